"""Every conditioning mode end to end on the labelled synthetic shapes: its preset (experiment=<mode>_shapes)
trains a few steps on one rank, checkpoints, resumes for more steps, and samples through ldm-sample; the
super-resolution and semantic models also sample at twice their training size."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from trainrun import events, losses, metrics, multirun

from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.tario import iter_shard
from trainer.cli.sample import main as ldm_sample
from trainer.config import build
from trainer.inference.export import checkpoint_folder, trained_weights
from trainer.inference.pipeline import GenerateOptions, load_pipeline
from trainer.models.autoencoder import Autoencoder, measure_scale_factor

pytestmark = pytest.mark.slow
TINY = ["weights.autoencoder=", "weights.allow_random_autoencoder=true", "data.batch_size=8",
        "task.scale_samples=32", "checkpoint.every=2", "ema.decay=0.9"]  # fmt: skip


SWEPT = ["uncond_shapes", "layout_shapes", "superres_shapes", "inpaint_shapes", "semantic_shapes", "tiny_cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_labelled) -> Path:
    """Every mode's preset: 2 steps and a checkpoint, then a resumed run to step 4 (class: in the test)."""
    run_dir = tmp_path_factory.mktemp("modes")
    for steps in (2, 4):
        multirun(run_dir, synth_labelled, [*TINY, f"max_steps={steps}"], experiment=",".join(SWEPT))
    return run_dir


def resumed(run_dir: Path) -> Path:
    """The checks every mode shares (resumed at step 2, four finite losses); returns the checkpoints folder."""
    rows = metrics(run_dir)
    assert [e["step"] for e in events(rows, "resumed_from")] == [2]
    steps = losses(rows)
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(v) for v in steps.values())
    return run_dir / "checkpoints"


def train_and_resume(trained: Path, experiment: str) -> Path:
    return resumed(trained / f"experiment={experiment}")


def sample(ckpt: Path, out: Path, prompt: str, *args: str, num: int = 2) -> list[np.ndarray]:
    """ldm-sample (in-process): its PNGs as arrays."""
    assert ldm_sample([str(ckpt), "--prompt", prompt, "--num", str(num), "--steps", "3", "--guidance", "2",
                       "--out", str(out), "--device", "cpu", *args]) == 0  # fmt: skip
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]


@pytest.fixture(scope="module")
def held_out(synth_labelled, tmp_path_factory) -> dict[str, Path]:
    """One labelled sample as files: image, 8x8 and 16x16 low-resolution versions, mask and segmentation map."""
    folder = tmp_path_factory.mktemp("inputs")
    raw = next(iter_shard(str(sorted(synth_labelled.glob("*.tar"))[-1])))
    image = Image.open(io.BytesIO(raw.files["jpg"])).convert("RGB")
    files = {"image": folder / "image.png", "low8": folder / "low8.png", "low16": folder / "low16.png",
             "mask": folder / "mask.png", "seg": folder / "seg.png"}  # fmt: skip
    image.save(files["image"])
    image.resize((8, 8), Image.BOX).save(files["low8"])
    image.resize((16, 16), Image.BOX).save(files["low16"])
    files["mask"].write_bytes(raw.files["mask.png"])
    files["seg"].write_bytes(raw.files["seg.png"])
    files["class_id"] = json.loads(raw.files["json"])["class_id"]
    return files


def test_unconditional_trains_resumes_and_samples(trained, tmp_path, synth_labelled):
    ckpt = train_and_resume(trained, "uncond_shapes")
    images = sample(ckpt, tmp_path / "samples", "")
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    assert not np.array_equal(images[0], images[1])  # two seeds, two images
    frozen = json.loads((ckpt / "frozen" / "frozen.json").read_text())
    assert frozen["text_encoder"]["_target_"] == "trainer.models.conditions.Unconditional"
    # the on-the-fly path measured the latent scale factor from the data (autoencoder.scale_factor is 0 and the
    # random autoencoder records none): 1 / std of posterior samples, here of the first 32 images, agrees with
    # the same measure over the whole set
    ae = build(frozen["autoencoder"], "autoencoder", Autoencoder)
    ae.load_state_dict(load_file(str(ckpt / "frozen" / "autoencoder.safetensors")))
    cfg = ImageShardsConfig(
        urls=str(synth_labelled), resolution=32, batch_size=40, num_workers=0, shuffle_buffer=1
    )
    batches = [b["image"].float() / 127.5 - 1 for b in itertools.islice(ImageShards(cfg).loader(0, 1), 8)]
    everything = measure_scale_factor(ae, batches, 320, torch.Generator().manual_seed(0))
    assert abs(frozen["scale_factor"] / everything - 1) < 0.1 and abs(frozen["scale_factor"] - 0.18215) > 0.1


