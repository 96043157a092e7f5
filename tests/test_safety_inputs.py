"""Issue 15, what a file or a config value can make us do (fast: no training run): metadata read back from disk
builds only known classes and never instantiates nested nodes; sbatch scripts render hostile values as data;
bad numbers are refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from presets import tiny_pipeline

from trainer.config import ConfigError, compose
from trainer.inference.pipeline import LatentDiffusionPipeline
from trainer.train import prepare

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class Payload:
    """Pickled, it runs ``touch <path>`` (what an attacker plants in a checkpoint)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_pipeline().save(tmp_path_factory.mktemp("export") / "model")


def hostile_copy(export_dir: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(export_dir, folder)
    meta = json.loads((folder / "pipeline.json").read_text())
    edit(meta, tmp_path)
    (folder / "pipeline.json").write_text(json.dumps(meta))
    return folder


def plant(tmp_path: Path) -> Path:
    import torch

    torch.save(Payload(tmp_path / "PWNED"), tmp_path / "payload.pt")
    return tmp_path / "payload.pt"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m, t: m["unet"].update(_target_="torch.load", f=str(plant(t)), weights_only=False), "only component"),
        (lambda m, t: m["text_encoder"].update(
            model_config={"_target_": "torch.load", "f": str(plant(t)), "weights_only": False}), ""),
        (lambda m, t: m.update(concat={"_target_": "builtins.open", "file": str(t / "PWNED"), "mode": "w"}),
         "only component"),
        (lambda m, t: m["diffusion"]["schedule"].update(_target_="shutil.copyfile", src="/etc/hostname",
                                                         dst=str(t / "PWNED")), "only component"),
    ],
    ids=["unet-target", "nested-in-model_config", "concat-open", "schedule-copyfile"],
)  # fmt: skip
def test_pipeline_json_builds_no_foreign_object(export_dir, tmp_path, edit, message):
    folder = hostile_copy(export_dir, tmp_path, edit)
    with pytest.raises((ConfigError, KeyError, TypeError, ValueError)) as info:
        LatentDiffusionPipeline.load(folder)
    assert message in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_config_yaml_builds_no_foreign_task(tmp_path):
    from trainer.inference.export import checkpoint_task

    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        f"task:\n  _target_: os.system\n  command: touch {tmp_path / 'PWNED'}\n"
    )
    with pytest.raises(ConfigError, match="only component classes"):
        checkpoint_task(folder)
    assert not (tmp_path / "PWNED").exists()


# -- sbatch scripts --------------------------------------------------------------------------------------------
HOSTILE_NAME = "x$(touch PWNED_NAME)`touch PWNED_TICK`"


def render(tmp_path: Path, overrides: list[str]) -> str:
    from slurm.submit import compose_config, render

    cfg = compose_config("train", ["experiment=tiny_cpu", "launcher=local_cpu", f"run_dir={tmp_path / 'run'}",
                                   f"launcher.python={PY}", *overrides])  # fmt: skip
    return render(cfg, "train", "job", tmp_path / "out", write=False)[1]


def test_hostile_values_render_as_data_and_the_script_runs_nothing_else(tmp_path):
    """The rendered script executed with stub srun/scontrol: no injected command runs, values arrive intact."""
    work = tmp_path / "work dir"
    work.mkdir()
    text = render(tmp_path, [f"run_name='{HOSTILE_NAME}'", f"launcher.workdir='{work}'", "launcher.export_at_end=false",
                             "launcher.job_name='job; touch PWNED_JOB'",
                             "+launcher.env.SAFE='$HOME/$(touch PWNED_ENV)`touch PWNED_ENV2`\"x'"])  # fmt: skip
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\necho n1\n")
    (stubs / "srun").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$LDM_WANDB_RUN_ID" "$SAFE" "$@" > {tmp_path}/srun.args\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1",
           "HOME": "/home/user"}  # fmt: skip
    out = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert not [p.name for p in list(tmp_path.rglob("PWNED*")) + list(work.rglob("PWNED*"))]
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[0] == f"{HOSTILE_NAME}-42"  # the W&B run id, literally
    assert args[1] == '/home/user/$(touch PWNED_ENV)`touch PWNED_ENV2`"x'  # $VAR expands, nothing else does
    assert '#SBATCH --job-name="job; touch PWNED_JOB"' in text


