"""Install the project (editable, with its dev extras) into a virtual environment, fast.

``make install`` calls this. It installs uv into the venv with pip, then lets ``uv pip install`` resolve and unpack
the same pins: 22 s instead of pip's 141 s for the 126 packages here (torch's wheel alone is ~1 GB unpacked),
which is most of a fresh clone's set-up time (docs/benchmarks.md). uv reads neither pip's config files nor its
``PIP_*`` variables, so the indexes, find-links and constraints pip would use (``pip config list``) are passed
on, with pip's rule of taking the best version across all indexes. If uv cannot be installed or fails, pip does
the install as before.

    python tools/install_venv.py .venv '.[dev]'
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

# pip config key -> uv option (pip's values are whitespace-separated lists)
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}  # fmt: skip


def pip_settings(pip: Path) -> list[str]:
    """uv options equal to pip's effective index settings (config files and ``PIP_*`` variables)."""
    out = subprocess.run([str(pip), "config", "list"], capture_output=True, text=True, check=False).stdout
    values: dict[str, list[str]] = {}
    for line in out.splitlines():  # global.extra-index-url='file:///a file:///b', :env:.find-links='/x', ...
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in OPTIONS:  # later scopes override earlier ones
            values[name] = shlex.split(value)[0].split() if value else []
    args = []
    for name, items in values.items():
        for item in items[:1] if name == "index-url" else items:
            args += [OPTIONS[name], item]
    return args


def main(venv: str, target: str) -> int:
    python, pip = Path(venv) / "bin" / "python", Path(venv) / "bin" / "pip"
    quiet = ["-q"]
    if subprocess.run([str(pip), "install", *quiet, "uv"], check=False).returncode == 0:
        uv = [str(python), "-m", "uv", "pip", "install", *quiet, "--python", str(python)]
        # --compile-bytecode: pip writes .pyc files at install time, uv does not; where PYTHONDONTWRITEBYTECODE is
        # set (this machine, many CI images) every process would then compile torch's sources again: the
        # suite ran in 51 min instead of 27 without it (imports of torch + open_clip 22 s instead of 10)
        options = ["--index-strategy", "unsafe-best-match", "--compile-bytecode"]
        cmd = [*uv, *pip_settings(pip), *options, "-e", target]
        if subprocess.run(cmd, check=False).returncode == 0:
            return 0
        print("install_venv: uv failed; installing with pip instead", file=sys.stderr)
    return subprocess.run([str(pip), "install", *quiet, "-e", target], check=False).returncode


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
