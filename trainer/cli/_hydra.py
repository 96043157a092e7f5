"""Running a library function as a Hydra entry point: the packaged config tree, one-line errors, exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from data_pipeline.atomic import StorageError
from data_pipeline.errors import InputError

from .. import schema  # noqa: F401  (registers the entry points' schemas with Hydra)
from ..config import CONFIG_PATH
from ..engine.guards import TrainingDiverged
from ..sweep import at_point, point_tag, swept_keys


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` / ``--local_rank N`` the deepspeed launcher appends (Hydra would reject it),
    keeping its value in ``LOCAL_RANK``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def sweep_point(cfg: DictConfig) -> DictConfig:
    """Under ``-m``, each job's config at its sweep point (its own run folder and W&B run; trainer/sweep.py)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or "run_dir" not in cfg:
        return cfg
    keys = swept_keys([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
    return at_point(cfg, point_tag(list(hc.overrides.task), keys)) if keys else cfg  # -m of one point: a run


def run(fn: Callable[[DictConfig], int], config_name: str, prog: str) -> None:
    """Compose ``config_name`` from the command line and exit with ``fn(cfg)``'s code; a ConfigError is one
    line on stderr and exit code 2."""
    code = 0

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        nonlocal code
        try:
            code = max(code, fn(sweep_point(cfg)))
        except (InputError, StorageError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            code = max(code, 2)
        except TrainingDiverged as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            code = max(code, 3)

    sys.argv = [sys.argv[0], *strip_local_rank(sys.argv[1:])]
    _main()
    sys.exit(code)
