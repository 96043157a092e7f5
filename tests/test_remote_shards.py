"""Issue 17, item 1: shards streamed from HTTP (a real server on localhost, with faults) and fsspec schemes.

Every count is exact: a dropped connection resumes with a Range request and loses nothing; a 503 that recovers
costs retries, not samples; a 404 (or a shard still failing after the retries) is one ``remote_error``, like a
corrupt shard, and a resumed run reads the same samples and keeps the same counts as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from presets import model as preset_model
from safetensors.torch import save_file
from shardmaker import good_members, member_end, write_tar
from shardserver import ShardServer
from test_precompute import precompute_cmd
from trainrun import ROOT, env

from data_pipeline.errors import DataQualityError, ShardUrlError
from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.latents import (
    MANIFEST,
    LatentShards,
    LatentShardsConfig,
    LatentShardWriter,
    write_manifest,
    write_null_text,
)
from data_pipeline.loader import Counters, sum_counters
from data_pipeline.samples import ImageLimits
from data_pipeline.tario import iter_shard
from data_pipeline.urls import ShardUrl, expand_shards
from data_pipeline.validate import validate_shards

PER_SHARD = 10
RETRIES = 3
REMOTE_ENV = {
    "LDM_REMOTE_RETRIES": str(RETRIES),
    "LDM_REMOTE_BACKOFF": "0.01",
    "LDM_REMOTE_MAX_BACKOFF": "0.05",
    "LDM_REMOTE_CONNECT_TIMEOUT": "5",
    "LDM_REMOTE_READ_TIMEOUT": "1",
}


def inside_sample(m: list[tuple[str, bytes]], j: int) -> int:
    """A byte offset in the middle of sample ``j``'s image data."""
    return member_end(m, 2 * j) + 512 + 100


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    for k, v in REMOTE_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Shards s0..s7 (10 samples each) behind a real HTTP server; faults are reset before each use."""
    root = tmp_path_factory.mktemp("served")
    layout = {}
    for s in range(8):
        layout[f"s{s}.tar"] = good_members(f"s{s}_", PER_SHARD, seed=10 * s, width=2)
        write_tar(root / f"s{s}.tar", layout[f"s{s}.tar"])
    with ShardServer(root) as srv:
        srv.layout = layout
        yield srv


@pytest.fixture
def server(served):
    served.reset()
    return served


def remote(srv: ShardServer, names) -> list[ShardUrl]:
    return [ShardUrl(srv.url(n), "http") for n in names]


# -- the reader --------------------------------------------------------------------------------------------------
def test_http_shard_reads_exactly_through_each_fault(server):
    at = inside_sample(server.layout["s0.tar"], 4)
    cases = {  # faults for s0.tar -> (samples read, error reasons, Range headers of the requests)
        "clean": ([], 10, [], [None]),
        "drop mid-shard resumes at the byte reached": ([f"drop:{at}"], 10, [], [None, f"bytes={at}-"]),
        "503 twice, then served": (["503", "503"], 10, [], [None, None, None]),
        "404 fails at once, no retry": (["404"], 0, ["remote_error"], [None]),
        "read timeout resumes": ([f"stall:{at}:3"], 10, [], [None, f"bytes={at}-"]),
        "drop, then failing past the retries": (
            [f"drop:{at}"] + ["503"] * RETRIES,  # the drop is the first failure
            4,  # samples 0-3 are complete; sample 4 was in flight
            ["remote_error"],
            [None] + [f"bytes={at}-"] * RETRIES,
        ),
        "503 past the retries at open": (
            ["503"] * (RETRIES + 1),
            0,
            ["remote_error"],
            [None] * (RETRIES + 1),
        ),
    }
    for case, (faults, count, reasons, ranges) in cases.items():
        server.reset()
        server.faults["/s0.tar"] = list(faults)
        errors = []
        keys = [s.key for s in iter_shard(remote(server, ["s0.tar"])[0], errors)]
        assert keys == [f"s0_{i:02d}" for i in range(count)], case
        assert [e.reason for e in errors] == reasons, case
        assert server.requests("s0.tar") == ranges, case
        assert all("s0.tar" in e.detail for e in errors)


def test_http_server_ignoring_range_is_read_past_the_bytes_already_delivered(server):
    at = inside_sample(server.layout["s1.tar"], 7)
    server.faults["/s1.tar"] = [f"drop:{at}"]
    server.ignore_range.add("/s1.tar")
    errors = []
    samples = list(iter_shard(remote(server, ["s1.tar"])[0], errors))
    assert [s.key for s in samples] == [f"s1_{i:02d}" for i in range(10)] and errors == []
    assert samples[9].files["jpg"] == server.layout["s1.tar"][18][1]  # byte-identical after the restart


def test_http_resume_inside_a_shard_asks_for_a_range(server):
    """A cursor's byte offset lets a resumed reader start mid-shard without downloading what came before."""
    (url,) = remote(server, ["s2.tar"])
    first = list(iter_shard(url))
    server.reset()
    rest = list(iter_shard(url, skip=6, offset=first[5].end))
    assert [s.key for s in rest] == [s.key for s in first[6:]] and rest[0].index == 6
    assert server.requests("s2.tar") == [f"bytes={first[5].end}-"]


