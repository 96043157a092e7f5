"""ldm-precompute on 2 ranks and training from its latent shards."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from presets import model as preset_model
from safetensors.torch import save_file
from trainrun import ROOT, TORCHRUN, env, free_port, metrics, run, wait_paused_then_kill

from data_pipeline.latents import LATENT_EXT, MANIFEST
from data_pipeline.samples import ImageLimits, decode_rgb
from data_pipeline.tario import iter_shard
from data_pipeline.transforms import crop_resize, sample_rng
from data_pipeline.urls import expand_shards
from data_pipeline.validate import validate_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_shards, corrupt_set):
    """The synthetic shards plus the hand-made corrupt ones."""
    folder = tmp_path_factory.mktemp("inputs")
    for p in list(synth_shards.glob("*.tar"))[:5] + list(corrupt_set[0].glob("*.tar")):
        shutil.copy(p, folder / p.name)
    return folder


def precompute_cmd(out, data, ae, extra=()) -> list[str]:
    return [
        TORCHRUN,
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "trainer.cli.precompute",
        f"out={out}",
        f"data.urls={data}",
        "autoencoder=tiny",
        f"weights.autoencoder={ae}",
        "data.resolution=32",
        "data.num_workers=2",
        "data.min_size=16",
        "data.max_pixels=100000",
        "batch_size=4",
        "progress=false",
        *extra,
    ]


def precompute(out, data, ae, extra=()):
    out_ = subprocess.run(
        precompute_cmd(out, data, ae, extra), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert out_.returncode == 0, out_.stderr[-5000:]


def read_latents(folder):
    out = {}
    for shard in expand_shards(str(folder)):
        for s in iter_shard(shard):
            out[(shard.rsplit("/", 1)[1], s.key)] = s.files[LATENT_EXT]
    return out


def test_two_ranks_cover_every_valid_sample_once_and_a_killed_run_resumes_to_the_same_files(
    tmp_path, inputs, tiny_ae
):
    ae, _ = tiny_ae
    clean = tmp_path / "clean"
    precompute(clean, inputs, ae, ["flip=true"])
    manifest = json.loads((clean / MANIFEST).read_text())
    report = validate_shards(expand_shards(str(inputs)), ImageLimits(16, 100_000), progress=False)
    assert manifest["samples"] == report["valid"] and manifest["skipped"] == report["invalid"]
    got = read_latents(clean)
    assert len(got) == report["valid"]  # each valid sample exactly once, in the output shard of its input
    expected = {(p.rsplit("/", 1)[1], s.key) for p in expand_shards(str(inputs)) for s in iter_shard(p)}
    assert set(got) <= expected
    # kill rank 0 after its second shard, then rerun: the same files as the clean run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        precompute_cmd(killed, inputs, ae, ["flip=true", "pause_after_shards=2"]),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_paused_then_kill(proc, killed / "PAUSED")
    done_before = {p.name for p in (killed / "_manifest").glob("*.tar.json")}
    assert 2 <= len(done_before) < len(expand_shards(str(inputs)))
    precompute(killed, inputs, ae, ["flip=true"])
    assert read_latents(killed) == got
    m2 = json.loads((killed / MANIFEST).read_text())
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert m2["scale_factor"] == manifest["scale_factor"]


def test_stored_means_decode_like_fresh_encodings(tmp_path, synth_shards, tiny_ae):
    ae, model = tiny_ae
    out = tmp_path / "lat"
    precompute(out, synth_shards, ae)
    from safetensors.torch import load

    shard = expand_shards(str(out))[0]
    source = {s.key: s for s in iter_shard(str(synth_shards / shard.rsplit("/", 1)[1]))}
    worst = 0.0
    for s in list(iter_shard(shard))[:12]:
        stored = load(s.files[LATENT_EXT])
        assert stored["mean"].dtype == torch.float16 and stored["mean"].shape == (4, 8, 8)
        pixels, _ = decode_rgb(source[s.key], ImageLimits(), 32)
        pixels, _ = crop_resize(pixels, 32, "center", sample_rng(0, 0, ""))
        x = pixels[None].float() / 127.5 - 1
        with torch.no_grad():
            fresh = model.encode(x)
            a = model.decode(stored["mean"][None].float())
            b = model.decode(fresh.mean)
        assert torch.allclose(stored["mean"].float(), fresh.mean[0], atol=2e-3, rtol=2e-3)
        assert torch.allclose(stored["std"].float(), fresh.std[0], atol=2e-3, rtol=2e-3)
        worst = max(worst, (a - b).abs().max().item())
    assert worst < 5e-3, worst


def test_training_from_latents_gives_the_first_step_loss_of_training_from_images(
    tmp_path, synth_shards, tiny_ae
):
    ae, _ = tiny_ae
    lat = tmp_path / "lat"
    precompute(lat, synth_shards, ae)
    common = [
        "weights.allow_random_autoencoder=false",
        f"weights.autoencoder={ae}",
        "task.sample_posterior=false",
        "max_steps=2",
        "checkpoint.every=100",
        "ema.enabled=false",
    ]
    # the images run measures the scale factor on every sample, as precompute does
    run(tmp_path / "img", synth_shards, [*common, "task.scale_samples=1024"], nproc=1)
    run(tmp_path / "lat_run", lat, [*common, "data=latents", "data.shuffle_buffer=500"], nproc=1)
    a = [r for r in metrics(tmp_path / "img") if "loss" in r]
    b = [r for r in metrics(tmp_path / "lat_run") if "loss" in r]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=2e-3)  # fp16 storage of the latents
    scale = json.loads((lat / MANIFEST).read_text())["scale_factor"]
    frozen = json.loads((tmp_path / "lat_run" / "checkpoints" / "frozen" / "frozen.json").read_text())
    assert frozen["scale_factor"] == scale


def test_latents_from_another_autoencoder_or_resolution_are_refused(tmp_path, synth_shards, tiny_ae):
    ae, _ = tiny_ae
    lat = tmp_path / "lat"
    precompute(lat, synth_shards, ae)
    other = tmp_path / "other_ae"
    other.mkdir()
    torch.manual_seed(7)
    m = preset_model("autoencoder/tiny")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(other / "autoencoder.safetensors"))
    out = run(
        tmp_path / "r1",
        lat,
        [
            "data=latents",
            "weights.allow_random_autoencoder=false",
            f"weights.autoencoder={other}",
            "max_steps=1",
        ],
        nproc=1,
        check=False,
    )
    assert out.returncode != 0 and "were made with autoencoder" in out.stderr
    out = run(
        tmp_path / "r2",
        lat,
        [
            "data=latents",
            "weights.allow_random_autoencoder=false",
            f"weights.autoencoder={ae}",
            "max_steps=1",
            "data.resolution=64",
            "unet.sample_size=16",
        ],
        nproc=1,
        check=False,
    )
    assert out.returncode != 0 and "data.resolution is 64" in out.stderr
