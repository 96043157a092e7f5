"""Which timesteps a training batch draws: small swappable parts (``diffusion.timesteps._target_``).

Every sampler returns the timesteps and their importance ratios p_uniform(t) / p(t); the objective multiplies the
loss weight by the ratio, so a sampler changes the variance of the gradient estimate, never the objective: the
expected loss is the uniform-t loss of the configured weighting either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class TimestepSampler(Protocol):
    """``n`` timesteps and their importance ratios, given the loss weight of every timestep (length T)."""

    def sample(self, weights: Tensor, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]: ...


@dataclass
class UniformTimestepsConfig:
    _target_: str = "trainer.diffusion.timesteps.UniformTimesteps"


@dataclass
class ImportanceTimestepsConfig:
    _target_: str = "trainer.diffusion.timesteps.ImportanceTimesteps"
    # of the draws spread evenly. Not small: the noisiest timesteps carry little weight but are where a model
    # learns layout (where objects go); drawn rarely with large ratios, Adam damps their rare large gradients and
    # the demo's UNet never learned positions at 0.1 (docs/benchmarks.md, issue 19, P19)
    uniform_share: float = 0.5


class UniformTimesteps:
    """Every timestep equally often (DDPM, LDM, Stable Diffusion)."""

    Config = UniformTimestepsConfig

    def __init__(self, config: UniformTimestepsConfig | None = None):
        self.config = config or UniformTimestepsConfig()

    def sample(self, weights, n, generator):
        t = torch.randint(0, weights.numel(), (n,), generator=generator, device=weights.device)
        return t, torch.ones(n, device=weights.device)


class ImportanceTimesteps:
    """Timesteps drawn in proportion to their loss weight (mixed with ``uniform_share`` of even draws).

    Under min-SNR weighting with v-prediction half of the timesteps (the noisiest) carry weights below 0.2
    and the nearly noise-free ones below 0.01: drawn uniformly, those samples cost a full forward and backward
    pass each and move the weights little. Drawn more often where the weight is high and divided by their
    probability, more of each batch goes where the loss has weight.
    """

    Config = ImportanceTimestepsConfig

    def __init__(self, config: ImportanceTimestepsConfig | None = None):
        self.config = config or ImportanceTimestepsConfig()
        if not 0.0 < self.config.uniform_share <= 1.0:
            raise ValueError(
                f"diffusion.timesteps.uniform_share must be in (0, 1], got {self.config.uniform_share}"
            )
        # (weights, p, ratio per timestep) of the last weights seen: the objective hands the same tensor every
        # step, so p is built (and its check, a host sync on a GPU, made) once, not per step
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    def probabilities(self, weights: Tensor) -> Tensor:
        """p(t) for every timestep."""
        w = weights.double().clamp(min=0)
        if not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(
                "importance sampling needs finite, non-negative loss weights with a positive sum"
            )
        share = self.config.uniform_share
        return (1 - share) * w / w.sum() + share / w.numel()

    def sample(self, weights, n, generator):
        if self._table is None or self._table[0] is not weights:
            p = self.probabilities(weights)
            self._table = (weights, p.float(), (1.0 / (p.numel() * p)).float())
        _, p, ratio = self._table
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, ratio[t]
