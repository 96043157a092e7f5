"""ldm-submit against a real slurmctld + two slurmd (emulated nodes n1, n2): multi-node training, preemption with
requeue and resume, a precompute -> train chain, and the rendered script of a 16-node job."""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import save_file
from trainrun import PY, ROOT, env, events, losses, metrics

pytestmark = (
    pytest.mark.slow
)  # (make test's --dist loadfile keeps this file, and the one local cluster, on one worker)
SUBMIT = [PY, "-m", "trainer.cli.submit"]
MIN_RUNTIME = 5  # launcher/local_cpu.yaml: a stop signal sooner after a (re)start is ignored


def base(run_dir: Path, shards: Path | str) -> list[str]:
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


def preempt_once(job: str, run_dir: Path, logs: Path | None = None) -> dict[str, str]:
    """Wait until ``job`` has logged step 3 in ``run_dir`` and runs past launcher.min_runtime, send its batch script the
    stop signal Slurm sends before a time limit, and wait until the requeued job has completed."""

    def running_a_while() -> bool:
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        return any(r.get("step", 0) >= 3 for r in rows) and "restart 0" in job_log(logs or run_dir)

    wait(job, until=running_a_while)
    starts = re.findall(r"\(restart 0\) on .*, (\S+)$", job_log(logs or run_dir), re.M)  # the scripts' clocks
    started = max(datetime.fromisoformat(t).timestamp() for t in starts)
    time.sleep(max(0.0, started + MIN_RUNTIME + 1 - time.time()))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=env())
    return wait(job, timeout=900, until=lambda: job_state(job).get("JobState") == "COMPLETED")


def assert_resumed_once(run_dir: Path, steps: int, run_id: str) -> None:
    """Every step logged exactly once across the two runs, resumed where the stop left off, one W&B run."""
    rows = metrics(run_dir)
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, steps + 1))
    preempted = events(rows, "preempted")
    assert len(preempted) == 1 and events(rows, "resumed_from")[0]["step"] == preempted[0]["step"]
    assert {r["run_id"] for r in events(rows, "start") + events(rows, "resume")} == {run_id}
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_pipeline_rehearsal_over_http_preempted_once_accounts_for_every_sample(
    tmp_path, synth_shards, slurm_cluster
):
    """ldm-submit pipeline with the shards behind a real HTTP server (one shard answers 503 and drops its
    connection before it is served whole): the precompute job, then training from its latents, preempted once."""
    from shardserver import ShardServer

    ae = _tiny_autoencoder(tmp_path / "ae")
    run_dir, steps, global_batch = tmp_path / "run", 30, 8 * 2
    with ShardServer(synth_shards) as srv:
        srv.faults["/train-000003.tar"] = ["503", "drop:3000"]
        urls = srv.url("train-{000000..000007}.tar")
        # two nodes x one task: the four-rank layout is the first test's; here every launch of a rank is CPU time
        pre, train = submit("pipeline", [*base(run_dir, f"'{urls}'"), "launcher.tasks_per_node=1",
                                         f"weights.autoencoder={ae}", "weights.allow_random_autoencoder=false",
                                         f"max_steps={steps}", "checkpoint.every=1000", "logger=wandb_offline"])  # fmt: skip
        state = preempt_once(train, run_dir)
        faulty = srv.requests("train-000003.tar")
    log = job_log(run_dir)
    assert job_state(pre)["JobState"] == "COMPLETED", job_log(run_dir / "latents")[-3000:]
    pre_end = re.search(r"job step exited with code 0, (\S+)", job_log(run_dir / "latents")).group(1)
    train_start = re.search(rf"\[ldm\] job {train} \(restart 0\).*, (\S+)$", log, re.M).group(1)
    assert pre_end <= train_start  # ISO timestamps: the chain ran in order
    manifest = json.loads((run_dir / "latents" / "manifest.json").read_text())
    assert manifest["samples"] == 320  # every sample fetched over HTTP, none lost to the faults
    assert state["Restarts"] == "1", log[-3000:]
    assert "stopped after a signal: requeueing" in log and f"job {train} (restart 1)" in log
    assert_resumed_once(run_dir, steps, f"tiny_cpu-{train}")
    last = [r for r in metrics(run_dir) if r.get("step") == steps and "loss" in r][-1]
    # the data position came back with the checkpoint: nothing read twice or skipped across the requeue
    assert last["data/seen"] == last["data/valid"] == steps * global_batch
    assert not [k for k in last if k.startswith("data/skipped")]
    assert (run_dir / "export" / "pipeline.json").is_file()
    assert faulty[:3] == [None, None, "bytes=3000-"]  # the 503, the dropped connection, the rest of the shard


def test_a_failed_precompute_cancels_the_training_it_feeds(tmp_path, synth_shards, slurm_cluster):
    bad_run = tmp_path / "bad"
    bad = _tiny_autoencoder(tmp_path / "bad_ae", garbage=True)
    pre, train = submit("pipeline", [*base(bad_run, synth_shards), "weights.allow_random_autoencoder=false",
                                     "max_steps=6", f"weights.autoencoder={bad}"])  # fmt: skip
    assert wait(pre)["JobState"] == "FAILED"
    state = wait(train, timeout=120)
    assert state["JobState"] == "CANCELLED" and not (bad_run / "metrics.jsonl").exists()


def test_sweep_is_a_job_array_whose_points_requeue_and_resume_on_their_own(
    tmp_path, synth_shards, slurm_cluster
):
    """ldm-submit train -m: one array task per point, each in its own run folder with its own W&B run; one
    point is preempted and requeued alone."""
    run_dir, steps = tmp_path / "sweep", 30
    [array] = submit("train", ["-m", *base(run_dir, synth_shards), "launcher.nodes=1", "launcher.tasks_per_node=1",
                               f"max_steps={steps}", "checkpoint.every=1000", "logger=wandb_offline",
                               "optim.lr=1e-3,3e-3"])  # fmt: skip
    points = {0: run_dir / "optim.lr=0.001", 1: run_dir / "optim.lr=0.003"}
    preempt_once(f"{array}_1", points[1], logs=run_dir)
    for task, folder in points.items():
        state = wait(
            f"{array}_{task}", until=lambda t=task: job_state(f"{array}_{t}").get("JobState") == "COMPLETED"
        )
        assert state["Restarts"] == str(task), job_log(run_dir)[-3000:]  # only point 1 was preempted
        rows = metrics(folder)
        assert {r["lr"] for r in rows if "loss" in r and r["step"] == steps} == {[1e-3, 3e-3][task]}
        if task:
            assert_resumed_once(folder, steps, f"tiny_cpu-{array}-1")
        else:
            assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, steps + 1))
            assert not events(rows, "resumed_from")
        assert (folder / "export" / "pipeline.json").is_file()


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
