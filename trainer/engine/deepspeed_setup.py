"""DeepSpeed around the trainable modules only: the config translated from ours, the optimizer (torch's AdamW
for bit-exact resume, or DeepSpeed's fused/CPU Adam), the learning rate as a pure function of the step, and
how a step with non-finite values is dropped."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..train_config import DeepSpeedConfig, OptimConfig

HUGE_CLIP = 1e12  # makes ZeRO compute the global grad norm (and skip non-finite steps) without clipping


def ds_config(ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, precision: str, lr: float) -> dict:
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
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": optim.grad_clip if optim.grad_clip > 0 else HUGE_CLIP,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "steps_per_print": 10**12,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if optim.name == "ds_adamw":
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    elif optim.name != "adamw":
        raise ValueError(f"optim.name must be 'adamw' or 'ds_adamw', got {optim.name!r}")
    return {**cfg, **ds.extra}


def lr_at(step: int, optim: OptimConfig, max_steps: int, base_lr: float | None = None) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio * lr``."""
    lr = optim.lr if base_lr is None else base_lr
    if optim.warmup_steps and step < optim.warmup_steps:
        return lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return lr
    if optim.schedule == "cosine":
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        floor = optim.min_lr_ratio * lr
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")


def make_engine(
    module: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, precision: str, lr: float
):
    """deepspeed.initialize over ``module``'s trainable parameters."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the engine would have no trainable parameter")
    optimizer = None
    if optim.name == "adamw":
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
        )
    cfg = ds_config(ds, optim, micro_batch, precision, lr)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params, config=cfg)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grads_finite_stage0(engine) -> bool:
    """ZeRO-0 has no overflow check: look at the (already all-reduced) gradients ourselves."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in engine.module.parameters())


def step(engine) -> bool:
    """engine.step(); returns whether the update was applied (False: a non-finite step was dropped).

    ZeRO 1-3 detect a non-finite global gradient norm themselves, clear the gradients and skip the update.
    For ZeRO-0 we drop the gradients and advance the engine's micro-step counter as its step() would
    (its gradient clipping fails on an all-None gradient list).
    """
    boundary = engine.is_gradient_accumulation_boundary()
    if engine.zero_optimization_stage() == 0 and boundary and not grads_finite_stage0(engine):
        for p in engine.module.parameters():
            p.grad = None
        engine.micro_steps += 1
        return False
    engine.step()
    return engine.was_step_applied() if boundary else True
