"""The demo's report: ``report.md`` with a sample grid, reconstructions, loss curves and the curve of prompt
adherence against training time, all in the run folder."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from data_pipeline.atomic import atomic_json, atomic_write

GOALS = {"colour": 0.95, "shape": 0.90, "psnr_photos": 25.0}


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


def checkpoint_minutes(run_dir: Path, checkpoint: str) -> float:
    """Training minutes until a checkpoint's step (time of the nearest logged step at or after it)."""
    start, rows = read_metrics(run_dir)
    step = int(checkpoint.rsplit("_", 1)[-1])
    after = [r for r in rows if r["step"] >= step] or rows[-1:]
    return (after[0]["time"] - start) / 60 if after else 0.0


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ("autoencoder", "unet"), strict=True):
        _, rows = read_metrics(out / name)
        key = "ae/rec_loss" if name == "autoencoder" else "loss"
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True))
        ax.set(title=f"{name}: {key}", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    return _save(fig, out / "loss_curves.png")


def plot_accuracy(out: Path, curve: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    minutes = [c["minutes"] for c in curve]
    for key in ("colour", "shape", "position", "all"):
        ax.plot(minutes, [c[key] for c in curve], marker="o", label=key)
    for key in ("colour", "shape"):
        ax.axhline(GOALS[key], ls=":", lw=1, color="grey")
    ax.set(xlabel="UNet training time (min, 2 CPU cores)", ylabel="held-out prompt accuracy", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_curve.png")


def reconstruction_grid(out: Path, photos: list[str]) -> Path:
    """Held-out photographs (top) and their reconstructions through the demo autoencoder (bottom), 256 px."""
    from ..evaluate.cli import center_crop, load_autoencoder, to_tensor
    from ..inference.images import grid_image

    model = load_autoencoder(out / "autoencoder/export")
    x = to_tensor([np.asarray(center_crop(Image.open(p).convert("RGB"), 256)) for p in photos])
    with torch.no_grad():
        rec = (model.decode(model.encode(x * 2 - 1).mode()) + 1) / 2
    path = out / "reconstructions.png"
    grid_image(torch.cat([x, rec.clamp(0, 1)]), nrow=len(photos)).save(path)
    return path


def reconstruction_adherence(export: Path, heldout_shards: Path) -> dict:
    """The scorer on the autoencoder's reconstructions of the held-out ground-truth images: the ceiling the UNet
    can reach through this autoencoder (the scorer reads the originals 100% right)."""
    from data_pipeline.tario import iter_shard

    from ..evaluate.adherence import score
    from ..evaluate.cli import load_autoencoder, to_tensor
    from ..inference.images import to_uint8

    images, prompts = [], []
    for shard in sorted(heldout_shards.glob("*.tar")):
        for s in iter_shard(str(shard)):
            images.append(np.asarray(Image.open(io.BytesIO(s.files["jpg"])).convert("RGB")))
            prompts.append(s.files["txt"].decode())
    model = load_autoencoder(export)
    with torch.no_grad():
        rec = (model.decode(model.encode(to_tensor(images) * 2 - 1).mode()) + 1) / 2
    result = score(list(to_uint8(rec)), prompts)
    result.pop("per_prompt")
    return result


def _ceiling_lines(ceiling: dict | None) -> list[str]:
    if not ceiling:
        return []
    return [
        "Ceiling set by the autoencoder: the scorer on its reconstructions of the held-out ground-truth images "
        f"reads colour {_pct(ceiling['colour'])}, shape {_pct(ceiling['shape'])}, position "
        f"{_pct(ceiling['position'])} (100% on the originals).",
        "",
    ]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def write_report(out: Path, results: dict) -> Path:
    """Write report.md (+ figures and results.json) into ``out``; returns the report's path."""
    ev, ae = results["eval"], results["autoencoder"]
    for point in ev["curve"]:
        point["minutes"] = checkpoint_minutes(out / "unet", point["checkpoint"])
    shutil.copyfile(out / "samples/final/grid.png", out / "samples_grid.png")
    figures = [
        plot_losses(out),
        plot_accuracy(out, ev["curve"]),
        reconstruction_grid(out, results["data"]["heldout_photos"]),
    ]
    for point in ev["curve"]:
        point.pop("per_prompt", None)
    atomic_json(out / "results.json", results)
    final, b = ev["final"], results["budget"]
    psnr256, psnr64 = ae["photos_256"]["mean"]["psnr"], ae["photos_64"]["mean"]["psnr"]
    val = results["data"]["validate"]
    lines = [
        "# Latent diffusion demo report",
        "",
        f"Total {results['total_s'] / 60:.1f} min: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["times"].items())
        + ".",
        "",
        f"Data: {val['total']} training samples read, {val['valid']} valid ({val['invalid'] or 'none invalid'}).",
        "",
        "## Prompt adherence (held-out caption combinations)",
        "",
        f"{final['n']} images ({b['images_per_prompt']} per held-out prompt), DDIM {b['sample_steps']} steps, "
        f"guidance {b['guidance']}, scored by the rule-based reader (`ldm-eval adherence`).",
        "",
        "| checkpoint | minutes | colour | shape | position | all three |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c['checkpoint']} | {c['minutes']:.1f} | {_pct(c['colour'])} | {_pct(c['shape'])} | "
            f"{_pct(c['position'])} | {_pct(c['all'])} |"
            for c in ev["curve"]
        ),
        "",
        f"Goal: colour >= {_pct(GOALS['colour'])} ({'met' if final['colour'] >= GOALS['colour'] else 'not met'}), "
        f"shape >= {_pct(GOALS['shape'])} ({'met' if final['shape'] >= GOALS['shape'] else 'not met'}).",
        "",
        *_ceiling_lines(ae.get("heldout_recon_adherence")),
        "![samples](samples_grid.png)",
        "",
        "![accuracy](accuracy_curve.png)",
        "",
        "## Autoencoder (f=8) on held-out photographs",
        "",
        "| photo | PSNR 256 px | SSIM 256 px | PSNR 64 px |",
        "|---|---|---|---|",
        *(
            f"| {name} | {m['psnr']:.2f} dB | {m['ssim']:.3f} | {ae['photos_64']['images'][name]['psnr']:.2f} dB |"
            for name, m in ae["photos_256"]["images"].items()
        ),
        "",
        f"Mean PSNR {psnr256:.2f} dB at 256 px, {psnr64:.2f} dB at 64 px after {b['ae_steps']} steps "
        f"(goal >= {GOALS['psnr_photos']:.0f} dB: {'met' if psnr256 >= GOALS['psnr_photos'] else 'not met'}).",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "![losses](loss_curves.png)",
        "",
        "## Where things are",
        "",
        *(
            f"- {what}: `{path}`"
            for what, path in [
                ("exported model (native + diffusers/)", out / "export"),
                ("autoencoder export", out / "autoencoder/export"),
                ("UNet checkpoints", out / "unet/checkpoints"),
                ("latent shards", out / "latents"),
                ("final samples", out / "samples/final"),
                ("metrics", out / "unet/metrics.jsonl"),
                ("all numbers", out / "results.json"),
            ]
        ),
    ]
    report = out / "report.md"
    atomic_write(report, "\n".join(lines) + "\n")
    print("figures: " + ", ".join(str(f) for f in figures))
    return report
