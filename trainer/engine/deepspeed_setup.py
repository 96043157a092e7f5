"""DeepSpeed around the trainable modules only: the config translated from ours, the optimizer component's
contribution, and how a step with non-finite values is dropped."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ..schema import DeepSpeedConfig
from .optim import Optimizer
from .precision import Precision
from .reshard import mark_universal

HUGE_CLIP = 1e12  # makes ZeRO compute the global grad norm (and skip non-finite steps) without clipping


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, recursively (a nested override keeps its siblings)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(out.get(key), dict) and isinstance(value, dict)
            else value
        )
    return out


def ds_config(
    ds: DeepSpeedConfig, optim: Optimizer, micro_batch: int, precision: Precision, lr: float
) -> dict:
    """The DeepSpeed config for one engine."""
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    clip = optim.config.grad_clip
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        # ZeRO-0: we check and clip ourselves with one read per step (DeepSpeed's fp32 clipping reads every
        # parameter's norm back to the host); ZeRO 1-3 compute one global norm and skip non-finite steps
        "gradient_clipping": 0.0
        if own_clipping(ds.zero_stage, precision.mixed)
        else (clip if clip > 0 else HUGE_CLIP),
        "zero_optimization": zero,
        **precision.ds_config(),
        "steps_per_print": 10**12,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        **optim.ds_config(lr),
    }
    extra = ds.extra  # a DictConfig when it comes from Hydra: nested DictConfigs are not dicts: convert them,
    # or a nested override replaces its whole section instead of keeping its siblings
    extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra)
    return deep_merge(cfg, extra)


def make_engine(
    module: nn.Module,
    ds: DeepSpeedConfig,
    optim: Optimizer,
    micro_batch: int,
    precision: Precision,
    lr: float,
):
    """deepspeed.initialize over ``module``'s trainable parameters."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the engine would have no trainable parameter")
    cfg = ds_config(ds, optim, micro_batch, precision, lr)
    mark_universal(module)  # its checkpoints can then be resharded for another world size
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optim.client(params, lr), model_parameters=params, config=cfg
    )
    engine.ldm_grad_clip = optim.config.grad_clip
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one rank has nothing to average with, yet DeepSpeed would flatten every gradient, "all-reduce" it over
        # the one-rank group and copy it back each step (7% of the demo's UNet step: docs/benchmarks.md)
        engine.enable_backward_allreduce = False
    link_fp32_masters(engine)
    return engine


def link_fp32_masters(engine) -> None:
    """16-bit ZeRO-0: DeepSpeed's fp16 optimizer wrappers (``FP16_Optimizer``, ``FP16_UnfusedOptimizer``; bf16
    uses them too at stage 0) keep the fp32 master weights apart from the module's 16-bit parameters. Each
    parameter gets a live view of its master as ``ldm_fp32_master`` so that the EMA and the gathered weights
    follow the fp32 values, not their 16-bit roundings."""
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None)
    if engine.zero_optimization_stage() != 0 or groups is None:
        return
    if hasattr(opt, "fp32_groups_flat"):  # fused: one flat fp32 tensor per group, parameters in order
        for params, flat in zip(groups, opt.fp32_groups_flat, strict=True):
            offset = 0
            for p in params:
                p.ldm_fp32_master = flat.detach()[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
    elif hasattr(opt, "fp32_groups"):  # unfused: one fp32 copy per parameter
        for params, masters in zip(groups, opt.fp32_groups, strict=True):
            for p, m in zip(params, masters, strict=True):
                p.ldm_fp32_master = m.detach()


def own_clipping(zero_stage: int, mixed: bool) -> bool:
    """fp32 ZeRO-0: DeepSpeed has no overflow check there and clips by reading each parameter's norm."""
    return zero_stage == 0 and not mixed


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def check_and_clip_stage0(engine) -> float:
    """ZeRO-0 has no overflow check and clips per parameter: compute the global norm of the (already
    all-reduced) gradients on the device, read it back once (the step's only device-to-host sync from our
    code) and, when finite, clip to ``optim.grad_clip`` without another read. Returns the norm."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    norm = float(total)  # inf or nan when a gradient holds one
    clip = getattr(engine, "ldm_grad_clip", 0.0)
    if clip > 0 and math.isfinite(norm):
        torch._foreach_mul_(grads, (clip / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return norm


def step(engine, losses: list[torch.Tensor] | None = None) -> bool:
    """engine.step(); returns whether the update was applied (False: a non-finite step was dropped).

    ZeRO 1-3 and 16-bit ZeRO-0 detect a non-finite global gradient norm themselves, clear the gradients and
    skip the update. For fp32 ZeRO-0 we compute the norm (and clip) ourselves (``check_and_clip_stage0``); when
    it is not finite we drop the gradients and advance the engine's micro-step counter as its step() would
    (its gradient clipping fails on an all-None gradient list). Under fp16 DeepSpeed's loss scaler handles
    overflow at every stage: a step it skips while the step's ``losses`` were finite is loss scaling at work
    (the scale was lowered), not a non-finite step, and counts as applied.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    fp16 = engine.fp16_enabled()
    if boundary and own_clipping(engine.zero_optimization_stage(), mixed(engine)):
        engine.ldm_grad_norm = check_and_clip_stage0(engine)
        if not math.isfinite(engine.ldm_grad_norm):
            for p in engine.module.parameters():
                p.grad = None
            engine.micro_steps += 1
            return False
    engine.step()
    if not boundary:
        return True
    applied = engine.was_step_applied()
    if not applied and fp16 and losses is not None:
        return all(bool(torch.isfinite(loss).all()) for loss in losses)
    return applied


def mixed(engine) -> bool:
    """The engine trains 16-bit weights (bf16 or fp16), so DeepSpeed checks for overflow and clips itself."""
    return engine.bfloat16_enabled() or engine.fp16_enabled()


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm (None where none was computed)."""
    if own_clipping(engine.zero_optimization_stage(), mixed(engine)):
        return getattr(engine, "ldm_grad_norm", None)
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def loss_scale(engine) -> float | None:
    """The current fp16 loss scale (None without loss scaling)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return float(opt.cur_scale if hasattr(opt, "cur_scale") else opt.loss_scale)