# -- URLs ------------------------------------------------------------------------------------------------------
def test_remote_brace_patterns_expand_without_contacting_the_server(server, tmp_path):
    shards = expand_shards(server.url("shard-{000000..009999}.tar"))
    assert len(shards) == 10_000 and {s.kind for s in shards} == {"http"}
    assert shards[17] == server.url("shard-000017.tar") and server.log == []
    signed = expand_shards(["https://host/a.tar?sig=x&exp=1", f"file://{tmp_path}/b.tar"])  # '?' is no glob
    assert [s.kind for s in signed] == ["http", "fsspec"] and signed[0].endswith("?sig=x&exp=1")
    mixed = expand_shards([server.url("s0.tar"), "memory://bucket/{0..1}.tar"])
    assert [s.kind for s in mixed] == ["http", "fsspec", "fsspec"]


def test_remote_unknown_scheme_or_missing_package_is_refused_naming_it():
    with pytest.raises(ShardUrlError, match=r"unsupported shard URL 'nosuch://x/y\.tar'"):
        expand_shards("nosuch://x/y.tar")
    if importlib.util.find_spec("s3fs") is None:  # the optional package is named, not a traceback
        with pytest.raises(ShardUrlError, match=r"s3://bucket/a\.tar.*pip install s3fs"):
            expand_shards("s3://bucket/{a,b}.tar")
    else:
        assert expand_shards("s3://bucket/a.tar")[0].kind == "fsspec"


def test_remote_options_from_the_environment_are_checked_at_start(monkeypatch):
    monkeypatch.setenv("LDM_REMOTE_RETRIES", "many")
    with pytest.raises(ValueError, match="LDM_REMOTE_RETRIES='many' is not a int"):
        expand_shards("http://127.0.0.1:9/a.tar")


# -- the loader ----------------------------------------------------------------------------------------------------
def cfg_for(urls, **kw) -> ImageShardsConfig:
    base = dict(urls=urls, resolution=32, batch_size=5, num_workers=0, shuffle_buffer=15, seed=3,
                shard_shuffle=False, max_bad_fraction=1.0)  # fmt: skip
    return ImageShardsConfig(**{**base, **kw})


def epoch_zero(loader) -> tuple[list[str], dict]:
    """Keys of epoch 0 and the counters as of each worker's last batch of it (batch b comes from worker
    b mod W)."""
    workers = loader.workers
    keys, last, done = [], [Counters()] * workers, set()
    for b, batch in enumerate(loader):
        w = b % workers
        if batch["epoch"][0] == 1:
            done.add(w)
            if len(done) == workers:
                return keys, sum_counters(last)
            continue
        keys += batch["key"]
        last[w] = Counters.from_dict(loader.worker_counters[w].to_dict())
    raise AssertionError("unreachable")


