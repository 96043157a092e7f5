"""The deterministic, resumable order in which a worker reads raw samples from its shards.

Every (rank, worker) pair is a *slot*. In each epoch the shard list is permuted with ``(seed, epoch)`` (the
same permutation on every rank) and slot ``s`` of ``n`` reads shards ``s, s+n, s+2n, ...``: slots see disjoint
samples that together cover the epoch. In ``resampled`` mode each slot instead draws shards with replacement
from the whole list, and an epoch is ``epoch_samples / n`` samples per slot.

A slot reads each shard in *blocks* of up to ``shuffle_buffer`` samples (a block never crosses into the next
shard) and yields each block in a permuted order seeded by ``(seed, epoch, the shard's place in the epoch, the
sample the block starts at)``, not by the slot: whichever slot reads a block, it comes out in the same order.
A position in the stream is therefore a small :class:`Cursor` (epoch, shard, samples to skip in it and the
byte where they end, samples consumed from the block): resuming re-reads at most one block's bytes (from that
byte: a remote shard is asked for a range) and decodes nothing it does not yield. The order of samples is a
pure function of (seed, epoch, rank, world size, worker count).

When the split changes (a job resumed on another number of ranks or workers), the positions every old slot
reached are turned into what is left of each epoch in progress (:mod:`.elastic`): the shards nobody started
and, as partial :class:`Entry` items, the blocks some slot was inside. The new slots deal those out among
themselves and go on, so every sample of the epoch is still read exactly once.

A shard stays open from one block to the next. A shard that ended early with an error (truncated, unreadable,
or remote and still failing after the retries) is counted once, when the block that read it is first handed
out; the cursor also records where each such shard of the current block stopped (``cuts``), so re-reading
that block after a resume stops there again, even if a remote shard has become readable meanwhile: the resumed
stream is the same as the uninterrupted one and no count is lost or doubled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .tario import RawSample, ShardError, iter_shard


@dataclass
class Cursor:
    """A slot's position: block starts at sample ``skip`` of shard ``shard`` (at byte ``offset`` of it, 0 when
    unknown); ``pos`` of it are consumed. ``cuts`` lists ``[shard, samples]`` for the shards of this block
    that ended early with an error (their errors are already counted once ``pos`` > 0)."""

    epoch: int = 0
    shard: int = 0  # index into the epoch's shard sequence (the draw number when resampled)
    skip: int = 0
    pos: int = 0
    taken: int = 0  # samples consumed in this epoch (ends a resampled epoch)
    offset: int = 0
    cuts: tuple[tuple[int, int], ...] | None = ()  # None: unknown (a state saved before cuts were recorded)

    def to_dict(self) -> dict:
        cuts = None if self.cuts is None else [list(c) for c in self.cuts]
        return {"epoch": self.epoch, "shard": self.shard, "skip": self.skip, "pos": self.pos,
                "taken": self.taken, "offset": self.offset, "cuts": cuts}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        """Also reads states saved before ``offset`` and ``cuts`` existed."""
        ints = {k: int(d.get(k, 0)) for k in ("epoch", "shard", "skip", "pos", "taken", "offset")}
        cuts = d.get("cuts")
        return cls(**ints, cuts=None if cuts is None else tuple((int(s), int(n)) for s, n in cuts))


@dataclass(frozen=True)
class Entry:
    """A shard of an epoch, by its position in the epoch's order, and where reading it starts: at the
    beginning, or — in an epoch resumed at another world size — where the old split left it (the block that
    starts at sample ``skip`` / byte ``offset``, ``pos`` of it consumed, ``cut`` where it stopped on an error)."""

    position: int
    skip: int = 0
    offset: int = 0
    pos: int = 0
    cut: int | None = None

    def to_list(self) -> list:
        return [self.position, self.skip, self.offset, self.pos, self.cut]

    @classmethod
    def from_list(cls, v: list) -> Entry:
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), None if v[4] is None else int(v[4]))


@dataclass(frozen=True)
class StreamPlan:
    """What every slot needs to know to compute its own share of the data."""

    shards: tuple[str, ...]
    seed: int = 0
    shuffle_buffer: int = 1000
    shard_shuffle: bool = True
    resampled: bool = False
    epoch_samples: int = 0  # resampled mode: samples per epoch, all slots together
    remainders: tuple[tuple[int, tuple[Entry, ...]], ...] = ()  # (epoch, what is left of it): elastic resume

    def order(self, epoch: int) -> list[int]:
        """The shard indices in ``epoch``'s order (the same on every rank)."""
        if not self.shard_shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.shards)).tolist()

    def resumed_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` continues under this split from what another split left of it."""
        return any(e == epoch for e, _ in self.remainders)

    def entries(self, epoch: int, slot: int, nslots: int) -> list[Entry]:
        """The shards slot ``slot`` reads in ``epoch`` (non-resampled mode): positions ``slot, slot + n, ...``
        of the epoch's order, or its share of what was left of the epoch when the split changed."""
        for e, left in self.remainders:
            if e == epoch:
                return list(left[slot::nslots])
        return [Entry(p) for p in range(slot, len(self.shards), nslots)]

    def epoch_shards(self, epoch: int, slot: int, nslots: int) -> list[str]:
        """The shard URLs slot ``slot`` reads in ``epoch``, in order."""
        order = self.order(epoch)
        return [self.shards[order[e.position]] for e in self.entries(epoch, slot, nslots)]

    def draw(self, epoch: int, slot: int, index: int) -> str:
        """The ``index``-th shard drawn with replacement by ``slot`` in ``epoch`` (resampled mode)."""
        rng = np.random.default_rng([self.seed, epoch, slot, index, 0xD4A7])
        return self.shards[int(rng.integers(len(self.shards)))]

    def slot_quota(self, nslots: int) -> int:
        """Samples per epoch for one slot in resampled mode."""
        return math.ceil(self.epoch_samples / nslots)


class _OpenShard:
    """One shard being read, kept open across blocks. ``limit``: stop after this many samples (where an
    earlier read of the same block stopped on an error)."""

    def __init__(self, url: str, epoch: int, shard: int, skip: int, offset: int, limit: int | None):
        self.epoch, self.shard, self.next, self.offset, self.limit = epoch, shard, skip, offset, limit
        self.errors: list[ShardError] = []
        self._samples = iter_shard(url, self.errors, skip, offset)
        self._pending: RawSample | None = None

    def peek(self) -> RawSample | None:
        """The next sample without consuming it (the position stays before it)."""
        before = (self.next, self.offset)
        sample = self.take()
        if sample is not None:
            self._pending = sample
            self.next, self.offset = before
        return sample

    @property
    def stopped_early(self) -> bool:
        """It ended on an error, or where an earlier read of the block did."""
        return bool(self.errors) or (self.limit is not None and self.next >= self.limit)

    def take(self) -> RawSample | None:
        if self._pending is not None:
            sample, self._pending = self._pending, None
            self.next, self.offset = sample.index + 1, sample.end
            return sample
        if self.limit is not None and self.next >= self.limit:
            return None
        sample = next(self._samples, None)
        if sample is not None:
            self.next, self.offset = sample.index + 1, sample.end
        return sample

    def close(self) -> None:
        self._samples.close()


def _skip_failed(
    plan, order, entries, epoch, s, known, legacy, cuts, errors
) -> tuple[int, _OpenShard | None]:
    """From entry ``s`` on, the first shard that gives a sample (left open, positioned before it) and its index;
    the ones before it failed without a sample: their cuts and (new) errors are added to the block's."""
    while s < len(entries):
        reader = _OpenShard(plan.shards[order[entries[s].position]], epoch, s, 0, 0, known.get(s))
        if reader.peek() is not None:
            return s, reader
        if reader.stopped_early:
            cuts.append((s, reader.next))
        if not legacy and (s not in known or reader.next < known[s]):
            errors += reader.errors
        reader.close()
        s += 1
    return s, None


def iter_raw(
    plan: StreamPlan, slot: int, nslots: int, start: Cursor
) -> Iterator[tuple[RawSample | None, int, tuple, list[ShardError]]]:
    """Yield ``(sample, epoch, position_after, shard_errors)`` forever, starting at ``start``;
    ``Cursor(*position_after)`` is the cursor after the sample.

    ``shard_errors`` lists shards found truncated, unreadable or failing (each one skipped sample), with the
    block's first sample. When resuming inside a block (``start.pos > 0``) the shards of ``start.cuts`` are
    read only as far as before and their errors, already reported, are not reported again (a state without
    ``cuts``, from an older version, reports none of the block's errors again).
    ``sample`` is None only when a block held nothing but errors.
    """
    cur = start
    legacy = start.pos > 0 and start.cuts is None
    known = dict(start.cuts or ()) if start.pos > 0 else {}
    reader: _OpenShard | None = None
    try:
        while True:
            epoch = cur.epoch
            entries = None if plan.resampled else plan.entries(epoch, slot, nslots)
            order = None if plan.resampled else plan.order(epoch)
            quota = plan.slot_quota(nslots) if plan.resampled else None
            elastic = plan.resumed_epoch(epoch)
            if entries is not None and not entries and not elastic:
                raise RuntimeError(
                    f"slot {slot} of {nslots} has no shard: use fewer workers/ranks or resampled mode"
                )
            got_any = elastic or cur.shard > 0 or cur.skip > 0 or cur.pos > 0  # resumed inside this epoch
            while True:  # blocks of this epoch, each inside one shard
                if (
                    entries is not None
                    and cur.shard < len(entries)
                    and not (cur.skip or cur.pos or cur.offset)
                ):
                    e = entries[
                        cur.shard
                    ]  # entering a shard another split left partly read: go on from there
                    if e.skip or e.pos or e.offset:
                        cuts = () if e.cut is None else ((cur.shard, e.cut),)
                        cur = Cursor(epoch, cur.shard, e.skip, e.pos, cur.taken, e.offset, cuts)
                        known, legacy = dict(cuts), False
                size = max(1, plan.shuffle_buffer)
                if quota is not None:
                    size = min(size, quota - cur.taken)
                block: list[RawSample] = []
                errors: list[ShardError] = []
                cuts: list[tuple[int, int]] = []
                s, k, off = first = (cur.shard, cur.skip, cur.offset)
                fruitless = 0  # shards in a row that gave nothing (resampled mode would spin forever)
                if reader is not None and (reader.epoch, reader.shard, reader.next) != (epoch, s, k):
                    reader.close()  # not where this block starts (a new epoch, or a resumed stream)
                    reader = None
                while len(block) < size:
                    if reader is None:
                        if entries is not None and s >= len(entries):
                            break
                        if fruitless > 2 * len(plan.shards) + 8:
                            raise RuntimeError(
                                f"slot {slot}: {fruitless} shard draws in a row gave no sample"
                            )
                        url = (
                            plan.draw(epoch, slot, s)
                            if order is None
                            else plan.shards[order[entries[s].position]]
                        )
                        reader = _OpenShard(url, epoch, s, k, off, known.get(s))
                        fruitless += 1
                    sample = reader.take()
                    if sample is None:  # the shard is done (or stopped where it stopped before)
                        if reader.stopped_early:
                            cuts.append((s, reader.next))
                        if not legacy and (s not in known or reader.next < known[s]):
                            errors += reader.errors  # new: not counted before the checkpoint
                        reader.close()
                        reader, s, k, off = None, s + 1, 0, 0
                        if block:  # a block never crosses into the next shard; shards after it that fail
                            if entries is not None:  # before giving a sample are reported with this block
                                s, reader = _skip_failed(
                                    plan, order, entries, epoch, s, known, legacy, cuts, errors
                                )
                            break
                        first = (s, k, off)  # that shard gave nothing: the block starts at the next one
                        cuts = []
                        continue
                    block.append(sample)
                    fruitless = 0
                    k, off = reader.next, reader.offset
                known, legacy = {}, False
                end_of_epoch = (entries is not None and s >= len(entries)) or (
                    quota is not None and cur.taken + len(block) >= quota
                )
                if end_of_epoch:
                    after_block = (epoch + 1, 0, 0, 0, 0, 0, ())
                else:
                    after_block = (epoch, s, k, 0, cur.taken + len(block), off, ())
                pos = cur.pos if first == (cur.shard, cur.skip, cur.offset) else 0
                n = len(block)
                perm = range(n)
                if (
                    plan.shuffle_buffer > 1 and n > 1
                ):  # seeded by the block's place in its shard, not the slot
                    where = [slot, first[0], 1] if order is None else [entries[first[0]].position]
                    perm = np.random.default_rng([plan.seed, epoch, *where, first[1]]).permutation(n).tolist()
                got_any = got_any or bool(block) or pos > 0
                errs = errors
                if pos >= n and errs:
                    yield None, epoch, after_block, errs
                done = tuple(cuts)
                inside = (epoch, first[0], first[1])  # positions are tuples: a Cursor is built per batch
                for i in range(pos, n):
                    nxt = after_block if i + 1 == n else (*inside, i + 1, cur.taken, first[2], done)
                    yield block[perm[i]], epoch, nxt, errs
                    errs = []
                cur = Cursor(*after_block)
                if end_of_epoch:
                    break
            if not got_any:
                raise RuntimeError(
                    f"slot {slot} of {nslots} read no sample in epoch {epoch} from its shards "
                    f"({plan.shards[:3]}...): are they empty or all corrupt?"
                )
    finally:
        if reader is not None:
            reader.close()
