"""Where a job's outputs live: a local folder or an ``s3://bucket/prefix`` on object storage.

A *location* is either a ``pathlib.Path`` (local disk, as before) or an :class:`S3Location`
(``s3://bucket/key``), which supports the few ``Path`` operations the writers use (``/``,
``name``, ``parent``, ``mkdir`` as a no-op, ``str``). The functions below take either and do
the same thing on both:

- :func:`zarr_store`: what ``zarr.open_group`` takes: the local path as a string, or zarr's
  ``ObjectStore`` over obstore's ``S3Store`` for the store's prefix.
- :func:`write_bytes` / :func:`read_bytes` / :func:`exists` / :func:`list_names` /
  :func:`remove_tree`: small objects (chunk markers, partial statistics, JSON).
- :func:`upload_from` / :func:`local_copy`: a local file to write (Parquet, PNG) that lands at
  the location when the block ends, and a local copy of an object to read.
- :func:`arrow_filesystem`: a pyarrow filesystem and base path for reading tables.

Atomicity. On local disk every small file is written to a temporary file and renamed over the
target (``pipelines.writers.atomic``). S3 has no rename, but a PUT of one object is all or nothing:
readers see the previous object or the new one, never part of one. So "write the marker last"
carries over unchanged: a chunk's ``<key>.json`` marker is PUT after its chunk and partials, and a
store's ``zarr.json`` with ``status: complete`` is PUT after every chunk, table and overview
(see :mod:`schemas.store`, "Completion").

Configuration comes from the standard AWS environment of the process that reads or writes (the
driver, or a Ray worker on another node): ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or GDAL's
``AWS_S3_ENDPOINT`` with ``AWS_HTTPS=NO`` for a custom endpoint, ``AWS_VIRTUAL_HOSTING`` (path-style
by default on a custom endpoint), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and the credentials
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or an instance role),
which obstore and pyarrow read themselves: the variables, and the obstore configuration
(``pipelines.readers.remote.s3_store``), of the remote inputs. The job sends the non-secret ones
to its workers (``pipelines.readers.remote.worker_env``), never the credentials.
Credentials are never part of a location: a root such as ``s3://key:secret@bucket/prefix`` is
refused (:func:`as_location`), so they cannot reach ``job.resolved.json``, tables, store
attributes or logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipelines.writers.atomic import atomic_path
from schemas.errors import OutputError

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Location:
    """An object or prefix ``s3://bucket/key`` (key without leading or trailing ``/``; empty for
    the bucket itself). Supports the ``Path`` operations the writers use on their root."""

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket or "@" in self.bucket:
            raise OutputError(f"s3://{self.bucket}: not a bucket name")

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    def __truediv__(self, part: str | os.PathLike[str]) -> S3Location:
        part = str(part).strip("/")
        return S3Location(self.bucket, f"{self.key}/{part}" if self.key else part)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> S3Location:
        return S3Location(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object storage has no folders (a key's prefix exists with its objects)."""


Location = Path | S3Location


def is_s3(text: str | os.PathLike[str] | S3Location) -> bool:
    """Whether a location (or its text) is on S3."""
    return isinstance(text, S3Location) or str(text).startswith(S3_SCHEME)


def as_location(text: str | os.PathLike[str] | S3Location) -> Location:
    """A location from its text: ``s3://bucket/prefix`` -> S3Location, anything else -> Path.

    Raises:
        OutputError: an ``s3://`` URI with credentials in it (``s3://key:secret@bucket``) or a
            query string, or without a bucket; the error never repeats the credentials.
    """
    if isinstance(text, (S3Location, Path)):
        return text
    text = str(text)
    if not text.startswith(S3_SCHEME):
        if "://" in text:
            raise OutputError(f"{text.split('://', 1)[0]}://...: output roots are local folders or s3:// URIs")
        return Path(text)
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise OutputError(f"s3://REDACTED@{parts.netloc.rsplit('@', 1)[-1]}{parts.path}: the output root carries "
                          "credentials, which would be saved with the outputs (job.resolved.json); give "
                          "s3://bucket/prefix and the credentials in the environment (AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")
    if parts.query or parts.fragment:
        raise OutputError(f"s3://{parts.netloc}{parts.path}: an output root takes no query string or fragment")
    return S3Location(parts.netloc, parts.path.strip("/"))


# --- configuration: the same variables, read the same way, as the remote inputs ----------------


def _true(value: str | None) -> bool:
    return str(value or "").strip().upper() in ("YES", "TRUE", "ON", "1")


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _object_store(bucket: str, prefix: str = "") -> Any:
    from pipelines.readers.remote import s3_store

    return s3_store(bucket, prefix or None)


def zarr_store(location: str | os.PathLike[str] | S3Location, *, read_only: bool = False) -> Any:
    """What zarr opens a store at `location` from: the local path (a string, as before), or
    ``zarr.storage.ObjectStore`` over obstore's S3Store of the store's prefix."""
    location = as_location(location)
    if isinstance(location, Path):
        return str(location)
    from zarr.storage import ObjectStore

    return ObjectStore(_object_store(location.bucket, location.key), read_only=read_only)


def arrow_filesystem(location: Location) -> tuple[Any, str]:
    """(pyarrow filesystem, base path) of a location, for pyarrow datasets: the local filesystem
    and the path, or ``pyarrow.fs.S3FileSystem`` (endpoint, scheme and region from the
    environment; credentials read by the AWS SDK itself) and ``bucket/key``."""
    import pyarrow.fs as pafs

    from pipelines.readers.remote import s3_endpoint

    if isinstance(location, Path):
        return pafs.LocalFileSystem(), str(location)
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https",
                      force_virtual_addressing=_true(os.environ.get("AWS_VIRTUAL_HOSTING", "FALSE")))
    if _region():
        kwargs["region"] = _region()
    if _true(os.environ.get("AWS_NO_SIGN_REQUEST")):
        kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs), f"{location.bucket}/{location.key}".rstrip("/")


