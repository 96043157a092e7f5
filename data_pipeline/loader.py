"""The streaming loader training uses: shards -> raw samples -> decode -> batch, on DataLoader workers, with
skip counters and an exact, resumable position.

Batches are assembled inside the workers; each carries its worker's position so the main process knows
precisely what was consumed (prefetched batches are not). With ``W`` workers the DataLoader hands out batches
round-robin, so batch ``b`` comes from logical worker ``b mod W``; a resumed loader maps physical workers onto
logical ones so the round-robin continues where it stopped.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import elastic
from .config import StreamConfig
from .errors import DataQualityError, SampleError
from .stream import Cursor, StreamPlan, iter_raw
from .tario import RawSample
from .urls import expand_shards, shards_digest

log = logging.getLogger(__name__)

STATE_VERSION = 1
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader workers leave stop signals to the main process, which finishes its step, checkpoints and exits
    (Slurm and torchrun signal every process: a worker dying first would take the step down with it). Workers
    the main process leaves behind when it exits are killed (:func:`_kill_leftover_workers`), since the SIGTERM
    multiprocessing would send them is ignored."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    import multiprocessing

    # torch's DataLoader handler would raise "worker killed" inside this loop, leaving the other workers alive
    # for multiprocessing's exit handler to wait on forever (they ignore SIGTERM)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


_cleanup_registered = False


def worker_cleanup_at_exit() -> None:
    """Once per process, at exit and before multiprocessing's own handler (atexit runs last-in first-out)."""
    global _cleanup_registered
    if not _cleanup_registered:
        import atexit

        atexit.register(_kill_leftover_workers)
        _cleanup_registered = True


Decoder = Callable[[RawSample, int], dict]
Collate = Callable[[list[dict]], dict]


@dataclass
class Counters:
    """Samples seen, valid and skipped (by reason) by one worker since the run began."""

    seen: int = 0
    valid: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"seen": self.seen, "valid": self.valid, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> Counters:
        return cls(int(d["seen"]), int(d["valid"]), {k: int(v) for k, v in d["skipped"].items()})


def sum_counters(items: list[Counters]) -> dict:
    """Totals over workers: ``{"seen", "valid", "skipped": {reason: n}, "skipped_total"}``."""
    total = Counters()
    for c in items:
        total.seen += c.seen
        total.valid += c.valid
        for k, v in c.skipped.items():
            total.skipped[k] = total.skipped.get(k, 0) + v
    out = total.to_dict()
    out["skipped_total"] = sum(total.skipped.values())
    return out


class _ShardDataset(IterableDataset):
    """Runs in each DataLoader worker: the slot's raw stream, decoded and batched."""

    def __init__(
        self,
        cfg: StreamConfig,
        plan: StreamPlan,
        rank: int,
        world: int,
        workers: int,
        batch_offset: int,
        cursors: list[Cursor],
        counters: list[Counters],
        decode: Decoder,
        collate: Collate,
    ):
        self.cfg, self.plan, self.rank, self.world, self.workers = cfg, plan, rank, world, workers
        self.batch_offset, self.cursors, self.counters = batch_offset, cursors, counters
        self.decode, self.collate = decode, collate

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            # Everything the worker inherited lives as long as it does: keep it out of the cyclic garbage
            # collector's full passes, which otherwise re-walk those ~10^5 objects every few thousand samples
            # (~12% of the latent loader's time). Only in a worker: the main process's collector is left alone.
            gc.freeze()
        physical = info.id if info is not None else 0
        logical = (self.batch_offset + physical) % self.workers
        slot = self.rank * self.workers + logical
        nslots = self.world * self.workers
        counters = Counters.from_dict(self.counters[logical].to_dict())
        cfg, items = self.cfg, []
        for raw, epoch, position, errors in iter_raw(self.plan, slot, nslots, self.cursors[logical]):
            for err in errors:  # a corrupt, truncated or unreachable shard: one bad sample, like the others
                counters.skip(err.reason)
                log.warning("skipping: %s", err.detail)
                self._check_bad_fraction(counters, logical, err.detail)
            if raw is None:
                continue
            try:
                item = self.decode(raw, epoch)
            except SampleError as exc:
                counters.skip(exc.reason)
                self._check_bad_fraction(counters, logical, str(exc))
                continue
            counters.seen += 1
            counters.valid += 1
            item["epoch"] = epoch
            items.append(item)
            if len(items) == cfg.batch_size:
                batch = self.collate(items)
                batch["epoch"] = torch.tensor([it["epoch"] for it in items], dtype=torch.long)
                batch["_loader"] = {
                    "worker": logical,
                    "cursor": Cursor(*position).to_dict(),
                    "counters": counters.to_dict(),
                }
                items = []
                yield batch

    def _check_bad_fraction(self, counters: Counters, logical: int, last: str) -> None:
        cfg = self.cfg
        bad = counters.seen - counters.valid
        if counters.seen >= cfg.bad_fraction_min_samples and bad > cfg.max_bad_fraction * counters.seen:
            raise DataQualityError(
                f"{bad} of {counters.seen} samples were bad (> data.max_bad_fraction={cfg.max_bad_fraction}) "
                f"on rank {self.rank} worker {logical}: {counters.skipped}; last: {last}"
            )


