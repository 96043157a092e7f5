"""Resuming a stream on another number of ranks or workers: what each old slot left of its epochs.

Old slot ``j`` of ``n`` stopped at a :class:`~.stream.Cursor`; everything it had not read yet in its epoch (and
all of its share of later epochs other slots already entered) goes back into a common pool per epoch, as the
shards' :class:`~.stream.Entry` items: whole shards, or the block a cursor was inside (from the sample it
starts at, with the samples already consumed from it). The new slots deal each pool out round-robin, so
together they read every remaining sample of those epochs exactly once; later epochs split as usual.
"""

from __future__ import annotations

from .stream import Cursor, Entry, StreamPlan


def remaining(
    plan: StreamPlan, cursors: list[Cursor], nslots: int
) -> tuple[tuple[int, tuple[Entry, ...]], ...]:
    """``(epoch, entries left)`` for every epoch some old slot is still in; ``cursors[j]`` is where old slot
    ``j`` of ``nslots`` stopped, under ``plan`` (whose own remainders describe an earlier change)."""
    if len(cursors) != nslots:
        raise ValueError(f"{len(cursors)} cursors for {nslots} slots")
    first, last = min(c.epoch for c in cursors), max(c.epoch for c in cursors)
    out = []
    for epoch in range(first, last + 1):
        left: list[Entry] = []
        for slot, cur in enumerate(cursors):
            if cur.epoch > epoch:
                continue  # it finished this epoch
            entries = plan.entries(epoch, slot, nslots)
            if cur.epoch < epoch:
                left += entries  # it had not begun this one
                continue
            i = cur.shard
            if i >= len(entries):
                continue
            if cur.skip or cur.pos or cur.offset:  # inside shard i: from the block it was in
                cut = dict(cur.cuts or ()).get(i) if cur.pos else None
                left.append(Entry(entries[i].position, cur.skip, cur.offset, cur.pos, cut))
            else:
                left.append(
                    entries[i]
                )  # not entered yet (possibly itself left partly read by a change before)
            left += entries[i + 1 :]
        out.append((epoch, tuple(sorted(left, key=lambda e: (e.position, e.skip)))))
    return tuple(out)


def encode(remainders: tuple[tuple[int, tuple[Entry, ...]], ...]) -> list:
    return [[epoch, [e.to_list() for e in left]] for epoch, left in remainders]


def decode(saved: list | None) -> tuple[tuple[int, tuple[Entry, ...]], ...]:
    return tuple((int(epoch), tuple(Entry.from_list(e) for e in left)) for epoch, left in saved or ())
