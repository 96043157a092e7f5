"""Samplers: DDPM (ancestral), DDIM (any eta, any number of steps) and DPM-Solver++(2M).

Each keeps diffusers' conventions (timestep spacings, float32 coefficients, where noise is drawn) so that a
step from the same (x_t, model output) equals the reference scheduler's. ``randn`` draws noise per sample
from a list of generators: a sample's result depends on its own seed only, not on its batch.
"""

from __future__ import annotations

import numpy as np
import torch

from .parameterizations import EpsPrediction, Parameterization
from .schedules import NoiseSchedule


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise; with a list of generators, row i comes from generator i (diffusers' randn_tensor)."""
    if isinstance(generator, list | tuple):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _leading(num_train: int, n: int, offset: int) -> np.ndarray:
    return (np.arange(0, n) * (num_train // n)).round()[::-1].copy().astype(np.int64) + offset


def _trailing(num_train: int, n: int, offset: int) -> np.ndarray:
    return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1


def _linspace(num_train: int, n: int, offset: int) -> np.ndarray:
    return np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(np.int64)


SPACINGS = {"leading": _leading, "trailing": _trailing, "linspace": _linspace}  # diffusers' timestep_spacing


def spaced_timesteps(num_train: int, n: int, spacing: str, offset: int = 0) -> np.ndarray:
    """n inference timesteps, descending (diffusers' DDPM/DDIM rules)."""
    if n < 1 or n > num_train:
        raise ValueError(f"steps must be in 1..{num_train}, got {n}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {sorted(SPACINGS)}, got {spacing!r}")
    return SPACINGS[spacing](num_train, n, offset)


class Sampler:
    """Common state: the schedule, the model's parameterization, the inference timesteps."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, parameterization: Parameterization | None = None):
        self.schedule = schedule
        self.parameterization = parameterization or EpsPrediction()
        self.abar = schedule.alphas_cumprod
        self.timesteps = torch.zeros(0, dtype=torch.long)

    @property
    def num_train(self) -> int:
        return self.schedule.num_timesteps

    def set_timesteps(self, n: int) -> None:
        raise NotImplementedError

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Noise clean latents to timestep ``t`` (image-to-image start, inpainting's known region)."""
        a = self.abar[t].to(x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise


class DDPMSampler(Sampler):
    """Ancestral sampling with the posterior variance (fixed_small); no noise at t = 0."""

    name = "ddpm"

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: Parameterization | None = None,
        spacing: str = "leading",
        steps_offset: int = 0,
        clip_sample: float = 0.0,
    ):
        super().__init__(schedule, parameterization)
        self.spacing, self.steps_offset, self.clip_sample = spacing, steps_offset, clip_sample

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.from_numpy(
            spaced_timesteps(self.num_train, n, self.spacing, self.steps_offset)
        )

    def _prev(self, t: int) -> int:
        idx = int((self.timesteps == t).nonzero()[0][0])
        return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(t)
        prev = self._prev(t)
        a_t = self.abar[t]
        a_prev = self.abar[prev] if prev >= 0 else torch.tensor(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0, _ = self.parameterization.to_x0_eps(out, x, a_t**0.5, b_t**0.5)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        mean = (a_prev**0.5 * cur_beta) / b_t * x0 + cur_alpha**0.5 * b_prev / b_t * x
        if t > 0:
            var = torch.clamp((1 - a_prev) / (1 - a_t) * cur_beta, min=1e-20)
            mean = mean + var**0.5 * randn(out.shape, generator, out.device, out.dtype)
        return mean


class DDIMSampler(Sampler):
    """DDIM (Song et al., 2021): deterministic at eta = 0, DDPM-like at eta = 1."""

    name = "ddim"

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: Parameterization | None = None,
        eta: float = 0.0,
        spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        clip_sample: float = 0.0,
    ):
        super().__init__(schedule, parameterization)
        self.eta, self.spacing, self.steps_offset, self.clip_sample = eta, spacing, steps_offset, clip_sample
        self.final_abar = torch.tensor(1.0) if set_alpha_to_one else self.abar[0]
        self.n = 0

    def set_timesteps(self, n: int) -> None:
        self.n = n
        self.timesteps = torch.from_numpy(
            spaced_timesteps(self.num_train, n, self.spacing, self.steps_offset)
        )

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(t)
        prev = t - self.num_train // self.n
        a_t = self.abar[t]
        a_prev = self.abar[prev] if prev >= 0 else self.final_abar
        b_t = 1 - a_t
        x0, eps = self.parameterization.to_x0_eps(out, x, a_t**0.5, b_t**0.5)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * randn(out.shape, generator, out.device, out.dtype)
        return x_prev


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al., 2022): second-order multistep in log-SNR, data prediction, first-order
    final step to sigma = 0 (diffusers' defaults: linspace spacing, midpoint solver, lower_order_final)."""

    name = "dpmpp_2m"

    def __init__(self, schedule: NoiseSchedule, parameterization: Parameterization | None = None):
        super().__init__(schedule, parameterization)
        if schedule.config.zero_terminal_snr:  # close to 0 without being 0, so the first sigma is finite
            self.abar = self.abar.clone()
            self.abar[-1] = 2**-24
        self.sigmas = torch.zeros(0)
        self.history: list[torch.Tensor] = []
        self.index = 0

    def set_timesteps(self, n: int) -> None:
        ts = np.linspace(0, self.num_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        sig = (((1 - self.abar) / self.abar) ** 0.5).numpy()
        sig = np.interp(ts, np.arange(0, len(sig)), sig)
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts)
        self.history, self.index = [], 0

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        i = int((self.timesteps == int(t)).nonzero()[0][0]) if self.index == 0 else self.index
        n = len(self.timesteps)
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        x0, _ = self.parameterization.to_x0_eps(out, x, alpha_s, sigma_s)
        self.history = [*self.history[-1:], x0]
        x = x.float()
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lam_t = torch.log(alpha_t) - torch.log(sigma_t)
        lam_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lam_t - lam_s
        first_order = len(self.history) < 2 or i == n - 1
        if first_order:
            x_prev = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            lam_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lam_s - lam_s1) / h
            d1 = (1.0 / r0) * (self.history[-1] - self.history[-2])
            x_prev = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        self.index = i + 1
        return x_prev.to(out.dtype)


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp_2m": DPMSolverPP2M}


def make_sampler(name: str, schedule: NoiseSchedule, parameterization: Parameterization, **kw) -> Sampler:
    """A sampler by its command-line name; ``kw`` are its options (eta, spacing, ...)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    cls = SAMPLERS[name]
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "schedule", "parameterization"}
    return cls(schedule, parameterization, **{k: v for k, v in kw.items() if k in allowed})


def img2img_start(timesteps: torch.Tensor, strength: float) -> int:
    """Index of the first timestep to run for image-to-image at ``strength`` (1 = from pure noise)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(timesteps)
    return max(n - min(int(n * strength), n), 0)  # diffusers' img2img rule
