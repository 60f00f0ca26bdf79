"""Remote inputs: HTTP(S) and S3 objects read window by window, and their identity.

- A COG at ``https://...`` / ``http://...`` is read through GDAL's ``/vsicurl/``, one at
  ``s3://bucket/key`` through ``/vsis3/``: GDAL fetches the header once, then only the byte
  ranges of the tiles a window touches (:func:`gdal_path`, :func:`gdal_options`).
- A Zarr v3 store at ``s3://bucket/prefix.zarr`` is read through zarr's ``ObjectStore`` over
  obstore's ``S3Store`` (:func:`s3_store`): a window reads only the chunk objects it touches.

Where the S3 endpoint, region and credentials come from: the standard AWS environment of the
process that reads. GDAL reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING``,
``AWS_NO_SIGN_REQUEST`` (and ``~/.aws`` profiles) itself; :func:`s3_settings` turns the same
variables (or the AWS SDKs' ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) into the obstore
configuration and fills GDAL's endpoint variables from the SDK ones, so one environment serves both
and any S3-compatible store (MinIO, Ceph, moto) works. obstore reads credentials from the
environment variables (or an instance role), not from ``~/.aws`` profiles.

How the settings reach the Ray workers: the non-secret ones (:func:`worker_env`: endpoint,
region, HTTPS, addressing, unsigned requests, GDAL's HTTP options) go with the job's actors and
tasks as Ray ``runtime_env`` variables. Credentials never do: Ray writes a runtime environment in
plain text to its ``runtime_env_agent.log`` (checked on Ray 2.60). The workers take credentials
from their own environment: a local Ray that ``tessera run`` starts inherits the driver's, and
the nodes of a cluster use their own (instance role, profile or environment).

Identity instead of a checksum: a remote object cannot be hashed without downloading it, so its
``input_sha256`` (what the scene's fingerprint and ``tables/scenes`` hold) is the SHA-256 of its
URI with the ETag, Last-Modified and size the server reports (HTTP HEAD, S3 HeadObject), and for
a Zarr store the same over the listing of every object under its prefix
(:func:`remote_input_sha256`). A changed object changes its ETag or Last-Modified, so a re-run
recomputes it; the same bytes at another URI get another fingerprint (a local file's does not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from schemas.errors import InputError
from schemas.uris import REMOTE_SCHEMES, check_uri, is_uri, redact_uri, uri_path, uri_scheme

log = logging.getLogger(__name__)

#: GDAL options for remote reads (rasterio.Env inside the reader, so every worker has them):
#: no directory listing or sidecar probing on open, a per-file cache of fetched ranges, and
#: consecutive tile ranges merged into one request; a few retries on transient errors.
GDAL_REMOTE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 * 2**20),
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
#: Environment variables about *where* and *how* to reach object storage (no secrets): sent to the
#: job's Ray workers (:func:`worker_env`).
FORWARDED_ENV = (
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING",
    "AWS_NO_SIGN_REQUEST", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
    "GDAL_HTTP_TIMEOUT", "GDAL_HTTP_CONNECTTIMEOUT", "GDAL_HTTP_MAX_RETRY", "GDAL_HTTP_RETRY_DELAY",
    "GDAL_HTTP_USERAGENT", "GDAL_HTTP_VERSION", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
)
HEAD_TIMEOUT_S = 30.0


def _true(value: str | None) -> bool:
    return str(value or "").strip().upper() in ("YES", "TRUE", "ON", "1")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL of this process's environment (``http(s)://host[:port]``), or None for
    AWS itself: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` (the AWS SDKs' names), or GDAL's
    ``AWS_S3_ENDPOINT`` (a host) with ``AWS_HTTPS=NO`` for plain HTTP."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        return url.rstrip("/")
    host = os.environ.get("AWS_S3_ENDPOINT")
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    return ("http://" if os.environ.get("AWS_HTTPS", "YES").upper() in ("NO", "FALSE", "0") else "https://") + host


def s3_settings() -> dict[str, Any]:
    """obstore ``S3Store`` keyword arguments from the environment (no credentials: obstore reads
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` itself)."""
    settings: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        settings["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            # a client option, not a top-level keyword: with `allow_http=` obstore 0.12 cannot pickle
            # the store (a Rust panic), which dask does when it tokenizes an xarray opened over it
            settings["client_options"] = {"allow_http": True}
        # custom endpoints are path-style unless told otherwise (GDAL's default is virtual hosting
        # on AWS, and AWS_VIRTUAL_HOSTING=FALSE elsewhere)
        settings["virtual_hosted_style_request"] = _true(os.environ.get("AWS_VIRTUAL_HOSTING", "FALSE"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        settings["region"] = region
    if _true(os.environ.get("AWS_NO_SIGN_REQUEST")):
        settings["skip_signature"] = True
    return settings


def s3_store(bucket: str, prefix: str | None = None) -> Any:
    """An obstore ``S3Store`` of `bucket` (under `prefix`), configured from the environment."""
    from obstore.store import S3Store

    return S3Store(bucket, prefix=prefix or None, **s3_settings())


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (the key without a trailing ``/``)."""
    parts = urlsplit(uri)
    return parts.netloc, parts.path.strip("/")


def gdal_path(uri: str) -> str:
    """The GDAL path of a remote raster: ``/vsicurl/<url>`` or ``/vsis3/<bucket>/<key>``."""
    scheme = uri_scheme(uri)
    if scheme in ("http", "https"):
        return f"/vsicurl/{uri}"
    if scheme == "s3":
        bucket, key = split_s3(uri)
        return f"/vsis3/{bucket}/{key}"
    raise InputError(f"{redact_uri(uri)}: GDAL reads http(s):// and s3:// URIs, not {scheme}://")


def gdal_options(uri: str) -> dict[str, str]:
    """GDAL configuration for reading `uri`: :data:`GDAL_REMOTE_OPTIONS`, GDAL's own endpoint
    variables filled from the AWS SDKs' ``AWS_ENDPOINT_URL[_S3]`` when only those are set, and
    ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS`` set to the URI's suffix (GDAL then never probes for
    sidecar files such as ``.aux.xml`` or ``.ovr``)."""
    options = dict(GDAL_REMOTE_OPTIONS)
    suffix = os.path.splitext(uri_path(uri))[1]
    if suffix:
        options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = suffix
    if uri_scheme(uri) == "s3" and not os.environ.get("AWS_S3_ENDPOINT"):
        endpoint = s3_endpoint()
        if endpoint:
            parts = urlsplit(endpoint)
            options["AWS_S3_ENDPOINT"] = parts.netloc
            options["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
            options.setdefault("AWS_VIRTUAL_HOSTING", os.environ.get("AWS_VIRTUAL_HOSTING", "FALSE"))
    return options


def worker_env() -> dict[str, str]:
    """The non-secret remote-access variables of this process's environment (:data:`FORWARDED_ENV`),
    for the job's Ray workers; credentials are never among them (see the module docstring)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _identity(uri: str, rows: list[dict[str, Any]]) -> str:
    payload = json.dumps({"uri": uri, "objects": rows}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _http_head(uri: str) -> dict[str, Any]:
    request = urllib.request.Request(uri, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT_S) as response:
            headers = response.headers
    except urllib.error.HTTPError as exc:
        raise InputError(f"{redact_uri(uri)}: HTTP {exc.code} {exc.reason} (HEAD)") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{redact_uri(uri)}: cannot reach the server: {getattr(exc, 'reason', exc)}") from None
    row = {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
           "size": headers.get("Content-Length")}
    if not row["etag"] and not row["last_modified"]:
        log.warning("%s: the server sends neither ETag nor Last-Modified: the input's identity is its URI "
                    "and size only, so a re-run will not notice a same-size change", redact_uri(uri))
    return row


def _s3_rows(uri: str, *, listing: bool) -> list[dict[str, Any]]:
    import obstore
    from obstore.exceptions import BaseError, NotFoundError

    bucket, key = split_s3(uri)
    try:
        if not listing:
            meta = obstore.head(s3_store(bucket), key)
            return [{"etag": meta.get("e_tag"), "last_modified": meta.get("last_modified"), "size": meta["size"]}]
        rows = []
        for batch in obstore.list(s3_store(bucket), prefix=key + "/"):
            rows += [{"key": m["path"], "etag": m.get("e_tag"), "size": m["size"]} for m in batch]
    except (FileNotFoundError, NotFoundError):  # obstore raises either, by version
        raise InputError(f"{uri}: no such object") from None
    except BaseError as exc:  # permission, authentication, connection, configuration
        raise InputError(f"{uri}: cannot read from S3: {type(exc).__name__}: {first_line(exc)}") from None
    if not rows:
        raise InputError(f"{uri}: no objects under this prefix")
    return sorted(rows, key=lambda r: r["key"])


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (obstore's run over many lines of debug detail)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def remote_input_sha256(uri: str, *, is_store: bool = False) -> str:
    """The identity of a remote input (see the module docstring): SHA-256 of its URI and the
    ETag / Last-Modified / size of its object (HTTP HEAD, S3 HeadObject), or with `is_store`
    (a Zarr store under an ``s3://`` prefix) of every object listed under the prefix.

    Raises:
        InputError: the object is missing or the server unreachable (naming the URI).
    """
    check_remote(uri)
    if uri_scheme(uri) == "s3":
        return _identity(uri, _s3_rows(uri, listing=is_store))
    if is_store:
        raise InputError(f"{uri}: a Zarr store over HTTP cannot be listed; give an s3:// URI")
    return _identity(uri, [_http_head(uri)])


def download(uri: str, dest: os.PathLike[str] | str) -> int:
    """Copy the object at `uri` (``http(s)://`` or ``s3://``) to the local file `dest`, streamed
    (never held in memory), under a temporary name renamed when complete; returns its size.

    Raises:
        InputError: the object is missing or cannot be read (naming the URI).
    """
    import shutil
    import tempfile

    check_remote(uri)
    dest = os.fspath(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".download-", suffix=".partial")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            if uri_scheme(uri) == "s3":
                import obstore
                from obstore.exceptions import BaseError, NotFoundError

                bucket, key = split_s3(uri)
                try:
                    for part in obstore.get(s3_store(bucket), key).stream(min_chunk_size=8 * 2**20):
                        out.write(part)
                        size += len(part)
                except (FileNotFoundError, NotFoundError):
                    raise InputError(f"{uri}: no such object") from None
                except BaseError as exc:
                    raise InputError(f"{uri}: cannot read from S3: {type(exc).__name__}: {first_line(exc)}") from None
            else:
                try:
                    with urllib.request.urlopen(uri, timeout=HEAD_TIMEOUT_S) as response:
                        shutil.copyfileobj(response, out, 8 * 2**20)
                        size = out.tell()
                except urllib.error.HTTPError as exc:
                    raise InputError(f"{redact_uri(uri)}: HTTP {exc.code} {exc.reason} (GET)") from None
                except (urllib.error.URLError, OSError) as exc:
                    raise InputError(f"{redact_uri(uri)}: download failed: {getattr(exc, 'reason', exc)}") from None
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def check_remote(uri: str) -> None:
    """Refuse a URI tessera cannot read (:func:`schemas.uris.check_uri`) as an InputError."""
    try:
        check_uri(uri)
    except ValueError as exc:
        raise InputError(str(exc)) from None


__all__ = [
    "REMOTE_SCHEMES",
    "check_remote",
    "download",
    "gdal_options",
    "gdal_path",
    "is_uri",
    "remote_input_sha256",
    "s3_settings",
    "s3_store",
    "split_s3",
    "worker_env",
]
