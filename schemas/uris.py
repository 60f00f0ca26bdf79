"""Input URIs: which inputs are remote, their names and suffixes, and the credential rule.

A job input is either a local path (or glob) or a URI of one of :data:`REMOTE_SCHEMES`:
``https://host/path/scene.tif``, ``http://...``, ``s3://bucket/key``. A URI is one object (or,
for ``s3://.../image.zarr``, one Zarr store under a prefix; for ``s3://bucket/prefix/``, whose path
ends with ``/``, the folder of objects directly under the prefix: a DICOM series,
:func:`is_folder_uri`); it is never globbed.

Credentials never travel in a URI. A job spec is saved beside the outputs (``job.resolved.json``)
and the input is recorded in ``tables/scenes`` (``source``) and in each store's attributes, so a
URI with inline credentials would leak them into every output. Such a URI (``user:pass@host``,
or a query parameter that carries a secret: ``X-Amz-Signature``, ``X-Amz-Credential``,
``X-Amz-Security-Token``, an Azure SAS ``sig``, ``token``, ``api_key`` ...) is refused when the job
spec is validated, and the error shows it redacted (:func:`redact_uri`). Credentials come from the
standard AWS environment instead (see :mod:`pipelines.readers.remote`).

Pure: no I/O, no third-party imports.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: URI schemes a job input may have (anything else with ``://`` is refused by :func:`check_uri`).
REMOTE_SCHEMES = ("http", "https", "s3")
#: Query parameter names (lower case) that carry a secret.
SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "googleaccessid", "signature", "sig", "token", "access_token", "api_key", "apikey", "key", "password",
    "secret", "code",
})
#: Substrings of a query parameter name that mark it as a secret too (``X-Custom-Token``).
SECRET_PARAM_PARTS = ("signature", "token", "secret", "password", "credential", "apikey", "api_key")
REDACTED = "REDACTED"


def is_uri(text: str) -> bool:
    """Whether an input is a URI (``<scheme>://...``) rather than a local path or glob."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of a URI (``"s3"``, ``"https"``)."""
    return str(uri).partition("://")[0].lower()


def uri_path(uri: str) -> str:
    """The path of a URI before any query string or fragment, without trailing ``/``
    (``s3://bucket/a/b.zarr/`` -> ``/a/b.zarr``); what a reader's suffix and a scene's name come from."""
    return urlsplit(str(uri)).path.rstrip("/")


def is_folder_uri(uri: str) -> bool:
    """Whether a URI names a folder: its path (before any query string) ends with ``/``
    (``s3://bucket/ct/series1/``). A folder no reader claims by suffix is a DICOM series."""
    return is_uri(uri) and urlsplit(str(uri)).path.endswith("/")


def uri_name(uri: str) -> str:
    """The last segment of a URI's path (``https://h/x/scene.tif?v=2`` -> ``scene.tif``), a
    folder's last name for a folder URI (``s3://b/ct/series1/`` -> ``series1``); the bucket for
    ``s3://bucket`` and ``s3://bucket/``."""
    name = uri_path(uri).rsplit("/", 1)[-1]
    return name or urlsplit(str(uri)).hostname or ""


def _secret_param(name: str) -> bool:
    lower = name.lower()
    return lower in SECRET_PARAMS or any(part in lower for part in SECRET_PARAM_PARTS)


def inline_credentials(uri: str) -> list[str]:
    """What in a URI carries credentials: ``"user info"`` for ``user[:pass]@``, and the names of
    query parameters that carry secrets. Empty for a clean URI."""
    parts = urlsplit(str(uri))
    found = ["user info"] if ("@" in parts.netloc) else []
    found += [name for name, _ in parse_qsl(parts.query, keep_blank_values=True) if _secret_param(name)]
    return found


def redact_uri(uri: str) -> str:
    """The URI with any user info and secret query values replaced by ``REDACTED`` (safe to log
    or record); a clean URI or a local path is returned unchanged."""
    text = str(uri)
    if not is_uri(text) or not inline_credentials(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = f"{REDACTED}@{netloc}"
    query = urlencode([(k, REDACTED if _secret_param(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe=REDACTED)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_uri(uri: str) -> None:
    """Refuse a URI tessera cannot take: another scheme than :data:`REMOTE_SCHEMES`, no host or
    bucket, or credentials inline (see the module docstring).

    Raises:
        ValueError: naming the URI (redacted) and what to do.
    """
    shown = redact_uri(uri)
    scheme = uri_scheme(uri)
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{shown}: URI scheme {scheme!r} is not supported (inputs may be local paths or "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)} URIs)")
    secrets = inline_credentials(uri)
    if secrets:
        raise ValueError(
            f"{shown}: the URI carries credentials ({', '.join(secrets)}); they would be saved with the "
            "outputs (job.resolved.json, tables/scenes, store attributes). Give a URI without them and "
            "the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or the cluster's instance role)")
    if not urlsplit(str(uri)).hostname:
        raise ValueError(f"{shown}: the URI names no host (or bucket)")


#: Between a STAC ItemCollection's location and an item id in a STAC scene's path.
STAC_SEPARATOR = "#"


def stac_scene_path(items: str, item_id: str) -> str:
    """The path of the scene a STAC item becomes: ``<ItemCollection path or URL>#<item id>``
    (what ``tables/scenes`` records as its ``source``; see :mod:`pipelines.readers.stac`)."""
    return f"{items}{STAC_SEPARATOR}{item_id}"


def split_stac_path(path: str) -> tuple[str, str] | None:
    """``(items, item id)`` of a STAC scene path (:func:`stac_scene_path`), or None for any other input."""
    items, sep, item_id = str(path).rpartition(STAC_SEPARATOR)
    if not sep or not item_id or not items.lower().split("?", 1)[0].endswith(".json"):
        return None
    return items, item_id
