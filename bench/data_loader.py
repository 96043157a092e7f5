"""Streaming loader throughput on one core, in one run: image shards against bare PIL decoding of the same
JPEGs, latent shards at Stable Diffusion sizes, and the start-up of a rank with 100,000 shard URLs.

    .venv/bin/python bench/data_loader.py [--sections images latents startup] [--num 2000] [--size 256]
        [--rounds 3] [--latent-rounds 5] [--latent-samples 20480] [--startup-trials 3]

images: both sides run in this process pinned to one CPU (the loader with num_workers=0): the ratio says what
the loader's tar reading, checks, crop, caption handling and batching cost on top of the decode itself.

latents: the latent-shard loader (num_workers=0, batch 256, shuffle buffer 1000, caption dropout 0.1) on
shards as ldm-precompute writes them: fp16 mean + std at 4x32x32 (256^2) and 4x64x64 (512^2), with and
without stored text embeddings (77x1024 fp16, one caption per sample). samples/s per core is measured in
this process's CPU time (the machine is shared: wall time would count other people's work), after a
gc.freeze() as every DataLoader worker does at start. Probes measured in the same rounds: the garbage
collector left as is, and the previous decode + collate (safetensors.load per sample, torch.stack,
a string-seeded random.Random).

startup: time from building the data source to the first batch of a rank, with the shipped latents config
(num_workers=2, batch 32, shuffle buffer 2000), when the URL pattern expands to 100,000 shards: local files
(hard links to real shards, so every name exists and is checked; manifest.json with 100,000 records as
ldm-precompute writes it) and http:// URLs served from localhost (no existence check; the manifest is
fetched). Median of the trials, wall clock.

Rounds alternate the configurations; the median of each is reported.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from webdataset.shardlists import expand_urls

from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.latents import (
    FORMAT,
    HEAD,
    MANIFEST,
    LatentDecoder,
    LatentShards,
    LatentShardsConfig,
    LatentShardWriter,
    read_manifest,
    write_manifest,
    write_null_text,
)
from data_pipeline.loader import StreamingLoader
from data_pipeline.samples import caption_text, metadata
from data_pipeline.shards import AtomicShardWriter, shard_name
from data_pipeline.tario import iter_shard
from data_pipeline.transforms import choose_caption
from data_pipeline.urls import expand_shards


def photo_like(size: int, rng: np.random.Generator) -> bytes:
    """A JPEG with smooth structure plus texture, about the byte size of a web photo at this size."""
    low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 9, size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, num: int, size: int, per_shard: int = 250) -> list[bytes]:
    rng = np.random.default_rng(0)
    jpegs = [photo_like(size, rng) for _ in range(num)]
    for s in range(0, num, per_shard):
        with AtomicShardWriter(folder / shard_name(s // per_shard)) as w:
            for i in range(s, min(num, s + per_shard)):
                w.write({"__key__": f"{i:08d}", "jpg": jpegs[i], "txt": f"a photo number {i}\nphoto {i}"})
    return jpegs


def bare_decode(jpegs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for data in jpegs:
        img = Image.open(io.BytesIO(data))
        img.load()
    return len(jpegs) / (time.perf_counter() - t0)


def full_loader(folder: Path, num: int, resolution: int, crop: str, hflip: bool, batch: int = 32) -> float:
    cfg = ImageShardsConfig(
        urls=str(folder),
        resolution=resolution,
        crop=crop,
        hflip=hflip,
        batch_size=batch,
        num_workers=0,
        shuffle_buffer=1000,
        caption_dropout=0.1,
    )
    loader = ImageShards(cfg).loader(0, 1)
    n = 0
    t0 = time.perf_counter()
    for b in itertools.islice(iter(loader), num // batch):
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t0)


# -- latent shards --------------------------------------------------------------------------------------------
LATENT_CONFIGS = {  # name -> (latent side, text embeddings stored)
    "4x32x32 (256^2)": (32, False),
    "4x32x32 (256^2) + text 77x1024": (32, True),
    "4x64x64 (512^2)": (64, False),
    "4x64x64 (512^2) + text 77x1024": (64, True),
}


def make_latent_shards(folder: Path, side: int, text: bool, num: int, per_shard: int = 500) -> None:
    """Latent shards exactly as ldm-precompute writes them (random values; the loader never looks at them)."""
    settings = {"autoencoder": "bench", "resolution": side * 8, "latent_shape": [4, side, side], "dtype": "fp16",
                "flip": False, "text_tokens": text, "text_encoder": "bench" if text else "", "caption_key": "txt"}  # fmt: skip
    g = torch.Generator().manual_seed(side)
    names = []
    for s in range(0, num, per_shard):
        names.append(f"{s // per_shard:06d}.tar")
        w = LatentShardWriter(folder, names[-1], settings)
        for i in range(s, min(num, s + per_shard)):
            t = {"mean": torch.randn(4, side, side, generator=g).half(), "std": torch.rand(4, side, side, generator=g).half()}  # fmt: skip
            if text:
                t["text"] = torch.randn(1, 77, 1024, generator=g).half()
            meta = {"original_size": [512, 683], "crop_top_left": [0, 85], "source": f"{names[-1]}:{i:09d}",
                    "resolution": side * 8}  # fmt: skip
            w.write(f"{i:09d}", t, f"a photo number {i} of something", meta)
        w.close({})
    if text:
        write_null_text(folder, torch.zeros(77, 1024).half())
    write_manifest(folder, names, settings, 0.18215, {})


class PreviousDecoder(LatentDecoder):
    """The decode + collate this loader had before issue 17 (for the probe): safetensors.load per sample,
    torch.stack per batch, a random.Random seeded with a string per sample."""

    def __call__(self, raw, epoch: int) -> dict:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{epoch}:{raw.key}")
        t = load_tensors(raw.files["latents.safetensors"])
        index, caption = choose_caption(caption_text(raw, cfg.caption_key), cfg.caption_choice, rng)
        dropped = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
        meta = metadata(raw)
        item = {"mean": t["mean"], "std": t["std"], "caption": "" if dropped else caption, "key": raw.key,
                "size": tuple(meta.get("original_size", (0, 0))), "crop": tuple(meta.get("crop_top_left", (0, 0)))}  # fmt: skip
        if "text" in t:
            item["text"] = self.null_text if dropped else t["text"][index]
        return item

    def collate(self, items: list[dict]) -> dict:
        batch = {"latent_mean": torch.stack([it["mean"] for it in items]),
                 "latent_std": torch.stack([it["std"] for it in items]),
                 "caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
                 "original_size": torch.tensor([it["size"] for it in items], dtype=torch.long),
                 "crop_top_left": torch.tensor([it["crop"] for it in items], dtype=torch.long)}  # fmt: skip
        if "text" in items[0]:
            batch["text_tokens"] = torch.stack([it["text"] for it in items])
        return batch


def latent_rate(
    folder: Path, samples: int, freeze: bool = True, previous: bool = False, batch: int = 256
) -> float:
    """Samples per CPU-second of the latent loader over ``samples`` samples (after one warm-up batch)."""
    resolution = json.loads((folder / MANIFEST).read_text())["settings"]["resolution"]
    cfg = LatentShardsConfig(urls=str(folder), resolution=resolution, batch_size=batch, num_workers=0,
                             shuffle_buffer=1000, caption_dropout=0.1)  # fmt: skip
    loader = LatentShards(cfg).loader(0, 1)
    if previous:
        decode = PreviousDecoder(cfg, loader.decode.null_text, loader.decode.latent)
        loader = StreamingLoader(cfg, decode, decode.collate, 0, 1, loader.shards)
    it = iter(loader)
    next(it)
    if freeze:
        gc.freeze()  # what each DataLoader worker does when it starts (data_pipeline/loader.py)
    t0, n = time.process_time(), 0
    for b in itertools.islice(it, samples // batch):
        n += b["latent_mean"].shape[0]
    rate = n / (time.process_time() - t0)
    gc.unfreeze()
    return rate


def latents_section(tmp: Path, rounds: int, samples: int) -> None:
    folders = {}
    for name, (side, text) in LATENT_CONFIGS.items():
        folders[name] = tmp / f"latents-{side}-{int(text)}"
        make_latent_shards(folders[name], side, text, 2000 if text else 4000)
    main = next(iter(LATENT_CONFIGS))
    probes = {"gc not frozen": {"freeze": False}, "previous decode + collate": {"previous": True}}
    rates: dict[str, list[float]] = {k: [] for k in [*LATENT_CONFIGS, *probes]}
    for _ in range(rounds):
        for name, (_, text) in LATENT_CONFIGS.items():
            rates[name].append(latent_rate(folders[name], samples // 4 if text else samples))
        for name, kw in probes.items():
            rates[name].append(latent_rate(folders[main], samples, **kw))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"latent loader, one core (CPU time), batch 256, {rounds} rounds; medians (min-max):")
    print(f"latent loader samples/s per core: {med[main]:.0f}   [{main}, no text embeddings; goal >= 20000]")
    for name in [*list(LATENT_CONFIGS)[1:], *probes]:
        ratio = f"  ratio to the first {med[name] / med[main]:.2f}"
        print(
            f"  {name:34s} {med[name]:8.0f} samples/s ({min(rates[name]):.0f}-{max(rates[name]):.0f}){ratio}"
        )


# -- start-up with 100,000 shard URLs ---------------------------------------------------------------------------
class _AnyShard(BaseHTTPRequestHandler):
    """Serves ``/<n>.tar`` as one of a few real shards, and the files beside them."""

    protocol_version = "HTTP/1.1"
    folder: Path
    shards: list[bytes]

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name.endswith(".tar") and name[:-4].isdigit():
            data = self.shards[int(name[:-4]) % len(self.shards)]
        elif (self.folder / name).is_file():
            data = (self.folder / name).read_bytes()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # a loader stopped after its first batch
            self.close_connection = True


def _serve(folder: Path, sources: list[Path], port) -> None:
    """Run in its own process (a server thread here would compete with the rank for the GIL)."""
    _AnyShard.folder, _AnyShard.shards = folder, [p.read_bytes() for p in sources]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnyShard)
    server.handle_error = lambda *a: None
    port.send(server.server_address[1])
    server.serve_forever()


def big_set(src: Path, folder: Path, n: int) -> None:
    """``n`` names (hard links to the shards of ``src``) and a manifest with ``n`` records, as write_manifest
    writes it (built in memory: the 100,000 per-shard record files it would read are not the point here)."""
    sources = sorted(src.glob("*.tar"))
    for i in range(n):
        os.link(sources[i % len(sources)], folder / f"{i:06d}.tar")  # (a file has at most ~65,000 links)
    manifest = json.loads((src / MANIFEST).read_text())
    record = manifest["shards"][0]
    manifest["shards"] = [dict(record, shard=f"{i:06d}.tar") for i in range(n)]
    assert manifest["format"] == FORMAT
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def first_batch(urls: str) -> tuple[float, float]:
    """Wall seconds to build the source and loader, and then to the first batch."""
    cfg = LatentShardsConfig(urls=urls, resolution=256, batch_size=32, num_workers=2, shuffle_buffer=2000)
    t0 = time.perf_counter()
    loader = LatentShards(cfg).loader(0, 1)
    t1 = time.perf_counter()
    it = iter(loader)
    next(it)
    t2 = time.perf_counter()
    del it
    return t1 - t0, t2 - t1


def startup_section(tmp: Path, trials: int, n: int = 100_000) -> None:
    src = tmp / "startup-src"
    make_latent_shards(src, 32, False, 8 * 500)
    big = tmp / "startup-100k"
    big.mkdir()
    big_set(src, big, n)
    here, there = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(big, sorted(src.glob("*.tar")), there), daemon=True)
    server.start()
    pattern = f"{{{0:06d}..{n - 1:06d}}}.tar"
    sets = {"local files": f"{big}/{pattern}", "http:// on localhost": f"http://127.0.0.1:{here.recv()}/{pattern}"}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sets}
    for _ in range(trials):
        for name, urls in sets.items():
            times[name].append(first_batch(urls))
    server.terminate()
    probes = startup_probes(big, f"{big}/{pattern}", trials)
    print(f"start-up of a rank, {n} shard URLs, latents config (2 workers, batch 32, shuffle buffer 2000), "
          f"median of {trials}:")  # fmt: skip
    for i, (name, t) in enumerate(times.items()):
        total = statistics.median(a + b for a, b in t)
        build, first = statistics.median(a for a, _ in t), statistics.median(b for _, b in t)
        head = f"startup with {n:,} shard URLs: {total:.2f} s" if i == 0 else f"  {name}: {total:.2f} s"
        print(f"{head}   [{name}: source + loader {build:.2f} s, first batch {first:.2f} s; goal <= 2 s]")
    print("  parts and probes (local files, median, wall):")
    for name, t in probes.items():
        print(f"    {name:62s} {statistics.median(t):6.2f} s")


def startup_probes(big: Path, urls: str, trials: int) -> dict[str, list[float]]:
    """The two start-up costs that grow with the shard count, each beside what it replaced."""
    manifest = json.loads((big / MANIFEST).read_text())
    manifest["shards"] = [dict(r, settings=manifest["settings"]) for r in manifest["shards"]]
    previous = big.parent / "previous-manifest.json"  # records with their settings, as before issue 17
    previous.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def old_expand():  # before: braceexpand, then a Path and a stat per name
        return [
            str(Path(u).expanduser()) for u in expand_urls(urls) if os.path.isfile(str(Path(u).expanduser()))
        ]

    parts = {
        "expand_shards (one listing, bulk check)": lambda: expand_shards(urls),
        "probe: braceexpand + Path + stat per name (before)": old_expand,
        "read_manifest, members up to settings (adopted)": lambda: read_manifest(big, HEAD),
        "probe: the whole manifest parsed": lambda: json.loads((big / MANIFEST).read_text()),
        "probe: the whole manifest, records with their settings (before)": lambda: json.loads(
            previous.read_text()
        ),
    }
    out: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(trials):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


# -- images ----------------------------------------------------------------------------------------------------
def images_section(tmp: Path, num: int, size: int, rounds: int) -> None:
    folder = tmp / "images"
    jpegs = make_shards(folder, num, size)
    assert sum(1 for p in folder.glob("*.tar") for _ in iter_shard(str(p))) == num
    kib = statistics.mean(len(j) for j in jpegs) / 1024
    print(f"{num} JPEGs {size}x{size}, mean {kib:.1f} KiB, one core, {rounds} rounds")
    configs = {
        f"center crop {size} (no resize)": (size, "center", False),
        f"random crop {size * 7 // 8} + flip (resize)": (size * 7 // 8, "random", True),
        f"center crop {size // 2} (JPEG draft decode)": (size // 2, "center", False),
    }
    bare: list[float] = []
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (res, crop, flip) in configs.items():
            bare.append(bare_decode(jpegs))
            rates[name].append(full_loader(folder, num, res, crop, flip))
    b = statistics.median(bare)
    print(f"bare PIL decode: {b:8.0f} img/s")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"full loader, {name:40s}: {m:8.0f} img/s  ratio {m / b:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["images", "latents", "startup"],
                   choices=["images", "latents", "startup"])  # fmt: skip
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latent-rounds", type=int, default=5)
    p.add_argument("--latent-samples", type=int, default=20480)
    p.add_argument("--startup-trials", type=int, default=3)
    args = p.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if "images" in args.sections:
            images_section(Path(tmp), args.num, args.size, args.rounds)
        if "latents" in args.sections:
            latents_section(Path(tmp), args.latent_rounds, args.latent_samples)
        if "startup" in args.sections:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # a rank's workers use the node's cores
            startup_section(Path(tmp), args.startup_trials)


if __name__ == "__main__":
    main()