@pytest.mark.parametrize(
    "override,message",
    [
        ("launcher.job_name='a\nb'", "launcher.job_name"),
        ("launcher.partition='gpu\n#SBATCH --requeue'", "launcher.partition"),
        ("+launcher.env.BAD-KEY=1", "not a valid environment variable name"),
        ("run_dir='/tmp/a\nb'", "newlines and control characters"),
        ("launcher.account='acc\"ount'", "double quote"),
    ],
)
def test_values_that_cannot_be_rendered_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        render(tmp_path, [override])


def test_output_paths_with_spaces_are_one_sbatch_value(tmp_path):
    text = render(tmp_path / "with space", [])
    line = next(x for x in text.splitlines() if x.startswith("#SBATCH --output="))
    assert line == f'#SBATCH --output="{tmp_path / "with space" / "out"}/%x-%j.out"'


def test_ldm_submit_without_sbatch_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(Path(PY).parent)}
    out = subprocess.run([PY, "-m", "trainer.cli.submit", "train", "experiment=tiny_cpu"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sbatch is not on PATH" in out.stderr and out.stderr.strip().count("\n") == 0


# -- numbers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    ["checkpoint.every=0", "logger.log_every=0", "ema.every=0", "max_steps=-3", "data.batch_size=0",
     "deepspeed.grad_accum=0"],
)  # fmt: skip
def test_training_numbers_are_refused_before_anything_runs(tmp_path, synth_shards, override):
    cfg = compose(
        "train", ["experiment=tiny_cpu", f"run_dir={tmp_path}", f"data.urls={synth_shards}", override]
    )
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*must be at least"):
        prepare(cfg, load_models=False)


@pytest.mark.parametrize(
    "override,message",
    [("batch_size=0", "batch_size=0: must be at least 1"), ("data.resolution=34", "not divisible by the autoencoder"),
     ("scale_samples=0", "scale_samples=0")],
)  # fmt: skip
def test_precompute_numbers_are_refused_before_anything_runs(tmp_path, override, message):
    from trainer.precompute import check_config

    cfg = compose("precompute", [f"out={tmp_path}", "autoencoder=tiny", "data.urls=x", override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(
    "args,message",
    [(["--num", "0"], "--num: must be >= 1"), (["--height", "33"], "--height 33 is not a multiple")],
)
def test_ldm_sample_refuses_bad_numbers(export_dir, tmp_path, args, message):
    out = subprocess.run([PY, "-m", "trainer.cli.sample", str(export_dir), "--prompt", "a red circle", *args,
                          "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()


def test_ldm_eval_refuses_a_decompression_bomb_in_one_line(tmp_path):
    from PIL import Image

    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("1", (30000, 30000)).save(samples / "0000.png")  # 30000 x 30000: a few KB on disk
    (samples / "prompts.json").write_text(
        json.dumps([{"file": "0000.png", "prompt": "a red circle", "seed": 0}])
    )
    out = subprocess.run([PY, "-m", "trainer.cli.eval", "adherence", str(samples)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert (
        out.returncode == 2 and "Traceback" not in out.stderr and "decompression bomb" in out.stderr.lower()
    )


def test_an_autoencoder_export_for_another_architecture_names_the_fields_that_differ(tmp_path):
    from presets import model as preset_model
    from safetensors.torch import save_file

    from trainer.config import config_dict
    from trainer.models.weights import WeightsError, load_autoencoder_weights

    trained = preset_model("autoencoder/tiny", seed=0)
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        str(tmp_path / "autoencoder.safetensors"),
    )
    (tmp_path / "autoencoder.json").write_text(json.dumps({"config": config_dict(trained.config)}))
    assert load_autoencoder_weights(preset_model("autoencoder/tiny"), tmp_path) is None  # same config: loads
    with pytest.raises(WeightsError) as err:
        load_autoencoder_weights(preset_model("autoencoder/tiny", ch=16, ch_mult=[1, 2]), tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "ch=32 there, 16 here" in message
    assert "ch_mult=[1, 2, 2] there, [1, 2] here" in message and "z_channels" not in message
