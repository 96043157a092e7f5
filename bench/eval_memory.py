"""Peak memory of ldm-eval's streaming FID/KID/PR path from 500 to 5,000 images (issue 18), against the old
all-in-RAM path. Each measurement runs in a fresh process (peak RSS is per process); the feature network is a
small random one (``--dim`` features), so what is measured is the pipeline, not Inception's weights.

    python bench/eval_memory.py --nums 500 5000 --size 256 --dim 2048 --modes fid all old
    python bench/eval_memory.py --json ...         # one JSON object (what tests/test_evaluate_fidelity.py reads)

Modes: ``fid`` — both sides streamed, running statistics only; ``all`` — also the feature matrices, KID (10
subsets) and precision/recall (``--prc-batch-size`` 1000); ``old`` — the previous ``ldm-eval fid``: every image
decoded into one float tensor first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_images(folder: Path, num: int, size: int) -> None:
    """Smooth random colour fields (PNG): cheap to write, realistic to decode."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")


def child(args) -> dict:
    import torch

    from trainer.evaluate.fidelity import POOL, extract, fid_from_stats, kid_from_features, prc_from_features
    from trainer.evaluate.sources import open_source
    from trainer.evaluate.testing import RandomFeatureNetwork

    torch.set_num_threads(args.threads)
    network = RandomFeatureNetwork(dim=args.dim)
    base = rss_mb()
    t0 = time.perf_counter()
    out: dict = {"mode": args.mode, "base_rss_mb": round(base, 1)}
    if args.mode == "old":
        from trainer.evaluate.cli import load_images, to_tensor

        feats = []
        for path in (args.folder, args.folder):
            x = to_tensor(load_images(path))  # the previous ldm-eval fid: all images, float32
            feats.append(torch.cat([network((b * 255).round().to(torch.uint8))[POOL] for b in x.split(64)]))
            del x
        a, b = (f.double().numpy() for f in feats)
        out["fid"] = fid_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        out["n"] = len(a)
    else:
        keep = {POOL} if args.mode == "all" else set()
        stats = []
        for _ in range(2):  # REAL and FAKE (the same folder here)
            src = open_source(args.folder)
            stats.append(extract(network, src.batches(64, 0), keep, src.count, progress=False)[POOL])
        real, fake = stats
        out["fid"] = fid_from_stats(fake.mean, fake.sigma, real.mean, real.sigma)
        out["n"] = fake.n
        if args.mode == "all":
            size = min(1000, fake.n)
            out["kid"] = kid_from_features(fake.features, real.features, 10, size)[0]
            out["precision"] = prc_from_features(fake.features, real.features, 3, 1000)["precision"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(peak_mb(), 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nums", type=int, nargs="+", default=[500, 5000])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--dim", type=int, default=2048, help="feature size (the FID Inception's is 2048)")
    p.add_argument("--modes", nargs="+", default=["fid", "all", "old"], choices=["fid", "all", "old"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_memory_") as tmp:
        full = Path(tmp) / f"n{max(args.nums)}"
        write_images(full, max(args.nums), args.size)
        files = sorted(full.iterdir())
        for mode in args.modes:
            for num in args.nums:
                folder = Path(tmp) / f"n{num}"
                if not folder.exists():
                    folder.mkdir()
                    for f in files[:num]:
                        os.link(f, folder / f.name)
                cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--mode", mode]
                cmd += ["--dim", str(args.dim), "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append({"num": num, **json.loads(res.stdout.strip().splitlines()[-1])})
                if not args.json:
                    r = rows[-1]
                    print(
                        f"{mode:4s} n={num:6d}: peak RSS {r['peak_rss_mb']:8.1f} MB "
                        f"(after start-up {r['base_rss_mb']:.1f}), {r['seconds']:.1f} s",
                        flush=True,
                    )
    growth = {}
    for mode in args.modes:
        peaks = {r["num"]: r["peak_rss_mb"] for r in rows if r["mode"] == mode}
        growth[mode] = round(peaks[max(args.nums)] - peaks[min(args.nums)], 1)
    result = {"size": args.size, "dim": args.dim, "rows": rows, "growth_mb": growth}
    if args.json:
        print(json.dumps(result))
    else:
        for mode, g in growth.items():
            print(f"{mode}: peak RSS growth {min(args.nums)} -> {max(args.nums)} images: {g:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
