"""Structured config schemas behind the Hydra groups.

Every component config carries a ``_target_``; :func:`typed` checks it against the dataclass registered for
that target, so a misspelled key or a wrong type fails at start with the key's name, and :func:`build`
instantiates it.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .models.autoencoder import AutoencoderConfig
from .models.text_encoders import ClassEmbedderConfig, OpenCLIPConfig, TransformerTextConfig
from .models.unet import UNetConfig

SCHEMAS: dict[str, type] = {
    "trainer.models.unet.UNetModel": UNetConfig,
    "trainer.models.autoencoder.AutoencoderKL": AutoencoderConfig,
    "trainer.models.autoencoder.VQModel": AutoencoderConfig,
    "trainer.models.text_encoders.OpenCLIPTextEncoder": OpenCLIPConfig,
    "trainer.models.text_encoders.TransformerTextEncoder": TransformerTextConfig,
    "trainer.models.text_encoders.ClassEmbedder": ClassEmbedderConfig,
}


def register(target: str, schema: type) -> None:
    """Add a component: configs with this ``_target_`` are checked against ``schema``."""
    SCHEMAS[target] = schema


def typed(node: Any, where: str) -> DictConfig:
    """``node`` merged onto the schema of its ``_target_``; errors name ``where`` (the config group)."""
    if node is None or "_target_" not in node:
        raise ValueError(f"config '{where}' needs a _target_ (one of {sorted(SCHEMAS)})")
    schema = SCHEMAS.get(node["_target_"])
    if schema is None:
        raise ValueError(
            f"{where}._target_={node['_target_']!r} is not a known component ({sorted(SCHEMAS)})"
        )
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except Exception as exc:
        raise type(exc)(f"in config '{where}': {exc}") from None


def to_dataclass(node: Any, where: str):
    """The component's schema dataclass filled from ``node``."""
    return OmegaConf.to_object(typed(node, where))


def build(node: Any, where: str, **overrides):
    """Instantiate a component from its (checked) config."""
    cfg = typed(node, where)
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return instantiate(cfg, _convert_="all")


def conf_dir() -> str:
    """Absolute path of the repository's ``conf/`` (Hydra's config_path for every entry point)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "conf")


def build_offline(node: Any, where: str):
    """Like :func:`build`, but never fetch pretrained weights (they come from a checkpoint or do not matter)."""
    cfg = typed(node, where)
    if "pretrained" in cfg:
        cfg.pretrained = ""
    return instantiate(cfg, _convert_="all")
