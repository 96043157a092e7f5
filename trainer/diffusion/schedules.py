"""Noise schedules: the betas of the forward process and everything derived from them.

Betas are computed exactly as diffusers computes them (float32), so that our samplers and diffusers'
schedulers agree to float32 rounding; ``zero_terminal_snr`` rescales them (Lin et al., 2023, Algorithm 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclass
class ScheduleConfig:
    kind: str = "scaled_linear"  # linear | scaled_linear (Stable Diffusion) | cosine
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """float32 betas, shape (num_timesteps,)."""
    n = cfg.num_timesteps
    if cfg.kind == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.kind == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.kind == "cosine":  # Nichol & Dhariwal 2021, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(f"diffusion.schedule.kind must be one of {SCHEDULES}, got {cfg.kind!r}")
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR and the first is unchanged."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """alpha_bar(t) and friends for integer timesteps 0..T-1 (q(z_t | z_0) = N(sqrt(abar) z_0, (1-abar) I))."""

    def __init__(self, cfg: ScheduleConfig | None = None):
        self.cfg = cfg or ScheduleConfig()
        self.betas = make_betas(self.cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = values.to(like.device)[t.long().to(like.device)].to(like.dtype)
        return v.view(-1, *([1] * (like.ndim - 1)))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t), shaped to broadcast against ``like``."""
        abar = self._at(self.alphas_cumprod, t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t.long().cpu()]
        return (abar / (1 - abar)).to(t.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise
