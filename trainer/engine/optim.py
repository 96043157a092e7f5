"""Optimizers and learning-rate schedules, each a small class named in YAML by ``_target_``.

An optimizer contributes to the DeepSpeed config and/or builds the client optimizer DeepSpeed wraps:
``AdamW`` is torch's (bit-exact resume), ``DeepSpeedAdamW`` is DeepSpeed's FusedAdam / CPUAdam (compiled on
first use, ~1 ulp from torch's after a reload). A schedule is a pure function of the step, so a resumed run
needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Optimizer(Protocol):
    """``optim._target_``. Attributes: ``config`` (with ``lr`` and ``grad_clip``)."""

    def ds_config(self, lr: float) -> dict[str, Any]:
        """Entries for the DeepSpeed config (an ``optimizer`` section when DeepSpeed builds it)."""
        ...

    def client(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
        """The optimizer DeepSpeed wraps, or None when DeepSpeed builds its own."""
        ...


@dataclass
class AdamWParams:
    """What both AdamW flavours take."""

    _target_: str = ""
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class AdamWConfig(AdamWParams):
    _target_: str = "trainer.engine.optim.AdamW"
    fused: bool = False  # torch's fused AdamW kernel: one pass over all parameters (CPU and CUDA)


@dataclass
class DeepSpeedAdamWConfig(AdamWParams):
    _target_: str = "trainer.engine.optim.DeepSpeedAdamW"


class AdamW:
    """torch.optim.AdamW as DeepSpeed's client optimizer: resumed runs are bit-exact."""

    Config = AdamWConfig

    def __init__(self, config: AdamWParams | None = None):
        self.config = config or AdamWConfig()

    def ds_config(self, lr: float) -> dict[str, Any]:
        return {}

    def client(self, params, lr):
        c = self.config
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay, fused=c.fused or None
        )


class DeepSpeedAdamW(AdamW):
    """DeepSpeed's AdamW (FusedAdam on GPU, DeepSpeedCPUAdam on CPU)."""

    Config = DeepSpeedAdamWConfig

    def ds_config(self, lr: float) -> dict[str, Any]:
        c = self.config
        params = {"lr": lr, "betas": list(c.betas), "eps": c.eps, "weight_decay": c.weight_decay}
        return {"optimizer": {"type": "AdamW", "params": params}}

    def client(self, params, lr):
        return None


@runtime_checkable
class LRSchedule(Protocol):
    """``lr_schedule._target_``: the learning rate as a multiple of the optimizer's, per step."""

    def factor(self, step: int, max_steps: int) -> float: ...


@dataclass
class ConstantLRConfig:
    _target_: str = "trainer.engine.optim.ConstantLR"
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps


@dataclass
class CosineLRConfig(ConstantLRConfig):
    _target_: str = "trainer.engine.optim.CosineLR"
    min_lr_ratio: float = 0.0  # the learning rate at max_steps, as a fraction of the peak


class ConstantLR:
    """Linear warmup, then constant."""

    Config = ConstantLRConfig

    def __init__(self, config: ConstantLRConfig | None = None):
        self.config = config or ConstantLRConfig()

    def warmup(self, step: int) -> float | None:
        w = self.config.warmup_steps
        return (step + 1) / w if w and step < w else None

    def factor(self, step: int, max_steps: int) -> float:
        return self.warmup(step) or 1.0


class CosineLR(ConstantLR):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    Config = CosineLRConfig

    def factor(self, step: int, max_steps: int) -> float:
        warm = self.warmup(step)
        if warm is not None:
            return warm
        w, floor = self.config.warmup_steps, self.config.min_lr_ratio
        progress = min(1.0, (step - w) / max(1, max_steps - w))
        return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * progress))
