"""Streaming loader throughput against bare PIL decoding of the same JPEGs, on one core, in one run.

    .venv/bin/python bench/data_loader.py [--num 2000] [--size 256] [--rounds 3]

Both sides run in this process pinned to one CPU (the loader with num_workers=0): the ratio says what the
loader's tar reading, checks, crop, caption handling and batching cost on top of the decode itself.
Rounds alternate the two sides; the median of each is reported.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.shards import AtomicShardWriter, shard_name
from data_pipeline.tario import iter_shard


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jpegs = make_shards(folder, args.num, args.size)
        assert sum(1 for p in folder.glob("*.tar") for _ in iter_shard(str(p))) == args.num
        kib = statistics.mean(len(j) for j in jpegs) / 1024
        print(f"{args.num} JPEGs {args.size}x{args.size}, mean {kib:.1f} KiB, one core, {args.rounds} rounds")
        configs = {
            f"center crop {args.size} (no resize)": (args.size, "center", False),
            f"random crop {args.size * 7 // 8} + flip (resize)": (args.size * 7 // 8, "random", True),
            f"center crop {args.size // 2} (JPEG draft decode)": (args.size // 2, "center", False),
        }
        bare: list[float] = []
        rates: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for name, (res, crop, flip) in configs.items():
                bare.append(bare_decode(jpegs))
                rates[name].append(full_loader(folder, args.num, res, crop, flip))
        b = statistics.median(bare)
        print(f"bare PIL decode: {b:8.0f} img/s")
        for name, r in rates.items():
            m = statistics.median(r)
            print(f"full loader, {name:40s}: {m:8.0f} img/s  ratio {m / b:.3f}")


if __name__ == "__main__":
    main()
