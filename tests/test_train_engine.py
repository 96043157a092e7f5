"""ldm-train on 2 CPU ranks (torchrun + gloo + DeepSpeed): ZeRO stages, exports, exact resume after SIGKILL,
a kill during a checkpoint save, the non-finite guard, EMA under ZeRO-3."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainrun import (
    ROOT,
    command,
    env,
    events,
    keys_by_step,
    losses,
    metrics,
    run,
    run_until_paused_then_kill,
)

from trainer.inference.export import checkpoint_folder, export, trained_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero_stages(tmp_path_factory, synth_shards) -> Path:
    """ZeRO 0, 2 and 3, one after another in one launch of 2 ranks (ldm-train -m)."""
    run_dir = tmp_path_factory.mktemp("zero_stages")
    overrides = ["deepspeed.zero_stage=0,2,3", "max_steps=30", "checkpoint.every=10", "optim.lr=1e-3",
                 "faults.dump_weights=true"]  # fmt: skip
    run(run_dir, synth_shards, overrides, sweep=True)
    return run_dir


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_trains_checkpoints_per_rank_and_exports_the_engine_weights(tmp_path, zero_stages, stage):
    run_dir = zero_stages / f"deepspeed.zero_stage={stage}"
    loss = losses(metrics(run_dir))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < 0.9 * first, (first, last)
    folder = run_dir / "checkpoints" / "step_00000030"
    assert (folder / "COMMITTED").is_file() and (
        run_dir / "checkpoints" / "latest"
    ).read_text() == "step_00000030"
    names = {p.name for p in (folder / "model").iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt"} <= {p.name for p in folder.iterdir()}
    if stage == 0:
        assert names == {"mp_rank_00_model_states.pt"}
    else:
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    if stage == 3:
        assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= names
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000020",
        "step_00000030",
    ]
    engine = load_file(str(run_dir / "final_weights.safetensors"))  # gathered from the live engine at the end
    raw = trained_weights(folder, ema=False)
    assert raw.keys() == engine.keys() and all(torch.equal(raw[k], engine[k]) for k in raw)
    out = export(run_dir / "checkpoints", tmp_path / "export", ema=False)
    unet = load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(unet[k], engine[f"unet.{k}"]) for k in unet)
    assert (out / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_after_sigkill_is_bit_exact(tmp_path, synth_shards):
    common = [
        "deepspeed.zero_stage=2",
        "max_steps=16",
        "checkpoint.every=5",
        "faults.log_keys=true",
        "data.caption_dropout=0.2",
        "data.crop=random",
    ]
    ref_dir, dir_ = tmp_path / "uninterrupted", tmp_path / "killed"
    run(ref_dir, synth_shards, common)
    where = run_until_paused_then_kill(dir_, synth_shards, [*common, "faults.pause_at=7"])
    assert where == "step 7"
    assert (dir_ / "checkpoints" / "latest").read_text() == "step_00000005"
    run(dir_, synth_shards, common)  # checkpoint.resume=auto
    rows = metrics(dir_)
    assert events(rows, "resumed_from")[0]["step"] == 5
    ref, got = losses(metrics(ref_dir)), losses(rows)
    for step in range(6, 17):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"
    assert len({e["run_id"] for e in events(rows, "start") + events(rows, "resume")}) == 1  # same W&B run
    for rank in (0, 1):
        a, b = keys_by_step(ref_dir, rank), keys_by_step(dir_, rank)
        assert a == b
        per_epoch = defaultdict(list)
        for keys, epochs in b.values():
            for k, e in zip(keys, epochs, strict=True):
                per_epoch[e].append(k)
        assert len(per_epoch[0]) == len(set(per_epoch[0]))  # nothing seen twice within the epoch


def test_kill_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, synth_shards):
    common = ["deepspeed.zero_stage=2", "max_steps=12", "checkpoint.every=5"]
    where = run_until_paused_then_kill(tmp_path, synth_shards, [*common, "faults.pause_in_save_at=10"])
    assert where == "save 10"
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000005"
    partial = ckpts / ".step_00000010.partial"  # written so far, hidden, never taken for a checkpoint
    assert (
        (partial / "model").is_dir() and (partial / "ema").is_dir() and not (partial / "COMMITTED").exists()
    )
    assert not (ckpts / "step_00000010").exists()
    assert checkpoint_folder(ckpts).name == "step_00000005"
    run(tmp_path, synth_shards, common)
    rows = metrics(tmp_path)
    assert events(rows, "resumed_from")[-1]["checkpoint"].endswith("step_00000005")
    assert events(rows, "done")[-1]["step"] == 12


@pytest.fixture(scope="module")
def non_finite(tmp_path_factory, synth_shards) -> Path:
    """ZeRO 0 and 2 with injected non-finite steps, in one launch of 2 ranks (ldm-train -m)."""
    run_dir = tmp_path_factory.mktemp("non_finite")
    overrides = ["deepspeed.zero_stage=0,2", "max_steps=20", "checkpoint.every=5", "faults.inf_grad_at=[7]",
                 "faults.nan_loss_at=[3,11,12,13]", "guard.max_consecutive_bad=3"]  # fmt: skip
    run(run_dir, synth_shards, overrides, sweep=True)
    return run_dir


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_steps_are_skipped_then_rolled_back(non_finite, stage):
    rows = metrics(non_finite / f"deepspeed.zero_stage={stage}")
    applied = {r["step"]: r["step_applied"] for r in rows if "step_applied" in r}
    assert [s for s, a in applied.items() if not a] == [4, 8, 12, 13, 14]  # logged after the step (1-based)
    rollback = events(rows, "rollback")
    assert len(rollback) == 1 and rollback[0]["step"] == 14 and rollback[0]["to"].endswith("step_00000010")
    last = [r for r in rows if r.get("step") == 20 and "loss" in r][-1]
    assert last["nonfinite_steps"] == 5 and last["rollbacks"] == 1
    assert all(abs(v) < 10 for s, v in losses(rows).items() if applied[s])  # every applied step is finite
    assert events(rows, "done")[0]["step"] == 20


def test_ema_under_zero3_follows_the_gathered_weights(tmp_path, synth_shards):
    run(
        tmp_path,
        synth_shards,
        [
            "deepspeed.zero_stage=3",
            "max_steps=4",
            "checkpoint.every=1",
            "checkpoint.keep_last=10",
            "ema.decay=0.9",
            "optim.lr=1e-3",
        ],
    )
    ckpts = tmp_path / "checkpoints"
    for s in (1, 2, 3):
        ema_s = trained_weights(ckpts / f"step_{s:08d}", ema=True)
        ema_next = trained_weights(ckpts / f"step_{s + 1:08d}", ema=True)
        raw_next = trained_weights(ckpts / f"step_{s + 1:08d}", ema=False)
        d = min(0.9, (1 + s) / (10 + s))  # s updates happened before this one
        for k in raw_next:
            assert torch.allclose(ema_next[k], d * ema_s[k] + (1 - d) * raw_next[k], atol=1e-6), k
    state = json.loads((ckpts / "step_00000004" / "trainer_state.json").read_text())
    assert state["ema_updates"] == 4


def test_a_one_process_cpu_run_builds_no_deepspeed_op(tmp_path, synth_shards):
    """DeepSpeed's shared-memory all-reduce op is for peers on one host: a one-process run (every stage of the
    demo) must not spend its first minute on a fresh machine compiling it."""
    ext = tmp_path / "torch_extensions"
    out = subprocess.run(command(tmp_path / "run", synth_shards, ["max_steps=1"], nproc=1), cwd=ROOT,
                         env={**env(), "TORCH_EXTENSIONS_DIR": str(ext)}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert not list(ext.rglob("*.so")), sorted(map(str, ext.rglob("*")))
