"""Reading shards that are not local files, as streams: ``http(s)://`` with our own reader (``requests``),
every other scheme fsspec knows (``s3://``, ``gs://``, ``hf://``, ``file://``, ...) through ``fsspec``.

Nothing is downloaded to disk first: the tar reader pulls bytes through a 1 MiB buffer. Connection errors,
timeouts, 5xx, 408 and 429 answers are retried with exponential backoff (with jitter; a ``Retry-After`` is
honoured), and each retry *resumes at the byte reached* (an HTTP ``Range`` request; a seek for fsspec), so a
connection dropped mid-shard loses no sample and counts stay exact. A 404 or any other 4xx fails at once. When
a shard still cannot be read, :class:`RemoteShardError` (an ``OSError``) reaches the tar reader, which keeps the
samples read so far and counts the shard once as ``remote_error``, like a corrupt shard.

WebDataset's ``gopen`` runs ``curl`` in a subprocess for http(s): an error is known only when the pipe
closes, a retry restarts the shard at byte 0, and curl must be installed; hence this reader.

Timeouts and retries come from :class:`RemoteOptions`: the defaults, or ``LDM_REMOTE_CONNECT_TIMEOUT``,
``LDM_REMOTE_READ_TIMEOUT``, ``LDM_REMOTE_RETRIES``, ``LDM_REMOTE_BACKOFF`` and ``LDM_REMOTE_MAX_BACKOFF`` in
the environment (seen by every rank and DataLoader worker). fsspec backends keep their own timeouts (s3fs:
botocore's; gcsfs, huggingface_hub: theirs); the retries and the resume-by-seek wrap them.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time
from dataclasses import dataclass, fields

from .errors import InputError, RemoteShardError

BUFFER = 1 << 20
RETRY_STATUS = frozenset({408, 429})  # 4xx answers that mean "try again later"; all 5xx do too
_ENV = "LDM_REMOTE_"
_jitter = random.Random()  # not the global generator: retries must not shift anyone else's draws


@dataclass(frozen=True)
class RemoteOptions:
    """Timeouts (seconds) and retries for remote shards."""

    connect_timeout: float = 30.0
    read_timeout: float = 60.0  # longest wait for the next bytes of an open connection
    retries: int = 6  # failed tries in a row (without a byte of progress) before the shard counts as failed
    backoff: float = 1.0  # wait before the first retry; doubles each retry (x0.5-1 jitter)
    max_backoff: float = 60.0

    @classmethod
    def from_env(cls) -> RemoteOptions:
        """The defaults, overridden by ``LDM_REMOTE_<FIELD>`` environment variables (e.g. LDM_REMOTE_RETRIES)."""
        values = {}
        for f in fields(cls):
            name = _ENV + f.name.upper()
            text = os.environ.get(name)
            if text is None:
                continue
            try:
                value = type(f.default)(text)
            except ValueError:
                raise InputError(f"{name}={text!r} is not a {type(f.default).__name__}") from None
            if value < 0:
                raise InputError(f"{name}={text!r} must be >= 0")
            values[f.name] = value
        return cls(**values)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``failures`` (1, 2, ...)."""
        wait = min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * _jitter.uniform(0.5, 1.0)
        return min(self.max_backoff, max(wait, retry_after or 0.0))


class _Fatal(Exception):
    """An answer that retrying will not change (404 and other 4xx, a shard that changed while being read);
    ``missing``: the answer is that there is no such file."""

    def __init__(self, detail: str, missing: bool = False):
        super().__init__(detail)
        self.missing = missing


