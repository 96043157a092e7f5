"""DeepSpeed around the trainable modules only: the config translated from ours, the optimizer component's
contribution, and how a step with non-finite values is dropped."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
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
    extra = ds.extra
    if isinstance(extra, DictConfig):  # nested DictConfigs are not dicts: convert, or they replace whole
        extra = OmegaConf.to_container(extra, resolve=True)
    return deep_merge(cfg, dict(extra))


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
    return engine


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


def step(engine) -> bool:
    """engine.step(); returns whether the update was applied (False: a non-finite step was dropped).

    ZeRO 1-3 detect a non-finite global gradient norm themselves, clear the gradients and skip the update.
    For ZeRO-0 we drop the gradients and advance the engine's micro-step counter as its step() would
    (its gradient clipping fails on an all-None gradient list).
    """
    boundary = engine.is_gradient_accumulation_boundary()
    if own_clipping(engine.zero_optimization_stage(), engine.bfloat16_enabled()) and boundary:
        engine.ldm_grad_norm = check_and_clip_stage0(engine)
        if not math.isfinite(engine.ldm_grad_norm):
            for p in engine.module.parameters():
                p.grad = None
            engine.micro_steps += 1
            return False
    engine.step()
    return engine.was_step_applied() if boundary else True


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm (None where none was computed)."""
    if own_clipping(engine.zero_optimization_stage(), engine.bfloat16_enabled()):
        return getattr(engine, "ldm_grad_norm", None)
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
