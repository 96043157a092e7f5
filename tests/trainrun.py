"""Run ldm-train as real processes (torchrun, 2 ranks, gloo) and read what they wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))


def free_port() -> int:
    """A port no other process listens on now (concurrent test sessions must not share a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    e["WANDB_MODE"] = "offline"
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def command(
    run_dir: Path,
    shards: Path,
    overrides: list[str],
    nproc: int = 2,
    experiment: str = "tiny_cpu",
    sweep: bool = False,
    logger: str = "jsonl",
    workers: int = 2,
) -> list[str]:
    """The ldm-train command line; ``sweep``: ``-m``, every point of the comma lists in turn in the same ranks,
    each in ``<run_dir>/<key=value,...>`` (one start-up of Python, torch and the ranks for all of them)."""
    base = [
        *(["-m"] if sweep else []),
        f"experiment={experiment}",
        f"run_dir={run_dir}",
        f"data.urls={shards}",
        "logger.log_every=1",
        "logger.progress=false",
        f"data.num_workers={workers}",
        f"logger={logger}",
    ]
    scale_set = any(o.startswith(("task=", "task.scale_samples=")) for o in overrides)
    # tests measure the latent scale factor on 64 images, not all 320: ~2 s less per start
    if experiment == "tiny_cpu" and not scale_set:
        base.append("task.scale_samples=64")
    if nproc == 1:
        return [PY, "-m", "trainer.cli.train", *base, *overrides]
    return [
        TORCHRUN,
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
        "-m",
        "trainer.cli.train",
        *base,
        *overrides,
    ]


def run(
    run_dir: Path,
    shards: Path,
    overrides: list[str],
    nproc: int = 2,
    check: bool = True,
    timeout: int = 600,
    experiment: str = "tiny_cpu",
    sweep: bool = False,
    logger: str = "jsonl",
    workers: int = 2,
) -> subprocess.CompletedProcess:
    out = subprocess.run(
        command(run_dir, shards, overrides, nproc, experiment, sweep, logger, workers),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"ldm-train failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
        )
    return out


def multirun(
    run_dir: Path, shards: Path, overrides: list[str], experiment: str = "tiny_cpu", logger: str = "jsonl"
) -> subprocess.CompletedProcess:
    """One ``ldm-train -m`` on one rank with no loader workers: every point of the swept overrides (comma lists;
    ``experiment`` may be one too) in one interpreter, each in ``<run_dir>/<key=value,...>``."""
    return run(run_dir, shards, overrides, nproc=1, timeout=900, experiment=experiment, sweep=True, logger=logger,
               workers=0)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own: killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_paused_then_kill(proc: subprocess.Popen, marker: Path, timeout: int = 300) -> str:
    """Wait for a run's PAUSED marker, then SIGKILL it and all its ranks (also on failure); returns the marker."""
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError("run ended before pausing")
            if time.time() > deadline:
                raise AssertionError("run did not pause in time")
            time.sleep(0.1)
        assert len(descendants(proc.pid)) >= 2, "expected torchrun's ranks below it"
        return marker.read_text()
    finally:
        kill_tree(proc)  # a real SIGKILL of torchrun and every rank
        marker.unlink(missing_ok=True)


def run_until_paused_then_kill(run_dir: Path, shards: Path, overrides: list[str], timeout: int = 300) -> str:
    """Start a 2-rank run that pauses itself (faults.pause_*), then SIGKILL every one of its processes."""
    proc = subprocess.Popen(
        command(run_dir, shards, overrides),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return wait_paused_then_kill(proc, run_dir / "PAUSED", timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(rows: list[dict]) -> dict[int, float]:
    """Per-step loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def events(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r.get("event") == name]


def keys_by_step(run_dir: Path, rank: int) -> dict[int, tuple[list[str], list[int]]]:
    out = {}
    for line in (run_dir / f"keys_rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = (r["keys"], r["epoch"])  # a re-run step after resume overwrites the killed run's
    return out
