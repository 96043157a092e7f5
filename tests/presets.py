"""Tiny models for tests, built from the shipped conf presets (one source of truth: conf/<group>/<name>.yaml)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.config import build, conf_root, to_dataclass
from trainer.diffusion.objectives import Diffusion
from trainer.inference.pipeline import LatentDiffusionPipeline
from trainer.models.autoencoder import Autoencoder
from trainer.models.text_encoders import ConditionEncoder
from trainer.models.unet import UNetModel

PROTOCOLS = {"unet": UNetModel, "autoencoder": Autoencoder, "text_encoder": ConditionEncoder}


def preset(path: str, **overrides: Any):
    """The config node of ``conf/<group>/<name>.yaml`` (``path`` = "group/name"), with ``overrides``."""
    return OmegaConf.merge(OmegaConf.load(conf_root() / f"{path}.yaml"), overrides)


def config(path: str, **overrides: Any):
    """The preset's typed Config dataclass."""
    return to_dataclass(preset(path, **overrides), path)


def model(path: str, seed: int | None = None, **overrides: Any) -> torch.nn.Module:
    """The module a preset describes (random init; seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return build(preset(path, **overrides), path, PROTOCOLS[path.split("/")[0]])


def tiny_pipeline(seed: int = 0, scale_factor: float = 0.5) -> LatentDiffusionPipeline:
    """unet/tiny + autoencoder/tiny + text_encoder/tiny_clip; the UNet's zero-initialised outputs perturbed so
    samples depend on the prompt."""
    unet = model("unet/tiny", seed=seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return LatentDiffusionPipeline(
        unet.eval(),
        model("autoencoder/tiny").eval(),
        model("text_encoder/tiny_clip"),
        Diffusion(),
        scale_factor=scale_factor,
    )
