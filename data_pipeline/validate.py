"""``ldm-data validate``: read every sample of every shard and count valid and invalid samples by reason."""

from __future__ import annotations

from collections import Counter
from multiprocessing import get_context

from .errors import SampleError
from .progress import progress as progress_bar
from .samples import ImageLimits, caption_text, decode_rgb
from .tario import iter_shard


def validate_shard(job: tuple[str, ImageLimits, str]) -> dict:
    """Counts for one shard: ``{"url", "total", "valid", "invalid": {reason: n}}``."""
    url, limits, caption_key = job
    invalid: Counter = Counter()
    valid = 0
    errors: list = []
    for raw in iter_shard(url, errors):
        try:
            decode_rgb(raw, limits)
            caption_text(raw, caption_key)
        except SampleError as exc:
            invalid[exc.reason] += 1
            continue
        valid += 1
    for err in errors:
        invalid[err.reason] += 1
    return {"url": url, "total": valid + sum(invalid.values()), "valid": valid, "invalid": dict(invalid)}


def validate_shards(
    shards: list[str],
    limits: ImageLimits = ImageLimits(),
    caption_key: str = "txt",
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Validate every shard; returns totals, invalid counts by reason, and per-shard results."""
    jobs = [(url, limits, caption_key) for url in shards]
    bar = progress_bar(total=len(jobs), desc="validate", unit="shard", disable=not progress)
    results = []
    if workers > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap(validate_shard, jobs):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(validate_shard(job))
            bar.update()
    bar.close()
    invalid: Counter = Counter()
    for r in results:
        invalid.update(r["invalid"])
    return {
        "shards": len(results),
        "total": sum(r["total"] for r in results),
        "valid": sum(r["valid"] for r in results),
        "invalid": dict(sorted(invalid.items())),
        "per_shard": results,
    }
