"""The contract between the training loop and a stage (``task._target_``): the loop knows nothing of
diffusion or autoencoders, only these methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from data_pipeline.loader import DataSource

from ..engine.optim import Optimizer
from ..engine.precision import Precision

Perturb = Callable[[torch.Tensor, int], torch.Tensor]  # fault injection on a step's loss (identity normally)


@dataclass
class TaskContext:
    """What a task is set up with: the whole (checked) config and the parts built from it once."""

    cfg: Any  # the train config (DictConfig)
    device: torch.device
    rank: int
    world_size: int
    precision: Precision
    optim: Optimizer
    data: DataSource


@runtime_checkable
class Task(Protocol):
    """One training stage. Attribute: ``config`` (the task's own typed config)."""

    def check(self, cfg: Any, files: bool = True) -> None:
        """Raise ConfigError (naming the key) for a config this stage cannot run; reads no weights. With
        ``files``, the weight files the config names must exist now."""
        ...

    def build_models(self, cfg: Any) -> dict[str, nn.Module]:
        """The stage's models with their initial weights (on the CPU)."""
        ...

    def setup(self, ctx: TaskContext, models: dict[str, nn.Module]) -> None:
        """Move models to the device and wrap the trained ones in DeepSpeed engines."""
        ...

    def engines(self) -> dict[str, Any]:
        """The DeepSpeed engines, ``model`` first; all are checkpointed."""
        ...

    def generators(self) -> dict[str, torch.Generator]:
        """Random generators whose state a checkpoint keeps (bit-exact resume)."""
        ...

    def ema_module(self) -> nn.Module:
        """The module whose trainable weights the EMA follows."""
        ...

    def set_lr_factor(self, factor: float) -> None:
        """Set every engine's learning rate to its base rate times ``factor`` (the schedule's)."""
        ...

    def forward_backward(self, batch: dict, step: int, perturb: Perturb) -> torch.Tensor:
        """One micro-batch: loss and backward through the engines. Returns the detached loss (on device)."""
        ...

    def optimizer_step(self) -> bool:
        """Step every engine; False when a non-finite step was dropped."""
        ...

    def metrics(self) -> dict[str, torch.Tensor]:
        """Extra scalars of the last micro-batch (on device), logged under the task's prefix."""
        ...

    def sampling_pipeline(self, weights: dict[str, torch.Tensor]) -> Any:
        """A text-to-image pipeline on a fresh copy of the trained module holding ``weights`` (for evaluation
        during training, on every rank), or None when this stage does not sample from prompts."""
        ...

    def samples(
        self, prompts: list[str], steps: int, guidance: float, weights: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, str]:
        """A grid's images in [0, 1] and its caption, made (on rank 0) by a fresh copy of the trained module with
        ``weights``: the full EMA (or raw) tensors keyed like ``ema_module()``'s parameters."""
        ...

    def save_frozen(self, folder: Path, write: bool) -> None:
        """Check the frozen modules against those this run was started with (every rank calls it: a resume
        with another autoencoder is refused) and, with ``write`` (rank 0), save them once per run."""
        ...

    def export(
        self, checkpoint: Path, out: Path, ema: bool = True, formats: frozenset[str] = frozenset()
    ) -> Path:
        """Write what users load from one of this stage's checkpoints (``ldm-export --format``: native,
        diffusers, single_file; empty: the stage's defaults)."""
        ...
