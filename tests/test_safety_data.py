"""Issue 15, data side: shard names that look like commands, decompression bombs and bad ``ldm-data``
arguments are refused or counted, never run, never fatal, never a traceback (crafted tar headers:
test_safety_tar_headers.py)."""

from __future__ import annotations

import io
import json
import pickle
import resource
import shlex
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
from datarun import ENV, epoch_zero, run_cli
from PIL import Image
from shardmaker import good_members, image_bytes, write_tar

from data_pipeline.errors import NoValidSampleError, SampleError
from data_pipeline.images import ImageShards, ImageShardsConfig
from data_pipeline.samples import ImageLimits, decode_rgb
from data_pipeline.shards import from_folder
from data_pipeline.tario import RawSample, iter_shard
from data_pipeline.urls import ShardUrl, expand_shards
from data_pipeline.validate import validate_shards

DEFAULT_PIL_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Image.MAX_IMAGE_PIXELS as PIL ships it


# -- item 3: a file named "pipe:..." is a file ---------------------------------------------------------------

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
    cfg = ImageShardsConfig(
        urls=["*.tar", "nested"],
        resolution=32,
        batch_size=1,
        num_workers=1,
        shuffle_buffer=1,
        shard_shuffle=False,
    )
    loader = ImageShards(cfg).loader(0, 1)
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


# -- item 12: PIL's decompression-bomb limit stays on for the whole process ----------------------------------


def bomb_png(side: int = 30000) -> bytes:
    """A valid side x side 1-bit PNG of ~100 KB (about 2.7 GB once decoded to RGB), built by hand."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bomb_png())
    return path


def test_importing_the_data_pipeline_keeps_pils_limit(bomb):
    """In a fresh process: every data_pipeline module imported, PIL still refuses the bomb elsewhere."""
    code = f"""
import warnings
from PIL import Image
default = Image.MAX_IMAGE_PIXELS
import data_pipeline.cli, data_pipeline.loader, data_pipeline.latents, data_pipeline.samples
import data_pipeline.shards, data_pipeline.synthetic, data_pipeline.validate
assert Image.MAX_IMAGE_PIXELS == default == {DEFAULT_PIL_LIMIT}, Image.MAX_IMAGE_PIXELS
assert not [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning], warnings.filters
try:
    Image.open({str(bomb)!r})
except Image.DecompressionBombError:
    print("refused")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


def test_our_decode_path_refuses_the_bomb_fast(bomb, tmp_path):
    raw = RawSample("bomb", "shard.tar", {"png": bomb.read_bytes(), "txt": b"a bomb"})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for target in (0, 64):
        with pytest.raises(SampleError) as err:
            decode_rgb(raw, ImageLimits(), target)
        assert err.value.reason == "too_many_pixels" and "30000x30000" in str(err.value)
    assert time.perf_counter() - t0 < 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB: nothing was decoded
    # through a shard and through from-folder: counted as too_many_pixels
    write_tar(
        tmp_path / "s.tar", [("bomb.png", raw.files["png"]), ("bomb.txt", b"a bomb"), *good_members("g", 1)]
    )
    report = validate_shards([str(tmp_path / "s.tar")], progress=False)
    assert (report["valid"], report["invalid"]) == (1, {"too_many_pixels": 1})
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(raw.files["png"])
    (src / "bomb.txt").write_text("a bomb")
    (src / "ok.jpg").write_bytes(image_bytes(32, 32))
    (src / "ok.txt").write_text("fine")
    summary = from_folder(str(src), str(tmp_path / "out"), workers=1, progress=False)
    assert summary["samples"] == 1 and summary["skipped"] == {"too_many_pixels": 1}


