"""Run ``ldm-data`` and the streaming loader as a user would, and read what they produce."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from data_pipeline.loader import StreamingLoader

CLI = [sys.executable, "-m", "data_pipeline.cli"]
ENV = dict(os.environ)


def run_cli(args: str | list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ldm-data ARGS`` in a subprocess (a string is split like a shell command line)."""
    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def epoch_zero(loader: StreamingLoader) -> tuple[list[str], dict]:
    """Keys of epoch 0 and the loader's counters after its last batch."""
    keys, counters = [], None
    for batch in loader:
        if batch["epoch"][0] == 1:
            return keys, counters
        keys += batch["key"]
        counters = loader.counters()
    raise AssertionError("unreachable: the loader is endless")
