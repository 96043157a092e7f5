"""Encode every image once with the frozen autoencoder into latent shards (``ldm-precompute``).

    ldm-precompute data.urls='data/train/{000000..000099}.tar' weights.autoencoder=runs/ae/export out=data/latents
    torchrun --nproc_per_node 8 -m trainer.cli.precompute ...   # or srun: each rank owns whole input shards

One output shard per input shard, same name and keys; posterior mean and std in fp16/bf16 (training draws
fresh noise), optionally for the flipped image too, optionally the text encoder's tokens. The format (writer
and reader) is data_pipeline/latents.py. A rerun skips shards already recorded with the same settings, so a
killed run resumes and ends with the same files as a clean run. The latent scale factor is 1 / std of
posterior samples over the first ``scale_samples`` images.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.atomic import atomic_json, atomic_write
from data_pipeline.errors import SampleError
from data_pipeline.images import ImageShardsConfig
from data_pipeline.latents import RECORDS, LatentShardWriter, shard_record, write_manifest, write_null_text
from data_pipeline.loader import ignore_stop_signals, worker_cleanup_at_exit
from data_pipeline.lock import FolderLock
from data_pipeline.progress import progress
from data_pipeline.samples import ImageLimits, caption_text, decode_rgb
from data_pipeline.tario import iter_shard
from data_pipeline.transforms import caption_lines, crop_resize, sample_rng
from data_pipeline.urls import expand_shards, shard_name

from .config import ConfigError, build, config_dict, to_dataclass
from .engine import distributed as D
from .engine.guards import PREEMPTED_MARKER, StopSignal, pause_forever
from .models.autoencoder import Autoencoder, measure_scale_factor
from .models.text_encoders import ConditionEncoder
from .models.weights import fingerprint, load_autoencoder_weights

log = logging.getLogger("ldm.precompute")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _ShardImages(IterableDataset):
    """Workers decode whole shards; items come out per shard, in order, ending with a 'done' item."""

    def __init__(self, shards: list[tuple[int, str]], cfg: ImageShardsConfig, batch: int):
        self.shards, self.cfg, self.batch = shards, cfg, batch

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        limits = ImageLimits(self.cfg.min_size, self.cfg.max_pixels, self.cfg.max_aspect)
        rng = sample_rng(0, 0, "")
        for index, url in self.shards[wid::n]:
            errors: list = []
            skipped: dict[str, int] = {}
            items = []
            for raw in iter_shard(url, errors):
                try:
                    text = caption_text(raw, self.cfg.caption_key)
                    pixels, size = decode_rgb(raw, limits, self.cfg.resolution)
                    pixels, crop = crop_resize(pixels, self.cfg.resolution, "center", rng)
                except SampleError as exc:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                    continue
                items.append({"key": raw.key, "pixels": pixels, "text": text, "size": size, "crop": crop,
                              "source": f"{shard_name(url)}:{raw.key}"})  # fmt: skip
                if len(items) == self.batch:
                    yield {"shard": index, "items": items, "done": False}
                    items = []
            for err in errors:
                skipped[err.reason] = skipped.get(err.reason, 0) + 1
            yield {"shard": index, "items": items, "done": True, "skipped": skipped}


def needs_encoding(out: Path, name: str, settings: dict) -> bool:
    """True unless the shard was finished with these settings. A shard recorded with a ``remote_error`` (its
    input could not be read, or not to the end) is encoded again: a rerun retries what the network lost."""
    record = shard_record(out, name, settings)
    return record is None or bool(record["skipped"].get("remote_error"))


def _images(items: list[dict], device: torch.device) -> torch.Tensor:
    """[-1, 1] batch in channels-last layout (the decoders' HWC buffers; faster convolutions)."""
    x = torch.stack([it["pixels"].permute(1, 2, 0) for it in items]).permute(0, 3, 1, 2)
    return x.to(device).float().div_(127.5).sub_(1.0)


def scale_factor(cfg, autoencoder, shards: list[str], device: torch.device) -> float:
    """1 / std of posterior samples over the first ``scale_samples`` images (shards in name order)."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    chunks = _ShardImages(list(enumerate(shards)), cfg.data, cfg.batch_size)
    images = (_images(c["items"], device) for c in chunks if c["items"])
    return measure_scale_factor(autoencoder, images, cfg.scale_samples, g)


class Encoder:
    """The frozen models and the settings every output shard records."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.dtype, self.flip = DTYPES[cfg.dtype], cfg.flip
        self.autoencoder = (
            build(cfg.autoencoder, "autoencoder", Autoencoder).to(device).eval().requires_grad_(False)
        )
        if cfg.weights.autoencoder:
            load_autoencoder_weights(self.autoencoder, cfg.weights.autoencoder)
        elif not cfg.weights.allow_random_autoencoder:
            raise ConfigError("weights.autoencoder is empty: precompute needs the trained autoencoder")
        self.text_encoder = None
        if cfg.store_text:
            if cfg.text_encoder is None:
                raise ConfigError("store_text=true needs a text_encoder")
            self.text_encoder = build(cfg.text_encoder, "text_encoder", ConditionEncoder).to(device).eval()
        f = self.autoencoder.config.downsampling
        self.settings = {
            "autoencoder": fingerprint(self.autoencoder),
            "resolution": cfg.data.resolution,
            "latent_shape": [
                self.autoencoder.config.embed_dim,
                cfg.data.resolution // f,
                cfg.data.resolution // f,
            ],
            "dtype": cfg.dtype,
            "flip": cfg.flip,
            "text_tokens": cfg.store_text,
            "text_encoder": fingerprint(self.text_encoder) if self.text_encoder is not None else "",
            "caption_key": cfg.data.caption_key,
        }

    @torch.no_grad()
    def write(
        self, writer: LatentShardWriter, items: list[dict], resolution: int, device: torch.device
    ) -> None:
        x = _images(items, device)
        variants = {"": x, "_flip": x.flip(-1)} if self.flip else {"": x}
        tensors: dict[str, torch.Tensor] = {}
        for suffix, imgs in variants.items():
            post = self.autoencoder.encode(imgs)
            tensors["mean" + suffix], tensors["std" + suffix] = (
                post.mean.to(self.dtype),
                post.std.to(self.dtype),
            )
        for i, it in enumerate(items):
            sample = {k: v[i].cpu() for k, v in tensors.items()}
            if self.text_encoder is not None:
                lines = caption_lines(it["text"]) or [""]
                sample["text"] = self.text_encoder(lines).tokens.to(self.dtype).cpu()
            meta = {"original_size": list(it["size"]), "crop_top_left": list(it["crop"]), "source": it["source"],
                    "resolution": resolution}  # fmt: skip
            writer.write(it["key"], sample, it["text"], meta)


def _scale_settings(scale_file: Path) -> dict | None:
    """The settings a stored scale factor was measured with (None: none stored yet)."""
    return json.loads(scale_file.read_text()).get("settings") if scale_file.is_file() else None


def check_inputs(shards: list[str], out: Path) -> list[str]:
    """The output shard names; refuses inputs that would collide in ``out`` or be overwritten by it."""
    names = [shard_name(u) for u in shards]  # a remote URL's file name, without its query string
    seen: dict[str, str] = {}
    for url, name in zip(shards, names, strict=True):
        if name in seen:
            raise ConfigError(f"data.urls: {seen[name]} and {url} would both write {out / name}: rename one")
        seen[name] = url
    local = [Path(u).resolve().parent for u in shards if getattr(u, "kind", "path") == "path"]
    if out.resolve() in local:
        raise ConfigError(
            f"out={out} is a folder of the input shards: the latents would replace them; use another out"
        )
    return names


def check_config(cfg: DictConfig) -> None:
    """Refuse a config that cannot work, before any process group, model or file."""
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    for key in ("batch_size", "scale_samples", "data.resolution", "data.num_workers"):
        least = 0 if key == "data.num_workers" else 1
        if OmegaConf.select(cfg, key) < least:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be at least {least}")
    f = to_dataclass(cfg.autoencoder, "autoencoder", Autoencoder).downsampling
    if cfg.data.resolution % f:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not divisible by the autoencoder's f={f}"
        )
    if cfg.store_text and cfg.text_encoder is None:
        raise ConfigError("store_text=true needs a text_encoder")


