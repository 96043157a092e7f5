"""Issue 15, training runs under attack and under a cluster's signals (real ldm-train processes, torchrun, gloo):
planted pickles run nothing, stop signals to every process leave one checkpoint, a save that is killed never
costs a committed checkpoint, one run per run_dir, divergence fails loudly, a full disk is named, and a resume
with another autoencoder is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from trainrun import ROOT, command, descendants, env, events, losses, metrics, run, wait_paused_then_kill

pytestmark = pytest.mark.slow
PY = sys.executable


class Payload:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


def test_a_pickle_planted_in_a_checkpoint_runs_nothing(tmp_path, synth_shards):
    """A ZeRO-2 checkpoint holds both kinds of file a loader reads: the model states and a rank's optimizer
    partition. One run is trained; the pickle is planted in each victim file in turn (the other one intact)."""
    run_dir = tmp_path / "run"
    run(run_dir, synth_shards, ["deepspeed.zero_stage=2", "max_steps=2", "checkpoint.every=2"], nproc=1)
    folder = run_dir / "checkpoints" / "step_00000002"
    pwned = tmp_path / "PWNED"
    for victim in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        path = folder / "model" / victim
        intact = path.read_bytes()
        torch.save(Payload(pwned), path)
        for args in (["trainer.cli.export", str(folder), "--out", str(tmp_path / "e"), "--raw"],
                     ["trainer.cli.sample", str(folder), "--raw", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")]):  # fmt: skip
            out = cli(*args, cwd=tmp_path)
            assert out.returncode != 0 and "refused" in out.stderr, (victim, out.stderr[-2000:])
            assert not pwned.exists()
        out = run(run_dir, synth_shards, ["deepspeed.zero_stage=2", "max_steps=3"], nproc=1, check=False)
        assert out.returncode == 2 and "refused (loading it could run code)" in out.stderr, (
            victim,
            out.stderr[-2000:],
        )
        assert not pwned.exists()
        path.write_bytes(intact)


def start(run_dir: Path, shards: Path, overrides: list[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(command(run_dir, shards, overrides, nproc), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= step and "loss" in r for r in rows):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.parametrize("who", ["every process", "torchrun's agent", "the process group (one rank)"])
def test_a_stop_signal_to_any_process_checkpoints_once_and_exits_cleanly(tmp_path, synth_shards, who):
    """Slurm (scancel, time limit) and torchrun's agent signal every process; data workers must not die first."""
    run_dir, nproc = tmp_path / "run", 1 if who.startswith("the process group") else 2
    common = ["max_steps=400", "checkpoint.every=1000", "data.num_workers=2"]
    proc = start(run_dir, synth_shards, common, nproc)
    wait_for_step(proc, run_dir, 3)
    if who == "every process":
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun, its ranks and their DataLoader workers
            os.kill(pid, signal.SIGTERM)
    elif who == "torchrun's agent":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    err = proc.stderr.read()
    rows = metrics(run_dir)
    [preempted] = events(rows, "preempted")
    step = preempted["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}", err[-3000:]
    assert (run_dir / "PREEMPTED").read_text().strip() == str(step)
    # no data worker died first, no rank failed (torchrun's agent itself reports the signal it got)
    assert "DataLoader worker" not in err and "ChildFailedError" not in err and "ldm-train:" not in err, err[
        -3000:
    ]
    run(
        run_dir, synth_shards, [*common[1:], f"max_steps={step + 3}"], nproc=nproc
    )  # resumes, every step once
    assert sorted(losses(metrics(run_dir))) == list(range(1, step + 4))


def test_killed_while_resaving_the_step_latest_names_keeps_that_checkpoint(tmp_path, synth_shards):
    common = ["max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=5"]
    run(tmp_path, synth_shards, common)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    before = {p.name: p.read_bytes() for p in (ckpts / "step_00000006").rglob("*") if p.is_file()}
    # resume from step 3 and get killed while saving step 6 again
    proc = subprocess.Popen(command(tmp_path, synth_shards, [*common, f"checkpoint.resume={ckpts / 'step_00000003'}",
                                                             "faults.pause_in_save_at=6"]),
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert wait_paused_then_kill(proc, tmp_path / "PAUSED") == "save 6"
    assert (ckpts / "latest").read_text() == "step_00000006"
    after = {p.name: p.read_bytes() for p in (ckpts / "step_00000006").rglob("*") if p.is_file()}
    assert after == before  # the committed folder was never touched
    out = run(tmp_path, synth_shards, [*common, "max_steps=8"])
    assert events(metrics(tmp_path), "resumed_from")[-1]["step"] == 6, out.stderr[-2000:]
    assert not list(ckpts.glob(".step_*"))  # the partial save was cleaned up


def test_resume_auto_refuses_to_start_fresh_over_uncommitted_steps(tmp_path, synth_shards):
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    out = run(tmp_path, synth_shards, ["max_steps=2"], nproc=1, check=False)
    assert out.returncode == 2 and "refusing to start from scratch" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or not losses(metrics(tmp_path))


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_first(tmp_path, synth_shards):
    proc = start(tmp_path, synth_shards, ["max_steps=400", "checkpoint.every=1000"], nproc=1)
    try:
        wait_for_step(proc, tmp_path, 1)
        out = run(tmp_path, synth_shards, ["max_steps=2"], nproc=1, check=False)
        assert out.returncode == 2 and "in use by another ldm-train run" in out.stderr
        assert f"pid {proc.pid}" in out.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_non_finite_streak_to_the_end_fails_instead_of_finishing(tmp_path, synth_shards):
    out = run(tmp_path, synth_shards, ["max_steps=30", "checkpoint.every=4", f"faults.nan_loss_at=[{','.join(map(str, range(6, 31)))}]",
                                       "guard.max_consecutive_bad=2", "guard.max_rollbacks=2"], nproc=1, check=False)  # fmt: skip
    assert out.returncode == 3 and "3 rollbacks in a row" in out.stderr, out.stderr[-2000:]
    assert len(events(metrics(tmp_path), "rollback")) == 2  # the third one gave up


def test_a_diverging_learning_rate_is_never_checkpointed_and_fails(tmp_path, synth_shards):
    out = run(tmp_path, synth_shards, ["max_steps=40", "checkpoint.every=1", "checkpoint.keep_last=0", "optim.lr=1e30",
                                       "guard.max_consecutive_bad=2", "guard.max_rollbacks=2"], nproc=1, check=False)  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
    from trainer.inference.export import trained_weights

    rows = metrics(tmp_path)
    applied = [r["step"] for r in rows if r.get("step_applied") == 1]
    assert applied == [1] and events(rows, "checkpoint_skipped")  # every later step was non-finite
    first = trained_weights(tmp_path / "checkpoints" / "step_00000001", ema=False)
    for folder in (tmp_path / "checkpoints").glob(
        "step_*"
    ):  # saved only right after a rollback: the same state
        weights = trained_weights(folder, ema=False)
        assert all(torch.equal(weights[k], first[k]) for k in first), folder.name


def test_a_full_disk_is_named_and_leaves_no_checkpoint_folder(tmp_path, synth_shards):
    """checkpoint.dir on a 24 MB tmpfs (a private mount namespace: no root needed): the frozen modules (17 MB)
    fit, the first checkpoint (22 MB) does not."""
    ckpts = tmp_path / "small"
    ckpts.mkdir()
    inner = command(
        tmp_path / "run", synth_shards, ["max_steps=4", "checkpoint.every=2", f"checkpoint.dir={ckpts}"], 1
    )
    script = f"mount -t tmpfs -o size=24m tmpfs {ckpts} && exec {' '.join(inner)}"
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ldm-train: writing") and "no space left on the device" in last, last
    assert "step_00000002" in last and not list((tmp_path / "run").rglob("step_00000002"))


def test_resuming_with_another_autoencoder_is_refused(tmp_path, synth_shards):
    from presets import model as preset_model

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"ae{seed}"
        folder.mkdir()
        sd = {k: v.contiguous() for k, v in preset_model("autoencoder/tiny", seed=seed).state_dict().items()}
        save_file(sd, str(folder / "autoencoder.safetensors"))
        (folder / "autoencoder.json").write_text(json.dumps({"scale_factor": 0.5}))
        folders.append(folder)
    common = ["weights.allow_random_autoencoder=false", "checkpoint.every=2"]
    run(
        tmp_path / "run", synth_shards, [*common, f"weights.autoencoder={folders[0]}", "max_steps=2"], nproc=1
    )
    frozen = (tmp_path / "run" / "checkpoints" / "frozen" / "autoencoder.safetensors").read_bytes()
    out = run(tmp_path / "run", synth_shards, [*common, f"weights.autoencoder={folders[1]}", "max_steps=4"], nproc=1,
              check=False)  # fmt: skip
    assert out.returncode == 2 and "trained with other autoencoder" in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "frozen" / "autoencoder.safetensors").read_bytes() == frozen
