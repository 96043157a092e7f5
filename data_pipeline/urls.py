"""Turn shard specifications (lists, brace patterns, globs, folders) into a list of shard URLs."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

from .errors import ShardNotFoundError

_GLOB_CHARS = "*?["


def expand_shards(spec: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Expand ``spec`` into shard URLs, in a stable order.

    Accepts a string or a list of strings; each may be a brace pattern (``data/{00000..00009}.tar``),
    several patterns joined with ``::``, a glob, a folder (all ``*.tar`` in it, sorted; img2dataset's
    ``_stats.json`` and ``.parquet`` files beside them are ignored), or ``pipe:CMD`` when ``allow_pipe``.
    Raises :class:`ShardNotFoundError` naming the pattern when nothing matches or a listed file is missing.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardNotFoundError("data.urls is empty: give at least one shard path or pattern")
    out: list[str] = []
    for item in specs:
        item = str(item)
        for url in expand_urls(item):
            if url.startswith("pipe:"):
                if not allow_pipe:
                    raise ValueError(
                        f"refusing shard URL {url!r}: pipe: URLs run shell commands; "
                        "set data.allow_pipe=true if you trust the config"
                    )
                out.append(url)
                continue
            if "://" in url:
                raise ValueError(
                    f"unsupported shard URL {url!r}: use a local path, or pipe:CMD with allow_pipe"
                )
            path = Path(url).expanduser()
            if any(ch in url for ch in _GLOB_CHARS):
                matches = sorted(m for m in glob.glob(str(path)) if m.endswith(".tar"))
                if not matches:
                    raise ShardNotFoundError(f"shard pattern {url!r} (from {item!r}) matches no .tar file")
                out.extend(matches)
            elif path.is_dir():
                matches = sorted(str(p) for p in path.glob("*.tar"))
                if not matches:
                    raise ShardNotFoundError(f"folder {str(path)!r} holds no .tar shard")
                out.extend(matches)
            elif path.is_file():
                out.append(str(path))
            else:
                raise ShardNotFoundError(f"shard {str(path)!r} (from {item!r}) does not exist")
    return out


def shards_digest(shards: Sequence[str]) -> str:
    """A short digest of the shard list: resumed runs check they read the same shards."""
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]
