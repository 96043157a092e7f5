"""Training precisions: the dtype of the module's weights and activations and what DeepSpeed is told."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype
    mixed: bool  # the engine holds 16-bit weights and keeps fp32 master weights in the optimizer

    def ds_config(self) -> dict:
        return {
            "bf16": {"enabled": self.dtype == torch.bfloat16, "check_grad_overflow": True},
            "fp16": {"enabled": False},
        }


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, mixed=False),
    "bf16": Precision("bf16", torch.bfloat16, mixed=True),
}


def precision(name: str) -> Precision:
    """The precision called ``name`` (the ``precision`` config key)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]
