"""Progress for long jobs that fits both a terminal and a Slurm log file.

On a terminal: a tqdm bar with its total. Anywhere else (stderr redirected to a file, as under Slurm): one plain
line every ``LDM_PROGRESS_INTERVAL`` seconds (default 30) and a last one at the end, never carriage returns
that turn a log file into one endless line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


class PlainProgress:
    """The part of tqdm's interface our jobs use, printing ``desc: n/total unit (p%), rate, eta`` lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float | None = None):  # fmt: skip
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n = self.start_n = initial
        self.interval = float(os.environ.get("LDM_PROGRESS_INTERVAL", 30)) if interval is None else interval
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        line = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {rate:.2f} {self.unit}/s, {elapsed:.0f}s elapsed"
        if self.total and rate > 0:
            line += f", eta {(self.total - self.n) / rate:.0f}s"
        if self.postfix:
            line += f" [{self.postfix}]"
        print(line, file=sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, leave: bool = True):  # fmt: skip
    """A tqdm bar on a terminal, :class:`PlainProgress` lines otherwise, nothing when ``disable``."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True
        )
    return PlainProgress(iterable, total, desc, unit, initial)
