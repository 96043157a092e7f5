"""Training precisions: the dtype of the module's weights and activations and what DeepSpeed is told.

bf16 (the default of the GPU presets) needs no loss scaling. fp16, for cards without bf16 (V100, T4 and many
inference cards), uses DeepSpeed's dynamic loss scaling: the loss is multiplied by a scale that halves when the
scaled gradients overflow (that step is skipped) and doubles after ``loss_scale_window`` clean steps.
bf16-autocast keeps fp32 weights, optimizer and loss and runs the forward under ``torch.autocast(bfloat16)``:
convolutions and matmuls in bf16 (AMX / avx512_bf16 on CPUs: 1.5-1.9x the fp32 step of the demo's models,
docs/benchmarks.md issue 19), the rest in fp32; DeepSpeed sees an fp32 model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype
    mixed: bool  # the engine holds 16-bit weights and keeps fp32 master weights in the optimizer
    loss_scaling: bool = False  # DeepSpeed's dynamic loss scale (fp16)
    autocast: torch.dtype | None = None  # the forward runs under torch.autocast(autocast)

    def forward_context(self, device: torch.device):
        """The context the model's forward runs in (autocast, or nothing)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def ds_config(self) -> dict:
        fp16 = {"enabled": False}
        if self.loss_scaling:
            fp16 = {
                "enabled": True,
                "loss_scale": 0,  # 0: dynamic
                "initial_scale_power": 16,  # start at 2^16
                "loss_scale_window": 1000,  # clean steps before the scale doubles
                "hysteresis": 2,  # overflows tolerated before the scale halves
                "min_loss_scale": 1,
            }
        return {"bf16": {"enabled": self.dtype == torch.bfloat16, "check_grad_overflow": True}, "fp16": fp16}

    def check_device(self, device: torch.device) -> None:
        """Refuse, before any engine is built, a precision ``device`` cannot train in."""
        if device.type == "cpu" and self.dtype == torch.float16 and not cpu_has_fp16():
            raise ValueError(
                f"precision={self.name}: this CPU has no fp16 support in oneDNN, and DeepSpeed refuses fp16 "
                "without it; use precision=bf16-autocast (or bf16, fp32) on this machine"
            )


def cpu_has_fp16() -> bool:
    """Whether oneDNN computes fp16 on this CPU (avx512_fp16 / AMX-FP16): DeepSpeed's CPU accelerator asks the
    same before it accepts an fp16 config."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, mixed=False),
    "bf16": Precision("bf16", torch.bfloat16, mixed=True),
    "fp16": Precision("fp16", torch.float16, mixed=True, loss_scaling=True),
    "bf16-autocast": Precision("bf16-autocast", torch.float32, mixed=False, autocast=torch.bfloat16),
}


def precision(name: str) -> Precision:
    """The precision called ``name`` (the ``precision`` config key)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]
