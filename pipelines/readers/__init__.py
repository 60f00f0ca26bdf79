"""Readers by input format, behind one protocol (:class:`pipelines.readers.base.Reader`).

The job opens and reads every scene through :func:`open_scene` and :func:`read_window`; the
reader is chosen by the file's suffix (:func:`reader_for`), or for a directory no suffix claims,
by its content (a DICOM series), or for a folder URI (``s3://bucket/prefix/``) no suffix claims,
by its form (a DICOM series), and a scene remembers the reader that opened it
(``SceneInfo.format``). Adding a format is one new module with a reader class and one
entry in :data:`READERS`.

=========  ============================================  ===========================
format     suffixes                                      module
=========  ============================================  ===========================
geotiff    .tif .tiff .vrt .jp2 (and any other suffix:   :mod:`.geotiff` (rasterio)
           GDAL tells the formats it opens by content)
dicom      a directory of one series' slices (.dcm       :mod:`.dicom` (pydicom)
           names, or files with the DICOM preamble);
           ``s3://bucket/prefix/``: the objects
           directly under the prefix
nifti      .nii .nii.gz (3D; 4D = channels, ``bands:``   :mod:`.nifti` (nibabel; .nii.gz
           required; .nii.gz converted once to Zarr)      cached as Zarr)
zarr       .zarr (OME-Zarr 0.5 image, or a plain         :mod:`.zarr_volume` (zarr v3)
           (z, y, x) / (c, z, y, x) Zarr v3 array)
stac       ``<items.json>#<item id>``: one item of a      :mod:`.stac` (pystac +
           STAC ItemCollection (job spec ``stac:``),      rasterio)
           its assets stacked on the finest grid
=========  ============================================  ===========================

The longest matching suffix wins (``.nii.gz`` over any reader claiming ``.gz``).

Inputs by URI (:mod:`.remote`): a URI's suffix is that of its path, before any query string.
GeoTIFF / COG from ``https://``, ``http://`` and ``s3://``, Zarr from ``s3://``
and NIfTI (``.nii``, ``.nii.gz``) from all three (:data:`REMOTE_FORMATS`; a NIfTI is downloaded
once, streamed, and converted into the reader's Zarr cache: see :mod:`.nifti`). A DICOM series
from ``s3://`` only, named by its folder with the trailing ``/`` (``s3://bucket/ct/series1/``: the
objects directly under the prefix; its scene is named ``series1``); its objects are downloaded
once into a local cache folder and read there (see :mod:`.dicom`). A series over ``http(s)://`` is
refused (HTTP cannot list a folder: copy it to a local disk, or put it in S3), and so is a single
``.dcm`` object (give its folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.readers.base import COMPLEX_DERIVATIONS, InputPolicy, Reader, SceneInfo, valid_mask
from pipelines.readers.dicom import HTTP_SERIES_REFUSAL, DicomReader, is_dicom_series_dir
from pipelines.readers.geotiff import GeoTiffReader
from pipelines.readers.nifti import NiftiReader
from pipelines.readers.stac import StacReader
from pipelines.readers.zarr_volume import ZarrVolumeReader
from schemas.errors import InputError
from schemas.uris import is_folder_uri, is_uri, redact_uri, split_stac_path, uri_name, uri_scheme

if TYPE_CHECKING:
    from schemas.window import ChunkWindow

__all__ = [
    "COMPLEX_DERIVATIONS",
    "READERS",
    "REMOTE_FORMATS",
    "InputPolicy",
    "Reader",
    "SceneInfo",
    "close_readers",
    "open_scene",
    "read_window",
    "reader_for",
    "is_input_dir",
    "known_suffixes",
    "valid_mask",
]

#: Every reader by format name; the one with the longest suffix matching a path opens it.
READERS: dict[str, Reader] = {
    r.name: r for r in (GeoTiffReader(), DicomReader(), NiftiReader(), ZarrVolumeReader(), StacReader())
}
#: The reader for a path no reader claims by suffix (GDAL recognises its formats by content).
FALLBACK_FORMAT = "geotiff"
#: The formats read from URIs, and the URI schemes each takes (:mod:`pipelines.readers.remote`); a
#: DICOM series only from ``s3://bucket/prefix/`` (a folder URI: HTTP cannot list one).
REMOTE_FORMATS: dict[str, tuple[str, ...]] = {"geotiff": ("http", "https", "s3"), "zarr": ("s3",),
                                              "stac": ("http", "https"), "nifti": ("http", "https", "s3"),
                                              "dicom": ("s3",)}
#: What to do instead, by format, when a URI's scheme is not read for it (the end of the error).
REMOTE_REFUSAL_HINTS: dict[str, str] = {"dicom": HTTP_SERIES_REFUSAL}


def reader_for(path: str | Path) -> Reader:
    """The reader of a path or URI, by its longest matching (lower-case) suffix (a URI's: of its
    path, before any query); a STAC item's path (``<items.json>#<item id>``) is the STAC
    reader's; a directory no suffix claims that holds DICOM files is a DICOM series, and so is a
    folder URI no suffix claims (its path ends with ``/``: ``s3://bucket/ct/series1/``; no I/O);
    GDAL's for any other path."""
    if split_stac_path(str(path)) is not None:
        return READERS[StacReader.name]
    name = (uri_name(str(path)) if is_uri(str(path)) else Path(str(path)).name).lower()
    matches = [(len(s), reader) for reader in READERS.values() for s in reader.suffixes if name.endswith(s)]
    if matches:
        return max(matches, key=lambda m: m[0])[1]
    if is_folder_uri(str(path)) or (not is_uri(str(path)) and is_dicom_series_dir(path)):
        return READERS[DicomReader.name]
    return READERS[FALLBACK_FORMAT]


def is_input_dir(path: str | Path) -> bool:
    """Whether a directory is one input (a DICOM series, or a store a reader claims by suffix,
    such as `.zarr`), so that a glob over inputs matches it."""
    if not Path(path).is_dir():
        return False
    name = Path(str(path)).name.lower()
    return any(name.endswith(s) for reader in READERS.values() for s in reader.suffixes) or is_dicom_series_dir(path)


def open_scene(path: str | Path, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
    """Metadata of one scene through its format's reader (see :meth:`Reader.open`).

    Raises:
        InputError: naming the file: missing, unreadable, or refused by the input policy; a URI
            of a format or scheme not read remotely (:data:`REMOTE_FORMATS`).
    """
    reader = reader_for(path)
    if is_uri(str(path)) and uri_scheme(str(path)) not in REMOTE_FORMATS.get(reader.name, ()):
        takes = [f"{fmt} ({', '.join(s + '://' for s in schemes)})" for fmt, schemes in REMOTE_FORMATS.items()]
        hint = REMOTE_REFUSAL_HINTS.get(reader.name, "copy the file to a local disk and give its path")
        raise InputError(f"{redact_uri(str(path))}: {reader.name} inputs are not read from "
                         f"{uri_scheme(str(path))}:// (remote inputs: {'; '.join(takes)}); {hint}")
    try:
        return reader.open(str(path), policy=policy)
    except InputError as exc:
        if uri_scheme(str(path)) == "s3" and reader.name == FALLBACK_FORMAT and "." not in uri_name(str(path)):
            # no suffix: perhaps a series folder named without its trailing slash
            raise InputError(f"{exc} (if {redact_uri(str(path))} is a folder of DICOM slices, end the URI with "
                             "'/' to name the series)") from None
        raise


def read_window(info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """One halo window of a scene, padded, through the reader that opened it (:meth:`Reader.read`)."""
    return READERS[info.format].read(info, window, bands=bands)


def close_readers() -> None:
    """Close the files every reader keeps open in this process."""
    for reader in READERS.values():
        reader.close()


def known_suffixes() -> tuple[str, ...]:
    """Every file suffix a reader claims (what a scene's name drops: `pipelines.plan.scenes.scene_name`)."""
    return tuple(s for r in READERS.values() for s in r.suffixes)
