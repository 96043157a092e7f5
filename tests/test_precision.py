"""fp16 mixed precision with DeepSpeed's dynamic loss scaling (bf16 stays the GPU presets' default): the
DeepSpeed config it renders, and a tiny run in which overflowing scaled gradients lower the scale without
counting as non-finite steps while a NaN loss still does."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from trainrun import free_port, losses, metrics, run

from trainer.config import compose
from trainer.engine import precision as precision_module
from trainer.engine.deepspeed_setup import ds_config
from trainer.engine.optim import AdamW
from trainer.engine.precision import cpu_has_fp16, precision
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


CPU_FP16 = cpu_has_fp16()
# DeepSpeed trains fp16 on a CPU only where oneDNN computes it (Intel Sapphire Rapids and later; not AMD Zen 4):
# elsewhere the fp16 training tests cannot run, and the refusal test below runs the whole command instead.
needs_cpu_fp16 = pytest.mark.skipif(
    not CPU_FP16, reason="this CPU has no fp16 in oneDNN: DeepSpeed refuses fp16"
)


def test_fp16_on_a_cpu_without_it_is_refused_at_start_naming_the_key(tmp_path, synth_shards, monkeypatch):
    """On a CPU without fp16 DeepSpeed fails deep in its engine set-up ("Type fp16 is not supported on your
    device"); ldm-train refuses first, naming the key and what to use instead, and writes no checkpoint."""
    cpu = torch.device("cpu")
    precision("bf16-autocast").check_device(cpu)
    precision("fp16").check_device(torch.device("cuda"))  # GPUs are DeepSpeed's to judge
    if CPU_FP16:  # this CPU trains fp16: the check lets it through; then the same check on a CPU without it
        precision("fp16").check_device(cpu)
        monkeypatch.setattr(precision_module, "cpu_has_fp16", lambda: False)
    with pytest.raises(
        ValueError, match=r"precision=fp16: this CPU has no fp16 .* use precision=bf16-autocast"
    ):
        precision("fp16").check_device(cpu)
    if not CPU_FP16:  # and the whole command, on this CPU
        out = run(tmp_path, synth_shards, ["precision=fp16", "max_steps=1"], nproc=1, check=False)
        refusal = "precision=fp16: this CPU has no fp16"
        assert out.returncode != 0 and refusal in out.stderr, out.stderr[-3000:]
        assert "Type fp16 is not supported" not in out.stderr
        assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def fp16_runs(tmp_path_factory, synth_shards) -> Path:
    """fp16 at ZeRO 2 and 0, one after the other in one process (ldm-train -m)."""
    run_dir = tmp_path_factory.mktemp("fp16")
    run(run_dir, synth_shards, ["precision=fp16", "max_steps=10", "checkpoint.every=5", "task.scale_samples=32",
                                "deepspeed.zero_stage=2,0", "+deepspeed.extra.fp16.initial_scale_power=24",
                                "+deepspeed.extra.fp16.hysteresis=1", "faults.nan_loss_at=[9]"], nproc=1, sweep=True)  # fmt: skip
    return run_dir


@pytest.mark.slow
@needs_cpu_fp16
@pytest.mark.parametrize("zero_stage", [2, 0])
def test_fp16_trains_with_dynamic_loss_scaling(fp16_runs, zero_stage):
    """Starting at a loss scale of 2^24 the scaled gradients overflow fp16 until DeepSpeed has halved it enough
    (ZeRO-2); those skipped steps are loss scaling at work, so the non-finite guard (3 in a row roll back) stays
    quiet. The NaN loss injected at step 9 is a real non-finite step and is counted."""
    rows = metrics(fp16_runs / f"deepspeed.zero_stage={zero_stage}")
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


def _stage0_masters(rank: int, port: int, name: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")  # fmt: skip
    import deepspeed

    from trainer.engine.deepspeed_setup import make_engine, step
    from trainer.engine.ema import ShardedEMA, full_fp32_params
    from trainer.engine.optim import AdamWConfig

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    prec = precision(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.GELU(), torch.nn.Linear(33, 5)).to(
        prec.dtype
    )
    eng = make_engine(
        model, DeepSpeedConfig(zero_stage=0), AdamW(AdamWConfig(weight_decay=0.0)), 4, prec, 1e-5
    )
    ema = ShardedEMA(0.5, 0, 1)
    ema.attach(eng.module, initialize=True)
    for _ in range(3):
        loss = eng(torch.randn(4, 7).to(prec.dtype)).float().pow(2).mean()
        eng.backward(loss)
        step(eng, [loss])
        ema.update()
    masters = [m for group in eng.optimizer.fp32_groups for m in group]
    full = dict(full_fp32_params(eng.module, 0, True))
    result = {
        "optimizer": type(eng.optimizer).__name__,
        "fragments_fp32": all(f.view.dtype == torch.float32 for f in ema.fragments),
        "gathered_are_masters": all(torch.equal(full[n], m) for n, m in zip(full, masters, strict=True)),
        "differs_from_16bit": any(
            not torch.equal(full[n], p.float()) for n, p in eng.module.named_parameters()
        ),
    }
    torch.save(result, f"{folder}/result.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("fp16", marks=needs_cpu_fp16), "bf16"])
def test_zero0_16bit_keeps_fp32_masters_and_the_ema_follows_them(tmp_path, name):
    """At ZeRO-0 DeepSpeed wraps the optimizer in its fp16 optimizer (for bf16 too): fp32 master weights beside
    the 16-bit module. The sharded EMA and the gathered weights read those masters, not their 16-bit roundings."""
    mp.start_processes(
        _stage0_masters, args=(free_port(), name, str(tmp_path)), nprocs=1, start_method="spawn"
    )
    result = torch.load(tmp_path / "result.pt")
    assert result == {"optimizer": "FP16_UnfusedOptimizer", "fragments_fp32": True, "gathered_are_masters": True,
                      "differs_from_16bit": True}  # fmt: skip


def test_bf16_autocast_keeps_fp32_weights_and_runs_the_forward_in_bf16():
    """precision=bf16-autocast: DeepSpeed sees an fp32 model (no bf16/fp16 section enabled), the task's forward
    runs matmuls in bf16, and AdamW's fused kernel (optim.fused) takes the same step as the loop (to rounding)."""
    prec = precision("bf16-autocast")
    assert prec.dtype == torch.float32 and not prec.mixed and prec.autocast == torch.bfloat16
    cfg = ds_config(DeepSpeedConfig(), AdamW(), 8, prec, 1e-4)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with prec.forward_context(torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with precision("fp32").forward_context(torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    steps = []
    for fused in (False, True):
        w = torch.nn.Parameter(torch.ones(1000))
        opt = AdamW(AdamW.Config(fused=fused)).client([w], 1e-2)
        assert bool(opt.defaults["fused"]) == fused
        w.grad = torch.linspace(-1, 1, 1000)
        opt.step()
        steps.append(w.detach().clone())
    torch.testing.assert_close(steps[0], steps[1])
