"""Scenes of a job: input patterns -> paths, safe unique scene names, and each scene's fingerprint."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.errors import InputError
from schemas.uris import is_uri, split_stac_path, uri_name

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


MANIFEST_PREFIX = "@"

"""An input entry `@<file>` names a manifest: a text file listing one input (path, glob or URI)
per line; blank lines and '#' comments are ignored, relative entries are relative to the
manifest's own folder."""


def read_manifest(path: Path) -> list[str]:
    """The entries of a manifest file, relative ones made relative to its folder.

    Args:
        path: the manifest (one path, glob or URI per line; '#' starts a comment).

    Returns:
        The entries in file order: absolute paths, globs or URIs (``scheme://...``) as written,
        relative ones joined to the manifest's folder.

    Raises:
        InputError: the manifest is missing or unreadable, or names another manifest (names the file).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: input manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read input manifest: {exc}") from None
    entries = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.startswith(MANIFEST_PREFIX):
            raise InputError(f"{path}: a manifest lists inputs, not other manifests ({entry})")
        if "://" not in entry and not os.path.isabs(os.path.expanduser(entry)):
            entry = str(path.parent / entry)
        entries.append(entry)
    return entries


def manifest_path(entry: str, *, base_dir: Path) -> Path | None:
    """The manifest file an input entry names (`@scenes.txt`, relative to base_dir), or None
    for an ordinary path or glob."""
    if not entry.startswith(MANIFEST_PREFIX):
        return None
    path = Path(entry[len(MANIFEST_PREFIX):]).expanduser()
    return path if path.is_absolute() else base_dir / path


def expand_manifests(patterns: tuple[str, ...], *, base_dir: Path) -> list[str]:
    """The input patterns with every `@manifest` entry replaced by its entries (one level: a
    manifest does not name other manifests).

    Raises:
        InputError: a manifest is missing or unreadable, or names another manifest.
    """
    out: list[str] = []
    for pattern in patterns:
        path = manifest_path(pattern, base_dir=base_dir)
        if path is None:
            out.append(pattern)
            continue
        out.extend(read_manifest(path))
    return out


def expand_inputs(patterns: tuple[str, ...], *, base_dir: Path,
                  is_input_dir: Callable[[str], bool] = lambda path: False) -> tuple[list[str], list[str]]:
    """Expand paths/globs (relative ones against base_dir), and manifests (`@scenes.txt`: see
    `read_manifest`).

    A glob matches files, and the directories `is_input_dir` accepts (a DICOM series, a Zarr
    store: `pipelines.readers.is_input_dir`); a plain path may be either. A URI
    (``https://``, ``s3://``: `schemas.uris.is_uri`) is one input and passes through as given:
    never globbed (``*`` and ``?`` are ordinary characters of an object key or a query), never
    checked here (its reader opens it, and a missing object fails its scene alone).

    Returns:
        (paths, unmatched): sorted unique existing paths and URIs, and patterns that matched nothing.

    Raises:
        InputError: a manifest is missing or unreadable.
    """
    paths: set[str] = set()
    unmatched: list[str] = []
    for pattern in expand_manifests(patterns, base_dir=base_dir):
        if is_uri(pattern):
            paths.add(pattern)
            continue
        full = pattern if os.path.isabs(os.path.expanduser(pattern)) else str(base_dir / pattern)
        full = os.path.expanduser(full)
        if glob.has_magic(full):
            found = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p) or is_input_dir(p)]
        else:
            found = [full] if os.path.exists(full) else []
        if not found:
            unmatched.append(pattern)
        paths.update(os.path.normpath(p) for p in found)
    return sorted(paths), unmatched


def scene_name(path: str | Path, *, suffixes: tuple[str, ...] = ()) -> str:
    """A safe output name for a scene: the file name (of a URI: the last segment of its path,
    before any query) without the longest of `suffixes` it ends with (case-insensitive; the
    readers' suffixes, `pipelines.readers.known_suffixes`), anything but [A-Za-z0-9._-] replaced;
    a STAC item's scene (`schemas.uris.stac_scene_path`) is named by its item id.

    Scene names come from catalogues and file names, which are untrusted: the result can never
    contain a path separator or be '.'/'..', so `<root>/<name>.zarr` stays under the root.
    """
    stac = split_stac_path(str(path))
    if stac is not None:  # a STAC item's scene is named by the item id
        return _SAFE_NAME.sub("_", stac[1]).strip("._-")[:200] or "scene"
    stem = uri_name(str(path)) if is_uri(str(path)) else Path(str(path)).name
    lower = stem.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix.lower()):
            stem = stem[: -len(suffix)]
            break
    safe = _SAFE_NAME.sub("_", stem).strip("._-")
    return safe[:200] or "scene"


def assign_scene_names(paths: list[str], *, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Safe, unique scene names in input order (a repeated stem gets '-2', '-3', ...); see
    `scene_name`."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        base = scene_name(path, suffixes=suffixes)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def scene_fingerprint(parameters: dict[str, Any], input_sha256: str) -> str:
    """SHA-256 of the job parameters that change output bytes and the input's checksum."""
    payload = json.dumps({**parameters, "input_sha256": input_sha256}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
