"""Every third-party module the installed package imports is a declared dependency: `pip install ldm-pipeline`
(no extras) must run every console script, the demo included. The dev venv has the dev extras, so a missing
declaration only shows on a user's machine; this reads the imports from the source instead."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement  # pytest's own dependency
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_pipeline", "slurm")
# GPU only, imported behind a guard with torch SDPA as the fallback (trainer/models/attention.py)
OPTIONAL = {"xformers"}


def declared() -> set[str]:
    """The project's dependencies and, one level down, what they require on this platform without extras
    (omegaconf comes with hydra-core), as canonical distribution names."""
    deps = {
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    indirect = {Requirement(r) for d in deps for r in (md.requires(d.name) or [])}
    wanted = (r for r in deps | indirect if r.marker is None or r.marker.evaluate({"extra": ""}))
    return {canonicalize_name(r.name) for r in wanted}


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> files of the package that import it (function-level imports included)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - set(PACKAGES) - set(sys.stdlib_module_names):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_module_is_a_declared_dependency():
    dists = md.packages_distributions()
    ok = declared()
    missing = {
        module: sorted(files)
        for module, files in imported_modules().items()
        if module not in OPTIONAL and not {canonicalize_name(d) for d in dists.get(module, [module])} & ok
    }
    assert not missing, f"imported by the package but not in pyproject's dependencies: {missing}"


def test_the_check_sees_function_level_imports():
    """The demo imports scikit-image inside a function: the scan must find imports like that one."""
    assert "trainer/demo/data.py" in imported_modules()["skimage"]
