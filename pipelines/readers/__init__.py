"""Readers by input format, behind one protocol (:class:`pipelines.readers.base.Reader`).

The job opens and reads every scene through :func:`open_scene` and :func:`read_window`; the
reader is chosen by the file's suffix (:func:`reader_for`), and a scene remembers the reader that
opened it (``SceneInfo.format``). Adding a format is one new module with a reader class and one
entry in :data:`READERS`.

=========  ============================================  ===========================
format     suffixes                                      module
=========  ============================================  ===========================
geotiff    .tif .tiff .vrt .jp2 (and any other suffix:   :mod:`.geotiff` (rasterio)
           GDAL tells the formats it opens by content)
=========  ============================================  ===========================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.readers.base import COMPLEX_DERIVATIONS, InputPolicy, Reader, SceneInfo, valid_mask
from pipelines.readers.geotiff import GeoTiffReader

if TYPE_CHECKING:
    from pipelines.plan.chunks import ChunkWindow

__all__ = [
    "COMPLEX_DERIVATIONS",
    "READERS",
    "InputPolicy",
    "Reader",
    "SceneInfo",
    "close_readers",
    "open_scene",
    "read_window",
    "reader_for",
    "scene_name",
    "valid_mask",
]

#: Every reader by format name; the first whose suffixes match a path opens it.
READERS: dict[str, Reader] = {r.name: r for r in (GeoTiffReader(),)}
#: The reader for a path no reader claims by suffix (GDAL recognises its formats by content).
FALLBACK_FORMAT = "geotiff"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def reader_for(path: str | Path) -> Reader:
    """The reader of a path, by its (lower-case) suffix; GDAL's for any other suffix."""
    name = Path(str(path)).name.lower()
    for reader in READERS.values():
        if any(name.endswith(s) for s in reader.suffixes):
            return reader
    return READERS[FALLBACK_FORMAT]


def open_scene(path: str | Path, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
    """Metadata of one scene through its format's reader (see :meth:`Reader.open`).

    Raises:
        InputError: naming the file: missing, unreadable, or refused by the input policy.
    """
    return reader_for(path).open(str(path), policy=policy)


def read_window(info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """One halo window of a scene, padded, through the reader that opened it (:meth:`Reader.read`)."""
    return READERS[info.format].read(info, window, bands=bands)


def close_readers() -> None:
    """Close the files every reader keeps open in this process."""
    for reader in READERS.values():
        reader.close()


def scene_name(path: str | Path) -> str:
    """A safe output name for a scene: the file name without a reader's suffix, anything but
    [A-Za-z0-9._-] replaced.

    Scene names come from catalogues and file names, which are untrusted: the result can never
    contain a path separator or be '.'/'..', so `<root>/<name>.zarr` stays under the root.
    """
    stem = Path(str(path)).name
    lower = stem.lower()
    for suffix in sorted((s for r in READERS.values() for s in r.suffixes), key=len, reverse=True):
        if lower.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    safe = _SAFE_NAME.sub("_", stem).strip("._-")
    return safe[:200] or "scene"
