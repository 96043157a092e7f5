"""The demo report's figures: loss curves (moving average over the raw values), accuracy against training time,
reconstructions beside their originals, and the final samples labelled with the scorer's verdict per image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

GOALS = {"colour": 0.95, "shape": 0.90, "position": 0.90, "all": 0.85, "psnr_photos": 22.0, "total_min": 20.0}
ATTRS = ("colour", "shape", "position")


def read_metrics(run_dir: Path) -> tuple[float, list[dict]]:
    """(start time, step rows) of a run's metrics.jsonl (the last start event: resumed runs count from it)."""
    start, rows = 0.0, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "start" and not start:
            start = row["time"]
        elif "step" in row and "loss" in row:
            rows.append(row)
    return start, rows


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def smooth(values: list[float], span: float = 0.1) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) over ~``span`` of the points."""
    beta = 1 - 1 / max(1.0, span * len(values))
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def plot_losses(out: Path) -> Path:
    """Each stage's training loss: the logged values faint, their moving average on top."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    titles = {"autoencoder": "autoencoder: pixel loss (ae/rec_loss)", "unet": "UNet: diffusion loss"}
    for ax, name in zip(axes, ("autoencoder", "unet"), strict=True):
        _, rows = read_metrics(out / name)
        key = "ae/rec_loss" if name == "autoencoder" else "loss"
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, color="C0", alpha=0.25, lw=0.8, label="logged")
            ax.plot(steps, smooth(list(values)), color="C0", lw=2, label="moving average")
            ax.legend(loc="upper right")
        ax.set(title=titles[name], xlabel="step", yscale="log")
        ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "loss_curves.png")


