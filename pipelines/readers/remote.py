"""Remote inputs: HTTP(S) and S3 objects read window by window, and their identity.

- A COG at ``https://...`` / ``http://...`` is read through GDAL's ``/vsicurl/``, one at
  ``s3://bucket/key`` through ``/vsis3/``: GDAL fetches the header once, then only the byte
  ranges of the tiles a window touches (:func:`gdal_path`, :func:`gdal_options`).
- A Zarr v3 store at ``s3://bucket/prefix.zarr`` is read through zarr's ``ObjectStore`` over
  obstore's ``S3Store`` (:func:`s3_store`): a window reads only the chunk objects it touches.
- A NIfTI at any of the three schemes is downloaded whole (:func:`download`, streamed) and
  converted into a local cache (:mod:`pipelines.readers.nifti`).
- A DICOM series at ``s3://bucket/prefix/`` (a folder URI: the path ends with ``/``) is the
  objects directly under the prefix (:func:`list_folder`); they are downloaded into a local cache
  folder (:func:`download_folder`) and read from there (:mod:`pipelines.readers.dicom`). HTTP(S)
  cannot list a folder, so a series is not read from ``http(s)://``.

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
URI with the ETag, Last-Modified and size the server reports (HTTP HEAD, S3 HeadObject); for
a Zarr store the same over the listing (key, ETag, size) of every object under its prefix, and for
a DICOM series over the listing of the objects directly under its prefix
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
#: Objects of a folder (a DICOM series) downloaded at once (:func:`download_folder`).
DOWNLOAD_THREADS = 8
#: How many sub-folders an empty folder's error names.
QUOTE_FOLDERS = 5


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


def _s3_rows(uri: str, *, listing: bool, recursive: bool = True) -> list[dict[str, Any]]:
    import obstore
    from obstore.exceptions import BaseError, NotFoundError

    bucket, key = split_s3(uri)
    folders: list[str] = []
    try:
        if not listing:
            meta = obstore.head(s3_store(bucket), key)
            return [{"etag": meta.get("e_tag"), "last_modified": meta.get("last_modified"), "size": meta["size"]}]
        rows = []
        if recursive:
            for batch in obstore.list(s3_store(bucket), prefix=key + "/" if key else None):
                rows += [{"key": m["path"], "etag": m.get("e_tag"), "size": m["size"]} for m in batch]
        else:  # one level (every page: obstore follows the continuation tokens)
            result = obstore.list_with_delimiter(s3_store(bucket), key + "/" if key else None)
            folders = sorted(p.rsplit("/", 1)[-1] + "/" for p in result["common_prefixes"])
            # a "folder marker" object (key "prefix/") is listed as the prefix itself: not one of its objects
            rows = [{"key": m["path"], "etag": m.get("e_tag"), "size": m["size"]} for m in result["objects"]
                    if m["path"] != key]
    except (FileNotFoundError, NotFoundError):  # obstore raises either, by version
        raise InputError(f"{uri}: no such object") from None
    except BaseError as exc:  # permission, authentication, connection, configuration
        raise InputError(f"{uri}: cannot read from S3: {type(exc).__name__}: {first_line(exc)}") from None
    if not rows and folders:
        shown = ", ".join(folders[:QUOTE_FOLDERS]) + (", ..." if len(folders) > QUOTE_FOLDERS else "")
        raise InputError(f"{uri}: no objects directly under this prefix, only the folders {shown}; "
                         "give the folder of one series (s3://bucket/prefix/series/)")
    if not rows:
        raise InputError(f"{uri}: no objects {'under' if recursive else 'directly under'} this prefix")
    return sorted(rows, key=lambda r: r["key"])


def list_folder(uri: str) -> list[dict[str, Any]]:
    """The objects directly under an ``s3://bucket/prefix/`` folder (not those of its sub-folders),
    sorted by key: ``{"key", "etag", "size"}`` each, the rows :func:`listing_identity` hashes.

    Raises:
        InputError: nothing directly under the prefix (naming its sub-folders, if any), or S3
            cannot be read (naming the URI).
    """
    check_remote(uri)
    if uri_scheme(uri) != "s3":
        raise InputError(f"{redact_uri(uri)}: {uri_scheme(uri)}:// cannot list a folder; give an s3:// URI")
    return _s3_rows(uri, listing=True, recursive=False)


def listing_identity(uri: str, rows: list[dict[str, Any]]) -> str:
    """The identity of a folder from its listing (:func:`list_folder`): the same value as
    ``remote_input_sha256(uri, is_store=True, recursive=False)`` over that listing."""
    return _identity(uri, rows)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (obstore's run over many lines of debug detail)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def remote_input_sha256(uri: str, *, is_store: bool = False, recursive: bool = True) -> str:
    """The identity of a remote input (see the module docstring): SHA-256 of its URI and the
    ETag / Last-Modified / size of its object (HTTP HEAD, S3 HeadObject), or with `is_store`
    (under an ``s3://`` prefix) of the key, ETag and size of every object listed under the prefix:
    all of them for a Zarr store, only those directly under it with ``recursive=False`` (a DICOM
    series folder).

    Raises:
        InputError: the object is missing, nothing is listed under the prefix, or the server is
            unreachable (naming the URI).
    """
    check_remote(uri)
    if uri_scheme(uri) == "s3":
        return _identity(uri, _s3_rows(uri, listing=is_store, recursive=recursive))
    if is_store:
        raise InputError(f"{uri}: a folder or Zarr store over HTTP cannot be listed; give an s3:// URI")
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


def folder_object_name(uri: str, key: str) -> str:
    """The name of an object of a folder URI (:func:`list_folder`): its key after the prefix."""
    prefix = split_s3(uri)[1]
    return key[len(prefix) + 1:] if prefix else key


def download_folder(uri: str, rows: list[dict[str, Any]], folder: os.PathLike[str] | str) -> int:
    """Copy the objects of a folder URI (`rows`: from :func:`list_folder`) into the local `folder`
    (which must exist), each under its name (:func:`folder_object_name`), streamed (never held in
    memory), :data:`DOWNLOAD_THREADS` at a time; returns the bytes copied. Each GET asks for the
    ETag the listing gave (``If-Match``), so the copies are the bytes whose identity the listing
    holds: an object replaced since it was listed fails here instead of mixing versions.

    Raises:
        InputError: an object missing, replaced since the listing, or unreadable (naming its URI).
    """
    import obstore
    from obstore.exceptions import BaseError, NotFoundError, PreconditionError

    check_remote(uri)
    bucket, _ = split_s3(uri)
    store = s3_store(bucket)

    def fetch(row: dict[str, Any]) -> int:
        shown = f"s3://{bucket}/{row['key']}"
        name = folder_object_name(uri, row["key"])
        size = 0
        try:
            options = {"if_match": row["etag"]} if row.get("etag") else None
            with open(os.path.join(os.fspath(folder), name), "wb") as out:
                for part in obstore.get(store, row["key"], options=options).stream(min_chunk_size=8 * 2**20):
                    out.write(part)
                    size += len(part)
        except PreconditionError:
            raise InputError(f"{shown}: the object was replaced after the folder was listed (another ETag); "
                             "run the job again") from None
        except (FileNotFoundError, NotFoundError):
            raise InputError(f"{shown}: no such object (deleted after the folder was listed); "
                             "run the job again") from None
        except BaseError as exc:
            raise InputError(f"{shown}: cannot read from S3: {type(exc).__name__}: {first_line(exc)}") from None
        except OSError as exc:
            raise InputError(f"{shown}: cannot write its local copy: {exc}") from None
        return size

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, min(DOWNLOAD_THREADS, len(rows))))
    try:
        return sum(pool.map(fetch, rows))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, start no more downloads


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
    "download_folder",
    "folder_object_name",
    "gdal_options",
    "gdal_path",
    "is_uri",
    "list_folder",
    "listing_identity",
    "remote_input_sha256",
    "s3_settings",
    "s3_store",
    "split_s3",
    "worker_env",
]
