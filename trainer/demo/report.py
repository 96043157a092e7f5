"""The demo's report: ``report.md`` with the labelled sample grid, reconstructions, loss curves and the curve of
prompt adherence against training time (figures.py draws them), and ``results.json``, all in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.atomic import atomic_json, atomic_write

from .figures import (
    GOALS,
    labelled_grid,
    plot_accuracy,
    plot_losses,
    read_metrics,
    reconstruction_adherence,
    reconstruction_grid,
    verdicts,
)

__all__ = ["reconstruction_adherence", "write_report"]


def checkpoint_minutes(run_dir: Path, checkpoint: str) -> float:
    """Training minutes until a checkpoint's step (time of the nearest logged step at or after it)."""
    start, rows = read_metrics(run_dir)
    step = int(checkpoint.rsplit("_", 1)[-1])
    after = [r for r in rows if r["step"] >= step] or rows[-1:]
    return (after[0]["time"] - start) / 60 if after else 0.0


def _ceiling_lines(ceiling: dict | None) -> list[str]:
    if not ceiling:
        return []
    return [
        "Ceiling set by the autoencoder: the scorer on its reconstructions of the held-out ground-truth images "
        f"reads colour {_pct(ceiling['colour'])}, shape {_pct(ceiling['shape'])}, position "
        f"{_pct(ceiling['position'])} (100% on the originals).",
        "",
    ]


def _downsampling(out: Path) -> int:
    meta = json.loads((out / "autoencoder/export/autoencoder.json").read_text())
    return 2 ** (len(meta["config"]["ch_mult"]) - 1)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def write_report(out: Path, results: dict) -> Path:
    """Write report.md (+ figures and results.json) into ``out``; returns the report's path."""
    ev, ae = results["eval"], results["autoencoder"]
    for point in ev["curve"]:
        point["minutes"] = checkpoint_minutes(out / "unet", point["checkpoint"])
    images = verdicts(out / "samples/final")
    ev["final_images"] = images
    figures = [
        labelled_grid(out, out / "samples/final", images),
        plot_losses(out),
        plot_accuracy(out, ev["curve"]),
        reconstruction_grid(out, results["data"]["heldout_photos"]),
    ]
    for point in ev["curve"]:
        point.pop("per_prompt", None)
    atomic_json(out / "results.json", results)
    final, b = ev["final"], results["budget"]
    psnr256 = ae["photos_256"]["mean"]["psnr"]
    val = results["data"]["validate"]
    lines = [
        "# Latent diffusion demo report",
        "",
        f"Total {results['total_s'] / 60:.1f} min (goal <= {GOALS['total_min']:.0f} min on 2 CPU cores): "
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
        "Goals: "
        + ", ".join(
            f"{k} >= {_pct(GOALS[k])} ({'met' if final[k] >= GOALS[k] else 'not met'})"
            for k in ("colour", "shape", "position", "all")
        )
        + ".",
        "",
        *_ceiling_lines(ae.get("heldout_recon_adherence")),
        "![samples](samples_grid.png)",
        "",
        "![accuracy](accuracy_curve.png)",
        "",
        f"## Autoencoder (f={_downsampling(out)}) on held-out photographs",
        "",
        "| photo | PSNR 256 px | SSIM 256 px |",
        "|---|---|---|",
        *(
            f"| {name} | {m['psnr']:.2f} dB | {m['ssim']:.3f} |"
            for name, m in ae["photos_256"]["images"].items()
        ),
        "",
        f"Mean PSNR {psnr256:.2f} dB at 256 px after {b['ae_steps']} steps "
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
