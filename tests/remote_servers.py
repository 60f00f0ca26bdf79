"""Loopback servers for the remote-input tests: an HTTP file server with Range support that counts
the bytes it sends, and moto's S3 server. Both listen on 127.0.0.1 only; nothing leaves the machine."""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeServer:
    """Serves the files of `folder` on ``http://127.0.0.1:<port>/``, with HEAD (ETag,
    Last-Modified, Content-Length) and single-range GET (206), and counts the body bytes sent
    per file path (``bytes_sent['/scene.tif']``) and the requests (``requests``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
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
                target = self._file()
                if target is None:
                    self.send_error(404)
                    return
                self._headers(target, 200, target.stat().st_size, {})

            def do_GET(self):
                header = self.headers.get("Range")
                server._note("GET", self.path, header)
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


#: The environment a GDAL / obstore / boto3 client needs to talk to a local S3 server at `endpoint`.
def s3_env(endpoint: str) -> dict[str, str]:
    host = endpoint.split("://", 1)[1]
    return {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
        "AWS_REGION": "us-east-1",
        "AWS_S3_ENDPOINT": host,  # GDAL's names
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint URL (``http://127.0.0.1:<port>``)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, the previous environment restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client(endpoint: str):
    """A boto3 S3 client of the local server (test credentials passed here, not via the environment)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing-key-id", aws_secret_access_key="testing-secret-key-do-not-log")


def upload_tree(client, bucket: str, folder: Path, prefix: str, *, public: bool = False) -> str:
    """Upload a file or every file below a folder (a Zarr store) under `prefix` (readable by
    anyone with `public`); returns its s3:// URI."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for f in files:
        key = prefix if folder.is_file() else f"{prefix}/{f.relative_to(folder).as_posix()}"
        client.upload_file(str(f), bucket, key, ExtraArgs={"ACL": "public-read"} if public else None)
    return f"s3://{bucket}/{prefix}"
