"""The shard reader against Python's tarfile on ustar, GNU and pax archives, and on damaged files."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.tario import iter_shard

LONG = "d/" + "x" * 120  # needs a GNU long name or a pax path record


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_agrees_with_tarfile(tmp_path, fmt):
    members = [("a/k1.jpg", b"1" * 700), ("a/k1.txt", b"cap one"), ("a/k2.jpg", b""), ("a/k2.txt", b"two")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [(f"{LONG}.jpg", b"long" * 300), (f"{LONG}.txt", "ünïcode".encode())]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "s.tar"
    path.write_bytes(buf.getvalue())
    errors = []
    samples = list(iter_shard(str(path), errors))
    assert errors == []
    got = [(f"{s.key}.{ext}", data) for s in samples for ext, data in s.files.items()]
    assert got == members
    assert [s.index for s in samples] == list(range(len(samples)))
    assert [s.key for s in iter_shard(str(path), skip=1)] == [s.key for s in samples[1:]]


def test_damage_is_classified(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "short.tar").write_bytes(b"\0" * 100)
    for name, reason in [("empty.tar", "unreadable_tar"), ("short.tar", "truncated_tar")]:
        errors = []
        assert list(iter_shard(str(tmp_path / name), errors)) == []
        assert [e.reason for e in errors] == [reason]
    errors = []
    assert list(iter_shard("pipe:exit 3", errors)) == []
    assert [e.reason for e in errors] == ["unreadable_tar"]
    errors = []
    assert list(iter_shard(str(tmp_path / "missing.tar"), errors)) == []
    assert errors[0].reason == "unreadable_tar" and "missing.tar" in errors[0].detail