# --- small objects ---------------------------------------------------------------------------


def _s3_error(location: S3Location, exc: BaseException) -> OutputError:
    text = str(exc).strip()
    return OutputError(f"{location}: object storage refused the request: {type(exc).__name__}: "
                       f"{text.splitlines()[0] if text else ''}")


def write_bytes(location: Location, data: bytes) -> None:
    """Replace the file or object at `location` with `data`, atomically (rename / one PUT)."""
    if isinstance(location, Path):
        with atomic_path(location) as tmp:
            tmp.write_bytes(data)
        return
    import obstore

    try:
        obstore.put(_object_store(location.bucket), location.key, data)
    except Exception as exc:  # obstore's errors: connection, permission, configuration
        raise _s3_error(location, exc) from exc


def write_text(location: Location, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(location, text.encode())


def read_bytes(location: Location) -> bytes:
    """The bytes of a file or object.

    Raises:
        FileNotFoundError: there is none.
    """
    if isinstance(location, Path):
        return location.read_bytes()
    import obstore

    try:
        return bytes(obstore.get(_object_store(location.bucket), location.key).bytes())
    except FileNotFoundError:
        raise FileNotFoundError(str(location)) from None
    except Exception as exc:
        if type(exc).__name__ == "NotFoundError":
            raise FileNotFoundError(str(location)) from None
        raise _s3_error(location, exc) from exc


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def exists(location: Location) -> bool:
    """Whether a file or object exists at `location` (a folder or bare prefix does not count)."""
    if isinstance(location, Path):
        return location.is_file()
    import obstore

    try:
        obstore.head(_object_store(location.bucket), location.key)
    except FileNotFoundError:
        return False
    except Exception as exc:
        if type(exc).__name__ == "NotFoundError":
            return False
        raise _s3_error(location, exc) from exc
    return True


def list_names(folder: Location) -> list[str]:
    """Names of the files or objects directly under `folder` (not in sub-folders), sorted; empty
    when there is none."""
    if isinstance(folder, Path):
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    import obstore

    prefix = f"{folder.key}/" if folder.key else ""
    try:
        listing = obstore.list_with_delimiter(_object_store(folder.bucket), prefix=prefix or None)
    except Exception as exc:
        raise _s3_error(folder, exc) from exc
    return sorted(str(m["path"])[len(prefix):] for m in listing["objects"])


def list_prefixes(folder: Location) -> list[str]:
    """Names of the sub-folders (common prefixes) directly under `folder`, sorted."""
    if isinstance(folder, Path):
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    import obstore

    prefix = f"{folder.key}/" if folder.key else ""
    try:
        listing = obstore.list_with_delimiter(_object_store(folder.bucket), prefix=prefix or None)
    except Exception as exc:
        raise _s3_error(folder, exc) from exc
    return sorted(str(p)[len(prefix):].rstrip("/") for p in listing["common_prefixes"])


def remove_tree(location: Location) -> None:
    """Delete a folder (or every object under a prefix); nothing to do when there is none. Only
    ever called on a location under the output root."""
    if isinstance(location, Path):
        if location.exists():
            shutil.rmtree(location)
        return
    import obstore

    store = _object_store(location.bucket)
    try:
        for batch in obstore.list(store, prefix=f"{location.key}/"):
            obstore.delete(store, [m["path"] for m in batch])
    except Exception as exc:
        raise _s3_error(location, exc) from exc


def remove(location: Location) -> None:
    """Delete one file or object (nothing to do when there is none)."""
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
        return
    import obstore

    try:
        obstore.delete(_object_store(location.bucket), location.key)
    except Exception as exc:
        raise _s3_error(location, exc) from exc


@contextlib.contextmanager
def upload_from(location: Location) -> Iterator[Path]:
    """A local path to write a file to, which becomes `location` when the block ends without an
    exception: renamed over it on local disk (``atomic_path``), one PUT from a local temporary
    file on S3 (``tempfile``: local scratch, removed after). On an exception the previous file
    or object stays as it was."""
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(location) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="tessera-upload-") as folder:
        tmp = Path(folder) / location.name
        yield tmp
        write_bytes(location, tmp.read_bytes())


def write_file(location: Location, write: Callable[[Path], None]) -> None:
    """Call `write(path)` to write a file at `location`: directly on local disk (`write` must
    replace the file atomically itself, as ``ChunkRegions.to_npz`` does), into a local temporary
    file that is then PUT as one object on S3."""
    if isinstance(location, Path):
        write(location)
        return
    with upload_from(location) as tmp:
        write(tmp)


@contextlib.contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local path holding the file or object at `location` for the block: the path itself on
    local disk, a temporary download on S3 (removed after)."""
    if isinstance(location, Path):
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="tessera-download-") as folder:
        tmp = Path(folder) / location.name
        tmp.write_bytes(read_bytes(location))
        yield tmp


@contextlib.contextmanager
def scratch_dir(location: Location) -> Iterator[Path]:
    """A local folder for scratch files of work at `location` (a DuckDB sort's spill): the
    location itself on local disk (as before), a local temporary folder for an S3 location
    (removed after): scratch files are never written to object storage."""
    if isinstance(location, Path):
        location.mkdir(parents=True, exist_ok=True)
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="tessera-scratch-") as folder:
        yield Path(folder)
