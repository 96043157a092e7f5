"""Sweeps: ``ldm-train -m`` gives every point its own run folder and W&B run, and ``checkpoint.resume=auto`` never
crosses points (the Slurm job array form is in tests/test_slurm.py)."""

from __future__ import annotations

import pytest
from trainrun import events, metrics, multirun

from trainer.config import ConfigError, compose
from trainer.sweep import at_point, expand, point_tag, swept_keys


def test_sweep_points_are_the_product_of_the_swept_values_in_hydra_order():
    overrides = ["experiment=tiny_cpu", "optim.lr=1e-4,3e-4", "+tag=a,b/c"]
    assert swept_keys(overrides) == ["optim.lr", "tag"]
    points = expand(overrides)
    assert points == [
        ["experiment=tiny_cpu", "optim.lr=0.0001", "+tag=a"],  # values as Hydra parses them
        ["experiment=tiny_cpu", "optim.lr=0.0001", "+tag=b/c"],
        ["experiment=tiny_cpu", "optim.lr=0.0003", "+tag=a"],
        ["experiment=tiny_cpu", "optim.lr=0.0003", "+tag=b/c"],
    ]
    assert [point_tag(p, swept_keys(overrides)) for p in points][1] == "optim.lr=0.0001,tag=b_c"


def test_sweep_refuses_intervals_and_a_checkpoint_folder_shared_by_every_point(tmp_path):
    with pytest.raises(ConfigError, match="only lists of values sweep"):
        expand(["optim.lr=interval(0.1,0.2)"])
    cfg = compose("train", ["experiment=tiny_cpu", f"run_dir={tmp_path}", f"checkpoint.dir={tmp_path}/ck"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.* shared by every sweep point"):
        at_point(cfg, "optim.lr=1")
    cfg = at_point(compose("train", ["experiment=tiny_cpu", f"run_dir={tmp_path}"]), "optim.lr=1")
    assert (cfg.run_dir, cfg.run_name, cfg.checkpoint.dir) == (
        f"{tmp_path}/optim.lr=1",
        "tiny_cpu-optim.lr=1",
        f"{tmp_path}/optim.lr=1/checkpoints",
    )


def sweep(run_dir, shards, steps: int, lrs: str) -> None:
    multirun(
        run_dir,
        shards,
        [f"max_steps={steps}", "checkpoint.every=2", f"optim.lr={lrs}"],
        logger="wandb_offline",
    )


@pytest.mark.slow
def test_sweep_points_train_in_their_own_folders_and_resume_only_their_own(tmp_path, synth_shards):
    sweep(tmp_path, synth_shards, 2, "1e-3,2e-3")
    # a second sweep: 2e-3 is now the first point, and resumes its own checkpoint; 3e-3 starts afresh
    sweep(tmp_path, synth_shards, 3, "2e-3,3e-3")
    runs = {lr: metrics(tmp_path / f"optim.lr={lr}") for lr in ("0.001", "0.002", "0.003")}
    ids = {
        lr: {r["run_id"] for r in events(rows, "start") + events(rows, "resume")} for lr, rows in runs.items()
    }
    assert (
        all(len(i) == 1 for i in ids.values()) and len(set.union(*ids.values())) == 3
    )  # a W&B run per point
    assert [r["step"] for r in runs["0.001"] if "loss" in r] == [1, 2]
    assert [r["step"] for r in runs["0.002"] if "loss" in r] == [1, 2, 3]
    assert events(runs["0.002"], "resumed_from")[0]["step"] == 2
    assert [r["step"] for r in runs["0.003"] if "loss" in r] == [1, 2, 3] and not events(
        runs["0.003"], "resumed_from"
    )
    [lr] = [r["lr"] for r in runs["0.003"] if r.get("step") == 3 and "loss" in r]
    assert lr == pytest.approx(3e-3 * 3 / 5)  # step 3 of 5 warmup steps, of this point's lr
