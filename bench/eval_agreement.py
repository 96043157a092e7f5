"""ldm-eval fid/kid/prc/isc against torch-fidelity on the same two folders and the same weights file (issue 18).

    python bench/eval_agreement.py REAL FAKE --inception-weights weights-inception-2015-12-05-6726825d.pth
    python bench/eval_agreement.py --synthetic 200            # generated folders, random-init weights (no download)

Prints each metric from both sides and their relative difference. torch-fidelity runs with its own folder
loader, ``feature_extractor="inception-v3-compat"`` and the pool features for precision/recall too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = {
    "fid": "frechet_inception_distance",
    "kid": "kernel_inception_distance_mean",
    "kid_std": "kernel_inception_distance_std",
    "precision": "precision",
    "recall": "recall",
    "inception_score": "inception_score_mean",
}


def synthetic(root: Path, num: int) -> tuple[Path, Path, Path]:
    """real/ and fake/ (half degraded) from the synthetic shapes set, and random weights calibrated on real."""
    import torch

    from data_pipeline.synthetic import write_synthetic
    from data_pipeline.tario import iter_shard
    from trainer.evaluate.sources import open_source
    from trainer.evaluate.testing import write_random_fid_weights

    write_synthetic(str(root / "shards"), 2 * num, num, 64, seed=3, split="all", progress=False)
    rng = np.random.default_rng(0)
    for name, shard in zip(("real", "fake"), sorted((root / "shards").glob("*.tar")), strict=True):
        (root / name).mkdir()
        for i, s in enumerate(iter_shard(str(shard))):
            img = np.asarray(Image.open(io.BytesIO(s.files["jpg"])).convert("RGB"))
            if name == "fake" and i % 2:
                img = np.clip(img * 0.7 + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:05d}.png")
    calib = torch.stack(next(open_source(root / "real").batches(8)))
    return root / "real", root / "fake", write_random_fid_weights(root / "random.pth", calib)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("real", nargs="?")
    p.add_argument("fake", nargs="?")
    p.add_argument("--inception-weights")
    p.add_argument("--synthetic", type=int, default=0, help="images per generated set (instead of REAL FAKE)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch_fidelity

    from trainer.evaluate.cli import main as ldm_eval

    with tempfile.TemporaryDirectory(prefix="eval_agreement_") as tmp:
        if args.synthetic:
            real, fake, weights = synthetic(Path(tmp), args.synthetic)
        elif args.real and args.fake and args.inception_weights:
            real, fake, weights = Path(args.real), Path(args.fake), Path(args.inception_weights)
        else:
            p.error("give REAL FAKE --inception-weights W, or --synthetic N")
        n = min(len(list(real.iterdir())), len(list(fake.iterdir())))
        kid_size = min(args.kid_subset_size, n)
        t0 = time.perf_counter()
        out = io.StringIO()
        argv = ["fid", real, fake, "--inception-weights", weights, "--also", "kid", "--also", "prc"]
        argv += ["--also", "isc", "--device", args.device, "--batch-size", args.batch_size, "--workers", 0]
        argv += ["--kid-subset-size", kid_size, "--no-progress"]
        with contextlib.redirect_stdout(out):
            if ldm_eval([str(a) for a in argv]) != 0:
                return 1
        ours = json.loads(out.getvalue())
        t1 = time.perf_counter()
        theirs = torch_fidelity.calculate_metrics(
            input1=str(fake),
            input2=str(real),
            fid=True,
            kid=True,
            prc=True,
            isc=True,
            feature_extractor="inception-v3-compat",
            feature_layer_prc="2048",
            feature_extractor_weights_path=str(weights),
            kid_subset_size=kid_size,
            batch_size=args.batch_size,
            cuda=args.device.startswith("cuda"),
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )
        t2 = time.perf_counter()
    print(f"{ours['n_real']} real, {ours['n_fake']} fake images; KID subsets of {kid_size}")
    print(f"{'metric':16s} {'ldm-eval':>18s} {'torch-fidelity':>18s} {'rel. diff':>10s}")
    for ours_key, their_key in PAIRS.items():
        a, b = ours[ours_key], theirs[their_key]
        print(f"{ours_key:16s} {a:18.10g} {b:18.10g} {abs(a - b) / max(abs(b), 1e-12):10.1e}")
    print(f"time: ldm-eval {t1 - t0:.1f} s, torch-fidelity {t2 - t1:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
