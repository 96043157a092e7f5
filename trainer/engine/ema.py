"""Exponential moving average of the trained weights, kept as one full fp32 copy on rank 0.

Every rank takes part in reading the current weights (they are collectives under ZeRO): the fp32 master
weights (``safe_get_full_fp32_param``) when the module holds bf16 copies or ZeRO-3 shards, the module's own
parameters when they are the fp32 weights already (fp32 with ZeRO 0-2). The decay warms up as in LDM's
LitEma: min(decay, (1 + n) / (10 + n)) after n updates.
"""

from __future__ import annotations

import torch
from torch import nn


def full_fp32_params(module: nn.Module, zero_stage: int, mixed: bool):
    """Yield (name, full fp32 tensor) for the trainable parameters; a collective under ZeRO-3 or bf16."""
    direct = not mixed and zero_stage < 3
    if not direct:
        from deepspeed.utils import safe_get_full_fp32_param
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if direct:
            yield name, p.detach().float()
            continue
        full = safe_get_full_fp32_param(p)
        yield name, (p.detach() if full is None else full).float()


class EMA:
    def __init__(self, decay: float, on_cpu: bool, is_main: bool):
        self.decay, self.on_cpu, self.is_main = decay, on_cpu, is_main
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    def _dev(self, t: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.on_cpu else t.device

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def initialize(self, module: nn.Module, zero_stage: int, mixed: bool) -> None:
        """Start from the current weights (all ranks must call this together)."""
        self.shadow, self.updates = {}, 0
        for name, value in full_fp32_params(module, zero_stage, mixed):
            if self.is_main:
                self.shadow[name] = value.to(self._dev(value)).clone()

    @torch.no_grad()
    def update(self, module: nn.Module, zero_stage: int, mixed: bool) -> None:
        """Fold the current weights in (all ranks must call this together)."""
        d = self.current_decay()
        for name, value in full_fp32_params(module, zero_stage, mixed):
            if not self.is_main:
                continue
            self.shadow[name].lerp_(value.to(self.shadow[name].device), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        self.shadow = {k: v.clone() for k, v in shadow.items()} if self.is_main else {}
        self.updates = updates
