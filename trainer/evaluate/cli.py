"""``ldm-eval``: metrics on generated images and autoencoders. Prints one JSON object.

    ldm-eval adherence runs/demo/samples                 # synthetic set: colour / shape / position accuracy
    ldm-eval recon runs/demo/ae_export photo1.png ...     # PSNR / SSIM (/ LPIPS with --lpips-backbone)
    ldm-eval fid REAL FAKE --inception-weights weights-inception-2015-12-05-6726825d.pth [--also kid --also prc]
    ldm-eval fid REAL FAKE --inception-weights W --ref-stats coco_val_256.npz   # writes the real statistics once
    ldm-eval prc FAKE --inception-weights W --ref-stats coco_val_256.npz        # ... and reuses them
    ldm-eval ref-stats REAL --ref-stats coco_val_256.npz --inception-weights W --size 256   # or precomputes them
    ldm-eval kid REAL FAKE --inception-weights W --device cuda --batch-size 128
    ldm-eval clip runs/x/samples --clip-model ViT-H-14 --clip-weights open_clip_vit_h14.bin

fid / kid / prc run the standard FID Inception (pt_inception-2015-12-05, torch-fidelity's port; numbers are
comparable with published ones) and stream the images in batches. REAL / FAKE are folders of images or of tar
shards; sample folders are those ``ldm-sample`` writes (their ``prompts.json`` says which prompt and seed made
each image). Weights are read from paths, never downloaded. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.progress import progress

from .fidelity_cli import add_fidelity_parsers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_images(source: str | Path, size: int = 0) -> list[np.ndarray]:
    """HxWx3 uint8 images from a folder of image files or of tar shards (center-cropped to ``size``), all in
    memory: for small sets (reports, benches); the metrics stream with :mod:`.sources` instead."""
    source = Path(source)
    arrays = []
    if any(source.glob("*.tar")):
        from data_pipeline.tario import iter_shard

        for shard in sorted(source.glob("*.tar")):
            for s in iter_shard(str(shard)):
                data = next((s.files[e] for e in ("jpg", "jpeg", "png", "webp") if e in s.files), None)
                if data:
                    arrays.append(Image.open(io.BytesIO(data)).convert("RGB"))
    else:
        arrays = [
            Image.open(p).convert("RGB")
            for p in sorted(source.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png"
        ]
    return [np.asarray(center_crop(im, size) if size else im) for im in arrays]


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def load_autoencoder(path: str | Path):
    """Our autoencoder export (autoencoder.safetensors + autoencoder.json) or a pipeline export."""
    from safetensors.torch import load_file

    from trainer.config import build
    from trainer.models.autoencoder import Autoencoder

    path = Path(path)
    meta_file = path / "autoencoder.json" if (path / "autoencoder.json").is_file() else path / "pipeline.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} holds neither autoencoder.json nor pipeline.json")
    meta = json.loads(meta_file.read_text())
    node = meta["config"] if "config" in meta else meta["autoencoder"]
    model = build(node, f"{meta_file}:autoencoder", Autoencoder)
    model.load_state_dict(load_file(str(path / "autoencoder.safetensors")), strict=True)
    return model.eval()


def adherence(args) -> dict:
    from .adherence import score

    index = json.loads((Path(args.samples) / "prompts.json").read_text())
    images = [np.asarray(Image.open(Path(args.samples) / row["file"]).convert("RGB")) for row in index]
    return score(images, [row["prompt"] for row in index])


def recon(args) -> dict:
    from .recon import reconstruction_metrics

    model = load_autoencoder(args.autoencoder)
    lpips_model = None
    if args.lpips_backbone:
        from trainer.models.ae_loss import AutoencoderLossConfig, build_lpips

        lpips_model = build_lpips(AutoencoderLossConfig(lpips_backbone_path=args.lpips_backbone))
    rows = {}
    for name in args.images:
        img = Image.open(name).convert("RGB")
        x = to_tensor([np.asarray(center_crop(img, args.size))])
        m = reconstruction_metrics(model, x, lpips_model)
        rows[Path(name).stem] = {k: float(v[0]) for k, v in m.items()}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    return {"size": args.size, "images": rows, "mean": mean}


def clip(args) -> dict:
    """Mean CLIP score of ldm-sample folders (their prompts.json), streamed in batches."""
    from .clip_score import clip_score, load_clip
    from .sources import stack_runs

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, _, tokenizer = load_clip(args.clip_model, args.clip_weights, args.device)
    rows = []
    for folder in map(Path, args.samples):
        index_file = folder / "prompts.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} does not exist (a folder written by ldm-sample)")
        rows += [(folder / r["file"], r["prompt"]) for r in json.loads(index_file.read_text())]
    total, n = 0.0, 0
    for start in progress(
        range(0, len(rows), args.batch_size), desc="ldm-eval clip", unit="batch", disable=args.no_progress
    ):
        chunk = rows[start : start + args.batch_size]
        images = [
            torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in chunk
        ]
        pos = 0
        for batch in stack_runs(images):
            prompts = [prompt for _, prompt in chunk[pos : pos + len(batch)]]
            total += float(clip_score(model, tokenizer, batch.float() / 255, prompts).double().sum())
            n, pos = n + len(batch), pos + len(batch)
    return {"clip_score": total / max(n, 1), "n": n, "clip_model": args.clip_model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("adherence", help="synthetic-set prompt adherence of ldm-sample output")
    a.add_argument("samples")
    a.set_defaults(fn=adherence)
    r = sub.add_parser("recon", help="autoencoder reconstruction PSNR / SSIM / LPIPS")
    r.add_argument("autoencoder")
    r.add_argument("images", nargs="+")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--lpips-backbone", default="")
    r.set_defaults(fn=recon)
    add_fidelity_parsers(sub)
    c = sub.add_parser("clip", help="CLIP score of ldm-sample output (OpenCLIP weights from a file)")
    c.add_argument("samples", nargs="+", help="folders written by ldm-sample")
    c.add_argument("--clip-model", default="ViT-B-32")
    c.add_argument("--clip-weights", required=True)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=clip)
    args = p.parse_args(argv)
    try:
        result = args.fn(args)
    except (FileNotFoundError, ValueError, ImportError, Image.DecompressionBombError) as exc:
        print(f"ldm-eval: {exc}", file=sys.stderr)  # a decompression bomb: PIL's own limit stays on
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
