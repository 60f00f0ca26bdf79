"""Loopback servers for the remote-input tests: an HTTP file server with Range support that counts
the bytes it sends (`pipelines.tools.rangeserver`, which the benchmark uses too), and moto's S3
server. Both listen on 127.0.0.1 only; nothing leaves the machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.tools.rangeserver import RangeServer

__all__ = ["RangeServer", "environ", "moto_s3", "s3_client", "s3_env", "upload_tree"]


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
def moto_s3(requests: list[tuple[str, str, str]] | None = None) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint URL (``http://127.0.0.1:<port>``).
    With `requests`, every request is appended to it as (method, path, access key id of its
    signature, "" when unsigned): which client wrote or read what."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    if requests is not None:
        server._server.app = _recording(server._server.app, requests)  # the handler calls server.app
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _recording(app, requests: list[tuple[str, str, str]]):
    """A WSGI app that appends (method, path, access key id) of each request, then calls `app`."""
    import re

    def recorded(environ, start_response):
        signed = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), signed.group(1) if signed else ""))
        return app(environ, start_response)

    return recorded


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
