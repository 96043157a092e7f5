"""Autoencoder quality against training budget: every kept checkpoint of an ldm-demo autoencoder run, exported
and measured on the held-out photographs (PSNR/SSIM at 256 and 64 px) and on the held-out synthetic shapes
(what the adherence scorer reads from their reconstructions: the ceiling for the UNet).

    python bench/ae_budget.py runs/long     # a run made by: ldm-demo --out runs/long --ae-steps 3000 \
                                            #   --ae-override checkpoint.every=500 --ae-override checkpoint.keep_last=10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.demo.report import checkpoint_minutes, reconstruction_adherence  # noqa: E402
from trainer.engine.checkpoint import COMMITTED  # noqa: E402
from trainer.evaluate.cli import load_autoencoder, load_images, to_tensor  # noqa: E402
from trainer.evaluate.recon import reconstruction_metrics  # noqa: E402
from trainer.inference.export import export  # noqa: E402


def photo_psnr(model: torch.nn.Module, photos: Path, size: int) -> float:
    """Mean PSNR of the autoencoder's reconstructions of the photographs in a folder, center-cropped to ``size``."""
    x = to_tensor(load_images(photos, size))
    with torch.no_grad():
        return float(reconstruction_metrics(model, x, None)["psnr"].mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="an ldm-demo output folder")
    args = p.parse_args()
    run = args.run
    photos = run / "data/heldout_photos"
    ckpts = sorted(c for c in (run / "autoencoder/checkpoints").iterdir() if (c / COMMITTED).is_file())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in ckpts:
            out = export(ckpt, Path(tmp) / ckpt.name, ema=True, diffusers=False)
            ceiling = reconstruction_adherence(out, run / "data/heldout")
            model = load_autoencoder(out)
            row = {
                "checkpoint": ckpt.name,
                "minutes": round(checkpoint_minutes(run / "autoencoder", ckpt.name), 1),
                "psnr_photos_256": round(photo_psnr(model, photos, 256), 2),
                "psnr_photos_64": round(photo_psnr(model, photos, 64), 2),
                **{f"recon_{k}": round(ceiling[k], 3) for k in ("colour", "shape", "position", "all")},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| checkpoint | minutes | PSNR photos 256 px | PSNR 64 px | scorer on reconstructions: colour / shape |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['minutes']} | {r['psnr_photos_256']} dB | {r['psnr_photos_64']} dB | "
            f"{100 * r['recon_colour']:.0f}% / {100 * r['recon_shape']:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