def test_our_limit_decides_in_our_path_and_pils_stays_for_other_formats(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a process that lowered PIL's limit
    png = RawSample("k", "s.tar", {"png": image_bytes(64, 48, 1, "PNG")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pixels, size = decode_rgb(png, ImageLimits(max_pixels=10_000))  # ours allows 3072 px
    assert pixels.shape == (3, 48, 64) and size == (48, 64)
    with pytest.raises(SampleError, match="too_many_pixels"):
        decode_rgb(png, ImageLimits(max_pixels=3000))
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="GIF")  # a format we do not sniff: PIL's limit applies too
    gif = RawSample("k", "s.tar", {"png": buf.getvalue()})
    with pytest.raises(SampleError) as err:
        decode_rgb(gif, ImageLimits(max_pixels=10_000))
    assert err.value.reason == "too_many_pixels"  # not undecodable_image
    assert Image.MAX_IMAGE_PIXELS == 1000


# -- item 14: ldm-data refuses bad numbers and bad sources in one line, before any work ---------------------

BAD_NUMBERS = [
    ("synth --out {out} --num -5", "--num", "must be >= 1, got -5"),
    ("synth --out {out} --num 10 --shard-size 0", "--shard-size", "must be >= 1, got 0"),
    ("synth --out {out} --num 10 --size 8", "--size", "must be >= 16, got 8"),
    ("synth --out {out} --num 10 --seed -1", "--seed", "must be >= 0, got -1"),
    ("synth --out {out} --num 10 --workers -2", "--workers", "must be >= 1, got -2"),
    ("synth --out {out} --num ten", "--num", "expected an integer >= 1, got 'ten'"),
    ("from-folder {src} --out {out} --shard-size 0", "--shard-size", "must be >= 1, got 0"),
    ("from-folder {src} --out {out} --workers 0", "--workers", "must be >= 1, got 0"),
    ("from-folder {src} --out {out} --min-size -1", "--min-size", "must be >= 0, got -1"),
    ("from-folder {src} --out {out} --max-pixels -1", "--max-pixels", "must be >= 0 (0: no limit), got -1"),
    ("validate {src} --workers 0", "--workers", "must be >= 1, got 0"),
    ("validate {src} --min-size -16", "--min-size", "must be >= 0, got -16"),
    ("stream {src} --batch-size 0", "--batch-size", "must be >= 1, got 0"),
    ("stream {src} --resolution 0", "--resolution", "must be >= 1, got 0"),
    ("stream {src} --workers -1", "--workers", "must be >= 0 (0: load in the main process), got -1"),
    ("stream {src} --batches 0", "--batches", "must be >= 1, got 0"),
    ("stream {src} --shuffle-buffer 0", "--shuffle-buffer", "must be >= 1 (1: no shuffling), got 0"),
    ("stream {src} --epoch-samples -1", "--epoch-samples", "must be >= 0, got -1"),
    ("stream {src} --resampled", "--epoch-samples", "--resampled needs it >= 1, got 0"),
]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(32, 32))
    (src / "a.txt").write_text("a caption")
    return src


@pytest.mark.parametrize(
    "args,flag,message", BAD_NUMBERS, ids=[a.split(" {")[0] + " " + f for a, f, _ in BAD_NUMBERS]
)
def test_bad_numbers_are_refused_before_any_work(args, flag, message, image_folder, tmp_path, capsys):
    from data_pipeline.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(shlex.split(args.format(src=image_folder, out=out)))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ldm-data {args.split()[0]}: error: argument {flag}: {message}"]
    assert not out.exists()


def test_bad_number_in_a_subprocess_is_one_line_and_writes_nothing(tmp_path):
    out = run_cli(f"synth --out {tmp_path / 'out'} --num -5")
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["ldm-data synth: error: argument --num: must be >= 1, got -5"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            "validate pipe:ls",
            "ldm-data: refusing shard URL 'pipe:ls': pipe: URLs run shell commands; allow them",
        ),
        ("validate foo://x/y.tar", "ldm-data: unsupported shard URL 'foo://x/y.tar': use a local path"),
    ],
    ids=["pipe-without-allow-pipe", "unknown-scheme"],
)
def test_refused_urls_are_one_line_without_traceback(args, message, tmp_path):
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(message), out.stderr
    assert out.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", ["stream pipe:ls", "stream foo://x/y.tar", "validate {missing}"])
def test_refused_sources_in_process(args, tmp_path, capsys):
    from data_pipeline.cli import main

    assert main(shlex.split(args.format(missing=tmp_path / "no-{0..3}.tar"))) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("ldm-data: ")


def test_from_folder_without_a_valid_image_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"not a jpeg at all")
    (src / "a.txt").write_text("a caption")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    (src / "notes.md").write_text("not an image")
    out = tmp_path / "made" / "out"
    res = run_cli(["from-folder", src, "--out", out, "--workers", "1"])
    assert res.returncode == 2
    last = res.stderr.splitlines()[-1]  # (after the progress bar)
    assert last.startswith(f"ldm-data: no usable image under {str(src)!r}: all 2 skipped")
    assert "undecodable_image" in last and "Traceback" not in res.stderr
    assert not (tmp_path / "made").exists()  # no shard, no dataset.json, no empty folders
    (src / "a.jpg").unlink()
    (src / "b.png").unlink()
    res = run_cli(["from-folder", src, "--out", out])  # no image file at all
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"ldm-data: no images (jpg, jpeg, png, webp) found under {str(src)!r}"
    ]
    assert not (tmp_path / "made").exists()


def test_from_folder_keeps_an_empty_shard_between_good_ones(tmp_path):
    """A chunk of only bad images still gets its (empty) shard when others hold samples, as before."""
    src = tmp_path / "src"
    src.mkdir()
    for name, data in (
        ("a.jpg", image_bytes(32, 32)),
        ("b.jpg", b"broken"),
        ("c.jpg", image_bytes(32, 32, 1)),
    ):
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text(f"caption {name}")
    summary = from_folder(str(src), str(tmp_path / "out"), shard_size=1, workers=1, progress=False)
    assert summary["per_shard"] == {"shard-000000.tar": 1, "shard-000001.tar": 0, "shard-000002.tar": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dataset.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert list(iter_shard(str(tmp_path / "out" / "shard-000001.tar"))) == []
    (src / "a.jpg").write_bytes(b"broken too")
    (src / "c.jpg").unlink()
    with pytest.raises(NoValidSampleError, match=r"all 2 skipped \({'undecodable_image': 2}\)"):
        from_folder(str(src), str(tmp_path / "o2"), shard_size=1, workers=1, progress=False)
    assert not (tmp_path / "o2").exists()