def test_class_cond_trains_resumes_and_samples_with_unet_num_classes(tmp_path, synth_labelled, held_out):
    """The class labels (the .json class_id) reach both the cross-attention tokens and, with unet.num_classes,
    the UNet's label embedding: its weights move in training (they once got no label at all)."""
    run_dir = tmp_path / "class"
    for steps in (2, 4):
        multirun(
            run_dir, synth_labelled, [*TINY, "unet.num_classes=25", f"max_steps={steps}"], "class_cond_shapes"
        )
    ckpt = resumed(run_dir)  # -m with one value sweeps nothing: the run folder is run_dir itself
    first = trained_weights(ckpt / "step_00000002")  # the EMA, stitched from its per-rank fragments
    last = trained_weights(checkpoint_folder(ckpt))
    assert not torch.equal(first["unet.label_emb.weight"], last["unet.label_emb.weight"])
    label = str(held_out["class_id"])
    images = sample(ckpt, tmp_path / "samples", label)
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    pipe = load_pipeline(ckpt)
    opts = GenerateOptions(steps=3, guidance=1.0, seeds=[0, 0])
    a, b = pipe.generate_latents([label, "3"], opts)
    assert not torch.allclose(a, b)  # same noise, another class: another sample


def test_layout_trains_resumes_and_samples(trained, tmp_path, synth_labelled):
    ckpt = train_and_resume(trained, "layout_shapes")
    images = sample(ckpt, tmp_path / "samples", "[[5, 0.55, 0.5, 0.95, 0.9]]")
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    pipe = load_pipeline(ckpt)
    opts = GenerateOptions(steps=3, guidance=1.0, seeds=[0, 0])
    a, b = pipe.generate_latents(["[[5, 0.55, 0.5, 0.95, 0.9]]", "[[5, 0.05, 0.05, 0.45, 0.45]]"], opts)
    assert not torch.allclose(a, b)  # the box moved: the sample changed


def test_superres_trains_resumes_and_samples_at_twice_its_training_size(
    trained, tmp_path, synth_labelled, held_out
):
    ckpt = train_and_resume(trained, "superres_shapes")
    images = sample(ckpt, tmp_path / "native", "", "--low-res", str(held_out["low8"]), num=1)
    assert images[0].shape == (32, 32, 3)
    big = sample(ckpt, tmp_path / "twice", "", "--low-res", str(held_out["low16"]),
                 "--height", "64", "--width", "64", num=1)  # fmt: skip
    assert big[0].shape == (64, 64, 3)
    pipe = load_pipeline(ckpt)
    low = torch.from_numpy(np.asarray(Image.open(held_out["low16"]), dtype=np.float32)).permute(2, 0, 1)[None]
    z = pipe.generate_latents(
        [""], GenerateOptions(steps=3, guidance=1.0, height=64, width=64), low_res=low / 127.5 - 1
    )
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
    assert torch.isfinite(pipe.decode_latents(z)).all()


def test_inpaint_trains_resumes_and_samples(trained, tmp_path, synth_labelled, held_out):
    ckpt = train_and_resume(trained, "inpaint_shapes")
    images = sample(ckpt, tmp_path / "samples", "", "--init-image", str(held_out["image"]),
                    "--mask", str(held_out["mask"]), num=1)  # fmt: skip
    assert images[0].shape == (32, 32, 3)
    pipe = load_pipeline(ckpt)
    with pytest.raises(ValueError, match="inpainting model"):
        pipe.generate_latents([""], GenerateOptions(steps=2, guidance=1.0))


def test_semantic_trains_resumes_and_samples_at_twice_its_training_size(
    trained, tmp_path, synth_labelled, held_out
):
    ckpt = train_and_resume(trained, "semantic_shapes")
    images = sample(ckpt, tmp_path / "native", "", "--segmentation", str(held_out["seg"]), num=1)
    assert images[0].shape == (32, 32, 3)
    big_map = tmp_path / "seg64.png"
    Image.open(held_out["seg"]).resize((64, 64), Image.NEAREST).save(big_map)
    big = sample(ckpt, tmp_path / "twice", "", "--segmentation", str(big_map),
                 "--height", "64", "--width", "64", num=1)  # fmt: skip
    assert big[0].shape == (64, 64, 3)
    pipe = load_pipeline(ckpt)
    seg = torch.from_numpy(np.asarray(Image.open(big_map), dtype=np.int64))[None, None]
    opts = GenerateOptions(steps=3, guidance=1.0, height=64, width=64)
    z = pipe.generate_latents([""], opts, segmentation=seg)
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
    assert torch.isfinite(pipe.decode_latents(z)).all()
    with pytest.raises(ValueError, match=r"task\.concat\.num_classes"):
        pipe.generate_latents([""], opts, segmentation=seg * 0 + 30)


def test_text_trains_resumes_and_samples(trained, tmp_path, synth_labelled):
    ckpt = train_and_resume(trained, "tiny_cpu")
    images = sample(ckpt, tmp_path / "samples", "a red circle in the top left")
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