def _as_is(batch: dict) -> dict:
    """Batches are complete when a worker yields them; the DataLoader's default (``default_convert``) would
    walk every caption and key of every batch looking for numpy arrays, ~5 us per sample."""
    return batch


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingLoader:
    """An endless stream of batches for one rank, with ``state_dict()`` / ``load_state_dict()``.

    Iterating yields batches forever (epochs follow one another inside each worker; ``batch["epoch"]``
    says which epoch each sample belongs to). Each ``iter()`` starts workers from the current state.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        decode: Decoder,
        collate: Collate,
        rank: int | None = None,
        world_size: int | None = None,
        shards: list[str] | None = None,
    ):
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.shards = shards if shards is not None else expand_shards(cfg.urls, cfg.allow_pipe)
        self.workers = max(1, cfg.num_workers)
        nslots = self.world * self.workers
        if cfg.resampled and cfg.epoch_samples <= 0:
            raise ValueError(
                "data.resampled=true needs data.epoch_samples > 0 (samples per epoch, all ranks)"
            )
        if not cfg.resampled and len(self.shards) < nslots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world} ranks x {self.workers} workers = {nslots} "
                "readers without some getting none: use more shards, fewer data.num_workers, "
                "or data.resampled=true (with data.epoch_samples)"
            )
        if cfg.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
        self.plan = StreamPlan(
            tuple(self.shards),
            cfg.seed,
            cfg.shuffle_buffer,
            cfg.shard_shuffle,
            cfg.resampled,
            cfg.epoch_samples,
        )
        self.decode, self.collate = decode, collate
        self.batches = 0
        self.cursors = [Cursor() for _ in range(self.workers)]
        self.worker_counters = [Counters() for _ in range(self.workers)]

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly after the last batch handed out."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world,
            "num_workers": self.workers,
            "seed": self.cfg.seed,
            "shards": shards_digest(self.shards),
            "batches": self.batches,
            "cursors": [c.to_dict() for c in self.cursors],
            "counters": [c.to_dict() for c in self.worker_counters],
            "remainders": elastic.encode(tuple(r for r in self.plan.remainders if r[0] >= self.epoch)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly from this rank's ``state`` (same world size and workers); see :meth:`load_states`."""
        self.load_states([state])

    def load_states(self, states: list[dict]) -> None:
        """Continue from the states every rank saved (or just this rank's when the split is the same).

        Same split, seed and shards: exactly where this rank stopped. Another world size or worker count
        (same seed and shards, every old rank's state given): elastically, every remaining sample of the
        epochs in progress is read exactly once by the new split (:mod:`.elastic`). Anything else (another
        seed or shard list, resampled mode): the earliest epoch in progress restarts under the new split.
        The skip counters carry over: their totals go to rank 0's first worker."""
        for state in states:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        digest = shards_digest(self.shards)
        same_data = all((st["seed"], st["shards"]) == (self.cfg.seed, digest) for st in states)
        old_world, old_workers = int(states[0]["world_size"]), int(states[0]["num_workers"])
        remainders = elastic.decode(states[0].get("remainders"))
        if same_data and (old_world, old_workers) == (self.world, self.workers):
            mine = [st for st in states if int(st["rank"]) == self.rank] or states[:1]
            state = mine[0]
            self.plan = replace(self.plan, remainders=remainders)
            self.batches = int(state["batches"])
            self.cursors = [Cursor.from_dict(c) for c in state["cursors"]]
            self.worker_counters = [Counters.from_dict(c) for c in state["counters"]]
            return
        ranks = sorted(int(st["rank"]) for st in states)
        cursors = [
            Cursor.from_dict(c)
            for st in sorted(states, key=lambda st: int(st["rank"]))
            for c in st["cursors"]
        ]
        epoch = min(c.epoch for c in cursors)
        if same_data and not self.cfg.resampled and ranks == list(range(old_world)):
            old_plan = replace(self.plan, remainders=remainders)
            self.plan = replace(
                self.plan, remainders=elastic.remaining(old_plan, cursors, old_world * old_workers)
            )
            log.info("data: resuming %d ranks x %d workers as %d x %d; epochs %s continue from where every old "
                     "reader stopped", old_world, old_workers, self.world, self.workers,
                     [e for e, _ in self.plan.remainders])  # fmt: skip
        else:
            log.warning(
                "data loader state was saved with world_size=%s num_workers=%s (now %s, %s), other shards/seed "
                "or resampled: restarting epoch %d under the new split",
                old_world, old_workers, self.world, self.workers, epoch,
            )  # fmt: skip
            self.plan = replace(self.plan, remainders=())
        self.batches = 0
        self.cursors = [Cursor(epoch=epoch) for _ in range(self.workers)]
        self.worker_counters = [Counters() for _ in range(self.workers)]
        if self.rank == 0:
            total = sum_counters([Counters.from_dict(c) for st in states for c in st["counters"]])
            self.worker_counters[0] = Counters(total["seen"], total["valid"], total["skipped"])

    def counters(self) -> dict:
        """Samples seen / valid / skipped by reason on this rank, as of the last batch handed out."""
        return sum_counters(self.worker_counters)

    @property
    def epoch(self) -> int:
        """The oldest epoch any worker of this rank is still in."""
        return min(c.epoch for c in self.cursors)

    # -- iteration ---------------------------------------------------------------------------------------
    def _dataloader(self) -> DataLoader:
        cfg = self.cfg
        dataset = _ShardDataset(
            cfg,
            self.plan,
            self.rank,
            self.world,
            self.workers,
            self.batches,
            self.cursors,
            self.worker_counters,
            self.decode,
            self.collate,
        )
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            worker_cleanup_at_exit()
            kwargs = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": cfg.persistent_workers}
        return DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=cfg.num_workers,
            worker_init_fn=ignore_stop_signals,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            **kwargs,
        )

    def __iter__(self) -> Iterator[dict]:
        for batch in self._dataloader():
            info = batch.pop("_loader")
            w = int(info["worker"])
            self.cursors[w] = Cursor.from_dict(info["cursor"])
            self.worker_counters[w] = Counters.from_dict(info["counters"])
            self.batches += 1
            yield batch


@runtime_checkable
class DataSource(Protocol):
    """A shard source the trainer streams from (``data._target_``): image shards or latent shards."""

    def shards(self) -> list[str]:
        """The shard URLs, expanded once (raises ShardNotFoundError naming the pattern)."""
        ...

    def check(self) -> None:
        """The data exists now and is what the config says (raises an error naming the file or key)."""
        ...

    def loader(self, rank: int, world_size: int) -> StreamingLoader:
        """The resumable stream of batches for one rank."""
        ...

    def batch_keys(self) -> frozenset[str]:
        """What each batch holds (``image`` or ``latent_mean``/``latent_std``, ``caption``, ...)."""
        ...

    def scale_factor(self) -> float | None:
        """The latent scale factor the data was made with (latent shards), None when it is not fixed."""
        ...

    def check_autoencoder(self, fingerprint: str) -> None:
        """Refuse data made with another autoencoder (latent shards); nothing to check for images."""
        ...
