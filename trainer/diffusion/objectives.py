"""The diffusion process of a model (noise schedule, parameterization, loss weighting, offset noise) and the
training objective built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import build, config_dict
from .parameterizations import LossWeighting, Parameterization
from .schedules import NoiseSchedule
from .timesteps import TimestepSampler


@dataclass
class DiffusionConfig:
    schedule: Any = field(
        default_factory=lambda: {"_target_": "trainer.diffusion.schedules.ScaledLinearSchedule"}
    )
    parameterization: Any = field(
        default_factory=lambda: {"_target_": "trainer.diffusion.parameterizations.EpsPrediction"}
    )
    weighting: Any = field(
        default_factory=lambda: {"_target_": "trainer.diffusion.parameterizations.UniformWeighting"}
    )
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise (brightness range)
    # which timesteps a batch draws (training only; importance-corrected, so the objective stays the same)
    timesteps: Any = field(
        default_factory=lambda: {"_target_": "trainer.diffusion.timesteps.UniformTimesteps"}
    )


class Diffusion:
    """The built parts of a :class:`DiffusionConfig`."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        self.schedule: NoiseSchedule = build(self.config.schedule, "diffusion.schedule", NoiseSchedule)
        self.parameterization: Parameterization = build(
            self.config.parameterization, "diffusion.parameterization", Parameterization
        )
        self.weighting: LossWeighting = build(self.config.weighting, "diffusion.weighting", LossWeighting)
        self.timesteps: TimestepSampler = build(self.config.timesteps, "diffusion.timesteps", TimestepSampler)

    @classmethod
    def from_node(cls, node: Any) -> Diffusion:
        """From a config node or a plain dict (as stored in metadata files)."""
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.structured(DiffusionConfig), node)
        return cls(OmegaConf.to_object(merged))

    def to_dict(self) -> dict:
        """The config with every part's fields (what metadata files store)."""
        return {
            "schedule": config_dict(self.schedule.config),
            "parameterization": config_dict(self.parameterization.config),
            "weighting": config_dict(self.weighting.config),
            "offset_noise": self.config.offset_noise,
            "timesteps": config_dict(self.timesteps.config),
        }


class DiffusionObjective:
    """Sample t and noise, noise the latents, and score the model's prediction."""

    def __init__(self, diffusion: Diffusion | None = None):
        self.diffusion = diffusion or Diffusion()
        self.schedule = self.diffusion.schedule
        self._weights: dict[torch.device, torch.Tensor] = {}

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        offset_std = self.diffusion.config.offset_noise
        if offset_std > 0:
            shape = (x0.shape[0], x0.shape[1], *([1] * (x0.ndim - 2)))
            offset = torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + offset_std * offset
        return noise

    def timestep_weights(self, device: torch.device) -> torch.Tensor:
        """The loss weight of every timestep 0..T-1 (what the timestep sampler draws by)."""
        device = torch.device(device)
        if device not in self._weights:
            t = torch.arange(self.schedule.num_timesteps, device=device)
            snr = self.schedule.snr(t).float()
            self._weights[device] = self.diffusion.weighting(snr, self.diffusion.parameterization)
        return self._weights[device]

    def sample_timesteps(
        self, n: int, device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training timesteps and their importance ratios (ones for uniform draws)."""
        return self.diffusion.timesteps.sample(self.timestep_weights(device), n, generator)

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
        ratio = None
        if t is None:
            t, ratio = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        alpha, sigma = self.schedule.alpha_sigma(t, x0)
        z = alpha * x0 + sigma * noise
        inp = z if concat is None else torch.cat([z, concat.to(z.dtype)], dim=1)
        out = model_fn(inp, t)
        param = self.diffusion.parameterization
        target = param.target(x0, noise, alpha, sigma)
        per_sample = (out.float() - target.float()).pow(2).mean(dim=list(range(1, x0.ndim)))
        weights = self.diffusion.weighting(self.schedule.snr(t).float(), param)
        if ratio is not None:
            weights = weights * ratio
        return (weights * per_sample).mean(), {"t": t, "per_sample": per_sample.detach()}
