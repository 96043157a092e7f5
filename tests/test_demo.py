"""The end-to-end demo (``ldm-demo --quick``): every stage runs as the real command, the report and its figures
are written, and the exported model samples in diffusers exactly as ``ldm-sample`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.inference.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    if os.environ.get("LDM_DEMO_RUN"):  # reuse a finished quick run while developing
        return Path(os.environ["LDM_DEMO_RUN"])
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    res = subprocess.run(
        [sys.executable, "-m", "trainer.cli.demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"report: {out.resolve()}/report.md" in res.stdout
    return out


def test_demo_writes_report_figures_and_numbers(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert set(results["times"]) == {"data", "autoencoder", "precompute", "unet", "sample+eval"}
    curve = results["eval"]["curve"]
    assert [c["checkpoint"] for c in curve] == ["step_00000005", "step_00000010"]
    assert all(c["n"] == 12 and 0 <= c["colour"] <= 1 for c in curve)
    assert curve[-1]["colour"] == results["eval"]["final"]["colour"]
    assert np.isfinite(results["autoencoder"]["photos_256"]["mean"]["psnr"])
    assert results["autoencoder"]["heldout_recon_adherence"]["n"] == 96
    assert results["data"]["validate"]["invalid"] == {}
    for name in ("samples_grid.png", "loss_curves.png", "accuracy_curve.png", "reconstructions.png"):
        with Image.open(demo_run / name) as img:
            assert img.size[0] > 100
    report = (demo_run / "report.md").read_text()
    assert "step_00000010" in report and "![samples](samples_grid.png)" in report
    assert len(list((demo_run / "samples/final").glob("*-seed*.png"))) == 12
    # the labelled grid's per-image verdicts are the scorer's: their means are the final figures
    images, final = results["eval"]["final_images"], results["eval"]["final"]
    assert len(images) == 12 and {"colour", "shape", "position", "read", "prompt", "file"} <= set(images[0])
    for key in ("colour", "shape", "position"):
        assert np.mean([r[key] for r in images]) == pytest.approx(final[key])


def test_export_samples_the_same_image_in_diffusers(demo_run):
    """Same seed, latents and DDIM settings: diffusers' StableDiffusionPipeline on the exported diffusers folder
    reproduces ldm-sample's PNGs within 1/255 (the text encoder is ours, so its embeddings are passed in)."""
    from diffusers import StableDiffusionPipeline

    results = json.loads((demo_run / "results.json").read_text())
    budget = results["budget"]
    sd = StableDiffusionPipeline.from_pretrained(
        demo_run / "export" / "diffusers",
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    assert sd.scheduler.config.steps_offset == 1 and not sd.scheduler.config.set_alpha_to_one
    ours = LatentDiffusionPipeline.load(demo_run / "export")
    index = json.loads((demo_run / "samples/final/prompts.json").read_text())[:4]
    with torch.no_grad():
        cond = ours.text_encoder([r["prompt"] for r in index]).tokens
        uncond = ours.text_encoder([""] * len(index)).tokens
    images = sd(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=budget["sample_steps"],
        guidance_scale=budget["guidance"],
        generator=[torch.Generator().manual_seed(r["seed"]) for r in index],
        output_type="np",
    ).images
    theirs = np.round(images * 255).astype(np.int16)
    mine = np.stack([np.asarray(Image.open(demo_run / "samples/final" / r["file"])) for r in index]).astype(
        np.int16
    )
    assert theirs.shape == mine.shape
    assert np.abs(theirs - mine).max() <= 1
    assert mine.std() > 1  # real images, not a constant
