"""The local-cluster tooling on a machine without Slurm: it says so, and names the command that fixes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_status_says_not_installed_when_slurm_is_not_on_path(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: no sinfo, no apt-get
    code = "from slurm import localcluster; print(localcluster.status()); print(localcluster.installed())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["not", "installed", "False"]


def test_up_without_root_or_apt_fails_in_one_line_naming_the_command(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "LDM_SLURM_DIR": str(tmp_path / "cluster")}
    cmd = [sys.executable, "-m", "slurm.localcluster", "up"]
    if os.geteuid() == 0:  # as root, the no-apt path; then a real unprivileged user for the no-root path
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "no apt-get" in out.stderr and "sudo python -m slurm.localcluster up" in out.stderr
        cmd = [shutil.which("unshare"), "--user", *cmd]  # a user namespace: this process is not root there
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0  # one line
    assert "needs root" in out.stderr and "sudo python -m slurm.localcluster up" in out.stderr
    assert not (tmp_path / "cluster").exists()
