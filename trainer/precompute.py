"""``ldm-precompute``: encode every image once with the frozen autoencoder into latent shards.

    ldm-precompute data.urls='data/train/{000000..000099}.tar' weights.autoencoder=runs/ae/export out=data/latents
    torchrun --nproc_per_node 8 -m trainer.precompute ...        # or srun: each rank owns whole input shards

One output shard per input shard, same name and keys; posterior mean and std in fp16/bf16 (training draws
fresh noise), optionally for the flipped image too, optionally the text encoder's tokens. Each output shard is
written under a temporary name and renamed when complete, then recorded in ``_manifest/<shard>.json``; a rerun
skips recorded shards, so a killed run resumes and ends with the same files as a clean run. The latent scale
factor (1 / std of posterior samples over the first ``scale_samples`` images) and the autoencoder's fingerprint
go into ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.errors import SampleError
from data_pipeline.latents import LATENT_EXT, MANIFEST, NULL_TEXT, pack
from data_pipeline.samples import ImageLimits, caption_text, decode_rgb
from data_pipeline.shards import AtomicShardWriter
from data_pipeline.tario import iter_shard
from data_pipeline.transforms import caption_lines, crop_resize, sample_rng
from data_pipeline.urls import expand_shards

from .build import ConfigError, fingerprint, load_autoencoder_weights
from .config import build, conf_dir
from .engine import distributed as D
from .train_config import ModelWeights, SlurmConfig

log = logging.getLogger("ldm.precompute")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PrecomputeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: Any = MISSING
    text_encoder: Any = None
    weights: ModelWeights = field(default_factory=ModelWeights)
    out: str = MISSING
    dtype: str = "fp16"  # fp16 | bf16
    flip: bool = False  # also store the latents of the horizontally flipped image
    store_text: bool = False  # also store the text encoder's tokens for every caption line
    batch_size: int = 16
    scale_samples: int = 1024
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    pause_after_shards: int = -1  # fault injection for tests: rank 0 pauses after this many shards
    run_name: str = "precompute"
    launcher: SlurmConfig = field(default_factory=SlurmConfig)  # used by ldm-submit


class _ShardImages(IterableDataset):
    """Workers decode whole shards; items come out per shard, in order, ending with a 'done' item."""

    def __init__(self, shards: list[tuple[int, str]], cfg: DataConfig, batch: int):
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
                items.append(
                    {
                        "key": raw.key,
                        "pixels": pixels,
                        "text": text,
                        "size": size,
                        "crop": crop,
                        "source": f"{Path(url).name}:{raw.key}",
                    }
                )
                if len(items) == self.batch:
                    yield {"shard": index, "items": items, "done": False}
                    items = []
            for err in errors:
                skipped[err.reason] = skipped.get(err.reason, 0) + 1
            yield {"shard": index, "items": items, "done": True, "skipped": skipped}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _images(items: list[dict], device: torch.device) -> torch.Tensor:
    """[-1, 1] batch in channels-last layout (the decoders' HWC buffers; faster convolutions)."""
    x = torch.stack([it["pixels"].permute(1, 2, 0) for it in items]).permute(0, 3, 1, 2)
    return x.to(device).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def scale_factor(cfg, autoencoder, shards: list[str], device: torch.device) -> float:
    """1 / std of posterior samples over the first ``scale_samples`` images (shards in name order)."""
    dataset = _ShardImages(list(enumerate(shards)), cfg.data, cfg.batch_size)
    g = torch.Generator(device).manual_seed(cfg.seed)
    total, sq, count = 0.0, 0.0, 0
    for chunk in dataset:
        if not chunk["items"]:
            continue
        z = autoencoder.encode_latents(_images(chunk["items"], device), sample=True, generator=g).double()
        total, sq, count = total + z.sum().item(), sq + z.pow(2).sum().item(), count + z.numel()
        if count >= cfg.scale_samples * z[0].numel():
            break
    if count == 0:
        raise RuntimeError("no valid image to estimate the latent scale factor from")
    mean = total / count
    return float(1.0 / ((sq / count - mean**2) ** 0.5))


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def precompute(cfg: DictConfig) -> int:
    env = D.detect()
    device = D.pick_device(cfg.device, env)
    D.init(env, device)
    out = Path(cfg.out)
    frag_dir = out / "_manifest"
    if env.is_main:
        frag_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()
    shards = expand_shards(cfg.data.urls, cfg.data.allow_pipe)
    autoencoder = build(cfg.autoencoder, "autoencoder").to(device).eval().requires_grad_(False)
    if cfg.weights.autoencoder:
        load_autoencoder_weights(autoencoder, cfg.weights.autoencoder)
    elif not cfg.weights.allow_random_autoencoder:
        raise ConfigError("weights.autoencoder is empty: precompute needs the trained autoencoder")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be fp16 or bf16, got {cfg.dtype!r}")
    text_encoder = None
    if cfg.store_text:
        if cfg.text_encoder is None:
            raise ConfigError("store_text=true needs a text_encoder")
        text_encoder = build(cfg.text_encoder, "text_encoder").to(device).eval()
    scale_file = frag_dir / "scale.json"
    if env.is_main and not scale_file.is_file():
        _atomic_json(scale_file, {"scale_factor": scale_factor(cfg, autoencoder, shards, device)})
    D.barrier()
    scale = json.loads(scale_file.read_text())["scale_factor"]
    todo = [
        (i, u)
        for i, u in enumerate(shards)
        if i % env.world_size == env.rank and not (frag_dir / f"{Path(u).name}.json").is_file()
    ]
    dtype = DTYPES[cfg.dtype]
    loader = DataLoader(
        _ShardImages(todo, cfg.data, cfg.batch_size),
        batch_size=None,
        num_workers=min(cfg.data.num_workers, len(todo)),
    )
    writers: dict[int, AtomicShardWriter] = {}
    counts: dict[int, int] = {}
    bar = tqdm(desc=f"precompute rank {env.rank}", unit="img", disable=not (cfg.progress and env.is_main))
    t0, images, done = None, 0, 0
    with torch.no_grad():
        for chunk in loader:
            t0 = t0 or time.perf_counter()  # throughput from the first decoded batch (not worker start-up)
            index = chunk["shard"]
            name = Path(shards[index]).name
            if index not in writers:
                writers[index], counts[index] = AtomicShardWriter(out / name), 0
            items = chunk["items"]
            if items:
                x = _images(items, device)
                variants = {"": x, "_flip": x.flip(-1)} if cfg.flip else {"": x}
                tensors: dict[str, torch.Tensor] = {}
                for suffix, imgs in variants.items():
                    post = autoencoder.encode(imgs)
                    tensors["mean" + suffix], tensors["std" + suffix] = (
                        post.mean.to(dtype),
                        post.std.to(dtype),
                    )
                for i, it in enumerate(items):
                    sample = {k: v[i].cpu() for k, v in tensors.items()}
                    if text_encoder is not None:
                        sample["text"] = (
                            text_encoder(caption_lines(it["text"]) or [""]).tokens.to(dtype).cpu()
                        )
                    writers[index].write(
                        {
                            "__key__": it["key"],
                            LATENT_EXT: pack(sample),
                            "txt": it["text"],
                            "json": {
                                "original_size": list(it["size"]),
                                "crop_top_left": list(it["crop"]),
                                "source": it["source"],
                                "resolution": cfg.data.resolution,
                            },
                        }
                    )
                counts[index] += len(items)
                images += len(items)
                bar.update(len(items))
                bar.set_postfix(img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.1f}")
            if chunk["done"]:
                writers.pop(index).close()
                _atomic_json(
                    frag_dir / f"{name}.json",
                    {
                        "shard": name,
                        "count": counts[index],
                        "skipped": chunk["skipped"],
                        "sha256": _sha256(out / name),
                    },
                )
                done += 1
                if done == cfg.pause_after_shards and env.is_main:
                    from .engine.guards import pause_forever

                    pause_forever(out, f"after {done} shards")
    bar.close()
    rate = images / max(time.perf_counter() - (t0 or time.perf_counter()), 1e-9)
    totals = D.all_reduce_sum([float(images), rate], device)
    D.barrier()
    if env.is_main:
        if text_encoder is not None:
            (out / NULL_TEXT).write_bytes(pack({"text": text_encoder([""]).tokens[0].to(dtype).cpu()}))
        frags = [json.loads((frag_dir / f"{Path(u).name}.json").read_text()) for u in shards]
        skipped: dict[str, int] = {}
        for f in frags:
            for k, v in f["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        manifest = {
            "format": "ldm-latents/1",
            "scale_factor": scale,
            "dtype": cfg.dtype,
            "flip": cfg.flip,
            "resolution": cfg.data.resolution,
            "text_tokens": cfg.store_text,
            "autoencoder": {
                "id": fingerprint(autoencoder),
                "weights": cfg.weights.autoencoder,
                "config": OmegaConf.to_container(cfg.autoencoder, resolve=True),
            },
            "latent_shape": [
                autoencoder.config.embed_dim,
                cfg.data.resolution // autoencoder.config.downsampling,
                cfg.data.resolution // autoencoder.config.downsampling,
            ],
            "shards": frags,
            "samples": sum(f["count"] for f in frags),
            "skipped": skipped,
        }
        _atomic_json(out / MANIFEST, manifest)
        print(
            f"precompute: {manifest['samples']} samples in {len(frags)} shards ({int(totals[0])} encoded now by "
            f"{env.world_size} ranks, {totals[1]:.1f} img/s), skipped {skipped or 'none'}, scale factor {scale:.5f}"
            f" -> {out}"
        )
    D.barrier()
    return 0


ConfigStore.instance().store(name="precompute_schema", node=PrecomputeConfig)
_exit_code = 0


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="precompute")
def _hydra_main(cfg: DictConfig) -> None:
    global _exit_code
    _exit_code = precompute(cfg)


def main() -> None:
    _hydra_main()
    sys.exit(_exit_code)


if __name__ == "__main__":
    main()
