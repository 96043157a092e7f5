"""``ldm-sample``: generate images from a trained model.

    ldm-sample runs/demo/export --prompt "a red circle in the top left" --num 4 --steps 50 --guidance 3
    ldm-sample CKPT --prompts-file prompts.txt --out samples/ --sampler dpmpp_2m --steps 20 --batch-size 8
    ldm-sample CKPT --prompt "..." --init-image in.png --strength 0.6          # image-to-image
    ldm-sample CKPT --prompt "..." --init-image in.png --mask mask.png          # inpainting (white = repaint)
    ldm-sample CKPT --prompt "" --low-res small.png --height 64 --width 64      # super-resolution (unconditional)
    ldm-sample CKPT --prompt "" --segmentation seg.png --height 64 --width 64   # semantic synthesis
    ldm-sample CKPT --prompt 7 --num 4                                         # class-conditional: a class id
    ldm-sample CKPT --prompt '[[7, 0.1, 0.1, 0.45, 0.45]]'                     # layout: [class, x0, y0, x1, y1]

CKPT is a native export (``ldm-export``) or a training checkpoint folder. A prompt is whatever the model's
condition encoder parses (a caption, a class id, a layout as JSON; unconditional models ignore it). Image i of
prompt p gets seed ``seed + p * num + i``, so an image depends on its seed only, not on the batch it ran in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_pipeline.args import OneLineParser, int_at_least
from data_pipeline.atomic import atomic_save, atomic_write
from data_pipeline.progress import progress

from ..inference.images import grid_image, load_image, load_label_map, save_images
from ..inference.pipeline import GenerateOptions, load_pipeline


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("ldm-sample: give --prompt (repeatable) or --prompts-file")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ldm-sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="samples")
    p.add_argument("--num", type=int_at_least(1), default=1, help="images per prompt")
    p.add_argument("--steps", type=int_at_least(1), default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp_2m"])
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int_at_least(0, " (0: the model's size)"), default=0)
    p.add_argument("--width", type=int_at_least(0, " (0: the model's size)"), default=0)
    p.add_argument("--batch-size", type=int_at_least(1), default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--init-image", help="image-to-image / inpainting source")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--mask", help="inpainting mask (white = repaint)")
    p.add_argument("--low-res", help="low-resolution input of a super-resolution model")
    p.add_argument(
        "--segmentation", help="segmentation map (one-channel PNG of class ids) of a semantic model"
    )
    p.add_argument("--raw", action="store_true", help="training checkpoints: use raw weights, not the EMA")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    pipe = load_pipeline(args.checkpoint, args.device, ema=not args.raw)
    pipe.to(args.device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    jobs = [(p, args.seed + pi * args.num + i) for pi, p in enumerate(prompts) for i in range(args.num)]
    f = pipe.autoencoder.config.downsampling
    size = (args.height or pipe.unet.config.sample_size * f, args.width or pipe.unet.config.sample_size * f)
    multiple = f * pipe.unet.config.downsampling
    for flag, value in (("--height", size[0]), ("--width", size[1])):
        if value % multiple:
            raise SystemExit(f"ldm-sample: {flag} {value} is not a multiple of {multiple} (this model's f={f} "
                             f"times its UNet's downsampling {pipe.unet.config.downsampling})")  # fmt: skip
    extra = {}
    if args.init_image:
        extra["init_image"] = load_image(args.init_image, size) * 2 - 1
    if args.mask:
        extra["mask"] = load_image(args.mask, size, mode="L")
    if args.low_res:
        extra["low_res"] = load_image(args.low_res) * 2 - 1
    if args.segmentation:
        extra["segmentation"] = load_label_map(args.segmentation)
    out = Path(args.out)
    images, names = [], []
    for start in progress(range(0, len(jobs), args.batch_size), desc="ldm-sample", unit="batch"):
        batch = jobs[start : start + args.batch_size]
        opts = GenerateOptions(
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            eta=args.eta,
            spacing=args.spacing,
            height=size[0],
            width=size[1],
            seeds=[s for _, s in batch],
            negative_prompt=args.negative_prompt,
            strength=args.strength,
        )
        kw = {k: v.expand(len(batch), -1, -1, -1) for k, v in extra.items()}
        imgs = pipe.generate([p for p, _ in batch], opts, **kw)
        batch_names = [f"{start + i:04d}-seed{s}.png" for i, (_, s) in enumerate(batch)]
        save_images(imgs, out, batch_names)
        images.append(imgs.cpu())
        names += batch_names
    grid = grid_image(torch.cat(images), nrow=args.num if args.num > 1 else None)
    atomic_save(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    atomic_write(
        out / "prompts.json",
        json.dumps(
            [{"file": n, "prompt": p, "seed": s} for n, (p, s) in zip(names, jobs, strict=True)], indent=1
        ),
    )
    print(f"wrote {len(names)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
