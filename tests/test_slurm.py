"""ldm-submit against a real slurmctld + two slurmd (emulated nodes n1, n2): multi-node training, preemption with
requeue and resume, a precompute -> train chain, and the rendered script of a 16-node job."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file
from trainrun import PY, ROOT, env, events, losses, metrics

pytestmark = pytest.mark.slow
SUBMIT = [PY, "-m", "trainer.cli.submit"]


def base(run_dir: Path, shards: Path) -> list[str]:
    return [
        "experiment=tiny_cpu",
        "launcher=local_cpu",
        f"launcher.python={PY}",
        f"run_dir={run_dir}",
        f"data.urls={shards}",
        "logger.progress=false",
        "logger.log_every=1",
    ]


def submit(job: str, overrides: list[str]) -> list[str]:
    out = subprocess.run([*SUBMIT, job, *overrides], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return re.findall(r"submitted \w+ job (\d+)", out.stdout)


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env()).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait(job: str, timeout: float = 600, until=None) -> dict[str, str]:
    """Poll until the job is done (or ``until()`` holds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if until is not None and until():
            return state
        if until is None and state.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
        ):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_state(job).get('JobState')} after {timeout}s")


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def test_two_nodes_by_two_tasks_train_and_export(tmp_path, synth_shards, slurm_cluster):
    run_dir = tmp_path / "run"
    [job] = submit("train", [*base(run_dir, synth_shards), "max_steps=12", "checkpoint.every=6"])
    state = wait(job)
    log = job_log(run_dir)
    assert state["JobState"] == "COMPLETED", log[-3000:]
    ranks = set(re.findall(r"\[ldm\] rank (\d)/4 on node (n\d)", log))
    assert {r for r, _ in ranks} == {"0", "1", "2", "3"} and {n for _, n in ranks} == {"n1", "n2"}
    folder = run_dir / "checkpoints" / "step_00000012"
    assert (folder / "COMMITTED").is_file()
    assert {f"rank_{r:05d}.pt" for r in range(4)} <= {p.name for p in folder.iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)} <= {
        p.name for p in (folder / "model").iterdir()
    }
    assert (run_dir / "export" / "pipeline.json").is_file()
    assert (run_dir / "export" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(losses(metrics(run_dir))) == list(range(1, 13))


def test_preemption_checkpoints_requeues_and_resumes(tmp_path, synth_shards, slurm_cluster):
    run_dir = tmp_path / "run"
    steps = 80
    [job] = submit(
        "train",
        [
            *base(run_dir, synth_shards),
            f"max_steps={steps}",
            "checkpoint.every=1000",
            "logger=wandb_offline",
        ],
    )

    def running_a_while() -> bool:
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        return any(r.get("step", 0) >= 3 for r in rows) and "restart 0" in job_log(run_dir)

    wait(job, until=running_a_while)
    time.sleep(6)  # past launcher.min_runtime
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=env())
    state = wait(job, timeout=900, until=lambda: job_state(job).get("JobState") == "COMPLETED")
    log = job_log(run_dir)
    assert state["Restarts"] == "1", log[-3000:]
    assert "stopped after a signal: requeueing" in log and f"job {job} (restart 1)" in log
    rows = metrics(run_dir)
    per_step = [r["step"] for r in rows if "loss" in r]
    assert sorted(per_step) == list(range(1, steps + 1)), "every step logged exactly once across both runs"
    preempted = events(rows, "preempted")
    assert len(preempted) == 1 and events(rows, "resumed_from")[0]["step"] == preempted[0]["step"]
    ids = {r["run_id"] for r in events(rows, "start") + events(rows, "resume")}
    assert ids == {f"tiny_cpu-{job}"}  # one W&B run, continued
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-tiny_cpu-{job}"))) == 2


def _tiny_autoencoder(folder: Path, garbage: bool = False) -> Path:
    folder.mkdir()
    if garbage:
        (folder / "autoencoder.safetensors").write_bytes(b"\x00" * 64)
        return folder
    from presets import model as preset_model

    model = preset_model("autoencoder/tiny", seed=3)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "autoencoder.safetensors")
    )
    return folder


def test_pipeline_runs_in_order_and_a_failed_precompute_cancels_training(
    tmp_path, synth_shards, slurm_cluster
):
    ae = _tiny_autoencoder(tmp_path / "ae")
    run_dir = tmp_path / "run"
    common = ["weights.allow_random_autoencoder=false", "max_steps=6", "checkpoint.every=3"]
    pre, train = submit("pipeline", [*base(run_dir, synth_shards), *common, f"weights.autoencoder={ae}"])
    assert wait(train)["JobState"] == "COMPLETED", job_log(run_dir)[-3000:]
    assert job_state(pre)["JobState"] == "COMPLETED"
    manifest = json.loads((run_dir / "latents" / "manifest.json").read_text())
    assert manifest["samples"] == 320
    pre_log = job_log(run_dir / "latents")
    pre_end = re.search(r"job step exited with code 0, (\S+)", pre_log).group(1)
    train_start = re.search(rf"\[ldm\] job {train} \(restart 0\).*, (\S+)$", job_log(run_dir), re.M).group(1)
    assert pre_end <= train_start  # ISO timestamps: the chain ran in order
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 7))
    # a precompute that fails (unreadable autoencoder weights) cancels the dependent training job
    bad_run = tmp_path / "bad"
    bad = _tiny_autoencoder(tmp_path / "bad_ae", garbage=True)
    pre, train = submit("pipeline", [*base(bad_run, synth_shards), *common, f"weights.autoencoder={bad}"])
    assert wait(pre)["JobState"] == "FAILED"
    state = wait(train, timeout=120)
    assert state["JobState"] == "CANCELLED" and not (bad_run / "metrics.jsonl").exists()


def test_dry_run_of_a_16_node_job_is_the_documented_example():
    out = subprocess.run(
        [
            *SUBMIT,
            "train",
            "experiment=sd2_base_256",
            "launcher.nodes=16",
            "launcher.partition=gpu",
            "launcher.account=my-project",
            "launcher.workdir=/shared/ldm",
            "launcher.python=/shared/ldm/.venv/bin/python",
            "run_dir=/shared/ldm/runs/sd2_base_256",
            "weights.autoencoder=/shared/models/sd-vae",
            "data.urls='/shared/data/laion2b-en/{00000..23295}.tar'",
            "--dry-run",
            "--name",
            "train",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == (ROOT / "docs" / "examples" / "sd2_base_256_16x8.sbatch").read_text()
    assert "#SBATCH --nodes=16" in out.stdout and "#SBATCH --gpus-per-node=8" in out.stdout
    assert subprocess.run(["bash", "-n"], input=out.stdout, text=True).returncode == 0
    assert not Path("/shared/ldm/runs").exists()  # a dry run writes nothing
