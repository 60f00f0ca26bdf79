"""A loopback HTTP file server with Range support, optional added latency per request, and a count
of the bytes it sends: the remote-input tests serve COGs and STAC assets with it, and `tessera
bench --remote-latency` measures reads over a network with it. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeServer:
    """Serves the files of `folder` on ``http://127.0.0.1:<port>/``, with HEAD (ETag,
    Last-Modified, Content-Length) and single-range GET (206), and counts the body bytes sent
    per file path (``bytes_sent['/scene.tif']``) and the requests (``requests``). With
    ``latency_s``, each request waits that long before it is answered (requests are served on
    their own threads, so concurrent requests wait concurrently, as on a real network)."""

    def __init__(self, folder: Path, *, latency_s: float = 0.0):
        self.folder = Path(folder)
        self.latency_s = float(latency_s)  # added before each response, as a round trip to a remote store
        self.bytes_sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as object stores and GDAL's curl use

            def log_message(self, format, *args):  # quiet
                pass

            def _file(self) -> Path | None:
                rel = self.path.split("?", 1)[0].lstrip("/")
                target = (server.folder / rel).resolve()
                if server.folder.resolve() not in target.parents or not target.is_file():
                    return None
                return target

            def _headers(self, target: Path, status: int, length: int, extra: dict[str, str]) -> None:
                st = target.stat()
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"' + hashlib.md5(f"{st.st_mtime_ns}-{st.st_size}".encode()).hexdigest() + '"')
                self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
                self.send_header("Content-Type", "application/octet-stream")
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                server._note("HEAD", self.path, None)
                server._wait()
                target = self._file()
                if target is None:
                    self.send_error(404)
                    return
                self._headers(target, 200, target.stat().st_size, {})

            def do_GET(self):
                header = self.headers.get("Range")
                server._note("GET", self.path, header)
                server._wait()
                target = self._file()
                if target is None:
                    self.send_error(404)
                    return
                size = target.stat().st_size
                start, stop, status, extra = 0, size, 200, {}
                if header:
                    m = _RANGE.match(header.strip())
                    if not m or (not m.group(1) and not m.group(2)):
                        self.send_error(416)
                        return
                    if m.group(1):
                        start = int(m.group(1))
                        stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
                    else:  # suffix range: the last n bytes
                        start = max(0, size - int(m.group(2)))
                    if start >= size:
                        self.send_error(416)
                        return
                    status, extra = 206, {"Content-Range": f"bytes {start}-{stop - 1}/{size}"}
                with open(target, "rb") as fh:
                    fh.seek(start)
                    body = fh.read(stop - start)
                self._headers(target, status, len(body), extra)
                self.wfile.write(body)
                server._count(self.path.split("?", 1)[0], len(body))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _wait(self) -> None:
        if self.latency_s > 0:
            time.sleep(self.latency_s)

    def _note(self, method: str, path: str, header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, header))

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_sent[path] = self.bytes_sent.get(path, 0) + n

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
