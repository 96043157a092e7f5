"""``ldm-data shuffle``: sources merged and shuffled across shards, so the loader's batches mix them (it shuffles
only within a shard); every sample kept once, byte for byte; a bad source shard counted, not fatal."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from shardmaker import image_bytes, write_tar

from data_pipeline.cli import main as ldm_data
from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.lock import LOCK_FILE, FolderLock
from data_pipeline.reshuffle import shuffle_shards
from data_pipeline.synthetic import write_synthetic
from data_pipeline.tario import iter_shard
from data_pipeline.urls import expand_shards


def _sources(tmp_path: Path) -> list[str]:
    """240 synthetic shapes (captions name a shape) and 80 hand-made "photo" samples, each in its own shards."""
    shapes = tmp_path / "shapes"
    write_synthetic(str(shapes), num=240, shard_size=80, size=32, seed=0, progress=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in range(2):
        members = []
        for i in range(40):
            members += [
                (f"{s}{i:03d}.jpg", image_bytes(32, 32, s * 40 + i)),
                (f"{s}{i:03d}.txt", b"a photograph"),
            ]
        write_tar(photos / f"p{s}.tar", members)
    return [str(shapes), str(photos)]


def _all(source: str) -> dict[str, dict[str, bytes]]:
    return {s.key: s.files for url in expand_shards(source) for s in iter_shard(url)}


def _photo_share_per_batch(urls: list[str]) -> list[float]:
    cfg = ImageShardsConfig(urls=urls, resolution=32, batch_size=16, num_workers=0, shuffle_buffer=1000)
    shares = []
    for batch in ImageShards(cfg).loader(0, 1):
        shares.append(sum(c == "a photograph" for c in batch["caption"]) / 16)
        if len(shares) == 20:
            return shares
    return shares


def test_shuffle_merges_sources_keeps_every_sample_and_mixes_the_batches(tmp_path):
    sources = _sources(tmp_path)
    summary = shuffle_shards(sources, str(tmp_path / "mixed"), shard_size=64, seed=3, progress=False)
    assert summary["samples"] == 320 and summary["shards"] == 5 and summary["skipped"] == {}
    out = _all(str(tmp_path / "mixed"))
    want = {f"s{i}-{k}": files for i, src in enumerate(sources) for k, files in _all(src).items()}
    assert out == want  # each sample once, every member byte for byte, keys told apart by source
    assert sum(summary["per_shard"].values()) == 320
    assert [p.name for p in (tmp_path / "mixed").iterdir() if p.name.startswith(".")] == []
    # the loader's batches: all one source or the other before, a quarter photographs each after
    before = _photo_share_per_batch(sources)
    after = _photo_share_per_batch([str(tmp_path / "mixed")])
    assert sum(s in (0.0, 1.0) for s in before) >= 16, before  # only batches across a shard boundary mix
    assert all(0 < s < 0.6 for s in after), after
    assert abs(sum(after) / len(after) - 0.25) < 0.08
    # a function of the inputs and the seed
    again = shuffle_shards(sources, str(tmp_path / "again"), shard_size=64, seed=3, progress=False)
    other = shuffle_shards(sources, str(tmp_path / "other"), shard_size=64, seed=4, progress=False)
    order = [[s.key for s in iter_shard(u)] for u in expand_shards(str(tmp_path / "mixed"))]
    assert order == [[s.key for s in iter_shard(u)] for u in expand_shards(str(tmp_path / "again"))]
    assert order != [[s.key for s in iter_shard(u)] for u in expand_shards(str(tmp_path / "other"))]
    assert again["per_shard"] == summary["per_shard"] and other["samples"] == 320


def test_shuffle_counts_a_truncated_source_shard_and_refuses_to_overwrite(tmp_path):
    sources = _sources(tmp_path)
    p1 = Path(sources[1]) / "p1.tar"
    p1.write_bytes(p1.read_bytes()[: len(p1.read_bytes()) // 2])  # a shard cut in the middle
    summary = shuffle_shards(sources, str(tmp_path / "mixed"), shard_size=100, progress=False)
    assert summary["skipped"] == {"truncated_tar": 1}
    kept = Counter(k.split("-")[0] for k in _all(str(tmp_path / "mixed")))
    assert kept["s0"] == 240 and 0 < kept["s1"] < 80 and summary["samples"] == sum(kept.values())
    # the command: a folder that holds shards is refused with one line, and nothing in it changes
    before = {p.name: p.read_bytes() for p in (tmp_path / "mixed").iterdir()}
    before[LOCK_FILE] = b""  # the command holds the folder's lock while it runs (one line of who holds it)
    cmd = [sys.executable, "-m", "data_pipeline.cli", "shuffle", *sources, "--out", str(tmp_path / "mixed")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert (
        res.returncode == 2 and "already holds shards" in res.stderr and str(tmp_path / "mixed") in res.stderr
    )
    after = {p.name: p.read_bytes() for p in (tmp_path / "mixed").iterdir()}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k != LOCK_FILE)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        shuffle_shards(sources, str(tmp_path / "x"), shard_size=0)


def test_a_second_job_on_the_same_output_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    """Two shuffles into one folder would delete each other's work: the second one is refused at once."""
    sources, out = _sources(tmp_path), tmp_path / "mixed"
    held = FolderLock(out, "ldm-data shuffle job")  # as a running job holds it (flock: per open file)
    try:
        assert ldm_data(["shuffle", *sources, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another ldm-data shuffle job: pid " in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        assert ldm_data(["synth", "--out", str(out), "--num", "8", "--size", "16"]) == 2
    finally:
        held.release()
    assert ldm_data(["shuffle", *sources, "--out", str(out), "--shard-size", "200"]) == 0
    assert len(_all(str(out))) == 320
