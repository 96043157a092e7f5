"""Writing WebDataset shards: atomically (temp name, fsync, rename) and reproducibly (fixed tar metadata);
``ldm-data from-folder`` packs an image folder or a CSV/parquet listing into shards."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from webdataset import TarWriter

from .atomic import atomic_json, fsync_dir
from .errors import NoValidSampleError, SampleError
from .progress import progress as progress_bar
from .samples import IMAGE_EXTS, ImageLimits, caption_text, decode_rgb
from .tario import RawSample


class AtomicShardWriter:
    """Write one tar shard; it appears under its final name only once complete.

    Samples are dicts with ``__key__`` and extension -> bytes/str/dict (dicts are written as JSON).
    Used as a context manager: on an exception the temporary file is removed and nothing replaces ``path``;
    so it is too when no sample was written and ``keep_empty`` is false.
    """

    def __init__(self, path: str | os.PathLike, keep_empty: bool = True):
        self.path = Path(path)
        self.keep_empty = keep_empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._tar = TarWriter(self._file, user="ldm", group="ldm", mtime=0, encoder=False)
        self.count = 0

    def write(self, sample: dict) -> None:
        out = {"__key__": sample["__key__"]}
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            if isinstance(value, dict | list):
                value = json.dumps(value, sort_keys=True)
            out[ext] = value.encode("utf-8") if isinstance(value, str) else value
        self._tar.write(out)
        self.count += 1

    def close(self) -> None:
        """Finish the tar, flush it to disk and move it into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and (self.count or self.keep_empty):
            self.close()
        else:
            self.abort()


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:06d}.tar"


@dataclass(frozen=True)
class FolderItem:
    key: str
    path: str  # absolute path of the image
    rel: str  # path relative to the source, kept in the .json sidecar
    caption: str | None


def _read_listing(listing: Path, src: Path) -> list[tuple[str, str | None]]:
    """(path, caption) rows of a CSV or parquet file; columns path|file|image and caption|text."""
    if listing.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(listing).to_pylist()
    else:
        with open(listing, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
    if not table:
        raise ValueError(f"{listing} has no rows")
    cols = set(table[0])
    path_col = next((c for c in ("path", "file", "image", "filepath") if c in cols), None)
    cap_col = next((c for c in ("caption", "text", "txt") if c in cols), None)
    if path_col is None or cap_col is None:
        raise ValueError(
            f"{listing} needs a path column (path/file/image) and a caption column "
            f"(caption/text); it has {sorted(cols)}"
        )
    return [(str(row[path_col]), row[cap_col]) for row in table]


def list_folder(src: str | os.PathLike, listing: str | os.PathLike | None = None) -> list[FolderItem]:
    """Images under ``src`` with their captions (``name.txt`` beside ``name.jpg``, or from ``listing``),
    sorted by relative path; keys are their zero-padded index in that order (deterministic)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {str(src)!r} does not exist")
    rows: list[tuple[str, str | None]]
    if listing is not None:
        rows = _read_listing(Path(listing), src)
    else:
        rows = []
        for p in src.rglob("*"):
            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS:
                txt = p.with_suffix(".txt")
                rows.append(
                    (str(p.relative_to(src)), txt.read_text("utf-8", "replace") if txt.exists() else None)
                )
    rows.sort(key=lambda r: r[0])
    if not rows:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {str(src)!r}")
    return [FolderItem(f"{i:09d}", str((src / rel).resolve()), rel, cap) for i, (rel, cap) in enumerate(rows)]


def _write_folder_shard(job: tuple[str, list[FolderItem], ImageLimits]) -> dict:
    path, items, limits = job
    skipped: Counter = Counter()
    # An empty shard is only written (by from_folder) once it is known that some other shard is not empty.
    with AtomicShardWriter(path, keep_empty=False) as writer:
        for item in items:
            ext = Path(item.path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            try:
                data = Path(item.path).read_bytes()
            except OSError:
                skipped["missing_image"] += 1
                continue
            files = {ext: data}
            if item.caption is not None:
                files["txt"] = item.caption.encode("utf-8")
            raw = RawSample(item.key, item.path, files)
            try:
                _, (h, w) = decode_rgb(raw, limits)
                caption = caption_text(raw).strip()
            except SampleError as exc:
                skipped[exc.reason] += 1
                continue
            writer.write(
                {
                    "__key__": item.key,
                    ext: data,
                    "txt": caption,
                    "json": {"key": item.key, "path": item.rel, "width": w, "height": h},
                }
            )
        count = writer.count
    return {"shard": path, "count": count, "skipped": dict(skipped), "images": len(items)}


def from_folder(
    src: str,
    out: str,
    listing: str | None = None,
    shard_size: int = 1000,
    workers: int = 4,
    prefix: str = "shard",
    limits: ImageLimits = ImageLimits(),
    progress: bool = True,
) -> dict:
    """Pack a folder of captioned images into shards under ``out``; returns (and writes) a summary.

    Raises :class:`NoValidSampleError`, having written nothing (no shard, no ``dataset.json``), when no
    image passes the checks."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    items = list_folder(src, listing)
    outdir = Path(out)
    created = [d for d in (outdir, *outdir.parents) if not d.exists()]  # the writers will make these
    jobs = [
        (str(outdir / shard_name(i // shard_size, prefix)), items[i : i + shard_size], limits)
        for i in range(0, len(items), shard_size)
    ]
    results = _run_jobs(_write_folder_shard, jobs, workers, len(items), progress, "from-folder")
    skipped = dict(sum((Counter(r["skipped"]) for r in results), Counter()))
    if not any(r["count"] for r in results):
        for d in created:  # innermost first
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise NoValidSampleError(
            f"no usable image under {str(src)!r}: all {len(items)} skipped ({skipped}); "
            f"nothing written to {out}"
        )
    for r in results:
        if not r["count"]:  # keep the shard numbering: a chunk of only bad images still gets its shard
            with AtomicShardWriter(r["shard"]):
                pass
    summary = {
        "source": str(src),
        "shards": len(results),
        "samples": sum(r["count"] for r in results),
        "skipped": skipped,
        "per_shard": {Path(r["shard"]).name: r["count"] for r in results},
    }
    atomic_json(outdir / "dataset.json", summary)
    return summary


def _run_jobs(fn, jobs: list, workers: int, total: int, progress: bool, desc: str) -> list[dict]:
    """Run shard jobs in a process pool with a progress bar over items; results in job order."""
    results: list[dict] = []
    bar = progress_bar(total=total, desc=desc, unit="img", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        iterator: Iterable = map(fn, jobs)
        for r in iterator:
            results.append(r)
            bar.update(r["images"])
    else:
        with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap_unordered(fn, jobs):
                results.append(r)
                bar.update(r["images"])
    bar.close()
    results.sort(key=lambda r: r["shard"])
    return results
