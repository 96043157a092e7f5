"""``ldm-eval``: metrics on generated images and autoencoders. Prints one JSON object.

    ldm-eval adherence runs/demo/samples                 # synthetic set: colour / shape / position accuracy
    ldm-eval recon runs/demo/ae_export photo1.png ...     # PSNR / SSIM (/ LPIPS with --lpips-backbone)
    ldm-eval fid REAL FAKE --inception-weights inception_v3_google-0cc3c7bd.pth [--kid]
    ldm-eval clip runs/x/samples --clip-model ViT-H-14 --clip-weights open_clip_vit_h14.bin

REAL / FAKE are folders of images or of tar shards; sample folders are those ``ldm-sample`` writes (their
``prompts.json`` says which prompt and seed made each image). Weights are read from paths, never downloaded.
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_images(source: str | Path, size: int = 0) -> list[np.ndarray]:
    """HxWx3 uint8 images from a folder of image files or of tar shards (center-cropped to ``size``)."""
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


def fid_kid(args) -> dict:
    from .fid import collect, fid, inception_features, kid

    features = inception_features(args.inception_weights)
    real, fake = (to_tensor(load_images(p, 299)) for p in (args.real, args.fake))
    fr, ff = (collect(features, x.split(64)) for x in (real, fake))
    out = {"fid": fid(fr, ff), "n_real": len(fr), "n_fake": len(ff)}
    if args.kid:
        out["kid"], out["kid_std"] = kid(fr, ff, subset_size=min(1000, len(fr), len(ff)))
    return out


def clip(args) -> dict:
    from .clip_score import clip_score, load_clip

    model, _, tokenizer = load_clip(args.clip_model, args.clip_weights)
    index = json.loads((Path(args.samples) / "prompts.json").read_text())
    images = to_tensor([np.asarray(Image.open(Path(args.samples) / r["file"]).convert("RGB")) for r in index])
    scores = clip_score(model, tokenizer, images, [r["prompt"] for r in index])
    return {"clip_score": float(scores.mean()), "n": len(index)}


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
    f = sub.add_parser("fid", help="FID (and KID) between two image sets")
    f.add_argument("real")
    f.add_argument("fake")
    f.add_argument("--inception-weights", required=True)
    f.add_argument("--kid", action="store_true")
    f.set_defaults(fn=fid_kid)
    c = sub.add_parser("clip", help="CLIP score of ldm-sample output")
    c.add_argument("samples")
    c.add_argument("--clip-model", default="ViT-B-32")
    c.add_argument("--clip-weights", required=True)
    c.set_defaults(fn=clip)
    args = p.parse_args(argv)
    try:
        result = args.fn(args)
    except FileNotFoundError as exc:
        print(f"ldm-eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