def plot_accuracy(out: Path, curve: list[dict]) -> Path:
    """Held-out prompt accuracy of the sampled checkpoints against UNet training time, with each goal."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    minutes = [c["minutes"] for c in curve]
    for i, key in enumerate((*ATTRS, "all")):
        ax.plot(
            minutes,
            [c[key] for c in curve],
            marker="o",
            label=f"{key} (goal {GOALS[key]:.0%})",
            color=f"C{i}",
        )
        ax.axhline(GOALS[key], ls=":", lw=1, color=f"C{i}")
    ax.set(xlabel="UNet training time (min, 2 CPU cores)", ylabel="held-out prompt accuracy", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_curve.png")


def _show(ax, img: torch.Tensor, title: str, fontsize: int) -> None:
    from ..inference.images import to_uint8

    ax.imshow(to_uint8(img[None])[0])
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def reconstruction_grid(out: Path, photos: list[str], shapes: int = 6) -> Path:
    """Each held-out photograph (256 px) beside its reconstruction through the demo autoencoder, with its PSNR,
    then held-out shape images (64 px) beside theirs, with what the adherence scorer reads from them."""
    from ..evaluate.adherence import read_image
    from ..evaluate.cli import center_crop, load_autoencoder, to_tensor
    from ..evaluate.recon import psnr, reconstruct
    from ..inference.images import to_uint8

    model = load_autoencoder(out / "autoencoder/export")
    x = to_tensor([np.asarray(center_crop(Image.open(p).convert("RGB"), 256)) for p in photos])
    rec = reconstruct(model, x)
    gt, prompts = heldout_images(out / "data/heldout")
    sx = to_tensor(gt[:: max(1, len(prompts) // shapes)][:shapes])
    srec = reconstruct(model, sx)
    cols = max(len(photos), 1)
    fig = plt.figure(figsize=(3.2 * cols, 5.4))
    grid = fig.add_gridspec(2, 1, height_ratios=[1.75, 1])
    top = grid[0].subgridspec(1, cols)
    for i, path in enumerate(photos):
        pair = top[i].subgridspec(1, 2, wspace=0.03)
        db = float(psnr(x[i : i + 1], rec[i : i + 1]))
        _show(fig.add_subplot(pair[0]), x[i], f"{Path(path).stem}: original", 8)
        _show(fig.add_subplot(pair[1]), rec[i], f"reconstruction\n{db:.1f} dB", 8)
    bottom = grid[1].subgridspec(1, max(len(sx), 1))
    for i in range(len(sx)):
        pair = bottom[i].subgridspec(1, 2, wspace=0.03)
        got = read_image(to_uint8(srec[i : i + 1])[0])
        _show(fig.add_subplot(pair[0]), sx[i], "original", 7)
        _show(fig.add_subplot(pair[1]), srec[i], f"read: {got.colour}\n{got.shape}", 7)
    fig.suptitle(
        "Held-out photographs (256 px) and shapes (64 px): originals beside reconstructions", fontsize=10
    )
    return _save(fig, out / "reconstructions.png")


def heldout_images(shards: Path) -> tuple[list[np.ndarray], list[str]]:
    """The held-out ground-truth shape images (HxWx3 uint8) and their captions."""
    from data_pipeline.tario import iter_shard

    images, prompts = [], []
    for shard in sorted(shards.glob("*.tar")):
        for s in iter_shard(str(shard)):
            images.append(np.asarray(Image.open(io.BytesIO(s.files["jpg"])).convert("RGB")))
            prompts.append(s.files["txt"].decode())
    return images, prompts


def verdicts(samples: Path) -> list[dict]:
    """Per image of an ``ldm-sample`` folder: its prompt, seed and what the scorer reads against what was asked."""
    from ..evaluate.adherence import parse_prompt, read_image

    rows = []
    for row in json.loads((samples / "prompts.json").read_text()):
        got = read_image(np.asarray(Image.open(samples / row["file"]).convert("RGB")))
        read = {"colour": got.colour, "shape": got.shape, "position": got.position}
        want = parse_prompt(row["prompt"])
        rows.append({**row, "read": read, **{a: read[a] == w for a, w in zip(ATTRS, want, strict=True)}})
    return rows


def labelled_grid(out: Path, samples: Path, rows: list[dict]) -> Path:
    """The final samples, one row per prompt, each image marked with the scorer's verdict per attribute."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    per = max(sum(r["prompt"] == p for r in rows) for p in prompts)
    fig, axes = plt.subplots(
        len(prompts), per, figsize=(1.25 * per + 2.6, 1.45 * len(prompts)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for pi, prompt in enumerate(prompts):
        axes[pi][0].text(-0.08, 0.5, prompt.removeprefix("a "), transform=axes[pi][0].transAxes, ha="right",
                         va="center", fontsize=8)  # fmt: skip
        for i, r in enumerate(r for r in rows if r["prompt"] == prompt):
            ax = axes[pi][i]
            ax.imshow(Image.open(samples / r["file"]).convert("RGB"))
            marks = " ".join(f"{a[0].upper()}{'✓' if r[a] else '✗'}" for a in ATTRS)
            ax.set_title(marks, fontsize=7, color="green" if all(r[a] for a in ATTRS) else "red", pad=2)
    fig.suptitle("Held-out prompts (EMA weights): the scorer's verdict per image, C colour / S shape / P position",
                 fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0.17, 0, 1, 0.97))
    path = out / "samples_grid.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reconstruction_adherence(export: Path, heldout_shards: Path) -> dict:
    """The scorer on the autoencoder's reconstructions of the held-out ground-truth images: the ceiling the UNet
    can reach through this autoencoder (the scorer reads the originals 100% right)."""
    from ..evaluate.adherence import score
    from ..evaluate.cli import load_autoencoder, to_tensor
    from ..evaluate.recon import reconstruct
    from ..inference.images import to_uint8

    images, prompts = heldout_images(heldout_shards)
    rec = reconstruct(load_autoencoder(export), to_tensor(images))
    result = score(list(to_uint8(rec)), prompts)
    result.pop("per_prompt")
    return result
