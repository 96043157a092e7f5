"""An exclusive lock on an output folder (a training run_dir, a precompute ``out``): two jobs never write the
same folder. The lock is an ``flock`` on ``<folder>/.lock``, released by the kernel when the holder dies (a
killed or preempted job never leaves a stale lock); the file says who holds it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import InputError

LOCK_FILE = ".lock"


class FolderLocked(InputError):
    """Another process holds the folder's lock; the message names it."""


class FolderLock:
    """Hold ``<folder>/.lock`` until :meth:`release` (or the process ends)."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.path = Path(folder) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(self._fd)
            raise FolderLocked(
                f"{self.path.parent} is in use by another {what}: {holder} (wait for it to end, or use another folder)"
            ) from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if os.environ.get("SLURM_JOB_ID"):
            info["slurm_job"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "an unknown process"
        job = f", Slurm job {info['slurm_job']}" if "slurm_job" in info else ""
        return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
