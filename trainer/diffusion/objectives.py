"""The training objective as small swappable parts: what the model predicts (eps, v or x0), how timesteps are
weighted (plain or min-SNR-gamma), offset noise, and conversions between parameterizations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedules import NoiseSchedule, ScheduleConfig

PREDICTIONS = ("eps", "v", "x0")


@dataclass
class DiffusionConfig:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"  # eps | v | x0
    loss_weighting: str = "plain"  # plain | min_snr
    snr_gamma: float = 5.0
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise (brightness range)
    cond_dropout: float = 0.0  # drop the condition to the null one with this probability (class labels)


def target_for(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
):
    """What the model is trained to output."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def to_x0_eps(prediction: str, out: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """(x0, eps) implied by a model output ``out`` at noisy input ``z``."""
    if prediction == "eps":
        return (z - sigma * out) / alpha, out
    if prediction == "v":
        return alpha * z - sigma * out, alpha * out + sigma * z
    if prediction == "x0":
        return out, (z - alpha * out) / sigma
    raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def loss_weights(cfg: DiffusionConfig, snr: torch.Tensor) -> torch.Tensor:
    """Per-sample weights on the MSE of the prediction. Min-SNR-gamma (Hang et al., 2023) is the
    x0-space weight min(SNR, gamma) expressed for the chosen parameterization."""
    if cfg.loss_weighting == "plain":
        return torch.ones_like(snr)
    if cfg.loss_weighting == "min_snr":
        clipped = snr.clamp(max=cfg.snr_gamma)
        if cfg.prediction == "eps":
            return clipped / snr
        if cfg.prediction == "v":
            return clipped / (snr + 1)
        return clipped
    raise ValueError(f"diffusion.loss_weighting must be 'plain' or 'min_snr', got {cfg.loss_weighting!r}")


class DiffusionObjective:
    """Sample t and noise, noise the latents, and score the model's prediction."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg or DiffusionConfig()
        if self.cfg.prediction not in PREDICTIONS:
            raise ValueError(
                f"diffusion.prediction must be one of {PREDICTIONS}, got {self.cfg.prediction!r}"
            )
        self.schedule = NoiseSchedule(self.cfg.schedule)

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.cfg.offset_noise > 0:
            shape = (x0.shape[0], x0.shape[1], *([1] * (x0.ndim - 2)))
            offset = torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.cfg.offset_noise * offset
        return noise

    def sample_timesteps(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator, device=device)

    def loss(
        self,
        model_fn,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Mean weighted MSE. ``model_fn(z_t, t)`` returns the prediction; ``concat`` (inpainting mask and
        masked latents, or a low-resolution image) is appended to z_t along channels."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        z = alpha * x0 + sigma * noise
        inp = z if concat is None else torch.cat([z, concat.to(z.dtype)], dim=1)
        out = model_fn(inp, t)
        target = target_for(self.cfg.prediction, x0, noise, alpha, sigma)
        per_sample = (out.float() - target.float()).pow(2).mean(dim=list(range(1, x0.ndim)))
        weights = loss_weights(self.cfg, self.schedule.snr(t).float())
        return (weights * per_sample).mean(), {"t": t, "per_sample": per_sample.detach()}
