"""Issue 15, data side: shard names that look like commands, crafted tar headers, decompression bombs and
bad ``ldm-data`` arguments are refused or counted, never run, never fatal, never a traceback."""

from __future__ import annotations

import json
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from shardmaker import image_bytes, write_tar

from data_pipeline.config import DataConfig
from data_pipeline.loader import StreamingLoader
from data_pipeline.samples import ImageLimits
from data_pipeline.tario import iter_shard
from data_pipeline.urls import ShardUrl, expand_shards
from data_pipeline.validate import validate_shards

CLI = [sys.executable, "-m", "data_pipeline.cli"]


def run_cli(args: str | list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ldm-data ARGS`` in a subprocess (a string is split like a shell command line)."""
    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)


def good_members(prefix: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [
            (f"{prefix}{i}.jpg", image_bytes(32, 32, seed + i)),
            (f"{prefix}{i}.txt", f"{prefix} {i}".encode()),
        ]
    return out


def epoch_zero(loader: StreamingLoader) -> tuple[list[str], dict]:
    """Keys of epoch 0 and the loader's counters after its last batch."""
    keys, counters = [], None
    for batch in loader:
        if batch["epoch"][0] == 1:
            return keys, counters
        keys += batch["key"]
        counters = loader.counters()
    raise AssertionError("unreachable: the loader is endless")


# -- item 3: a file named "pipe:..." is a file ----------------------------------------------------------------

PIPE_NAME = "pipe:touch PWNED #.tar"


@pytest.fixture
def pipe_named(tmp_path, monkeypatch) -> Path:
    """The working folder holds a valid shard and a corrupt one named like pipe: commands, and a folder
    ``nested`` another valid one; it is also the current directory (where ``touch PWNED`` would write)."""
    write_tar(tmp_path / PIPE_NAME, good_members("p", 3))
    (tmp_path / "pipe:touch PWNED_TOO #.tar").write_bytes(b"not a tar at all " * 64)
    (tmp_path / "nested").mkdir()
    write_tar(tmp_path / "nested" / "pipe:touch PWNED_NESTED #.tar", good_members("n", 2, seed=10))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_not_pwned(root: Path) -> None:
    ran = [p for p in root.rglob("PWNED*") if not p.name.endswith(".tar")]
    assert ran == [], f"a shard file name was run as a command: {ran}"


def test_glob_and_folder_results_are_paths_never_pipes(pipe_named):
    for spec in ("*.tar", ".", "./", "pipe*.tar", str(pipe_named)):
        shards = expand_shards(spec)
        assert len(shards) == 2 and all(isinstance(s, ShardUrl) and s.kind == "path" for s in shards), spec
    nested = expand_shards(["nested", "nested/*.tar"])
    assert [s.kind for s in nested] == ["path", "path"]
    report = validate_shards(expand_shards(["*.tar", ".", "nested"]), ImageLimits(16), progress=False)
    assert report["invalid"] == {"unreadable_tar": 2}  # the garbage "pipe:" file, found twice
    assert (report["shards"], report["valid"]) == (5, 3 + 3 + 2)
    assert_not_pwned(pipe_named)


def test_a_plain_string_is_never_run(pipe_named):
    errors = []
    assert len(list(iter_shard(PIPE_NAME, errors))) == 3 and errors == []  # read as the file it is
    assert list(iter_shard("pipe:touch PWNED_PLAIN #", errors)) == []  # no such file: counted, not run
    assert [e.reason for e in errors] == ["unreadable_tar"] and "cannot open" in errors[0].detail
    assert_not_pwned(pipe_named)


def test_streaming_loader_reads_pipe_named_files_as_paths(pipe_named):
    cfg = DataConfig(
        urls=["*.tar", "nested"],
        resolution=32,
        batch_size=1,
        num_workers=1,
        shuffle_buffer=1,
        shard_shuffle=False,
    )
    loader = StreamingLoader(cfg, rank=0, world_size=1)
    keys, counters = epoch_zero(loader)
    assert keys == ["p0", "p1", "p2", "n0", "n1"]
    assert counters == {"seen": 6, "valid": 5, "skipped": {"unreadable_tar": 1}, "skipped_total": 1}
    assert_not_pwned(pipe_named)


def test_cli_validate_and_stream_over_pipe_named_files(pipe_named):
    out = run_cli("validate '*.tar' . --json", cwd=pipe_named)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["invalid"] == {"unreadable_tar": 2} and (report["shards"], report["valid"]) == (4, 6)
    out = run_cli("stream . --workers 1 --batches 2 --batch-size 2 --resolution 32", cwd=pipe_named)
    assert out.returncode == 0, out.stderr
    assert "unreadable_tar" in out.stdout
    assert_not_pwned(pipe_named)


def test_pipe_urls_the_user_wrote_still_work_when_allowed(synth_shards, tmp_path):
    url = f"pipe:cat {synth_shards}/train-000000.tar"
    (shard,) = expand_shards(url, allow_pipe=True)
    assert shard.kind == "pipe" and shard == url
    assert pickle.loads(pickle.dumps(shard)).kind == "pipe"  # survives the trip to spawned workers
    assert len(list(iter_shard(shard))) == 40
    errors = []
    assert list(iter_shard(ShardUrl("pipe:exit 3", "pipe"), errors)) == []
    assert [e.reason for e in errors] == ["unreadable_tar"]
    with pytest.raises(ValueError, match="pipe: URLs run shell commands"):
        expand_shards(url)
    with pytest.raises(ValueError, match="starts with 'pipe:'"):
        ShardUrl("data/a.tar", "pipe")
