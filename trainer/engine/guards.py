"""Non-finite steps, stop signals and test faults.

A step whose loss or gradients are not finite is dropped (see ``deepspeed_setup.step``) and counted;
``max_consecutive_bad`` in a row roll back to the last good checkpoint, and no checkpoint is written while such
a streak lasts (it would save the state that produced it). ``max_rollbacks`` rollbacks with no good step in
between end the run with :class:`TrainingDiverged` (exit code 3), not a quiet success.

SIGUSR1, SIGTERM and SIGINT set a flag that the loop reads after the current step: every rank checkpoints and
exits 0, and rank 0 leaves ``PREEMPTED`` in the run folder (a launcher's cue to requeue). DataLoader workers
ignore them (:func:`ignore_stop_signals`): Slurm and torchrun signal every process, and a worker dying first
would take the step down with it. The marker is used rather than an exit code because launchers (``srun
--kill-on-bad-exit``, torchrun) kill the other ranks as soon as one exits with a non-zero code.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import torch

from data_pipeline.loader import STOP_SIGNALS

log = logging.getLogger(__name__)
PREEMPTED_MARKER = "PREEMPTED"  # written by rank 0 into the run folder once the stop checkpoint is committed


class TrainingDiverged(RuntimeError):
    """Rolling back did not help: the run stops with a non-zero exit code instead of pretending to finish."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, max_rollbacks: int = 3):
        self.max_consecutive, self.max_rollbacks = max_consecutive, max_rollbacks
        self.consecutive = 0
        self.total = 0
        self.rollbacks = 0
        self.rollbacks_in_a_row = 0  # rollbacks with no applied step in between

    @property
    def in_streak(self) -> bool:
        """The last step was dropped: the state is not one to checkpoint."""
        return self.consecutive > 0

    def record(self, applied: bool) -> bool:
        """Count a step; True when it is time to roll back."""
        if applied:
            self.consecutive = self.rollbacks_in_a_row = 0
            return False
        self.consecutive += 1
        self.total += 1
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def rolled_back(self, step: int) -> None:
        self.consecutive = 0
        self.rollbacks += 1
        self.rollbacks_in_a_row += 1
        if self.rollbacks_in_a_row > self.max_rollbacks:
            raise TrainingDiverged(
                f"step {step}: {self.rollbacks_in_a_row} rollbacks in a row (guard.max_rollbacks="
                f"{self.max_rollbacks}) and every step since was non-finite: the run diverges from its last good "
                "checkpoint (lower optim.lr, check the data around this step)"
            )


class StopSignal:
    """Remembers SIGUSR1 / SIGTERM / SIGINT instead of dying; the loop checkpoints and exits."""

    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.received = signum


def pause_forever(run_dir: Path, what: str, stop: StopSignal | None = None) -> None:
    """Fault injection: tell the test where we are, then wait to be killed (or, given ``stop``, signalled)."""
    (Path(run_dir) / "PAUSED").write_text(what)
    while stop is None or stop.received is None:
        time.sleep(0.2)


class InfGrad(torch.autograd.Function):
    """Fault injection: identity forward, infinite gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Faults:
    """Fault injection and inspection for tests and drills (``faults.*``): never set in real runs."""

    def __init__(self, cfg, run_dir: Path, rank: int, world_size: int):
        self.cfg, self.run_dir, self.rank, self.world = cfg, Path(run_dir), rank, world_size
        self.keys = open(self.run_dir / f"keys_rank{rank}.jsonl", "a", buffering=1) if cfg.log_keys else None

    def perturb(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The step's loss, made NaN (on the last rank) or given infinite gradients where configured."""
        if step in self.cfg.nan_loss_at and self.rank == self.world - 1:
            loss = loss * float("nan")
        if step in self.cfg.inf_grad_at:
            loss = InfGrad.apply(loss)
        return loss

    def record_keys(self, step: int, batch: dict) -> None:
        if self.keys is not None:
            self.keys.write(
                json.dumps({"step": step, "keys": batch["key"], "epoch": batch["epoch"].tolist()}) + "\n"
            )

    def pause_after_step(self, step: int) -> None:
        if step == self.cfg.pause_at and self.rank == 0:
            pause_forever(self.run_dir, f"step {step}")

    def pause_in_save(self, step: int):
        """A callable that pauses rank 0 before the save of ``step`` commits, or None."""
        if step == self.cfg.pause_in_save_at and self.rank == 0:
            return lambda: pause_forever(self.run_dir, f"save {step}")
        return None

    def close(self) -> None:
        if self.keys is not None:
            self.keys.close()
