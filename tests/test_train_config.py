"""ldm-train refuses bad configs before the first step, naming the key (in-process); dry_run and --cfg job; the
autoencoder stage's export feeds the UNet stage; W&B offline across a resume."""

from __future__ import annotations

import json

import pytest
from trainrun import PY, env, metrics, run

from trainer.config import ConfigError, compose
from trainer.train import prepare, train

BAD = [
    (["data.resolution=36"], "data.resolution=36 is not divisible"),
    (["data.urls=[]"], "data.urls"),
    (["precision=fp8"], "precision must be one of"),
    (
        ["weights.allow_random_autoencoder=false", "weights.autoencoder=/nonexistent/vae"],
        "weights.autoencoder",
    ),
    (["weights.allow_random_autoencoder=false"], "weights.autoencoder is empty"),
    (["text_encoder.pretrained=/nonexistent/open_clip.pt"], "text_encoder.pretrained"),
    (["+optim.lrr=1e-4"], "Key 'lrr' not in 'AdamWConfig'"),
    (["optim.lr=fast"], "optim"),
    (["task.concat={_target_:trainer.tasks.concat.InpaintConcat}"], "unet.in_channels=4"),
    (["lr_schedule._target_=os.system"], "only component classes"),
    (["unet.context_dim=32"], "unet.context_dim=32"),
    (
        ["task=autoencoder", "deepspeed.zero_stage=3", "task.loss.lpips_random_backbone=true"],
        "zero_stage must be 0-2",
    ),
    (["task=unet", "data=latents"], "latent"),
    (["precision=bf16", "deepspeed.zero_stage=0"], "not supported yet"),
    (
        ["eval.every=5", "eval.adherence=true", "eval.prompts=[a photo of a cat]"],
        "synthetic-set prompts only",
    ),
    (["eval.every=5", "eval.inception_weights=/nonexistent/pt_inception.pth"], "eval.inception_weights"),
]


def train_config(tmp_path, shards, overrides: list[str]):
    return compose("train", ["experiment=tiny_cpu", f"run_dir={tmp_path}", f"data.urls={shards}", *overrides])


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_fails_before_anything_runs(tmp_path, synth_shards, overrides, message):
    with pytest.raises((ConfigError, FileNotFoundError, ValueError), match=message):
        cfg = train_config(tmp_path, synth_shards, overrides)
        prepare(cfg)


def test_fp16_at_zero_stage_0_is_accepted(tmp_path, synth_shards):
    """Only bf16 is refused at ZeRO-0: fp16 gets DeepSpeed's fp16 optimizer there, which keeps fp32 masters."""
    prepare(train_config(tmp_path, synth_shards, ["precision=fp16", "deepspeed.zero_stage=0"]))


def test_cli_prints_one_line_and_exits_2_on_a_bad_config(tmp_path, synth_shards):
    import subprocess

    out = subprocess.run([PY, "-m", "trainer.cli.train", "experiment=tiny_cpu", f"run_dir={tmp_path}",
                          f"data.urls={synth_shards}", "data.resolution=36"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("ldm-train: data.resolution=36 is not divisible")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_dry_run_prints_the_plan(tmp_path, synth_shards, capsys):
    assert train(train_config(tmp_path, "/nonexistent/shards", ["dry_run=true"])) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["latent_size"] == 8 and plan["modules"]["unet"]["trainable"] > 0
    assert not (tmp_path / "checkpoints").exists()


def test_cfg_job_prints_the_resolved_config(tmp_path, synth_shards):
    import subprocess

    out = subprocess.run([PY, "-m", "trainer.cli.train", "experiment=tiny_cpu", f"run_dir={tmp_path}", "--cfg", "job"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, check=True)  # fmt: skip
    assert "zero_stage: 2" in out.stdout and "max_steps: 60" in out.stdout
    assert "_target_: trainer.tasks.unet.UNetTask" in out.stdout


@pytest.mark.slow
def test_autoencoder_stage_exports_what_the_unet_stage_loads(tmp_path, synth_shards):
    ae_dir = tmp_path / "ae"
    ae = [
        "task=autoencoder",
        "max_steps=6",
        "checkpoint.every=3",
        "task.loss.lpips_net=alex",
        "task.loss.lpips_random_backbone=true",
        "task.loss.disc_start=3",
        "task.loss.disc_layers=2",
        "precision=bf16-autocast",  # the demo's: the GAN's adaptive weight sees bf16 activations
        "data.resolution=32",
        "ema.enabled=false",
        "deepspeed.zero_stage=1",
        "eval.every=3",
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
    from trainer.inference.export import export

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


@pytest.mark.slow
def test_wandb_offline_run_continues_after_resume_and_never_stores_the_key(
    tmp_path, synth_shards, monkeypatch
):
    """One W&B run across sessions, named run_name, steps increasing with none logged twice (read back from the
    offline transaction logs), eval grids, checkpoints and the config as artifacts, and no API key on disk."""
    from wandbfiles import read_run

    monkeypatch.setenv("WANDB_API_KEY", "local-0123456789abcdef0123456789abcdef01234567")
    common = ["logger=wandb_offline", "logger.artifacts=true", "checkpoint.every=2", "eval.every=2",
              "eval.steps=2", "run_name=sweep-point-a"]  # fmt: skip
    run(tmp_path, synth_shards, [*common, "max_steps=3"], nproc=1)  # checkpoints at 2 and 3 (final)
    ckpt2 = tmp_path / "checkpoints" / "step_00000002"
    # resumed from step 2: step 3 runs and is logged again (as after a kill), then 4
    run(tmp_path, synth_shards, [*common, "max_steps=4", f"checkpoint.resume={ckpt2}"], nproc=1)
    rows = metrics(tmp_path)
    ids = {r["run_id"] for r in rows if r.get("event") in ("start", "resume")}
    assert len(ids) == 1
    run_id = ids.pop()
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 3, 4]  # the JSONL keeps both step 3s
    sessions = sorted(
        (tmp_path / "wandb").glob("offline-run-*")
    )  # in start order, as `wandb sync` takes them
    assert len(sessions) == 2 and all(p.name.endswith(run_id) for p in sessions)
    runs = [read_run(p / f"run-{run_id}.wandb") for p in sessions]
    assert {r["id"] for r in runs} == {run_id} and {r["name"] for r in runs} == {"sweep-point-a"}
    steps = [s for r in runs for s in r["steps"]]
    assert steps == sorted(set(steps)) and max(steps) == 4, steps  # increasing, none twice
    artifacts = [a for r in runs for a in r["artifacts"]]
    assert ("checkpoint-" + run_id, "checkpoint") in artifacts and ("config-" + run_id, "config") in artifacts
    assert len(list((tmp_path / "samples").glob("samples_*.png"))) == 2  # steps 2 and 4
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"0123456789abcdef0123456789abcdef01234567" not in path.read_bytes(), path
