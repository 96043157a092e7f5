"""Build tar shards by hand (tarfile + PIL), independent of the project's own writer, like img2dataset does."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def good_members(prefix: str, n: int, seed: int = 0, width: int = 1) -> list[tuple[str, bytes]]:
    """``n`` samples as tar members: a 32x32 JPEG and a caption each, keys ``prefix0``, ``prefix1``, ... (the
    index zero-padded to ``width`` digits)."""
    out = []
    for i in range(n):
        out += [
            (f"{prefix}{i:0{width}d}.jpg", image_bytes(32, 32, seed + i)),
            (f"{prefix}{i:0{width}d}.txt", f"{prefix} {i}".encode()),
        ]
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    """Write members in order; ``cut`` truncates the file to that many bytes (negative: from the end)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut is not None:
        data = data[:cut]
    path.write_bytes(data)


def member_end(members: list[tuple[str, bytes]], upto: int) -> int:
    """Byte offset just after the first ``upto`` members in a USTAR tar."""
    off = 0
    for _, data in members[:upto]:
        off += 512 + (len(data) + 511) // 512 * 512
    return off


def img2dataset_shard(folder: Path, index: int, samples: list[dict]) -> Path:
    """A shard as img2dataset writes it: {key}.jpg/.txt/.json in the tar, plus _stats.json and .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    members, rows = [], []
    for s in samples:
        meta = {
            "url": f"http://example.com/{s['key']}.jpg",
            "key": s["key"],
            "status": "success",
            "error_message": None,
            "width": s["w"],
            "height": s["h"],
            "original_width": s["w"] * 2,
            "original_height": s["h"] * 2,
            "exif": "{}",
            "sha256": "0" * 64,
        }
        members += [
            (f"{s['key']}.jpg", s["jpg"]),
            (f"{s['key']}.txt", s["txt"].encode()),
            (f"{s['key']}.json", json.dumps(meta).encode()),
        ]
        rows.append({**meta, "caption": s["txt"]})
    path = folder / f"{index:05d}.tar"
    write_tar(path, members)
    (folder / f"{index:05d}_stats.json").write_text(
        json.dumps({"count": len(samples), "successes": len(samples)})
    )
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{index:05d}.parquet")
    return path
