"""ldm-train refuses bad configs before the first step, naming the key; dry_run and --cfg job."""

from __future__ import annotations

import json

import pytest
from trainrun import metrics, run

BAD = [
    (["data.resolution=36"], "data.resolution=36 is not divisible"),
    (["data.urls=[]"], "data.urls"),
    (
        ["deepspeed.zero_stage=3", "deepspeed.modules=[unet,text_encoder]"],
        "ZeRO-3 would shard a frozen encoder",
    ),
    (
        ["weights.allow_random_autoencoder=false", "weights.autoencoder=/nonexistent/vae"],
        "weights.autoencoder",
    ),
    (["weights.allow_random_autoencoder=false"], "weights.autoencoder is empty"),
    (["text_encoder.pretrained=/nonexistent/open_clip.pt"], "text_encoder.pretrained"),
    (["+optim.lrr=1e-4"], "Key 'lrr' not in 'OptimConfig'"),
    (["optim.lrr=1e-4"], "Key 'lrr' not in 'OptimConfig'"),
    (["optim.lr=fast"], "optim.lr"),
    (["unet.context_dim=32"], "unet.context_dim=32"),
    (
        ["stage=autoencoder", "deepspeed.zero_stage=3", "loss.lpips_random_backbone=true"],
        "zero_stage=3 is not supported",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_fails_before_the_first_step(tmp_path, synth_shards, overrides, message):
    out = run(tmp_path, synth_shards, overrides, nproc=1, check=False, timeout=300)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    logged = [r for r in metrics(tmp_path) if "loss" in r] if (tmp_path / "metrics.jsonl").exists() else []
    assert logged == []


def test_dry_run_prints_the_plan_and_cfg_job_the_config(tmp_path, synth_shards):
    out = run(tmp_path, synth_shards, ["dry_run=true"], nproc=1)
    plan = json.loads(out.stdout[out.stdout.index("{") :])
    assert plan["latent_size"] == 8 and plan["modules"]["unet"]["trainable"] > 0
    assert not (tmp_path / "checkpoints").exists()
    out = run(tmp_path, synth_shards, ["--cfg", "job"], nproc=1)
    assert "zero_stage: 2" in out.stdout and "max_steps: 60" in out.stdout


def test_autoencoder_stage_exports_what_the_unet_stage_loads(tmp_path, synth_shards):
    ae_dir = tmp_path / "ae"
    ae = [
        "stage=autoencoder",
        "max_steps=6",
        "checkpoint.every=3",
        "loss.lpips_net=alex",
        "loss.lpips_random_backbone=true",
        "loss.disc_start=3",
        "loss.disc_layers=2",
        "data.resolution=32",
        "ema.enabled=false",
        "deepspeed.zero_stage=1",
        "logger.sample_every=3",
    ]
    run(ae_dir, synth_shards, ae)
    rows = metrics(ae_dir)
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert "ae/g_loss" not in steps[3] and "ae/g_loss" in steps[4] and "ae/d_loss" in steps[4]
    folder = ae_dir / "checkpoints" / "step_00000006"
    assert {p.name for p in folder.iterdir()} >= {
        "model",
        "disc",
        "rank_00000.pt",
        "rank_00001.pt",
        "COMMITTED",
    }
    assert list((ae_dir / "samples").glob("samples_*.png"))
    from trainer.export import export

    out = export(ae_dir / "checkpoints", tmp_path / "ae_export")
    assert (out / "autoencoder.safetensors").is_file() and (
        out / "diffusers" / "vae" / "config.json"
    ).is_file()
    unet_dir = tmp_path / "unet"
    run(
        unet_dir,
        synth_shards,
        [
            "weights.allow_random_autoencoder=false",
            f"weights.autoencoder={out}",
            "max_steps=3",
            "checkpoint.every=3",
        ],
    )
    assert [r for r in metrics(unet_dir) if "loss" in r][-1]["step"] == 3


def test_wandb_offline_run_continues_after_resume_and_never_stores_the_key(
    tmp_path, synth_shards, monkeypatch
):
    monkeypatch.setenv("WANDB_API_KEY", "local-0123456789abcdef0123456789abcdef01234567")
    common = [
        "logger.kind=wandb",
        "logger.mode=offline",
        "checkpoint.every=2",
        "logger.sample_every=2",
        "logger.sample_steps=2",
    ]
    run(tmp_path, synth_shards, [*common, "max_steps=2"], nproc=1)
    run(tmp_path, synth_shards, [*common, "max_steps=4"], nproc=1)
    rows = metrics(tmp_path)
    ids = {r["run_id"] for r in rows if r.get("event") in ("start", "resume")}
    assert len(ids) == 1
    run_id = ids.pop()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)  # one W&B run, two sessions
    assert all((p / f"run-{run_id}.wandb").is_file() for p in runs)
    assert len(list((tmp_path / "samples").glob("samples_*.png"))) == 2
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"0123456789abcdef0123456789abcdef01234567" not in path.read_bytes(), path
