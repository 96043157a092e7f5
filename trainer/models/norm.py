"""GroupNorm that stays fast under bf16 autocast on CPUs.

On CPU, torch's bf16 ``group_norm`` backward on channels-last tensors is ~4x slower than the fp32 kernel
(docs/benchmarks.md, issue 19), which wipes out what bf16 (AMX) convolutions gain. Like CompVis' ``GroupNorm32``,
this one computes in fp32 when it gets bf16 input on the CPU and hands bf16 back; elsewhere (GPUs, fp32) it is
``nn.GroupNorm``. Parameters and state-dict keys are nn.GroupNorm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CPU_BF16_IN_FP32 = True  # False: the plain bf16 kernels (only to measure them)


def cpu_bf16(x: torch.Tensor) -> bool:
    """Whether ``x`` is a bf16 CPU tensor that the fp32 fallbacks apply to."""
    return CPU_BF16_IN_FP32 and x.dtype == torch.bfloat16 and x.device.type == "cpu"


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_bf16(x):
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast("cpu", enabled=False):
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
