"""What the denoiser predicts (eps, v or x0) and how timesteps are weighted in the loss: small swappable parts
(as in sgm), each named in YAML by ``_target_``.

With z = alpha x0 + sigma eps and SNR = alpha^2 / sigma^2, an error in one parameterization maps to an error in
x0 by a fixed factor: ||d eps||^2 = SNR ||d x0||^2, ||d v||^2 = (SNR + 1) ||d x0||^2. Weightings are defined in
x0 space (min-SNR-gamma: min(SNR, gamma)) and each parameterization expresses them in its own space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Parameterization(Protocol):
    """The model output's meaning. ``diffusers_name`` is the matching ``prediction_type``."""

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor: ...

    def to_x0_eps(self, out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]: ...

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor: ...


@dataclass
class EpsConfig:
    _target_: str = "trainer.diffusion.parameterizations.EpsPrediction"


@dataclass
class VConfig:
    _target_: str = "trainer.diffusion.parameterizations.VPrediction"


@dataclass
class X0Config:
    _target_: str = "trainer.diffusion.parameterizations.X0Prediction"


class EpsPrediction:
    """The noise (DDPM, Stable Diffusion 1.x and 2-base)."""

    Config = EpsConfig
    diffusers_name = "epsilon"

    def __init__(self, config: EpsConfig | None = None):
        self.config = config or EpsConfig()

    def target(self, x0, noise, alpha, sigma):
        return noise

    def to_x0_eps(self, out, z, alpha, sigma):
        return (z - sigma * out) / alpha, out

    def min_snr_weight(self, snr, gamma):
        # min(SNR, gamma) / SNR, written so that SNR = 0 (zero terminal SNR) gives its limit 1, not 0/0
        return (gamma / snr).clamp(max=1.0)


class VPrediction:
    """v = alpha eps - sigma x0 (Salimans & Ho, 2022; Stable Diffusion 2 768-v)."""

    Config = VConfig
    diffusers_name = "v_prediction"

    def __init__(self, config: VConfig | None = None):
        self.config = config or VConfig()

    def target(self, x0, noise, alpha, sigma):
        return alpha * noise - sigma * x0

    def to_x0_eps(self, out, z, alpha, sigma):
        return alpha * z - sigma * out, alpha * out + sigma * z

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1)


class X0Prediction:
    """The clean latents."""

    Config = X0Config
    diffusers_name = "sample"

    def __init__(self, config: X0Config | None = None):
        self.config = config or X0Config()

    def target(self, x0, noise, alpha, sigma):
        return x0

    def to_x0_eps(self, out, z, alpha, sigma):
        return out, (z - alpha * out) / sigma

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)


@runtime_checkable
class LossWeighting(Protocol):
    """Per-sample weights on the MSE of the prediction, given each sample's SNR."""

    def __call__(self, snr: Tensor, parameterization: Parameterization) -> Tensor: ...


@dataclass
class UniformConfig:
    _target_: str = "trainer.diffusion.parameterizations.UniformWeighting"


@dataclass
class MinSNRConfig:
    _target_: str = "trainer.diffusion.parameterizations.MinSNRWeighting"
    gamma: float = 5.0


class UniformWeighting:
    """Every timestep weighted 1 in the parameterization's own space (the plain DDPM / LDM loss)."""

    Config = UniformConfig

    def __init__(self, config: UniformConfig | None = None):
        self.config = config or UniformConfig()

    def __call__(self, snr, parameterization):
        return torch.ones_like(snr)


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al., 2023): x0-space weight min(SNR, gamma)."""

    Config = MinSNRConfig

    def __init__(self, config: MinSNRConfig | None = None):
        self.config = config or MinSNRConfig()

    def __call__(self, snr, parameterization):
        return parameterization.min_snr_weight(snr, self.config.gamma)
