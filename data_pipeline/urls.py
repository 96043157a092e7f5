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

import contextlib
import gc
import glob
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from braceexpand import int_range_re, make_int_range
from webdataset.shardlists import expand_urls

from .errors import ShardNotFoundError, ShardUrlError
from .remote import RemoteOptions

_GLOB_CHARS = "*?["
_LIST_AT = 64  # from this many literal names in one spec, list their folders once instead of stat-ing each
_SPECIAL = re.compile(r"pipe:|://|[*?\[$]")  # a pattern without these expands to literal local names only
_ONE_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a pattern starting with a plain scheme
_ONE_RANGE = re.compile(r"([^{}\\$]*)\{([^{}]*)\}([^{}\\$]*)")  # one brace group, no escapes or variables

SCHEME_KINDS = {"http": "http", "https": "http"}  # any other scheme that fsspec knows is kind "fsspec"


class ShardUrl(str):
    """A shard URL with its kind: ``path`` (a local file, opened as such whatever its name), ``pipe`` (a
    ``pipe:CMD`` from the user's own spec, allowed by ``allow_pipe``), ``http`` or ``fsspec`` (remote). It is a
    ``str``, so shard lists print, compare and digest as before; a plain ``str`` is always read as a path.

    ``ShardUrl(url, kind)`` checks the URL has its kind's shape and returns an instance of the kind's subclass
    (the kind is a class attribute: a 100,000-shard list costs no per-URL attribute dict)."""

    __slots__ = ()
    kind = ""
    shape = ""  # what a URL of this kind looks like, in words

    def __new__(cls, url: str, kind: str = "path") -> ShardUrl:
        sub = KINDS.get(kind)
        if sub is None:
            raise ValueError(f"shard URL kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not sub.looks_right(url):
            raise ValueError(f"a shard URL of kind {kind} {sub.shape}, got {url!r}")
        return str.__new__(sub, url)

    @staticmethod
    def looks_right(url: str) -> bool:
        return False

    def __reduce__(self):  # keep the kind across pickling (spawned workers)
        return ShardUrl, (str(self), self.kind)


class _Path(ShardUrl):
    __slots__ = ()
    kind, shape = "path", "is any file name"  # even "pipe:..." or one holding "://"

    @staticmethod
    def looks_right(url: str) -> bool:
        return True


class _Pipe(ShardUrl):
    __slots__ = ()
    kind, shape = "pipe", "starts with 'pipe:'"

    @staticmethod
    def looks_right(url: str) -> bool:
        return url.startswith("pipe:")


class _Http(ShardUrl):
    __slots__ = ()
    kind, shape = "http", "starts with http:// or https://"

    @staticmethod
    def looks_right(url: str) -> bool:
        return url.startswith(("http://", "https://"))


class _Fsspec(ShardUrl):
    __slots__ = ()
    kind, shape = "fsspec", "has a scheme (scheme://...)"

    @staticmethod
    def looks_right(url: str) -> bool:
        return "://" in url


KINDS: dict[str, type[ShardUrl]] = {c.kind: c for c in (_Path, _Pipe, _Http, _Fsspec)}


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
    return [str.__new__(_Path, m) for m in matches]


def _as_path(name: str) -> str:
    """``str(Path(name).expanduser())`` (the strings earlier versions digested), without building a Path for
    a name pathlib leaves as it is (no ``~``, empty or ``.`` component, or trailing slash): ~15 us less per name."""
    if (
        name.startswith(("~", "./"))
        or name.endswith(("/", "/."))
        or "//" in name
        or "/./" in name
        or name in ("", ".")
    ):
        return str(Path(name).expanduser())
    return name


def _entries(folder: str) -> dict[str, os.DirEntry]:
    """A folder's entries by name (empty when it does not exist)."""
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _local(names: list[str], item: str) -> list[ShardUrl]:
    """Literal local names (no glob characters) in order: files as paths, folders listed; any other name is
    :class:`ShardNotFoundError`. With many names, each folder is listed once rather than each name stat-ed
    (100,000 stat calls take seconds on a shared filesystem), and the usual case, all of them files, is
    checked in bulk."""
    paths = [_as_path(n) for n in names]
    if len(paths) >= _LIST_AT:
        parts = [
            (head or ("/" if sep else "."), base) for head, sep, base in (p.rpartition("/") for p in paths)
        ]
        listed = {folder: _entries(folder) for folder in {folder for folder, _ in parts}}
        entries = [listed[folder].get(base) for folder, base in parts]
        if all(e is not None and e.is_file() for e in entries):
            return [str.__new__(_Path, p) for p in paths]
    out: list[ShardUrl] = []
    for path in paths:
        if os.path.isfile(path):
            out.append(str.__new__(_Path, path))
        elif os.path.isdir(path):
            out.extend(_folder(Path(path)))
        else:
            raise ShardNotFoundError(f"shard {path!r} (from {item!r}) does not exist")
    return out


def _expand(item: str) -> list[str]:
    """WebDataset's expansion (``::``-separated patterns, ``${WDS_...}`` variables, brace expansion), with a
    direct path for the usual ``prefix{00000..23295}suffix``: the same strings (braceexpand's own range
    rule), ~20x faster than its generator pipeline for 100,000 names."""
    out: list[str] = []
    for part in item.split("::"):
        match = _ONE_RANGE.fullmatch(part)
        if match is None:
            out += expand_urls(part)
            continue
        prefix, body, suffix = match.groups()
        ends = int_range_re.match(body)
        if ends is None:
            out += expand_urls(part)
            continue
        out += [prefix + n + suffix for n in make_int_range(*ends.groups())]
    return out


@contextlib.contextmanager
def _no_gc_passes():
    """Building 100,000 ShardUrls (instances of a class, so tracked by the cyclic GC) triggers dozens of full
    collections over everything the process holds: ~4x the cost of building them. They create no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
    with _no_gc_passes():
        return _expand_specs(specs, allow_pipe)


def _expand_specs(specs: list, allow_pipe: bool) -> list[ShardUrl]:
    out: list[ShardUrl] = []
    schemes: dict[str, str] = {}
    for item in specs:
        item = str(item)
        names = _expand(item)
        if not _SPECIAL.search(item):  # expansion adds no character: every name is a literal local path
            out.extend(_local(names, item))
            continue
        if _ONE_SCHEME.match(item) and "::" not in item and "$" not in item:  # every name has this scheme
            kind = KINDS[_remote(names[0], schemes).kind]
            out.extend(str.__new__(kind, url) for url in names)
            continue
        literal: list[str] = []  # local names without glob characters, checked together
        for url in names:
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
                out.extend(str.__new__(_Path, m) for m in matches)
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
