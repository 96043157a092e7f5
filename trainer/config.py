"""Config -> objects, one way for every swappable part.

Each component (a model, a task, a data source, an optimizer, a learning-rate schedule, a logger, a noise
schedule, a parameterization, a loss weighting, a concat condition) is a class with a ``Config`` dataclass
attribute, named in YAML by ``_target_``. :func:`typed` checks a node against the ``Config`` of the class its
``_target_`` names (a typo or a wrong type fails at start, naming the key); :func:`build` then calls
``cls(config)``. The schema comes from the class itself, so there is no registry to keep in step.

Only classes of this project's packages can be named, and each slot says which protocol the class must
implement, so metadata read back from disk (an export's ``pipeline.json``, a checkpoint's ``config.yaml``) can
never make us construct an arbitrary object; nested nodes are never instantiated recursively.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data_pipeline.errors import InputError

CONFIG_MODULE = "trainer.conf"  # the Hydra config tree ships inside the package (conf/ at the top links here)
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
ALLOWED_PACKAGES = ("trainer.", "data_pipeline.")


class ConfigError(InputError):
    """A config that cannot work; the message names the key at fault."""


def component_class(target: str, where: str, protocol: type | None = None) -> type:
    """The class a ``_target_`` names: one of this project's component classes implementing ``protocol``."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PACKAGES):
        raise ConfigError(
            f"{where}._target_={target!r}: only component classes of this project "
            f"({', '.join(p.rstrip('.') for p in ALLOWED_PACKAGES)}) can be built"
        )
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{where}._target_={target!r} does not name a class") from None
    config_cls = getattr(cls, "Config", None)
    if not isinstance(cls, type) or config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise ConfigError(f"{where}._target_={target!r} is not a component (a class with a Config dataclass)")
    if protocol is not None and not issubclass(cls, protocol):
        raise ConfigError(f"{where}._target_={target!r} is not a {protocol.__name__}")
    return cls


def typed(node: Any, where: str, protocol: type | None = None) -> DictConfig:
    """``node`` checked against the ``Config`` of the class its ``_target_`` names (errors name ``where``)."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"config '{where}' needs a _target_ naming its class")
    cls = component_class(node["_target_"], where, protocol)
    try:
        return OmegaConf.merge(OmegaConf.structured(cls.Config), node)
    except Exception as exc:
        raise ConfigError(f"in config '{where}': {exc}") from None


def to_dataclass(node: Any, where: str, protocol: type | None = None):
    """The component's ``Config`` dataclass filled from ``node``."""
    return OmegaConf.to_object(typed(node, where, protocol))


def build(node: Any, where: str, protocol: type | None = None, **overrides):
    """Construct the component ``node`` describes: ``cls(config)``. ``overrides`` replace config fields."""
    config = to_dataclass(node, where, protocol)
    cls = component_class(node["_target_"], where, protocol)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return cls(config)


def offline(node: Any) -> Any:
    """``node`` with any ``pretrained`` weights reference cleared (they come from a checkpoint instead)."""
    if node is not None and "pretrained" in node:
        node = OmegaConf.merge(node, {"pretrained": ""})
    return node


def config_dict(config: Any) -> dict:
    """A component's config as a plain dict (with its ``_target_``), for metadata files."""
    return dataclasses.asdict(config)


def compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point (``train``, ``precompute``, ``info``) would run with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from . import schema  # noqa: F401  (registers the schemas with Hydra)

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides or []))


def conf_root() -> Path:
    """Where the packaged config tree is on disk."""
    return Path(__file__).resolve().parent / "conf"
