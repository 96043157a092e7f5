"""Turn shard specifications (lists, brace patterns, globs, folders) into a list of shard URLs.

Each URL's kind is decided here, once, from where it came from: only a ``pipe:CMD`` the user wrote (and
allowed) is a pipe; every name found by a glob or a folder listing is a file path, whatever it looks like
(a file may well be called ``pipe:touch x #.tar``). The reader (:mod:`.tario`) opens a pipe only for a
:class:`ShardUrl` of kind ``pipe``.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

from .errors import ShardNotFoundError, ShardUrlError

_GLOB_CHARS = "*?["
# kind -> (what a URL of that kind must look like, in words); a path may be named anything, even "pipe:..."
KINDS = {
    "path": (lambda url: True, "is any file name"),
    "pipe": (lambda url: url.startswith("pipe:"), "starts with 'pipe:'"),
}


class ShardUrl(str):
    """A shard URL with its kind: ``path`` (a local file, opened as such whatever its name) or ``pipe``
    (a ``pipe:CMD`` from the user's own spec, allowed by ``allow_pipe``). It is a ``str``, so shard lists
    print, compare and digest as before; a plain ``str`` is always read as a path."""

    kind: str

    def __new__(cls, url: str, kind: str = "path") -> ShardUrl:
        if kind not in KINDS:
            raise ValueError(f"shard URL kind must be one of {sorted(KINDS)}, got {kind!r}")
        looks_right, shape = KINDS[kind]
        if not looks_right(url):
            raise ValueError(f"a {kind} shard URL {shape}, got {url!r}")
        self = super().__new__(cls, url)
        self.kind = kind
        return self

    def __reduce__(self):  # keep the kind across pickling (spawned workers)
        return ShardUrl, (str(self), self.kind)


def expand_shards(spec: str | Sequence[str], allow_pipe: bool = False) -> list[ShardUrl]:
    """Expand ``spec`` into shard URLs, in a stable order.

    Accepts a string or a list of strings; each may be a brace pattern (``data/{00000..00009}.tar``),
    several patterns joined with ``::``, a glob, a folder (all ``*.tar`` in it, sorted; img2dataset's
    ``_stats.json`` and ``.parquet`` files beside them are ignored), or ``pipe:CMD`` when ``allow_pipe``.
    Files found by a glob or in a folder are always paths (kind ``path``), never commands.
    Raises :class:`ShardNotFoundError` naming the pattern when nothing matches or a listed file is missing,
    and :class:`ShardUrlError` for a ``pipe:`` URL without ``allow_pipe`` or a remote URL.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardNotFoundError("data.urls is empty: give at least one shard path or pattern")
    out: list[ShardUrl] = []
    for item in specs:
        item = str(item)
        for url in expand_urls(item):
            if url.startswith("pipe:"):
                if not allow_pipe:
                    raise ShardUrlError(
                        f"refusing shard URL {url!r}: pipe: URLs run shell commands; "
                        "allow them with data.allow_pipe=true (ldm-data: --allow-pipe) if you trust the source"
                    )
                out.append(ShardUrl(url, "pipe"))
                continue
            if "://" in url:
                raise ShardUrlError(
                    f"unsupported shard URL {url!r}: use a local path, or pipe:CMD with allow_pipe"
                )
            path = Path(url).expanduser()
            if any(ch in url for ch in _GLOB_CHARS):
                matches = sorted(m for m in glob.glob(str(path)) if m.endswith(".tar"))
                if not matches:
                    raise ShardNotFoundError(f"shard pattern {url!r} (from {item!r}) matches no .tar file")
                out.extend(ShardUrl(m) for m in matches)
            elif path.is_dir():
                matches = sorted(str(p) for p in path.glob("*.tar"))
                if not matches:
                    raise ShardNotFoundError(f"folder {str(path)!r} holds no .tar shard")
                out.extend(ShardUrl(m) for m in matches)
            elif path.is_file():
                out.append(ShardUrl(str(path)))
            else:
                raise ShardNotFoundError(f"shard {str(path)!r} (from {item!r}) does not exist")
    return out


def shards_digest(shards: Sequence[str]) -> str:
    """A short digest of the shard list: resumed runs check they read the same shards."""
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]
