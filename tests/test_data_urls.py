"""Issue 17, item 5: the fast paths of shard expansion give exactly what the general ones gave."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from webdataset.shardlists import expand_urls

from data_pipeline.errors import ShardNotFoundError
from data_pipeline.latents import HEAD, LatentFormatError, read_manifest
from data_pipeline.urls import ShardUrl, _expand, expand_shards, shards_digest

PATTERNS = ["a/{000..120}.tar", "x{0..10}y", "x{10..0}y", "x{-3..3}y", "x{1..10..3}", "x{01..9}", "x{0..010}",
            "x{-05..5}", "x{5..1..2}", "a{1,2}b", "a{0..2}b{0..1}", "p/{a..c}.tar", "p/{00..02}.tar::q/{1..2}.tar",
            "https://h/{000000..000010}.tar?sig=1", "a{{0..1}}", "x{1..1}"]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_brace_expansion_is_webdatasets(pattern):
    assert _expand(pattern) == expand_urls(pattern)


def test_many_local_names_are_checked_like_few(tmp_path, monkeypatch):
    for i in range(100):
        (tmp_path / f"s{i:03d}.tar").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for spec in [
        "s{000..099}.tar",
        f"{tmp_path}/s{{000..099}}.tar",
        "./s{000..099}.tar",
        f"{tmp_path}//s{{000..099}}.tar",
    ]:
        got = expand_shards(spec)
        assert got == [str(Path(u).expanduser()) for u in expand_urls(spec)], spec
        assert all(type(s).kind == "path" for s in got)
    few = expand_shards("s{000..009}.tar")  # below the listing threshold: stat per name
    assert few == expand_shards("s{000..099}.tar")[:10]
    mixed = expand_shards("{s000.tar,sub,s001.tar," + ",".join(f"s{i:03d}.tar" for i in range(2, 70)) + "}")
    assert mixed[:3] == ["s000.tar", "sub/z.tar", "s001.tar"] and len(mixed) == 71
    with pytest.raises(
        ShardNotFoundError, match=r"shard 's100.tar' \(from 's\{000..100\}.tar'\) does not exist"
    ):
        expand_shards("s{000..100}.tar")
    assert shards_digest(expand_shards("s{000..099}.tar")) == shards_digest(
        [f"s{i:03d}.tar" for i in range(100)]
    )


def test_shard_url_kinds_are_classes_that_survive_pickling():
    for url, kind in [
        ("a.tar", "path"),
        ("pipe:cat a", "pipe"),
        ("http://h/a.tar", "http"),
        ("s3://b/a", "fsspec"),
    ]:
        u = ShardUrl(url, kind)
        assert u.kind == kind and isinstance(u, ShardUrl) and isinstance(u, str) and u == url
        v = pickle.loads(pickle.dumps(u))
        assert type(v) is type(u) and v.kind == kind
        assert not hasattr(u, "__dict__")
    with pytest.raises(ValueError, match="a shard URL of kind http starts with http:// or https://"):
        ShardUrl("ftp://h/a.tar", "http")
    with pytest.raises(ValueError, match="kind must be one of"):
        ShardUrl("a.tar", "remote")
    assert ShardUrl("pipe:x #.tar").kind == "path"  # a file may have any name


def test_manifest_head_is_read_without_the_records(tmp_path):
    manifest = {"format": "ldm-latents/2", "settings": {"resolution": 256}, "scale_factor": 0.18,
                "shards": [{"shard": f"{i}.tar", "count": 3} for i in range(1000)], "samples": 3000, "skipped": {}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    head = read_manifest(tmp_path, HEAD)
    assert head == {k: manifest[k] for k in ("format", "scale_factor", "samples", "settings")}
    assert read_manifest(tmp_path) == manifest
    (tmp_path / "manifest.json").write_text('{"format": "ldm-latents/2", "settings" {}}')
    with pytest.raises(LatentFormatError, match=r"manifest.json is not valid JSON: expected ':'"):
        read_manifest(tmp_path, HEAD)
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(LatentFormatError, match=r"no manifest\.json in"):
        read_manifest(tmp_path, HEAD)