@pytest.mark.parametrize("workers", [0, 2])
def test_http_loader_counts_a_lost_shard_like_a_corrupt_one(server, workers):
    names = ["s0.tar", "s1.tar", "s2.tar", "s3.tar", "missing.tar"]
    server.faults["/s1.tar"] = [f"drop:{inside_sample(server.layout['s1.tar'], 3)}"]
    server.faults["/s2.tar"] = ["503", "503"]
    server.faults["/s3.tar"] = [f"drop:{inside_sample(server.layout['s3.tar'], 6)}"] + ["503"] * RETRIES
    loader = ImageShards(cfg_for(remote(server, names), num_workers=workers, batch_size=1)).loader(0, 1)
    keys, counters = epoch_zero(loader)
    expected = {f"s{s}_{i:02d}" for s in range(3) for i in range(10)} | {f"s3_{i:02d}" for i in range(6)}
    assert sorted(keys) == sorted(expected)  # each exactly once
    assert counters == {"seen": 36 + 2, "valid": 36, "skipped": {"remote_error": 2}, "skipped_total": 2}


def test_remote_failures_count_toward_max_bad_fraction(server):
    names = ["s0.tar", "gone1.tar", "gone2.tar", "gone3.tar"]
    cfg = cfg_for(remote(server, names), max_bad_fraction=0.05, bad_fraction_min_samples=5, shuffle_buffer=1)
    with pytest.raises(DataQualityError, match=r"data.max_bad_fraction=0.05.*remote_error.*gone\d\.tar.*404"):
        list(itertools.islice(iter(ImageShards(cfg).loader(0, 1)), 20))


@pytest.mark.parametrize("stop", [1, 3, 5, 7, 8])
def test_remote_resume_is_exact_when_a_failed_shard_comes_back(server, stop):
    """Run 1 loses s1 (past the retries) inside its block; it is back by the resume. Resumed inside or after that
    block, the run re-reads it exactly as before (s1 still stops where it stopped), reads no finished shard
    again, and its counts equal the uninterrupted run's. Resumed before s1's block was read (stop=1: a block
    never crosses into the next shard), the failure had not happened yet: the run reads s1 whole, like a run
    on a healthy server."""
    names = ["s0.tar", "s1.tar", "s2.tar", "s3.tar"]
    cut = inside_sample(server.layout["s1.tar"], 2)
    cfg = cfg_for(remote(server, names), batch_size=4, shuffle_buffer=16)

    def failing():
        server.reset()
        server.faults["/s1.tar"] = [f"drop:{cut}"] + ["503"] * RETRIES

    failing()
    full = ImageShards(cfg).loader(0, 1)
    ref = [b["key"] for b in itertools.islice(iter(full), 12)]
    failing()
    first = ImageShards(cfg).loader(0, 1)
    head = [b["key"] for b in itertools.islice(iter(first), stop)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    at = first.cursors[0]
    server.reset()  # s1 is readable again
    second = ImageShards(cfg).loader(0, 1)
    second.load_state_dict(state)
    it = iter(second)
    batch = next(it)
    tail = [batch["key"]]
    if (batch["epoch"] == at.epoch).all():  # (stop=8 resumes at the end of epoch 0: epoch 1 reads s0 again)
        assert not any(server.requests(n) for n in names[: at.shard])  # finished shards are not read again
    if at.offset:  # the block starts inside a shard: only its remaining bytes are asked for
        assert server.requests(names[at.shard])[0] == f"bytes={at.offset}-"
    tail += [b["key"] for b in itertools.islice(it, 11 - stop)]
    assert full.counters()["skipped"] == {"remote_error": 1}
    if (at.epoch, at.shard) == (0, 0):  # checkpointed before s1 failed
        server.reset()
        healthy = ImageShards(cfg).loader(0, 1)
        assert head + tail == [b["key"] for b in itertools.islice(iter(healthy), 12)]
        assert second.counters() == healthy.counters()
        return
    assert head + tail == ref
    assert second.counters() == full.counters()


# -- validate, fsspec, latent shards ---------------------------------------------------------------------------------
def test_http_validate_counts_exactly_in_process_and_cli(server, corrupt_set):
    folder, expected = corrupt_set
    with ShardServer(folder) as srv:
        srv.faults["/b.tar"] = ["503"]
        srv.faults["/e.tar"] = [f"drop:{700}"]
        urls = [srv.url("{a,b,c,d,e}.tar"), srv.url("nothere.tar")]
        report = validate_shards(expand_shards(urls), ImageLimits(16, 100_000), progress=False)
        invalid = {**expected["invalid"], "remote_error": 1}
        assert (report["valid"], report["invalid"]) == (expected["valid"], invalid)
        srv.faults["/a.tar"] = ["drop:3000"]
        env = {**os.environ, **REMOTE_ENV}
        out = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "validate", *urls, "--json",
                              "--max-pixels", "100000", "--workers", "2"],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr
        cli = json.loads(out.stdout)
        assert (cli["valid"], cli["invalid"], cli["total"]) == (
            expected["valid"], invalid, expected["total"] + 1)  # fmt: skip


