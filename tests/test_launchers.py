"""Issue 16: every launcher's way of passing the local rank is accepted, and ``deepspeed.extra`` merges deeply."""

from __future__ import annotations

import os
import subprocess

from trainrun import PY, ROOT, env

from trainer.cli._hydra import strip_local_rank
from trainer.config import compose
from trainer.engine.deepspeed_setup import deep_merge, ds_config
from trainer.train import prepare


def test_the_deepspeed_launchers_local_rank_argument_is_taken_out_for_hydra(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=3", "max_steps=2"]) == ["max_steps=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank(["a=1", "--local-rank", "2", "b=2"]) == ["a=1", "b=2"]
    assert os.environ["LOCAL_RANK"] == "2"


def test_ldm_train_accepts_the_deepspeed_launcher_command_line(tmp_path):
    """What ``deepspeed --num_gpus N -m trainer.cli.train ...`` runs on each rank (here a dry run)."""
    cmd = [PY, "-m", "trainer.cli.train", "--local_rank=0", "experiment=tiny_cpu", "dry_run=true",
           f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env() | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "unrecognized arguments" not in out.stderr


def test_deepspeed_extra_is_merged_deeply_keeping_sibling_keys():
    base = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True}}
    merged = deep_merge(base, {"zero_optimization": {"reduce_scatter": False}, "steps_per_print": 5})
    assert merged == {"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_scatter": False},
                      "bf16": {"enabled": True}, "steps_per_print": 5}  # fmt: skip
    assert base["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the input is left alone
    cfg = compose("train", ["experiment=tiny_cpu", "deepspeed.zero_stage=3",
                            "+deepspeed.extra.zero_optimization.stage3_max_live_parameters=1000"])  # fmt: skip
    parts = prepare(cfg, load_models=False, check_files=False)
    ds = ds_config(cfg.deepspeed, parts.optim, 8, parts.precision, 1e-4)
    zero = ds["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 1000 and zero["stage"] == 3 and "reduce_bucket_size" in zero
