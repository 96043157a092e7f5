"""``ldm-export``: a training checkpoint -> what users load.

    ldm-export runs/demo_unet/checkpoints --out runs/demo_unet/export          # EMA weights, latest checkpoint
    ldm-export runs/x/checkpoints/step_00005000 --out export --raw             # the raw (non-EMA) weights
    ldm-export runs/x/checkpoints --out export --format single_file            # one CompVis-layout .safetensors
    ldm-export runs/x/export --out runs/x/export --format diffusers            # convert a native export

A UNet-stage checkpoint (or a native export) is written in each ``--format`` asked for (repeatable; default:
native and diffusers):

* ``native`` — ``pipeline.json`` + safetensors in OUT: what ``ldm-sample``, ``ldm-eval`` and ``weights.*`` read;
* ``diffusers`` — ``OUT/diffusers/``: unet, vae, scheduler and, for an OpenCLIP text tower, text_encoder
  (transformers CLIPTextModel) and tokenizer, so ``StableDiffusionPipeline.from_pretrained(OUT/diffusers)``
  needs no extra argument;
* ``single_file`` — ``OUT/single_file/model.safetensors`` (CompVis keys: model.diffusion_model.*,
  first_stage_model.*, cond_stage_model.*) and ``OUT/single_file/config/`` for diffusers' ``from_single_file(...,
  config=...)``, which then downloads nothing.

An autoencoder-stage checkpoint becomes ``autoencoder.safetensors`` + ``autoencoder.json`` (what
``weights.autoencoder`` takes) and ``diffusers/vae``. ZeRO shards are consolidated with DeepSpeed's zero_to_fp32.
See trainer/inference/export.py and formats.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..inference.export import FORMATS, checkpoint_folder, export, uses_ema


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "checkpoint", help="a checkpoints folder (its latest), one committed checkpoint, or a native export"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument(
        "--format", action="append", choices=FORMATS, help="repeatable; default: native and diffusers"
    )
    p.add_argument("--no-diffusers", action="store_true", help="the native format only (= --format native)")
    args = p.parse_args(argv)
    formats = frozenset(args.format or (["native"] if args.no_diffusers else ["native", "diffusers"]))
    source = Path(args.checkpoint)
    try:
        if (source / "pipeline.json").is_file():
            out = export(source, args.out, formats=formats)
            print(f"exported {source} ({', '.join(sorted(formats))}) to {out}")
            return 0
        folder = checkpoint_folder(source)
        out = export(folder, args.out, ema=not args.raw, formats=formats)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ldm-export: {exc}", file=sys.stderr)
        return 2
    kind = "raw" if args.raw else "EMA" if uses_ema(folder, True) else "raw (no EMA in the checkpoint)"
    print(f"exported {folder} ({kind} weights; {', '.join(sorted(formats))}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
