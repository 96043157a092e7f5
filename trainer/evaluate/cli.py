"""``ldm-eval``: metrics on generated images and autoencoders. Prints one JSON object.

    ldm-eval adherence runs/demo/samples                 # synthetic set: colour / shape / position accuracy
    ldm-eval recon runs/demo/ae_export photo1.png ...     # PSNR / SSIM (/ LPIPS with --lpips-backbone)
    ldm-eval fid REAL FAKE --inception-weights weights-inception-2015-12-05-6726825d.pth [--also kid --also prc]
    ldm-eval fid REAL FAKE --inception-weights W --ref-stats coco_val_256.npz   # writes the real statistics once
    ldm-eval prc FAKE --inception-weights W --ref-stats coco_val_256.npz        # ... and reuses them
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
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .fidelity import NETWORK as NETWORK_NAME
from .fidelity import WEIGHTS_FILE as WEIGHTS_NAME

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
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from trainer.config import build

    path = Path(path)
    meta_file = path / "autoencoder.json" if (path / "autoencoder.json").is_file() else path / "pipeline.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} holds neither autoencoder.json nor pipeline.json")
    meta = json.loads(meta_file.read_text())
    model = build(
        OmegaConf.create(meta["config"] if "config" in meta else meta["autoencoder"]), "autoencoder"
    )
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


def fidelity(args) -> dict:
    """fid / kid / prc (and isc) between REAL (or --ref-stats) and FAKE, streamed in batches."""
    from .fidelity import (
        LOGITS,
        POOL,
        FIDInception,
        extract,
        fid_from_stats,
        isc_from_logits,
        kid_from_features,
        prc_from_features,
    )
    from .reference import ReferenceStats, load_reference, save_reference
    from .sources import open_source

    metrics = list(dict.fromkeys([args.cmd, *args.also, *(["kid"] if args.kid else [])]))
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--kid-subset-size", args.kid_subset_size, 2),
        ("--kid-subsets", args.kid_subsets, 1),
        ("--prc-k", args.prc_k, 1),
        ("--prc-batch-size", args.prc_batch_size, 1),
        ("--size", args.size, 0),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    need_features = "kid" in metrics or "prc" in metrics
    ref_file = Path(args.ref_stats) if args.ref_stats else None
    reuse = ref_file is not None and ref_file.is_file()
    if args.real is None and not reuse:
        raise ValueError(f"give REAL, or --ref-stats with an existing file (got {args.ref_stats or 'none'})")
    fake_src = open_source(args.fake, args.size, args.recursive)
    real_src = None if reuse else open_source(args.real, args.size, args.recursive)
    network = FIDInception(
        args.inception_weights, args.device, (POOL, LOGITS) if "isc" in metrics else (POOL,)
    )
    progress = not args.no_progress

    def stats_of(src, keep, desc):
        batches = src.batches(args.batch_size, args.workers)
        return extract(network, batches, keep, src.count, f"ldm-eval {desc}", progress)

    if reuse:
        ref = load_reference(ref_file)
        if args.real is not None and ref.source and Path(args.real).resolve() != Path(ref.source):
            raise ValueError(f"--ref-stats {ref_file} was computed from {ref.source}, not {args.real}")
        ref.check_network(network.fingerprint)
        if need_features:  # fail before the long pass over FAKE
            ref.require_features(" and ".join(m for m in metrics if m in ("kid", "prc")))
    else:
        # the feature matrix is kept whenever the statistics are saved, so a later kid / prc can reuse them
        real = stats_of(real_src, {POOL} if need_features or ref_file else set(), "real")[POOL]
        ref = ReferenceStats(
            real.mean, real.sigma, real.n, real.features, network.fingerprint, str(real_src.path.resolve())
        )
        if ref_file is not None:
            ref.path = str(save_reference(ref_file, ref))
    fake_keep = ({POOL} if need_features else set()) | ({LOGITS} if "isc" in metrics else set())
    fake_all = stats_of(fake_src, fake_keep, "fake")
    fake = fake_all[POOL]
    out: dict = {"n_real": ref.n, "n_fake": fake.n, "network": network.fingerprint}
    if ref_file is not None:
        out["ref_stats"] = str(ref_file)
    if "fid" in metrics:
        out["fid"] = fid_from_stats(fake.mean, fake.sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        size = min(args.kid_subset_size, fake.n, ref.n)
        if size < args.kid_subset_size:
            print(
                f"ldm-eval: --kid-subset-size {args.kid_subset_size} > images; using {size}", file=sys.stderr
            )
        real_f = ref.require_features("kid")
        out["kid"], out["kid_std"] = kid_from_features(
            fake.features, real_f, args.kid_subsets, size, args.seed
        )
        out["kid_subset_size"] = size
    if "prc" in metrics:
        real_f = ref.require_features("precision/recall")
        out.update(prc_from_features(fake.features, real_f, args.prc_k, args.prc_batch_size, args.device))
        out["prc_k"] = args.prc_k
    if "isc" in metrics:
        out["inception_score"], out["inception_score_std"] = isc_from_logits(
            fake_all[LOGITS].features, seed=args.seed
        )
    return out


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
    for start in tqdm(
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


def _fidelity_parser(sub, name: str, help_: str) -> None:
    f = sub.add_parser(name, help=help_, description=f"{help_}. Prints one JSON object.")
    f.add_argument(
        "real", nargs="?", help="real images: a folder of images or of .tar shards (or --ref-stats)"
    )
    f.add_argument("fake", help="generated images: a folder of images or of .tar shards")
    f.add_argument(
        "--inception-weights",
        required=True,
        help=f"the FID Inception ({NETWORK_NAME}) state dict: torch-fidelity's {WEIGHTS_NAME}",
    )
    f.add_argument(
        "--ref-stats",
        default="",
        help="real-image statistics (.npz): read if the file exists (REAL may then be omitted), else written",
    )
    f.add_argument(
        "--also",
        action="append",
        default=[],
        choices=["fid", "kid", "prc", "isc"],
        help="more metrics, same pass",
    )
    f.add_argument("--kid", action="store_true", help="same as --also kid")
    f.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes"
    )
    f.add_argument("--size", type=int, default=0, help="resize + center-crop to SIZE first (0: as they are)")
    f.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    f.add_argument("--kid-subsets", type=int, default=100)
    f.add_argument("--kid-subset-size", type=int, default=1000)
    f.add_argument("--prc-k", type=int, default=3, help="precision/recall neighbourhood size")
    f.add_argument(
        "--prc-batch-size",
        type=int,
        default=1000,
        help="rows per distance block: memory ~40 B x rows x images",
    )
    f.add_argument(
        "--seed", type=int, default=2020, help="KID subsets and IS shuffle (torch-fidelity's default)"
    )
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=fidelity)


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
    _fidelity_parser(sub, "fid", "FID on the standard FID Inception (comparable with published numbers)")
    _fidelity_parser(sub, "kid", "KID (torch-fidelity's estimator) on the FID Inception")
    _fidelity_parser(sub, "prc", "precision/recall (Kynkäänniemi et al. 2019, k=3) on the FID Inception")
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
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"ldm-eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
