"""Issue 16, data: a stream saved by one split (ranks x workers) resumes under another and still reads every
sample of the epochs in progress exactly once; a later resume at the new size continues exactly."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from data_pipeline.images import ImageShards, ImageShardsConfig

ALL = {f"{i:08d}" for i in range(320)}  # synth_shards: 8 shards x 40 samples


def cfg(urls, workers: int = 0, **kw) -> ImageShardsConfig:
    base = dict(urls=str(urls), resolution=32, batch_size=5, num_workers=workers, shuffle_buffer=16, seed=3)
    return ImageShardsConfig(**(base | kw))


def loader(urls, rank, world, workers=0, **kw):
    return ImageShards(cfg(urls, workers, **kw)).loader(rank, world)


def consume(ld, batches: int, seen: Counter) -> None:
    for batch in itertools.islice(iter(ld), batches):
        seen.update(zip(batch["key"], batch["epoch"].tolist(), strict=True))


def consume_until(ld, epoch: int, seen: Counter, limit: int = 400) -> None:
    """Batches until one holds only samples of ``epoch`` or later."""
    for batch in itertools.islice(iter(ld), limit):
        epochs = batch["epoch"].tolist()
        seen.update(zip(batch["key"], epochs, strict=True))
        if min(epochs) >= epoch:
            return
    raise AssertionError(f"never reached epoch {epoch}")


def assert_exactly_once(seen: Counter, epochs) -> None:
    for e in epochs:
        got = Counter({k: n for (k, ep), n in seen.items() if ep == e})
        assert set(got) == ALL, f"epoch {e}: {len(ALL - set(got))} samples never read"
        assert max(got.values()) == 1, f"epoch {e}: read twice: {[k for k, n in got.items() if n > 1][:5]}"


def old_run(urls, world, batches, workers=0, **kw):
    seen: Counter = Counter()
    states = []
    for rank, n in zip(range(world), batches, strict=True):
        ld = loader(urls, rank, world, workers, **kw)
        consume(ld, n, seen)
        states.append(ld.state_dict())
    return seen, states


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_elastic_data_two_ranks_resume_on_other_sizes_reading_each_sample_once(synth_shards, new_world):
    # rank 0 stops inside a shuffle block of epoch 0, rank 1 is already inside epoch 1 (160 samples per rank)
    seen, states = old_run(synth_shards, 2, [7, 40])
    for rank in range(new_world):
        ld = loader(synth_shards, rank, new_world)
        ld.load_states(states)
        consume_until(ld, 2, seen)
    assert_exactly_once(seen, [0, 1])


def test_elastic_data_one_rank_resumes_on_two_and_changes_workers(synth_shards):
    seen, states = old_run(synth_shards, 1, [13], workers=2)
    for rank in range(2):
        ld = loader(synth_shards, rank, 2, workers=1)
        ld.load_states(states)
        consume_until(ld, 1, seen)
    assert_exactly_once(seen, [0])


def test_elastic_data_chained_changes_and_an_exact_resume_at_the_new_size(synth_shards):
    seen, states = old_run(synth_shards, 2, [9, 3])
    mid = []
    for rank in range(3):  # 2 -> 3 ranks, each stopping somewhere inside the remainder of epoch 0
        ld = loader(synth_shards, rank, 3)
        ld.load_states(states)
        consume(ld, 2 + 3 * rank, seen)
        mid.append(ld.state_dict())
    for rank in range(3):  # an exact resume at the same size carries the remainder on
        a, b = loader(synth_shards, rank, 3), loader(synth_shards, rank, 3)
        a.load_state_dict(mid[rank])
        b.load_state_dict(mid[rank])
        ka = [k for batch in itertools.islice(iter(a), 6) for k in batch["key"]]
        kb = [k for batch in itertools.islice(iter(b), 6) for k in batch["key"]]
        assert ka == kb
    for rank in range(1):  # 3 -> 1
        ld = loader(synth_shards, rank, 1)
        ld.load_states(mid)
        consume_until(ld, 1, seen)
    assert_exactly_once(seen, [0])


def test_elastic_data_counters_carry_over_once(synth_shards):
    _, states = old_run(synth_shards, 2, [4, 6])
    totals = [loader(synth_shards, r, 3) for r in range(3)]
    for ld in totals:
        ld.load_states(states)
    assert [ld.counters()["valid"] for ld in totals] == [50, 0, 0]


def test_other_shards_or_seed_fall_back_to_restarting_the_epoch(synth_shards, caplog):
    _, states = old_run(synth_shards, 2, [4, 6])
    ld = loader(synth_shards, 0, 1, seed=99)
    ld.load_states(states)
    assert "restarting epoch 0" in caplog.text and not ld.plan.remainders