def precompute(cfg: DictConfig) -> int:
    """Encode the shards of ``cfg.data`` into ``cfg.out`` on every rank of the job; returns the exit code.
    On a stop signal each rank discards the shards it had not finished, rank 0 leaves ``out/PREEMPTED`` and
    the job exits 0 (a rerun continues from the finished shards)."""
    check_config(cfg)
    env = D.detect()
    device = D.pick_device(cfg.device, env)
    D.init(env, device)
    out = Path(cfg.out)
    shards = expand_shards(cfg.data.urls, cfg.data.allow_pipe)
    names = check_inputs(shards, out)
    encoder = Encoder(cfg, device)
    lock = FolderLock(out, "ldm-precompute job") if env.is_main else None
    if env.is_main:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)
    D.barrier()
    stop = StopSignal()
    scale_file = out / RECORDS / "scale.json"
    if env.is_main and _scale_settings(scale_file) != encoder.settings:  # measured again for other settings
        scale = scale_factor(cfg, encoder.autoencoder, shards, device)
        atomic_json(scale_file, {"scale_factor": scale, "settings": encoder.settings})
    D.barrier()
    scale = json.loads(scale_file.read_text())["scale_factor"]
    todo = [(i, u) for i, u in enumerate(shards)
            if i % env.world_size == env.rank and needs_encoding(out, names[i], encoder.settings)]  # fmt: skip
    loader = DataLoader(_ShardImages(todo, cfg.data, cfg.batch_size), batch_size=None,
                        num_workers=min(cfg.data.num_workers, len(todo)), worker_init_fn=ignore_stop_signals)  # fmt: skip
    worker_cleanup_at_exit()
    writers: dict[int, LatentShardWriter] = {}
    bar = progress(total=len(todo), desc=f"precompute rank {env.rank}", unit="shard",
                   disable=not (cfg.progress and env.is_main))  # fmt: skip
    t0, images, done = None, 0, 0
    for chunk in loader:
        if stop.received is not None:
            break
        t0 = t0 or time.perf_counter()  # throughput from the first decoded batch (not worker start-up)
        index = chunk["shard"]
        if index not in writers:
            writers[index] = LatentShardWriter(out, names[index], encoder.settings)
        writer = writers[index]
        if chunk["items"]:
            encoder.write(writer, chunk["items"], cfg.data.resolution, device)
            images += len(chunk["items"])
            bar.set_postfix(img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.1f}", images=images)
        if chunk["done"]:
            writers.pop(index).close(chunk["skipped"])
            done += 1
            bar.update(1)
            if done == cfg.pause_after_shards and env.is_main:
                pause_forever(out, f"after {done} shards", stop)
    bar.close()
    for writer in writers.values():  # stopped mid-shard: the shard is discarded, a rerun encodes it again
        writer.abort()
    rate = images / max(time.perf_counter() - (t0 or time.perf_counter()), 1e-9)
    totals = D.all_reduce_sum([float(images), rate, float(stop.received is not None)], device)
    D.barrier()
    if totals[2] > 0:
        if env.is_main:
            atomic_write(out / PREEMPTED_MARKER, f"{done} shards finished by rank 0\n")
        print(f"precompute rank {env.rank}: stopped by a signal; finished shards are kept, rerun to continue")
        return 0
    if env.is_main:
        if encoder.text_encoder is not None:
            write_null_text(out, encoder.text_encoder([""]).tokens[0].to(encoder.dtype).cpu())
        extra = {
            "autoencoder": {
                "weights": cfg.weights.autoencoder,
                "config": config_dict(encoder.autoencoder.config),
            }
        }
        manifest = write_manifest(out, names, encoder.settings, scale, extra)
        print(f"precompute: {manifest['samples']} samples in {len(names)} shards ({int(totals[0])} encoded now by "
              f"{env.world_size} ranks, {totals[1]:.1f} img/s), skipped {manifest['skipped'] or 'none'}, "
              f"scale factor {scale:.5f} -> {out}")  # fmt: skip
    D.barrier()
    if lock is not None:
        lock.release()
    return 0
