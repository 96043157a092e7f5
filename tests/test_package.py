"""The package as users get it: a wheel built from the source, installed into a fresh virtual environment outside
the checkout, its console scripts run from another directory (configs and sbatch templates are package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sources(dest: Path) -> Path:
    """The files git would ship (tracked and new, not ignored), copied to ``dest`` (symlinks kept)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, names):
        src, out = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel installed (dependencies come from this interpreter's site-packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = sources(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)  # fmt: skip
    [wheel] = (tmp / "dist").glob("ldm_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trainer/conf/train.yaml" in names and "trainer/conf/experiment/tiny_cpu.yaml" in names
    assert "slurm/templates/train.sbatch.j2" in names and "slurm/localcluster.py" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )  # torch & co. without a 6 GB install
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)  # fmt: skip
    return venv


def run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    out = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    out = run(
        installed, tmp_path, "python", "-c", "import trainer, data_pipeline, slurm; print(trainer.__file__)"
    )
    assert out.stdout.strip().startswith(str(installed))


def test_cli_run_from_another_directory(installed, tmp_path):
    import json

    plan = run(installed, tmp_path, "ldm-train", "experiment=tiny_cpu", "dry_run=true").stdout
    assert json.loads(plan[plan.index("{") :])["latent_size"] == 8
    script = run(installed, tmp_path, "ldm-submit", "train", "experiment=tiny_cpu", "--dry-run").stdout
    assert f"{installed}/bin/python" in script and "-m trainer.cli.train" in script
    assert ".venv/bin/activate" not in script and "source" not in script
    assert "ldm-precompute" in run(installed, tmp_path, "ldm-precompute", "--help").stdout
    written = {p.relative_to(tmp_path).parts[-1] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"config.yaml", "hydra.yaml", "overrides.yaml", "ldm-train.log"}  # Hydra's own record


def test_a_users_config_directory_composes_on_top(installed, tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - tiny_cpu\n\nmax_steps: 7\n")
    out = run(installed, tmp_path, "ldm-train", "--config-dir", str(tmp_path / "my_conf"), "experiment=mine",
              "--cfg", "job")  # fmt: skip
    assert "max_steps: 7" in out.stdout and "UNetTask" in out.stdout