class FlakyFS(LocalFileSystem):
    """A local filesystem whose files fail once, mid-read, the first time each is opened (an fsspec backend
    whose connection drops)."""

    protocol = "flaky"
    opened: dict[str, int] = {}  # noqa: RUF012

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        FlakyFS.opened[path] = FlakyFS.opened.get(path, 0) + 1
        if FlakyFS.opened[path] > 1:
            return f

        class Breaks(io.RawIOBase):
            def __init__(self):
                self.left = 1500

            def readable(self):
                return True

            def readinto(self, b):
                if self.left <= 0:
                    raise ConnectionResetError("connection reset by peer")
                data = f.read(min(len(b), self.left))
                self.left -= len(data)
                b[: len(data)] = data
                return len(data)

            def close(self):
                f.close()

            @property
            def size(self):
                return None

        return Breaks()


def test_remote_fsspec_schemes_stream_and_resume(served, tmp_path):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.opened.clear()
    root = served.root
    shards = expand_shards(
        [f"file://{root}/s{{0..1}}.tar", f"flaky://{root}/s2.tar", f"flaky://{root}/gone.tar"]
    )
    assert [s.kind for s in shards] == ["fsspec"] * 4
    counts, reasons = [], []
    for url in shards:
        errors = []
        counts.append(len(list(iter_shard(url, errors))))
        reasons += [e.reason for e in errors]
    assert counts == [10, 10, 10, 0] and reasons == ["remote_error"]
    assert FlakyFS.opened[f"{root}/s2.tar"] == 2  # reopened once, at the byte reached
    mem = fsspec.filesystem("memory")
    mem.pipe("/remote17/m.tar", (root / "s3.tar").read_bytes())
    (url,) = expand_shards("memory://remote17/m.tar")
    assert [s.key for s in iter_shard(url)] == [f"s3_{i:02d}" for i in range(10)]


