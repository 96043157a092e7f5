"""Turn shard specifications (lists, brace patterns, globs, folders, remote URLs) into a list of shard URLs.

Each URL's kind is decided here, once, from where it came from: only a ``pipe:CMD`` the user wrote (and
allowed) is a pipe; every name found by a glob or a folder listing is a file path, whatever it looks like
(a file may well be called ``pipe:touch x #.tar``). A URL the user wrote with a scheme is remote: ``http(s)://``
(kind ``http``, our streaming reader) or any scheme fsspec knows (kind ``fsspec``: ``s3://``, ``gs://``,
``hf://``, ``file://``, ...). Brace patterns expand for remote URLs too; the names are then taken literally (no
globs or listings: a ``?`` starts a query string) and not checked for existence (a missing one is counted when
read, as ``remote_error``). The reader (:mod:`.tario`) opens each kind with its own opener.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from webdataset.shardlists import expand_urls

from .errors import ShardNotFoundError, ShardUrlError
from .remote import RemoteOptions

_GLOB_CHARS = "*?["
_LIST_AT = 64  # from this many literal names in one spec, list their folders once instead of stat-ing each

# kind -> (what a URL of that kind must look like, in words); a path may be named anything, even "pipe:..."
KINDS: dict[str, tuple[Callable[[str], bool], str]] = {
    "path": (lambda url: True, "is any file name"),
    "pipe": (lambda url: url.startswith("pipe:"), "starts with 'pipe:'"),
    "http": (lambda url: url.startswith(("http://", "https://")), "starts with http:// or https://"),
    "fsspec": (lambda url: "://" in url, "has a scheme (scheme://...)"),
}
SCHEME_KINDS = {"http": "http", "https": "http"}  # any other scheme that fsspec knows is kind "fsspec"


class ShardUrl(str):
    """A shard URL with its kind (see :data:`KINDS`): ``path`` (a local file, opened as such whatever its
    name), ``pipe`` (a ``pipe:CMD`` from the user's own spec, allowed by ``allow_pipe``), ``http`` or
    ``fsspec`` (remote). It is a ``str``, so shard lists print, compare and digest as before; a plain ``str``
    is always read as a path."""

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


def kind_of(url: str) -> str:
    """The kind of a shard URL: a :class:`ShardUrl`'s own, ``path`` for a plain string."""
    return url.kind if isinstance(url, ShardUrl) else "path"


def _fsspec_scheme(scheme: str, url: str) -> None:
    """Refuse a scheme fsspec does not know, or whose optional package is missing (naming the package)."""
    try:
        from fsspec.registry import get_filesystem_class, known_implementations
    except ImportError:
        raise ShardUrlError(
            f"shard URL {url!r}: {scheme}:// URLs are read through fsspec, which is not installed "
            "(pip install fsspec)"
        ) from None
    try:
        get_filesystem_class(scheme)
    except ValueError:
        raise ShardUrlError(
            f"unsupported shard URL {url!r}: use a local path, http(s)://, a scheme fsspec knows "
            "(s3://, gs://, hf://, ...), or pipe:CMD with allow_pipe"
        ) from None
    except ImportError as exc:
        package = known_implementations.get(scheme, {}).get("class", "").split(".", 1)[0]
        hint = f" (pip install {package})" if package and package != "fsspec" else ""
        raise ShardUrlError(f"shard URL {url!r} needs an optional package: {exc}{hint}") from None


def _remote(url: str, checked: dict[str, str]) -> ShardUrl:
    scheme = url.split("://", 1)[0].lower()
    if not checked:
        RemoteOptions.from_env()  # a bad LDM_REMOTE_* value fails here, at start, naming the variable
    if scheme not in checked:
        if scheme not in SCHEME_KINDS:
            _fsspec_scheme(scheme, url)
        checked[scheme] = SCHEME_KINDS.get(scheme, "fsspec")
    return ShardUrl(url, checked[scheme])


def _folder(path: Path) -> list[ShardUrl]:
    matches = sorted(str(p) for p in path.glob("*.tar"))
    if not matches:
        raise ShardNotFoundError(f"folder {str(path)!r} holds no .tar shard")
    return [ShardUrl(m) for m in matches]


def _listings(paths: list[str]) -> dict[str, dict[str, os.DirEntry]]:
    """Each folder's entries by name, listed once (a missing folder lists as empty)."""
    out: dict[str, dict[str, os.DirEntry]] = {}
    for folder in {os.path.dirname(p) or "." for p in paths}:
        try:
            with os.scandir(folder) as it:
                out[folder] = {e.name: e for e in it}
        except (FileNotFoundError, NotADirectoryError):
            out[folder] = {}
    return out


def _local(names: list[str], item: str) -> list[ShardUrl]:
    """Literal local names (no glob characters) in order: files as paths, folders listed; any other name is
    :class:`ShardNotFoundError`. With many names, each folder is listed once rather than each name stat-ed
    (100,000 stat calls take seconds on a shared filesystem)."""
    paths = [str(Path(n).expanduser()) for n in names]
    listed = _listings(paths) if len(paths) >= _LIST_AT else None
    out: list[ShardUrl] = []
    for path in paths:
        if listed is not None:
            entry = listed[os.path.dirname(path) or "."].get(os.path.basename(path))
            is_file, is_dir = (entry.is_file(), entry.is_dir()) if entry is not None else (False, False)
        else:
            is_file, is_dir = os.path.isfile(path), os.path.isdir(path)
        if is_file:
            out.append(ShardUrl(path))
        elif is_dir:
            out.extend(_folder(Path(path)))
        else:
            raise ShardNotFoundError(f"shard {path!r} (from {item!r}) does not exist")
    return out


def expand_shards(spec: str | Sequence[str], allow_pipe: bool = False) -> list[ShardUrl]:
    """Expand ``spec`` into shard URLs, in a stable order.

    Accepts a string or a list of strings; each may be a brace pattern (``data/{00000..00009}.tar``, also
    ``https://host/{00000..23295}.tar``), several patterns joined with ``::``, a glob, a folder (all ``*.tar``
    in it, sorted; img2dataset's ``_stats.json`` and ``.parquet`` files beside them are ignored), a remote URL
    (``http(s)://`` or an fsspec scheme), or ``pipe:CMD`` when ``allow_pipe``. Files found by a glob or in a
    folder are always paths (kind ``path``), never commands. Raises :class:`ShardNotFoundError` naming the
    pattern when nothing matches or a listed local file is missing, and :class:`ShardUrlError` for a ``pipe:``
    URL without ``allow_pipe``, an unknown scheme, or a scheme whose optional package is missing.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardNotFoundError("data.urls is empty: give at least one shard path or pattern")
    out: list[ShardUrl] = []
    schemes: dict[str, str] = {}
    for item in specs:
        item = str(item)
        literal: list[str] = []  # local names without glob characters, checked together
        for url in expand_urls(item):
            if not (url.startswith("pipe:") or "://" in url or any(ch in url for ch in _GLOB_CHARS)):
                literal.append(url)
                continue
            out.extend(_local(literal, item))
            literal = []
            if url.startswith("pipe:"):
                if not allow_pipe:
                    raise ShardUrlError(
                        f"refusing shard URL {url!r}: pipe: URLs run shell commands; "
                        "allow them with data.allow_pipe=true (ldm-data: --allow-pipe) if you trust the source"
                    )
                out.append(ShardUrl(url, "pipe"))
            elif "://" in url:
                out.append(_remote(url, schemes))
            else:
                matches = sorted(m for m in glob.glob(str(Path(url).expanduser())) if m.endswith(".tar"))
                if not matches:
                    raise ShardNotFoundError(f"shard pattern {url!r} (from {item!r}) matches no .tar file")
                out.extend(ShardUrl(m) for m in matches)
        out.extend(_local(literal, item))
    return out


def _url_dir(url: str) -> str:
    return url.split("?", 1)[0].rsplit("/", 1)[0]


# kind -> the file beside a shard (the latent manifest, null_text) as (URL, kind), and a shard's file name
_BESIDE: dict[str, Callable[[str, str], tuple[str, str]]] = {
    "path": lambda url, name: (str(Path(url).parent / name), "path"),
    "pipe": lambda url, name: (str(Path(url).parent / name), "path"),  # a local file, never a command
    "http": lambda url, name: (f"{_url_dir(url)}/{name}", "http"),
    "fsspec": lambda url, name: (f"{_url_dir(url)}/{name}", "fsspec"),
}
_NAME: dict[str, Callable[[str], str]] = {
    "path": lambda url: Path(url).name,
    "pipe": lambda url: Path(url).name,
    "http": lambda url: url.split("?", 1)[0].rsplit("/", 1)[-1],
    "fsspec": lambda url: url.split("?", 1)[0].rsplit("/", 1)[-1],
}


def beside(url: str, name: str) -> ShardUrl:
    """The file ``name`` in the same folder as shard ``url``, of the same kind (a path beside a pipe's)."""
    return ShardUrl(*_BESIDE[kind_of(url)](url, name))


def shard_name(url: str) -> str:
    """A shard's file name (the last path component, without a query string)."""
    return _NAME[kind_of(url)](url)


def shards_digest(shards: Sequence[str]) -> str:
    """A short digest of the shard list: resumed runs check they read the same shards."""
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]
