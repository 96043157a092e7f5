"""A real HTTP server on localhost that serves shard files, with scripted faults per file (tests only).

Faults are queued per URL path and used up one per request, in order:

    "503"        answer 503 (with ``Retry-After: 0``)
    "404"        answer 404
    "drop:N"     send the headers (full length) and the first N bytes of the body, then close the connection
    "stall:N:S"  send N bytes of the body, then wait S seconds before the rest (a read timeout on the client)

Without a queued fault a file is served whole (200), or from a ``Range: bytes=a-`` (206) unless its path is in
``ignore_range``; a missing file is a 404. Every request is logged as ``(path, range header or None)``.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real object stores do
    server: ShardServer

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((path, rng))
            queue = srv.faults.get(path)
            fault = queue.pop(0) if queue else ""
        file = srv.root / path.lstrip("/")
        if fault in ("503", "404") or not file.is_file():
            status = int(fault or 404)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        start = 0
        if rng and path not in srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-", 1)[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{len(data)}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        kind, _, arg = fault.partition(":")
        if kind == "drop":
            self.wfile.write(body[: int(arg)])
            self.wfile.flush()
            self.close_connection = True
            return
        if kind == "stall":
            n, seconds = arg.split(":")
            self.wfile.write(body[: int(n)])
            self.wfile.flush()
            time.sleep(float(seconds))
            body = body[int(n) :]
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): fine
            self.close_connection = True


class ShardServer(ThreadingHTTPServer):
    """``with ShardServer(folder) as srv: srv.url("a.tar")``; ``srv.faults["/a.tar"] = ["503", "503"]``."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.lock = threading.Lock()
        self.faults: dict[str, list[str]] = {}
        self.ignore_range: set[str] = set()
        self.log: list[tuple[str, str | None]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def requests(self, name: str) -> list[str | None]:
        """The Range headers of the requests for ``name`` so far (None: no Range)."""
        with self.lock:
            return [r for p, r in self.log if p == "/" + name]

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.ignore_range.clear()
            self.log.clear()

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
