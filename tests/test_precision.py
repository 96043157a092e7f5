"""fp16 mixed precision with DeepSpeed's dynamic loss scaling (bf16 stays the GPU presets' default): the
DeepSpeed config it renders, and a tiny run in which overflowing scaled gradients lower the scale without
counting as non-finite steps while a NaN loss still does."""

from __future__ import annotations

import math

import pytest
import torch
from trainrun import losses, metrics, run

from trainer.config import compose
from trainer.engine.deepspeed_setup import ds_config
from trainer.engine.optim import AdamW
from trainer.engine.precision import precision
from trainer.schema import DeepSpeedConfig


def test_fp16_config_renders_deepspeed_dynamic_loss_scale():
    ds = DeepSpeedConfig(zero_stage=2, extra={"fp16": {"hysteresis": 1}})
    cfg = ds_config(ds, AdamW(), 8, precision("fp16"), 1e-4)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 1, "min_loss_scale": 1}  # fmt: skip
    assert cfg["bf16"]["enabled"] is False
    assert precision("fp16").dtype == torch.float16 and precision("fp16").mixed
    bf16 = ds_config(DeepSpeedConfig(), AdamW(), 8, precision("bf16"), 1e-4)
    assert bf16["bf16"]["enabled"] and bf16["fp16"] == {"enabled": False}
    for name in ("sd2_base_256", "ldm_kl8_text", "sd15_512"):  # GPU presets keep bf16
        assert compose("train", [f"experiment={name}"]).precision == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 0])
def test_fp16_trains_with_dynamic_loss_scaling(tmp_path, synth_shards, zero_stage):
    """Starting at a loss scale of 2^24 the scaled gradients overflow fp16 until DeepSpeed has halved it enough
    (ZeRO-2); those skipped steps are loss scaling at work, so the non-finite guard (3 in a row roll back) stays
    quiet. The NaN loss injected at step 9 is a real non-finite step and is counted."""
    run(tmp_path, synth_shards, ["precision=fp16", "max_steps=10", "checkpoint.every=5", "task.scale_samples=32",
                                 f"deepspeed.zero_stage={zero_stage}", "+deepspeed.extra.fp16.initial_scale_power=24",
                                 "+deepspeed.extra.fp16.hysteresis=1", "faults.nan_loss_at=[9]"], nproc=1)  # fmt: skip
    rows = metrics(tmp_path)
    steps = [r for r in rows if "loss" in r]
    scales = [r["loss_scale"] for r in steps]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in steps[:9]) and math.isnan(steps[9]["loss"])
    assert scales[0] <= 2**24 and scales[-1] < scales[-2] and scales == sorted(scales, reverse=True)
    assert steps[8]["nonfinite_steps"] == 0 and steps[9]["nonfinite_steps"] == 1
    assert not [r for r in rows if r.get("event") == "rollback"]
    if zero_stage == 2:
        assert scales[2] < 2**24  # it overflowed at 2^24 and halved
    assert sorted(losses(rows)) == list(range(1, 11))
