"""Issue 15, data side, item 9: crafted tar headers (sizes that are not numbers or point past the file, pax
records of any length) are corrupt shards, counted and skipped, not crashes, hangs or huge allocations."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from datarun import epoch_zero, run_cli
from shardmaker import good_members, write_tar

from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.tario import iter_shard
from data_pipeline.urls import expand_shards
from data_pipeline.validate import validate_shards


def tar_header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header written byte by byte, with a correct checksum around whatever ``size_field`` holds."""
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:124] = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
    h[124:136] = size_field.ljust(12, b"\0")[:12]
    h[136:148] = b"00000000000\0"  # mtime
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def tar_member(name: str, data: bytes, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    size_field = b"%011o\0" % len(data) if size_field is None else size_field
    return tar_header(name, size_field, kind) + data + b"\0" * (-len(data) % 512)


def pax_then(record: bytes) -> bytes:
    """A pax extended header holding ``record``, then the member it describes."""
    return tar_member("././@PaxHeader/x.jpg", record, b"x") + tar_member("x.jpg", b"x" * 600)


GOOD_MEMBERS = [tar_member(n, d) for n, d in good_members("g", 2)]
GOOD = b"".join(GOOD_MEMBERS)
# case -> (what follows two good samples, the reason it is counted as)
AFTER_GOOD = {
    "size_not_octal": (tar_member("x.jpg", b"", size_field=b"12zz\0"), "unreadable_tar"),
    "size_signed": (tar_member("x.jpg", b"y" * 600, size_field=b"-0000001000\0"), "unreadable_tar"),
    "size_base256_huge": (
        tar_member("x.jpg", b"", size_field=b"\x80" + (1 << 87).to_bytes(11, "big")),
        "unreadable_tar",
    ),
    "size_base256_negative": (tar_member("x.jpg", b"", size_field=b"\xff" * 12), "unreadable_tar"),
    "size_base256_64gib": (
        tar_member("x.jpg", b"", size_field=b"\x80" + (1 << 36).to_bytes(11, "big")),
        "unreadable_tar",
    ),
    "size_1gib_in_a_small_file": (
        tar_member("x.jpg", b"z" * 900, size_field=b"%011o\0" % (1 << 30)),
        "truncated_tar",
    ),
    "pax_without_length": (pax_then(b"garbage=1\n"), "unreadable_tar"),
    "pax_length_not_a_number": (pax_then(b"xx path=x.jpg\n"), "unreadable_tar"),
    "pax_length_zero": (pax_then(b"0 path=x.jpg\n"), "unreadable_tar"),
    "pax_length_negative": (pax_then(b"-5 path=x.jpg\n"), "unreadable_tar"),
    "pax_length_past_the_end": (pax_then(b"99 path=x.jpg\n"), "unreadable_tar"),
}

# case -> (shard bytes, reason, keys of the samples kept)
CRAFTED = {case: (GOOD + tail, reason, ["g0", "g1"]) for case, (tail, reason) in AFTER_GOOD.items()}
CRAFTED["first_header"] = (AFTER_GOOD["size_not_octal"][0] + GOOD, "unreadable_tar", [])
CRAFTED["inside_a_sample"] = (  # g1.txt's header is the bad one: g1 is dropped, g0 kept
    b"".join(GOOD_MEMBERS[:3]) + tar_member("g1.txt", b"g 1", size_field=b"9\0"),
    "unreadable_tar",
    ["g0"],
)


@pytest.fixture(scope="module")
def crafted_dir(tmp_path_factory) -> Path:
    """One shard per crafted case, and a clean shard last in name order."""
    d = tmp_path_factory.mktemp("crafted")
    for case, (data, _, _) in CRAFTED.items():
        (d / f"{case}.tar").write_bytes(data)
    write_tar(d / "zz_clean.tar", good_members("c", 2, seed=50))
    return d


def crafted_totals() -> tuple[int, dict[str, int]]:
    """Valid samples and invalid counts by reason over ``crafted_dir``."""
    invalid: dict[str, int] = {}
    for _, reason, _ in CRAFTED.values():
        invalid[reason] = invalid.get(reason, 0) + 1
    return sum(len(keys) for _, _, keys in CRAFTED.values()) + 2, invalid


@pytest.mark.timeout(60)  # a zero-length pax record used to loop forever
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_a_counted_corrupt_shard(crafted_dir, case):
    _, reason, keys = CRAFTED[case]
    errors = []
    tracemalloc.start()
    try:
        samples = list(iter_shard(str(crafted_dir / f"{case}.tar"), errors))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.key for s in samples] == keys  # samples before the damage are kept
    assert [e.reason for e in errors] == [reason]
    assert f"{case}.tar" in errors[0].detail
    assert peak < 64 << 20, f"a forged size made the reader allocate {peak >> 20} MiB"


@pytest.mark.timeout(300)
def test_validate_counts_crafted_shards_exactly(crafted_dir):
    valid, invalid = crafted_totals()
    report = validate_shards(expand_shards(str(crafted_dir)), progress=False)
    assert (report["valid"], report["invalid"]) == (valid, invalid)
    out = run_cli(["validate", crafted_dir, "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["valid"], report["invalid"]) == (valid, invalid)
    assert report["total"] == valid + sum(invalid.values())


@pytest.mark.timeout(120)
def test_streaming_loader_keeps_going_past_crafted_headers(crafted_dir):
    cfg = ImageShardsConfig(
        urls=str(crafted_dir),
        resolution=32,
        batch_size=1,
        num_workers=1,
        shuffle_buffer=1,
        shard_shuffle=False,
    )
    keys, counters = epoch_zero(ImageShards(cfg).loader(0, 1))
    valid, invalid = crafted_totals()
    expected_keys = [k for case in sorted(CRAFTED) for k in CRAFTED[case][2]] + ["c0", "c1"]
    assert keys == expected_keys and len(keys) == valid
    assert counters["skipped"] == invalid and counters["valid"] == valid