class _Transient(Exception):
    """A failed try worth repeating; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.retry_after = retry_after


class _Resumable(io.RawIOBase):
    """A remote file read front to back; each (re)connection starts at ``offset``, the bytes delivered so far.

    Subclasses open a connection at an offset (:meth:`_connect`), read from it (:meth:`_read`) and name the
    exceptions worth a retry (``TRANSIENT``)."""

    TRANSIENT: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, url: str, offset: int = 0, options: RemoteOptions | None = None):
        super().__init__()
        self.url, self.offset = str(url), offset
        self.opt = options or RemoteOptions.from_env()
        self.size: int | None = None  # total bytes, when the source says
        self._body = None
        self._retrying(self._reconnect)  # fail at open (404, unreachable host) rather than at the first read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._retrying(lambda: self._read_once(buffer))

    def _read_once(self, buffer) -> int:
        if self._body is None:
            self._reconnect()
        n = self._read(buffer)
        if n == 0 and self.size is not None and self.offset < self.size:
            raise _Transient(f"connection closed at byte {self.offset} of {self.size}")
        self.offset += n
        return n

    def _retrying(self, attempt):
        failures = 0
        while True:
            try:
                return attempt()
            except _Fatal as exc:
                self._drop()
                raise RemoteShardError(f"{self.url}: {exc}", exc.missing) from None
            except (_Transient, *self.TRANSIENT) as exc:
                self._drop()
                failures += 1
                cause = str(exc) or type(exc).__name__
                if failures > self.opt.retries:
                    raise RemoteShardError(
                        f"{self.url}: gave up after {failures} tries at byte {self.offset}: {cause}"
                    ) from None
                time.sleep(self.opt.delay(failures, getattr(exc, "retry_after", None)))

    def _reconnect(self) -> None:
        self._drop()
        self._body = self._connect()

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close: it is discarded
                body.close()

    def close(self) -> None:
        self._drop()
        super().close()

    def _connect(self):
        raise NotImplementedError

    def _read(self, buffer) -> int:
        raise NotImplementedError


# -- http(s) ---------------------------------------------------------------------------------------------------
_session: tuple[int, object] | None = None


def _http_session():
    """One ``requests`` session per process (connections are reused across shards; never shared across fork)."""
    global _session
    if _session is None or _session[0] != os.getpid():
        import requests

        _session = (os.getpid(), requests.Session())
    return _session[1]


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


class HttpStream(_Resumable):
    """An http(s) shard; a retry asks for ``Range: bytes=<offset>-`` (a server that ignores it is read past
    the bytes already delivered) and checks the shard did not change meanwhile (``ETag``, total size)."""

    def __init__(self, url: str, offset: int = 0, options: RemoteOptions | None = None):
        import http.client

        import requests
        import urllib3

        self.TRANSIENT = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                          OSError)  # fmt: skip
        self.etag: str | None = None
        super().__init__(url, offset, options)

    def _connect(self):
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be offsets in the shard itself
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        resp = _http_session().get(
            self.url,
            headers=headers,
            stream=True,
            timeout=(self.opt.connect_timeout, self.opt.read_timeout),
        )
        status = resp.status_code
        if status == 416 and self.size is not None and self.offset >= self.size:
            resp.close()
            return io.BytesIO(b"")  # resumed exactly at the end
        if status >= 400:
            resp.close()
            detail = f"HTTP {status} {resp.reason or ''}".rstrip()
            if status >= 500 or status in RETRY_STATUS:
                raise _Transient(detail, _retry_after(resp.headers.get("Retry-After")))
            raise _Fatal(detail, missing=status in (404, 410))
        etag = resp.headers.get("ETag")
        if self.etag and etag and etag != self.etag:
            resp.close()
            raise _Fatal(f"changed while being read (ETag {self.etag} -> {etag})")
        self.etag = self.etag or etag
        start, length = 0, resp.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
        if total is not None:
            if self.size is not None and total != self.size:
                resp.close()
                raise _Fatal(f"changed while being read (size {self.size} -> {total})")
            self.size = total
        if start > self.offset:
            resp.close()
            raise _Fatal(f"asked for bytes from {self.offset}, got them from {start}")
        body = resp.raw
        _discard(body, self.offset - start)  # a server that ignored Range (200) resends the start
        return body

    def _read(self, buffer) -> int:
        # read1: what has arrived (at most one socket read), so the offset reached before a drop is kept
        data = self._body.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total size or None) from ``Content-Range: bytes a-b/total`` (total may be ``*``)."""
    try:
        unit, spec = value.split(" ", 1)
        span, total = spec.split("/", 1)
        first = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return first, int(total) if total.isdigit() else None
    except ValueError:
        raise _Fatal(f"206 answer with a malformed Content-Range {value!r}") from None


def _discard(body, n: int) -> None:
    while n > 0:
        chunk = body.read(min(n, BUFFER))
        if not chunk:
            raise _Transient(f"connection closed {n} bytes before the resume offset")
        n -= len(chunk)


# -- fsspec ----------------------------------------------------------------------------------------------------
class FsspecStream(_Resumable):
    """A shard on any fsspec filesystem; a retry reopens the file and seeks to the byte reached. Missing files
    and refused access fail at once; any other error is retried (backends raise many types)."""

    TRANSIENT = (Exception,)
    FATAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

    def __init__(self, url: str, offset: int = 0, options: RemoteOptions | None = None):
        self._fs = None
        super().__init__(url, offset, options)

    def _connect(self):
        try:
            if self._fs is None:
                from fsspec.core import url_to_fs

                self._fs = url_to_fs(self.url)
            fs, path = self._fs
            f = fs.open(path, "rb", block_size=BUFFER)
        except self.FATAL as exc:
            raise _Fatal(f"{type(exc).__name__}: {exc}", missing=isinstance(exc, FileNotFoundError)) from None
        if self.offset:
            f.seek(self.offset)
        self.size = getattr(f, "size", None)
        return f

    def _read(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_remote(cls: type[_Resumable], url: str, offset: int = 0) -> io.BufferedReader:
    """A buffered binary stream of ``url`` from byte ``offset``; RemoteShardError when it cannot be opened."""
    return io.BufferedReader(cls(url, offset), BUFFER)


def read_bytes(url: str) -> bytes:
    """The whole content of a small file beside the shards (a manifest), by its kind's opener."""
    from .tario import open_shard

    with open_shard(url) as f:
        return f.read()
