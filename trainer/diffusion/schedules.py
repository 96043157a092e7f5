"""Noise schedules: the betas of the forward process and everything derived from them.

One class per schedule family (linear, scaled linear = Stable Diffusion's, cosine), each with its own config,
named in YAML by ``_target_``. Betas are computed exactly as diffusers computes them (float32), so that our
samplers and diffusers' schedulers agree to float32 rounding; ``zero_terminal_snr`` rescales them (Lin et
al., 2023, Algorithm 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LinearScheduleConfig:
    _target_: str = "trainer.diffusion.schedules.LinearSchedule"
    num_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = False


@dataclass
class ScaledLinearScheduleConfig(LinearScheduleConfig):
    _target_: str = "trainer.diffusion.schedules.ScaledLinearSchedule"
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass
class CosineScheduleConfig:
    _target_: str = "trainer.diffusion.schedules.CosineSchedule"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR and the first is unchanged."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """alpha_bar(t) and friends for integer timesteps 0..T-1 (q(z_t | z_0) = N(sqrt(abar) z_0, (1-abar) I)).
    Subclasses give the betas (:meth:`make_betas`) and diffusers' name for them (``diffusers_name``)."""

    Config = LinearScheduleConfig
    diffusers_name = ""

    def __init__(self, config=None):
        self.config = config if config is not None else type(self).Config()
        betas = self.make_betas()
        self.betas = rescale_zero_terminal_snr(betas) if self.config.zero_terminal_snr else betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def make_betas(self) -> torch.Tensor:
        """float32 betas, shape (num_timesteps,)."""
        raise NotImplementedError(f"{type(self).__name__} is abstract: use a concrete schedule class")

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def diffusers_config(self) -> dict:
        """The fields of a diffusers scheduler config that describe this schedule."""
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_start": getattr(self.config, "beta_start", 0.0001),
            "beta_end": getattr(self.config, "beta_end", 0.02),
            "beta_schedule": self.diffusers_name,
            "rescale_betas_zero_snr": self.config.zero_terminal_snr,
        }

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = values.to(like.device)[t.long().to(like.device)].to(like.dtype)
        return v.view(-1, *([1] * (like.ndim - 1)))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t), shaped to broadcast against ``like``."""
        abar = self._at(self.alphas_cumprod, t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1 - abar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise


class LinearSchedule(NoiseSchedule):
    """DDPM's linear betas (Ho et al., 2020)."""

    Config = LinearScheduleConfig
    diffusers_name = "linear"

    def make_betas(self) -> torch.Tensor:
        c = self.config
        return torch.linspace(c.beta_start, c.beta_end, c.num_timesteps, dtype=torch.float32)


class ScaledLinearSchedule(NoiseSchedule):
    """Linear in sqrt(beta): latent diffusion's and Stable Diffusion's schedule."""

    Config = ScaledLinearScheduleConfig
    diffusers_name = "scaled_linear"

    def make_betas(self) -> torch.Tensor:
        c = self.config
        return torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_timesteps, dtype=torch.float32) ** 2


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal (2021), betas capped at 0.999."""

    Config = CosineScheduleConfig
    diffusers_name = "squaredcos_cap_v2"

    def make_betas(self) -> torch.Tensor:
        n = self.config.num_timesteps

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
