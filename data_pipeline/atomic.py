"""Files that appear complete or not at all: the one atomic-write helper every writer uses (checkpoints,
``latest``, manifests, shards, result files, exports).

A file is written under a temporary name in the same directory, flushed and fsynced, renamed over its final
name, and the directory is fsynced so the rename survives a power loss. A failure (disk full, permission,
quota) removes the temporary file, leaves any previous file untouched, and raises :class:`StorageError`
naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class StorageError(OSError):
    """Writing a file failed; the message names the path and the cause (disk full, permission, quota...)."""

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(path: str | os.PathLike, exc: OSError, what: str = "writing") -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while ``what`` ``path``."""
    cause = _CAUSES.get(exc.errno or -1, exc.strerror or str(exc))
    err = StorageError(exc.errno, f"{what} {os.fspath(path)} failed: {cause}")
    err.filename = os.fspath(path)
    return err


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (so renames and new entries in it are durable)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` (same file system, unique per process and call)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is fsynced and renamed into place.

    Works with any writer that takes a file name (``torch.save``, safetensors' ``save_file``, ``Image.save``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path.parent, exc, "creating") from exc
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(path, exc) from exc
        if isinstance(exc, RuntimeError) and "iostream" in str(exc):  # torch.save's C++ stream on a full disk
            raise storage_error(path, OSError(errno.EIO, str(exc))) from exc
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    """Write ``obj`` as JSON (sorted keys) to ``path`` atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` with a binary file object, then move the file into place atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_save(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file, then move it into place atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
