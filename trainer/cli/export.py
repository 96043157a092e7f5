"""``ldm-export``: a training checkpoint -> what users load.

    ldm-export runs/demo_unet/checkpoints --out runs/demo_unet/export          # EMA weights, latest checkpoint
    ldm-export runs/x/checkpoints/step_00005000 --out export --raw             # the raw (non-EMA) weights

A UNet-stage checkpoint becomes our native format (``pipeline.json`` + safetensors: what ``ldm-sample`` reads)
and ``diffusers/`` (unet, vae, scheduler, model_index.json) for ``StableDiffusionPipeline.from_pretrained(...,
text_encoder=None, tokenizer=None)``; an autoencoder-stage checkpoint becomes ``autoencoder.safetensors`` +
``autoencoder.json`` (what ``weights.autoencoder`` takes) and ``diffusers/vae``. ZeRO shards are consolidated
with DeepSpeed's zero_to_fp32. See trainer/inference/export.py.
"""

from __future__ import annotations

import argparse
import sys

from ..inference.export import checkpoint_folder, export, uses_ema


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("checkpoint", help="a checkpoints folder (its latest) or one committed checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--no-diffusers", action="store_true")
    args = p.parse_args(argv)
    try:
        folder = checkpoint_folder(args.checkpoint)
        out = export(folder, args.out, ema=not args.raw, diffusers=not args.no_diffusers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ldm-export: {exc}", file=sys.stderr)
        return 2
    kind = (
        "EMA"
        if uses_ema(folder, not args.raw)
        else "raw (no EMA in the checkpoint)"
        if not args.raw
        else "raw"
    )
    print(f"exported {folder} ({kind} weights) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
