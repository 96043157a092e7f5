"""Sweeps: every point of a sweep is its own run, with its own run folder, checkpoints and W&B run.

``ldm-train -m optim.lr=1e-4,3e-4 unet=tiny,small`` runs the four points one after another (Hydra's basic
launcher); ``ldm-submit train -m ...`` turns them into one Slurm job array. Both name a point by the values it
sweeps (``optim.lr=0.0001,unet=small``), so the folder of a point depends on what it runs, never on its position:
rerunning or requeueing a sweep resumes each point from its own checkpoints (``checkpoint.resume=auto``), and a
different sweep never resumes another's.
"""

from __future__ import annotations

import itertools
import re

from omegaconf import DictConfig, open_dict

from .config import ConfigError

_UNSAFE = re.compile(r"[^\w.=,+-]")


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"overrides {overrides}: {exc}") from None


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys that ``overrides`` sweep (``a=1,2`` sweeps ``a``), in command-line order."""
    return [o.get_key_element().lstrip("+~") for o in _parse(overrides) if o.is_sweep_override()]


def expand(overrides: list[str]) -> list[list[str]]:
    """The points of a sweep, in the order ``-m`` runs them: the product of the swept values, each point a
    list of plain overrides. Range and interval sweeps are refused (a point must be a fixed value)."""
    choices = []
    for o in _parse(overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices.append([f"{key}={o.get_value_element_as_str()}"])
        elif o.is_discrete_sweep():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            raise ConfigError(f"{o.input_line}: only lists of values sweep (a=1,2 or a=range(1,4))")
    return [list(p) for p in itertools.product(*choices)]


def point_tag(point: list[str], keys: list[str]) -> str:
    """A point's name: its swept ``key=value`` pairs, made safe as a folder name."""
    pairs = [o.lstrip("+~") for o in point if o.lstrip("+~").split("=", 1)[0] in keys]
    return _UNSAFE.sub("_", ",".join(pairs)) or "point"


def at_point(cfg: DictConfig, tag: str) -> DictConfig:
    """``cfg`` as the sweep point ``tag`` runs it: ``run_dir=<run_dir>/<tag>``, ``run_name=<run_name>-<tag>``
    (the job's checkpoints, metrics and W&B run follow ``run_dir`` and ``run_name``)."""
    base_dir, base_name = str(cfg.run_dir), str(cfg.run_name)
    with open_dict(cfg):
        cfg.run_name = f"{base_name}-{tag}"
        cfg.run_dir = f"{base_dir}/{tag}"
    ckpt = str(cfg.checkpoint.dir) if "checkpoint" in cfg else cfg.run_dir
    if not ckpt.startswith(cfg.run_dir):
        raise ConfigError(f"checkpoint.dir={ckpt} would be shared by every sweep point (one would resume "
                          "another's checkpoints): leave it under run_dir (the default ${run_dir}/checkpoints)")  # fmt: skip
    return cfg
