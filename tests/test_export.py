"""ldm-export to the ecosystem, checked against diffusers itself: the diffusers folder loads with
``StableDiffusionPipeline.from_pretrained(dir)`` and no extra argument (its text encoder and tokenizer are the
transformers equivalents of our OpenCLIP tower), the single file with ``from_single_file`` (configs beside it,
nothing downloaded); both reproduce ``ldm-sample``'s PNGs within 1/255. Tiny random towers in SD 2.x style
(penultimate layer, zero padding, GELU) and SD 1.x style (last layer, end-token padding, quick-GELU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from presets import model

from trainer.cli.export import main as ldm_export
from trainer.cli.sample import main as ldm_sample
from trainer.diffusion.objectives import Diffusion
from trainer.inference.pipeline import LatentDiffusionPipeline
from trainer.models.text_encoders import _TINY_CFG, OpenCLIPConfig, OpenCLIPTextEncoder

PROMPTS = ["a red circle in the top left", "a blue cross in the bottom right"]
STEPS, GUIDANCE = 4, 3.0
STYLES = {
    "sd2": OpenCLIPConfig(model_name="ldm-tiny-text", layer="penultimate", pad_id=0),
    "sd1": OpenCLIPConfig(
        model_name="ldm-tiny-text-quickgelu",
        layer="last",
        pad_id=49407,
        model_config={**_TINY_CFG, "quick_gelu": True},
    ),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def exported(request, tmp_path_factory):
    """A tiny pipeline (native export), its diffusers and single-file exports, and ldm-sample's PNGs."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    torch.manual_seed(0)
    text = OpenCLIPTextEncoder(STYLES[request.param])
    with torch.no_grad():  # a random tower whose tokens differ between prompts (and positions)
        for p in text.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet = model("unet/tiny", seed=1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = LatentDiffusionPipeline(
        unet.eval(), model("autoencoder/tiny", seed=2).eval(), text.eval(), Diffusion(), 0.5
    )
    native = pipe.save(root / "native")
    assert (
        ldm_export(
            [str(native), "--out", str(root / "out"), "--format", "diffusers", "--format", "single_file"]
        )
        == 0
    )
    samples = root / "samples"
    assert ldm_sample([str(native), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", str(STEPS),
                       "--guidance", str(GUIDANCE), "--seed", "7", "--out", str(samples), "--device", "cpu"]) == 0  # fmt: skip
    index = json.loads((samples / "prompts.json").read_text())
    ours = np.stack([np.asarray(Image.open(samples / r["file"])) for r in index]).astype(np.int16)
    return {"pipe": pipe, "out": root / "out", "index": index, "ours": ours, "style": request.param}


def _theirs(sd, index) -> np.ndarray:
    sd.set_progress_bar_config(disable=True)
    images = sd(
        prompt=[r["prompt"] for r in index],
        negative_prompt=[""] * len(index),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator().manual_seed(r["seed"]) for r in index],
        output_type="np",
    ).images
    return np.round(images * 255).astype(np.int16)


def test_export_diffusers_loads_with_no_extra_argument_and_reproduces_ldm_sample(exported):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    folder = exported["out"] / "diffusers"
    sd = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(sd.text_encoder, CLIPTextModel) and sd.safety_checker is None
    ours = exported["pipe"].text_encoder
    ids = sd.tokenizer(
        [*PROMPTS, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    assert torch.equal(ids.input_ids, ours.tokenize([*PROMPTS, ""]))  # same BPE, start/end and padding
    with torch.no_grad():
        hf = sd.text_encoder(ids.input_ids).last_hidden_state
        assert torch.allclose(hf, ours([*PROMPTS, ""]).tokens, atol=1e-5)
    theirs = _theirs(sd, exported["index"])
    mine = exported["ours"]
    assert theirs.shape == mine.shape == (2, 32, 32, 3)
    diff = int(np.abs(theirs - mine).max())
    print(f"{exported['style']} diffusers export: max |diffusers - ldm-sample| = {diff}/255")
    assert diff <= 1 and mine.std() > 1 and not np.array_equal(mine[0], mine[1])


def test_export_single_file_loads_in_diffusers_from_single_file_offline(exported):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    folder = exported["out"] / "single_file"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefix = (
        "cond_stage_model.model."
        if exported["style"] == "sd2"
        else "cond_stage_model.transformer.text_model."
    )
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith(prefix) for k in keys)
    assert not list(
        (folder / "config").rglob("*.safetensors")
    )  # configs only: the weights are in the one file
    sd = StableDiffusionPipeline.from_single_file(
        str(folder / "model.safetensors"), config=str(folder / "config"), local_files_only=True
    )
    theirs = _theirs(sd, exported["index"])
    diff = int(np.abs(theirs - exported["ours"]).max())
    print(f"{exported['style']} single-file export: max |diffusers - ldm-sample| = {diff}/255")
    assert diff <= 1
