"""Non-finite steps, preemption signals and test faults.

A step whose loss or gradients are not finite is dropped (see ``deepspeed_setup.step``) and counted;
``max_consecutive_bad`` in a row roll back to the last good checkpoint. SIGUSR1 / SIGTERM set a flag that the
loop reads after the current step: every rank checkpoints and exits 0, and rank 0 leaves ``PREEMPTED`` in the
run folder (a launcher's cue to requeue). The marker is used rather than an exit code because launchers
(``srun --kill-on-bad-exit``, torchrun) kill the other ranks as soon as one exits with a non-zero code.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)
PREEMPTED_MARKER = "PREEMPTED"  # written by rank 0 into the run folder once the stop checkpoint is committed


class NonFiniteGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.rollbacks = 0

    def record(self, applied: bool) -> bool:
        """Count a step; True when it is time to roll back."""
        if applied:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def rolled_back(self) -> None:
        self.consecutive = 0
        self.rollbacks += 1


class StopSignal:
    """Remembers SIGUSR1 / SIGTERM instead of dying; the training loop checkpoints and exits."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.received = signum


def pause_forever(run_dir: Path, what: str) -> None:
    """Fault injection: tell the test where we are, then wait to be killed."""
    (Path(run_dir) / "PAUSED").write_text(what)
    while True:
        time.sleep(1)
