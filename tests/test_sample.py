"""The pipeline's native format and ldm-sample: files, seeds, image-to-image and inpainting."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from presets import tiny_pipeline

from trainer.inference.pipeline import GenerateOptions, LatentDiffusionPipeline


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_pipeline().save(tmp_path_factory.mktemp("export") / "model")


def test_native_export_round_trips(export_dir):
    pipe = tiny_pipeline()
    loaded = LatentDiffusionPipeline.load(export_dir)
    opts = GenerateOptions(steps=5, guidance=3.0, seeds=[7, 8])
    a = pipe.generate_latents(["a red circle", "a blue square"], opts)
    b = loaded.generate_latents(["a red circle", "a blue square"], opts)
    assert torch.equal(a, b)
    assert json.loads((export_dir / "pipeline.json").read_text())["text_encoder"]["pretrained"] == ""
    assert not list(export_dir.glob(".*tmp"))


def test_seeds_are_per_sample_not_per_batch(export_dir):
    pipe = LatentDiffusionPipeline.load(export_dir)
    for sampler in ("ddim", "ddpm", "dpmpp_2m"):
        opts = GenerateOptions(steps=4, guidance=2.0, sampler=sampler, eta=1.0, seeds=[1, 2, 3])
        batch = pipe.generate_latents(["x", "y", "z"], opts)
        single = pipe.generate_latents(
            ["y"], GenerateOptions(steps=4, guidance=2.0, sampler=sampler, eta=1.0, seeds=[2])
        )
        assert torch.allclose(batch[1:2], single, rtol=1e-4, atol=1e-4), (
            sampler
        )  # GEMM blocking varies with batch
        assert not torch.allclose(batch[0], batch[2])


def test_inpainting_keeps_the_known_region_and_img2img_starts_from_the_image(export_dir):
    pipe = LatentDiffusionPipeline.load(export_dir)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1  # repaint the bottom half
    opts = GenerateOptions(steps=6, guidance=1.0, seeds=[0])
    out = pipe.generate_latents(["p"], opts, init_image=image, mask=mask)
    known = pipe.encode_images(image)
    assert torch.equal(out[..., :4, :], known[..., :4, :])
    assert not torch.allclose(out[..., 4:, :], known[..., 4:, :])
    weak = pipe.generate_latents(
        ["p"], GenerateOptions(steps=10, guidance=1.0, seeds=[0], strength=0.2), init_image=image
    )
    strong = pipe.generate_latents(
        ["p"], GenerateOptions(steps=10, guidance=1.0, seeds=[0], strength=0.9), init_image=image
    )
    assert (weak - known).abs().mean() < (strong - known).abs().mean()


@pytest.mark.slow  # a sampling run in a subprocess
def test_ldm_sample_cli_writes_pngs_grid_and_index(export_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\n\na blue cross in the bottom right\n")
    out = tmp_path / "samples"
    base = [
        sys.executable,
        "-m",
        "trainer.cli.sample",
        str(export_dir),
        "--prompts-file",
        str(prompts),
        "--num",
        "2",
        "--steps",
        "4",
        "--guidance",
        "3",
        "--sampler",
        "dpmpp_2m",
    ]
    subprocess.run([*base, "--batch-size", "3", "--out", str(out)], check=True, capture_output=True)
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["0000-seed0.png", "0001-seed1.png", "0002-seed2.png", "0003-seed3.png"]
    assert Image.open(out / "0000-seed0.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    index = json.loads((out / "prompts.json").read_text())
    assert index[2] == {"file": "0002-seed2.png", "prompt": "a blue cross in the bottom right", "seed": 2}
    again = tmp_path / "again"
    subprocess.run([*base, "--batch-size", "1", "--out", str(again)], check=True, capture_output=True)
    a = np.asarray(Image.open(out / "0003-seed3.png"), dtype=int)
    b = np.asarray(Image.open(again / "0003-seed3.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # same seed, other batch: same image


@pytest.mark.parametrize("n,nrow", [(12, None), (5, 3), (7, 10), (1, None)])
def test_grid_image_is_torchvision_make_grid(n, nrow):
    """Our grid (written out to keep torchvision's import out of ldm-sample) is make_grid's, pixel for pixel."""
    import math

    from torchvision.utils import make_grid

    from trainer.inference.images import grid_image, to_uint8

    x = torch.rand(n, 3, 9, 11, generator=torch.Generator().manual_seed(n))
    ref = make_grid(x, nrow=nrow or math.ceil(math.sqrt(n)), padding=2, pad_value=1.0)
    assert np.array_equal(np.asarray(grid_image(x, nrow)), to_uint8(ref[None])[0])
