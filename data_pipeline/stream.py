"""The deterministic, resumable order in which a worker reads raw samples from its shards.

Every (rank, worker) pair is a *slot*. In each epoch the shard list is permuted with ``(seed, epoch)`` (the
same permutation on every rank) and slot ``s`` of ``n`` reads shards ``s, s+n, s+2n, ...``: slots see disjoint
samples that together cover the epoch. In ``resampled`` mode each slot instead draws shards with replacement
from the whole list, and an epoch is ``epoch_samples / n`` samples per slot.

A slot reads its stream in *blocks* of ``shuffle_buffer`` samples (crossing shard boundaries) and yields each
block in a permuted order seeded by ``(seed, epoch, slot, where the block starts)``. A position in the stream
is therefore a small :class:`Cursor` (epoch, shard, samples to skip in it, samples consumed from the block):
resuming re-reads at most one block's bytes and decodes nothing it does not yield. The order of samples is a
pure function of (seed, epoch, rank, world size, worker count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .tario import RawSample, ShardError, iter_shard


@dataclass
class Cursor:
    """A slot's position: block starts at sample ``skip`` of shard ``shard``; ``pos`` of it are consumed."""

    epoch: int = 0
    shard: int = 0  # index into the epoch's shard sequence (the draw number when resampled)
    skip: int = 0
    pos: int = 0
    taken: int = 0  # samples consumed in this epoch (ends a resampled epoch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        return cls(**{k: int(d[k]) for k in ("epoch", "shard", "skip", "pos", "taken")})


@dataclass(frozen=True)
class StreamPlan:
    """What every slot needs to know to compute its own share of the data."""

    shards: tuple[str, ...]
    seed: int = 0
    shuffle_buffer: int = 1000
    shard_shuffle: bool = True
    resampled: bool = False
    epoch_samples: int = 0  # resampled mode: samples per epoch, all slots together

    def epoch_shards(self, epoch: int, slot: int, nslots: int) -> list[str]:
        """The shards slot ``slot`` reads in ``epoch`` (non-resampled mode)."""
        order = np.arange(len(self.shards))
        if self.shard_shuffle:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.shards))
        return [self.shards[i] for i in order[slot::nslots]]

    def draw(self, epoch: int, slot: int, index: int) -> str:
        """The ``index``-th shard drawn with replacement by ``slot`` in ``epoch`` (resampled mode)."""
        rng = np.random.default_rng([self.seed, epoch, slot, index, 0xD4A7])
        return self.shards[int(rng.integers(len(self.shards)))]

    def slot_quota(self, nslots: int) -> int:
        """Samples per epoch for one slot in resampled mode."""
        return math.ceil(self.epoch_samples / nslots)


def iter_raw(
    plan: StreamPlan, slot: int, nslots: int, start: Cursor
) -> Iterator[tuple[RawSample | None, int, Cursor, list[ShardError]]]:
    """Yield ``(sample, epoch, cursor_after, shard_errors)`` forever, starting at ``start``.

    ``shard_errors`` lists shards found truncated or unreadable while filling the block (each one skipped
    sample). When resuming inside a block (``start.pos > 0``) they were already reported before the
    checkpoint and are not reported again. ``sample`` is None only when a block held nothing but errors.
    """
    cur = Cursor(**start.to_dict())
    report_errors = cur.pos == 0
    while True:
        epoch = cur.epoch
        shards = None if plan.resampled else plan.epoch_shards(epoch, slot, nslots)
        quota = plan.slot_quota(nslots) if plan.resampled else None
        if shards is not None and not shards:
            raise RuntimeError(
                f"slot {slot} of {nslots} has no shard: use fewer workers/ranks or resampled mode"
            )
        got_any = False
        while True:  # blocks of this epoch
            size = max(1, plan.shuffle_buffer)
            if quota is not None:
                size = min(size, quota - cur.taken)
            block: list[RawSample] = []
            errors: list[ShardError] = []
            s, k = cur.shard, cur.skip
            gen = None
            fruitless = 0  # shards in a row that gave nothing (resampled mode would spin forever)
            while len(block) < size:
                if gen is None:
                    if shards is not None and s >= len(shards):
                        break
                    if fruitless > 2 * len(plan.shards) + 8:
                        raise RuntimeError(f"slot {slot}: {fruitless} shard draws in a row gave no sample")
                    url = shards[s] if shards is not None else plan.draw(epoch, slot, s)
                    gen = iter_shard(url, errors, skip=k)
                    fruitless += 1
                sample = next(gen, None)
                if sample is None:
                    gen, s, k = None, s + 1, 0
                    continue
                block.append(sample)
                fruitless = 0
                k = sample.index + 1
            if gen is not None:
                gen.close()
            end_of_epoch = (shards is not None and s >= len(shards)) or (
                quota is not None and cur.taken + len(block) >= quota
            )
            after_block = Cursor(epoch + 1, 0, 0, 0, 0) if end_of_epoch else Cursor(epoch, s, k, 0, 0)
            if not end_of_epoch:
                after_block.taken = cur.taken + len(block)
            errs = errors if report_errors else []
            report_errors = True
            order = range(len(block))
            if plan.shuffle_buffer > 1 and len(block) > 1:
                order = np.random.default_rng([plan.seed, epoch, slot, cur.shard, cur.skip]).permutation(
                    len(block)
                )
            got_any = got_any or bool(block) or cur.pos > 0
            if cur.pos >= len(block) and errs:
                yield None, epoch, after_block, errs
            for i in range(cur.pos, len(block)):
                nxt = after_block
                if i + 1 < len(block):
                    nxt = Cursor(epoch, cur.shard, cur.skip, i + 1, cur.taken)
                yield block[int(order[i])], epoch, nxt, errs
                errs = []
            cur = after_block
            if end_of_epoch:
                break
        if not got_any:
            raise RuntimeError(
                f"slot {slot} of {nslots} read no sample in epoch {epoch} from its shards "
                f"({(shards or plan.shards)[:3]}...): are they empty or all corrupt?"
            )