def test_remote_latent_shards_read_their_manifest_over_http(tmp_path):
    settings = {"autoencoder": "ae", "resolution": 64, "latent_shape": [4, 8, 8], "dtype": "fp16", "flip": False,
                "text_tokens": True, "text_encoder": "te", "caption_key": "txt"}  # fmt: skip
    names = [f"{s:06d}.tar" for s in range(3)]
    for s, name in enumerate(names):
        w = LatentShardWriter(tmp_path, name, settings)
        for i in range(6):
            t = {"mean": torch.full((4, 8, 8), float(i), dtype=torch.float16), "std": torch.ones(4, 8, 8).half(),
                 "text": torch.zeros(1, 7, 16).half()}  # fmt: skip
            w.write(
                f"{s}{i:03d}", t, f"caption {s} {i}", {"original_size": [64, 64], "crop_top_left": [0, 0]}
            )
        w.close({})
    write_null_text(tmp_path, torch.ones(7, 16).half())
    write_manifest(tmp_path, names, settings, 0.5, {})
    with ShardServer(tmp_path) as srv:
        srv.faults["/000001.tar"] = ["503"]
        cfg = LatentShardsConfig(urls=srv.url("{000000..000002}.tar"), resolution=64, batch_size=6, num_workers=0,
                                 shuffle_buffer=1, shard_shuffle=False, caption_dropout=0.5)  # fmt: skip
        data = LatentShards(cfg)
        assert data.scale_factor() == 0.5 and "text_tokens" in data.batch_keys()
        loader = data.loader(0, 1)
        batches = list(itertools.islice(iter(loader), 3))
        assert [k for b in batches for k in b["key"]] == [f"{s}{i:03d}" for s in range(3) for i in range(6)]
        assert batches[0]["text_tokens"].shape == (6, 7, 16) and loader.counters()["skipped_total"] == 0
        dropped = [c == "" for b in batches for c in b["caption"]]
        tokens = torch.cat([b["text_tokens"] for b in batches])
        assert any(dropped) and all(bool((t == 1).all()) == d for t, d in zip(tokens, dropped, strict=True))
        (tmp_path / "manifest.json").unlink()
        with pytest.raises(ValueError, match=r"no manifest.json in http://127\.0\.0\.1:\d+: these are not"):
            LatentShards(cfg).check()


# -- ldm-precompute's input ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ae_export(tmp_path_factory):
    """A (random) tiny autoencoder saved as our export."""
    folder = tmp_path_factory.mktemp("ae")
    model = preset_model("autoencoder/tiny", seed=123)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "autoencoder.safetensors")
    )
    (folder / "autoencoder.json").write_text(json.dumps({"scale_factor": 0.5}))
    return folder


@pytest.mark.slow
def test_remote_precompute_reads_http_inputs_and_a_rerun_retries_a_lost_shard(
    tmp_path, synth_shards, ae_export
):
    root = tmp_path / "served"
    root.mkdir()
    names = sorted(p.name for p in synth_shards.glob("*.tar"))[:4]
    for name in names:
        (root / name).write_bytes((synth_shards / name).read_bytes())
    lost = names[2]
    (root / lost).rename(root / "later.tar")  # a 404 on the first run
    out = tmp_path / "lat"
    with ShardServer(root) as srv:
        srv.faults["/" + names[1]] = ["503", "503"]
        srv.faults["/" + names[3]] = [f"drop:{40_000}"]
        urls = srv.url("{" + ",".join(n.removesuffix(".tar") for n in names) + "}.tar")

        def run():
            port = f"--master_port={20000 + (os.getpid() + 7) % 20000}"  # not test_precompute's fixed one
            cmd = [f"data.urls='{urls}'" if a.startswith("data.urls=") else port if a.startswith("--master_port")
                   else a for a in precompute_cmd(out, "X", ae_export)]  # fmt: skip
            res = subprocess.run(cmd, cwd=ROOT, env={**env(), **REMOTE_ENV}, capture_output=True, text=True,
                                 timeout=600)  # fmt: skip
            assert res.returncode == 0, res.stderr[-5000:]
            return json.loads((out / MANIFEST).read_text())

        manifest = run()
        assert manifest["samples"] == 3 * 40 and manifest["skipped"] == {"remote_error": 1}
        record = {r["shard"]: r for r in manifest["shards"]}
        assert record[lost]["count"] == 0 and record[names[3]]["count"] == 40
        (root / "later.tar").rename(root / lost)
        srv.reset()
        manifest = run()
        assert manifest["samples"] == 4 * 40 and manifest["skipped"] == {}
        assert [p for p, _ in srv.log] == ["/" + lost]  # only the lost shard was read again
