"""A local S3 server (moto's ThreadedMotoServer on 127.0.0.1, a free port) for the output-root
tests, and the AWS environment that points obstore, pyarrow and boto3 at it.

(The remote-input tests have their own helper, ``tests/remote_servers.py`` on the branch that adds
S3 inputs; this one uses the same environment conventions and can merge into it.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: A credential that must never appear in any output (tables, attributes, job.resolved.json).
TEST_SECRET = "s3out-secret-key-never-written"
TEST_KEY_ID = "s3out-test-key-id"


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a client needs for the server at `endpoint` (``http://127.0.0.1:<port>``),
    in GDAL's spelling (host, AWS_HTTPS=NO, path-style), as the inputs side reads it too."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_S3_ENDPOINT": endpoint.split("://", 1)[1],
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint URL."""
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
    """A boto3 client of the server (the test's view of the bucket, independent of tessera's code)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)


def all_objects(client, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`: key -> bytes."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out
