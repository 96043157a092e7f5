"""``ldm-data shuffle``: merge shard sets and shuffle their samples across shards, once, offline.

The loader shuffles inside blocks of one shard (that is what keeps its resume cursor small: see
:mod:`.stream`), as WebDataset's own sample buffer mostly does too. So shards must already be in random order
across sources: a folder of photographs packed beside a folder of synthetic images gives batches that are all
one or all the other for dozens of steps (measured on the demo's data: 139 of the first 650 batches of 32 were
entirely photographs). This is the offline fix that LAION-style pipelines use: a two-pass bucket shuffle.

1. Every sample of every source is dealt to a random output bucket (temporary tar files in the output folder).
2. Each bucket is read back into memory (about ``shard_size`` samples), permuted and written as a final shard.

Memory stays at one shard's samples (pass 1 keeps one open file per output shard); the result is a function
of the inputs and ``seed``. Keys are prefixed with the source's index (``s0-000000012``): sources made
separately number their samples alike. Samples a source
cannot deliver (a truncated or unreadable shard) are skipped and counted in the summary, as the loader counts
them. Nothing under ``out`` is replaced until every shard is written; a failed run leaves no shard behind.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_json
from .errors import InputError, NoValidSampleError
from .progress import progress as progress_bar
from .shards import AtomicShardWriter, shard_name
from .tario import RawSample, ShardError, iter_shard
from .urls import expand_shards


def _count(source: str, shards: list) -> int | None:
    """The sample count a source's ``dataset.json`` records (ours), if it covers exactly these shards."""
    summary = Path(source) / "dataset.json"
    if not summary.is_file():
        return None
    per_shard = json.loads(summary.read_text()).get("per_shard", {})
    names = {Path(str(s)).name for s in shards}
    return sum(per_shard.values()) if names == set(per_shard) else None


def _samples(sources: Sequence[str], skipped: Counter):
    """(source index, raw sample) for every readable sample of every source, in order."""
    for i, source in enumerate(sources):
        for url in expand_shards(source):
            errors: list[ShardError] = []
            yield from ((i, s) for s in iter_shard(url, errors))
            for err in errors:
                skipped[err.reason] += 1


def _record(i: int, sample: RawSample) -> dict:
    return {"__key__": f"s{i}-{sample.key}", **sample.files}  # the whole key: a folder part keeps it unique


def shuffle_shards(
    sources: Sequence[str],
    out: str,
    shard_size: int = 1000,
    seed: int = 0,
    prefix: str = "shard",
    progress: bool = True,
) -> dict:
    """Merge the shard sets ``sources`` into shards of about ``shard_size`` samples under ``out``, samples
    shuffled across all of them; returns (and writes as ``dataset.json``) a summary."""
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    outdir = Path(out)
    if any(outdir.glob("*.tar")):
        raise InputError(f"{out} already holds shards: choose an empty output folder")
    counts = [_count(s, expand_shards(s)) for s in sources]
    skipped: Counter = Counter()
    if all(c is not None for c in counts):
        total = sum(counts)
    else:  # not ours: count by reading (the shuffle reads everything twice more anyway)
        total = sum(1 for _ in _samples(sources, Counter()))
    if total == 0:
        raise NoValidSampleError(f"no sample in {list(sources)}: nothing written to {out}")
    buckets = max(1, math.ceil(total / shard_size))
    rng = np.random.default_rng([seed, 0x5407])
    work = outdir / f".shuffle-{seed}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        writers = [AtomicShardWriter(work / shard_name(b, "bucket")) for b in range(buckets)]
        try:
            bar = progress_bar(total=total, desc="shuffle: deal", unit="img", disable=not progress)
            for i, sample in _samples(sources, skipped):
                writers[int(rng.integers(buckets))].write(_record(i, sample))
                bar.update(1)
            bar.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for w in writers:
            w.close()
        per_shard = {}
        bar = progress_bar(total=buckets, desc="shuffle: write", unit="shard", disable=not progress)
        for b in range(buckets):
            bucket = work / shard_name(b, "bucket")
            records = [{"__key__": s.key, **s.files} for s in iter_shard(str(bucket))]
            order = rng.permutation(len(records))
            name = shard_name(b, prefix)
            with AtomicShardWriter(work / name) as writer:
                for j in order:
                    writer.write(records[j])
            bucket.unlink()
            per_shard[name] = len(records)
            bar.update(1)
        bar.close()
        for name in per_shard:  # every shard is complete: move them in
            (work / name).replace(outdir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "source": [str(s) for s in sources],
        "shards": buckets,
        "samples": sum(per_shard.values()),
        "skipped": dict(skipped),
        "per_shard": per_shard,
        "seed": seed,
    }
    atomic_json(outdir / "dataset.json", summary)
    return summary
