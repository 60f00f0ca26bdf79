"""DICOM series reader: one directory of single-frame slices -> one (z, y, x) volume.

Opening a series reads the headers only (``dcmread(stop_before_pixels=True)``) of every file in
the directory (not its subdirectories) and decides, before any chunk is planned:

- **One series.** Files of several ``SeriesInstanceUID`` are refused (each UID is named with its
  file count); split them into one directory per series.
- **What is ignored.** Hidden files (``.*``), subdirectories, files without the DICOM preamble
  (``DICM`` at byte 128) that are not named ``*.dcm``, and DICOM files that hold no image (no
  ``Rows``: DICOMDIR, structured reports, presentation states) are ignored; their count and first
  names are logged as a warning at open (``SceneInfo`` has no field for them). A ``*.dcm`` file
  without the preamble, or a DICOM file whose header cannot be parsed, is refused.
- **Slice order.** Slices are sorted by their position along the slice normal,
  ``n = row_cosines x col_cosines`` (``ImageOrientationPatient``), position ``n . IPP``; never by
  InstanceNumber or file name. Orientation (within 1e-4), Rows, Columns, PixelSpacing, bit depth,
  signedness and photometric interpretation must agree across slices. Positions must be evenly
  spaced within ``max(0.01 mm, 1 %)`` of the median spacing: a missing slice (a gap of about twice
  the spacing), duplicated positions (several echoes, phases or acquisitions in one series) or
  uneven spacing are refused, naming the positions and files around the fault. The slice origins
  must lie on one line (``IPP_k = IPP_0 + k * step``); a gantry tilt (step not along the normal)
  gives a sheared affine.
- **Pixel encodings.** Every file's transfer syntax must have a pydicom decoder whose
  dependencies are installed (``pydicom.pixels.get_decoder(uid).is_available``): native and
  deflated encodings and RLE need only numpy; JPEG, JPEG-LS and JPEG 2000 need an extra package,
  named in the error. Multi-frame (Enhanced) objects, colour images and Modality LUT sequences are
  refused.

Geometry. Array axes ``(z, y, x)`` = (slice in sorted order, row, column). DICOM patient
coordinates are LPS; tessera's affine is RAS, so the first two rows of the LPS affine change sign.
With ``ImageOrientationPatient = [row cosines (direction of increasing column index), column
cosines (direction of increasing row index)]`` and ``PixelSpacing = [between rows, between
columns]`` (mm), the LPS position of voxel ``(k, r, c)`` is::

    IPP_0 + k * step + r * PixelSpacing[0] * col_cosines + c * PixelSpacing[1] * row_cosines

with ``step = (IPP_last - IPP_0) / (n - 1)`` (for one slice: the normal times
SpacingBetweenSlices, else SliceThickness). ``spacing = (|step|, PixelSpacing[0], PixelSpacing[1])``.

Values. ``RescaleSlope`` / ``RescaleIntercept`` (CT: Hounsfield units) are applied per slice, in
float64, and returned as float32 whenever any slice's pair is not ``(1, 0)``; otherwise the stored
integer type is returned unchanged (``source_dtype`` is always the stored type). MONOCHROME1
values are not inverted (they are values, not display levels). One channel; ``nodata`` None.

Reading a window decodes only the slices of its z range (``dcmread`` of those files), cuts rows
and columns and reflect-pads it to the full window. Each process keeps the sorted series index of
its last few directories and an LRU cache of decoded slices (stored values, bounded by
:data:`SLICE_CACHE_MB`) that neighbouring halo windows share.

Series in object storage. ``s3://bucket/prefix/`` (the path ends with ``/``: a folder URI,
``schemas.uris.is_folder_uri``) names the series made of the objects *directly* under the prefix
(not those of its sub-folders); the trailing ``/`` is required (without it the URI names one
object, and a ``.dcm`` object alone is refused with its folder's URI to give instead). HTTP(S)
cannot list a folder, so a series at an ``http(s)://`` URI is refused (copy it to a local disk, or
put it in S3).

- Identity: the listing of those objects (key, ETag, size; ``remote.list_folder``, every page)
  hashed with the URI, the same value the job records as the scene's ``input_sha256``
  (``remote_input_sha256(uri, is_store=True, recursive=False)``).
- Cache: at open the objects are downloaded (streamed, several at a time, each GET conditional on
  the ETag listed; hidden names ``.*`` are skipped, as locally) into
  ``<cache_dir>/<folder name>-<URI hash>-<identity[:12]>.dicom`` (``InputPolicy.cache_dir``: the
  job's ``<root>/_work/inputs``, else ``tessera-inputs`` in the system temp dir). They go into a
  hidden ``.<entry>.partial-*`` sibling renamed into place when complete, so a half-downloaded
  series is never taken for a complete one; when several processes race, the first rename wins
  and the others delete their copy and use it. An entry present is reused without downloading
  (a re-open lists the prefix only); earlier entries of the same URI (other identities) are
  deleted once a new one is complete; a crash may leave a ``.*.partial-*`` folder to delete.
- Then :func:`scan_series` checks the local copy as it checks a local folder, its errors naming
  the URI and the objects (``s3://bucket/prefix/IM0004.dcm``), never the cache folder; a
  refused series keeps no cache entry. ``SceneInfo.path`` stays the URI (tables and messages show
  it), ``SceneInfo.data_path`` is the cache entry. A read in a process (node) where the entry is
  missing lists the prefix again and, if its identity is unchanged, downloads it there; if the
  objects changed since the open (added, removed, replaced), the read fails: run the job again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from pipelines.readers.base import InputPolicy, SceneInfo, check_dtype, finish_window, input_cache_folder
from pipelines.readers.remote import download_folder, folder_object_name, list_folder, listing_identity
from schemas.errors import InputError
from schemas.uris import is_folder_uri, is_uri, redact_uri, uri_name, uri_scheme
from schemas.window import ChunkWindow

logger = logging.getLogger(__name__)

DICOM_SUFFIX = ".dcm"
#: Byte offset of the ``DICM`` magic after the 128-byte preamble of a DICOM Part 10 file.
PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
#: How many files `is_dicom_series_dir` opens to look for the magic when no name ends in .dcm.
SNIFF_FILES = 8
#: Equal orientation: largest difference of the direction cosines across slices.
ORIENTATION_ATOL = 1e-4
#: Equal pixel spacing across slices, mm.
PIXEL_SPACING_ATOL_MM = 1e-4
#: Slice positions are even when within max(SPACING_ATOL_MM, SPACING_RTOL * spacing) of the grid.
SPACING_ATOL_MM = 0.01
SPACING_RTOL = 0.01
#: Decoded slices kept per process (stored values; a 512 x 512 int16 slice is 0.5 MiB).
SLICE_CACHE_MB = 128
#: Sorted series indexes kept per process.
MAX_CACHED_SERIES = 4
#: How many ignored file names the open warning quotes.
QUOTE_NAMES = 5
#: Suffix of the cache folder of a series downloaded from S3 (see the module docstring).
CACHE_SUFFIX = ".dicom"
#: Why a series is not read over HTTP(S), and what to do instead (the end of its error message).
HTTP_SERIES_REFUSAL = ("a DICOM series is a folder of objects and HTTP(S) cannot list a folder: copy the series to "
                       "a local disk and give its folder, or put it in S3 and give s3://bucket/prefix/ (the "
                       "trailing '/' names the folder)")

#: What to install for transfer syntaxes pydicom decodes only with an extra package.
_INSTALL_HINTS = (
    (JPEG2000TransferSyntaxes, "pylibjpeg + pylibjpeg-openjpeg (or Pillow built with OpenJPEG, or python-gdcm)"),
    (JPEGLSTransferSyntaxes, "pyjpegls (or pylibjpeg + pylibjpeg-libjpeg, or python-gdcm)"),
    (JPEGTransferSyntaxes, "pylibjpeg + pylibjpeg-libjpeg (or Pillow for 8-bit baseline, or python-gdcm)"),
)


@dataclass(frozen=True)
class DicomSeries:
    """The sorted index of one series directory (headers only); small and picklable.

    Attributes:
        directory: the directory as given (for a series in S3: its local cache folder).
        files: file names (in `directory`) in array z order.
        slopes, intercepts: ``RescaleSlope`` / ``RescaleIntercept`` per slice, z order.
        shape: ``(z, rows, cols)`` voxels.
        source_dtype: numpy dtype name of the stored values.
        dtype: numpy dtype name of the values returned (float32 when rescaled).
        affine: 4x4 voxel ``(z, y, x)`` -> RAS mm, row-major 16 floats.
        spacing: ``(|step|, between rows, between columns)`` mm.
        orientation: RAS axis codes of the array axes (e.g. ``"SAR"``).
        transfer_syntaxes: the transfer syntax UIDs of the files.
        ignored: names of the directory entries ignored (see the module docstring).
    """

    directory: str
    files: tuple[str, ...]
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]
    shape: tuple[int, int, int]
    source_dtype: str
    dtype: str
    affine: tuple[float, ...]
    spacing: tuple[float, float, float]
    orientation: str
    transfer_syntaxes: tuple[str, ...]
    ignored: tuple[str, ...]

    @property
    def rescaled(self) -> bool:
        """Whether any slice has a rescale other than ``(1, 0)``."""
        return any(s != 1.0 or i != 0.0 for s, i in zip(self.slopes, self.intercepts, strict=True))


def _has_magic(path: str) -> bool:
    """Whether the file has ``DICM`` after a 128-byte preamble (DICOM Part 10)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(PREAMBLE_LENGTH)
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _files(directory: str) -> list[str]:
    """Names of the regular, non-hidden files directly in `directory`, sorted."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())


def is_dicom_series_dir(path: str | Path) -> bool:
    """Whether `path` is a directory that holds DICOM files: a ``*.dcm`` name, or the ``DICM``
    magic in one of its first :data:`SNIFF_FILES` files (by name)."""
    path = str(path)
    if not os.path.isdir(path):
        return False
    try:
        names = _files(path)
    except OSError:
        return False
    if any(n.lower().endswith(DICOM_SUFFIX) for n in names):
        return True
    return any(_has_magic(os.path.join(path, n)) for n in names[:SNIFF_FILES])


def _install_hint(uid: UID) -> str:
    for family, hint in _INSTALL_HINTS:
        if uid in family:
            return hint
    return "a pydicom decoding plugin for it"


def _check_decodable(directory: str, uid_by_file: dict[str, str]) -> None:
    """Refuse transfer syntaxes pydicom cannot decode with what is installed (names a file)."""
    first: dict[str, str] = {}
    for name, uid in uid_by_file.items():
        first.setdefault(uid, name)
    for uid_str, name in sorted(first.items()):
        uid = UID(uid_str)
        label = f"{uid.name} ({uid_str})" if uid.name != uid_str else f"transfer syntax {uid_str}"
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise InputError(f"{directory}/{name}: pixel data in {label}, which pydicom has no decoder for; "
                             "convert the series to an uncompressed transfer syntax") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "none listed"
            raise InputError(
                f"{directory}/{name}: pixel data in {label}, which no installed package decodes "
                f"(pydicom reports missing: {missing}); install {_install_hint(uid)} in the environment "
                "of every worker, or convert the series to an uncompressed transfer syntax")


def _float_tuple(ds: pydicom.Dataset, keyword: str, n: int, where: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        values = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        values = ()
    if len(values) != n or not np.all(np.isfinite(values)):
        raise InputError(f"{where}: {keyword} must be {n} finite numbers, got {value!r}")
    return values


def _scalar(ds: pydicom.Dataset, keyword: str, default: float, where: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise InputError(f"{where}: {keyword} must be a finite number, got {value!r}")
    return number


def _axis_codes(affine_ras: np.ndarray) -> str:
    """RAS axis codes of the three array axes: each axis gets the scanner axis that, over all
    assignments of distinct scanner axes, maximises the summed |cosine|; the letter names the
    direction of increasing index (nibabel's convention)."""
    columns = affine_ras[:3, :3]
    best = max(permutations(range(3)), key=lambda p: sum(abs(columns[p[a], a]) for a in range(3)))
    letters = ("LR", "PA", "IS")
    return "".join(letters[row][int(columns[row, a] > 0)] for a, row in enumerate(best))


def _group_by_series(directory: str, headers: dict[str, pydicom.Dataset]) -> None:
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in headers.values())
    if len(series) > 1:
        examples = {}
        for name, ds in headers.items():
            examples.setdefault(str(ds.get("SeriesInstanceUID", "")), name)
        listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {count} files, e.g. {examples[uid]}"
                            for uid, count in sorted(series.items()))
        raise InputError(f"{directory}: holds {len(series)} DICOM series ({listing}); "
                         "split them into one directory per series")


def _check_equal(directory: str, headers: dict[str, pydicom.Dataset], keyword: str) -> object:
    values: dict[str, list[str]] = {}
    for name, ds in headers.items():
        values.setdefault(repr(ds.get(keyword)), []).append(name)
    if len(values) > 1:
        listing = "; ".join(f"{v} in {len(n)} files, e.g. {n[0]}" for v, n in values.items())
        raise InputError(f"{directory}: {keyword} differs between slices ({listing}); "
                         "one series must have one slice geometry and encoding")
    return next(iter(headers.values())).get(keyword)


def _slice_positions(directory: str, names: list[str], ipps: np.ndarray, normal: np.ndarray,
                     ) -> tuple[np.ndarray, float]:
    """Sort slices along `normal` and check their spacing.

    Returns:
        (order, spacing): indexes of `names` in z order; the median spacing along the normal, mm.

    Raises:
        InputError: duplicated positions, a missing slice or uneven spacing, naming the positions
            (mm along the normal) and files around the fault.
    """
    positions = ipps @ normal
    order = np.lexsort((np.array(names), positions))
    sorted_pos = positions[order]
    if len(order) < 2:
        return order, 0.0
    gaps = np.diff(sorted_pos)
    spacing = float(np.median(gaps))
    tol = max(SPACING_ATOL_MM, SPACING_RTOL * spacing)

    def around(i: int) -> str:
        return (f"{sorted_pos[i]:.4f} mm ({names[order[i]]}) and {sorted_pos[i + 1]:.4f} mm "
                f"({names[order[i + 1]]})")

    for i, gap in enumerate(gaps):
        if gap <= tol:
            raise InputError(
                f"{directory}: two slices at the same position along the slice normal: {around(i)}; "
                "several echoes, phases or acquisitions in one series? split them into one directory each")
    for i, gap in enumerate(gaps):
        if abs(gap - spacing) <= tol:
            continue
        multiple = round(gap / spacing)
        if multiple >= 2 and abs(gap - multiple * spacing) <= tol * multiple:
            raise InputError(
                f"{directory}: {multiple - 1} slice(s) missing between {around(i)}: a gap of {gap:.4f} mm "
                f"where the series' spacing is {spacing:.4f} mm; restore the missing files")
        raise InputError(
            f"{directory}: uneven slice spacing: {gap:.4f} mm between {around(i)}, where the median spacing "
            f"is {spacing:.4f} mm (tolerance {tol:.4f} mm); a volume needs evenly spaced slices")
    return order, spacing


def _check_slices(directory: str, headers: dict[str, pydicom.Dataset]) -> None:
    """Refuse multi-frame, colour, Modality LUT and unplaceable (no position, orientation or
    pixel spacing) slices, naming the file."""
    for name, ds in headers.items():
        where = f"{directory}/{name}"
        frames = ds.get("NumberOfFrames")
        if (frames is not None and int(frames) > 1) or "PerFrameFunctionalGroupsSequence" in ds:
            raise InputError(f"{where}: a multi-frame (Enhanced) DICOM object ({frames} frames); only series "
                             "of single-frame slices are supported: convert it to single-frame files")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{where}: {ds.SamplesPerPixel} samples per pixel "
                             f"({ds.get('PhotometricInterpretation')}); only grey images are supported")
        if "ModalityLUTSequence" in ds:
            raise InputError(f"{where}: a Modality LUT Sequence; only RescaleSlope/RescaleIntercept "
                             "are supported")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise InputError(f"{where}: no {keyword}; the slice cannot be placed in a volume")



def _volume_geometry(directory: str, headers: dict[str, pydicom.Dataset],
                     ) -> tuple[tuple[str, ...], np.ndarray, tuple[float, float, float]]:
    """Sort the slices along their normal and build the voxel -> RAS affine (module docstring).

    Returns:
        ``(files, ras, spacing)``: file names in z order; the 4x4 float64 affine, voxel
        ``(z, y, x)`` -> RAS mm; ``(|step|, between rows, between columns)`` in mm.

    Raises:
        InputError: unequal orientation or pixel spacing, a non-orthonormal orientation, uneven
            or duplicated positions, origins off one line, or one slice without a thickness.
    """
    names = list(headers)
    iops = np.array([_float_tuple(headers[n], "ImageOrientationPatient", 6, f"{directory}/{n}") for n in names])
    spacings = np.array([_float_tuple(headers[n], "PixelSpacing", 2, f"{directory}/{n}") for n in names])
    ipps = np.array([_float_tuple(headers[n], "ImagePositionPatient", 3, f"{directory}/{n}") for n in names])
    for values, atol, keyword, unit in ((iops, ORIENTATION_ATOL, "ImageOrientationPatient", ""),
                                        (spacings, PIXEL_SPACING_ATOL_MM, "PixelSpacing", " mm")):
        far = np.flatnonzero(np.abs(values - values[0]).max(axis=1) > atol)
        if far.size:
            raise InputError(f"{directory}: {keyword} differs between slices: {values[0].tolist()}{unit} in "
                             f"{names[0]}, {values[far[0]].tolist()}{unit} in {names[far[0]]}; "
                             "one series must have one slice geometry")
    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    if (abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3
            or abs(row_cos @ col_cos) > 1e-3):
        raise InputError(f"{directory}/{names[0]}: ImageOrientationPatient {iops[0].tolist()} is not two "
                         "orthogonal unit vectors")
    row_spacing, col_spacing = spacings[0]
    if row_spacing <= 0 or col_spacing <= 0:
        raise InputError(f"{directory}/{names[0]}: PixelSpacing {spacings[0].tolist()} mm must be > 0")
    normal = np.cross(row_cos, col_cos)

    order, _ = _slice_positions(directory, names, ipps, normal)
    files = tuple(names[i] for i in order)
    origins = ipps[order]
    n = len(files)
    if n == 1:
        ds = headers[files[0]]
        thickness = _scalar(ds, "SpacingBetweenSlices", 0.0, f"{directory}/{files[0]}") or _scalar(
            ds, "SliceThickness", 0.0, f"{directory}/{files[0]}")
        if thickness <= 0:
            raise InputError(f"{directory}/{files[0]}: a single slice without SpacingBetweenSlices or "
                             "SliceThickness; its z spacing is unknown")
        step = normal * thickness
    else:
        step = (origins[-1] - origins[0]) / (n - 1)
        tol = max(SPACING_ATOL_MM, SPACING_RTOL * float(np.linalg.norm(step)))
        off = np.linalg.norm(origins - (origins[0] + np.arange(n)[:, None] * step), axis=1)
        worst = int(np.argmax(off))
        if off[worst] > tol:
            raise InputError(
                f"{directory}/{files[worst]}: ImagePositionPatient {origins[worst].tolist()} is {off[worst]:.4f} mm "
                f"off the line through the first ({files[0]}) and last ({files[-1]}) slice origins "
                f"(tolerance {tol:.4f} mm); the slices do not form one regular volume")

    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = row_spacing * col_cos
    lps[:3, 2] = col_spacing * row_cos
    lps[:3, 3] = origins[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    spacing = (float(np.linalg.norm(step)), float(row_spacing), float(col_spacing))
    return files, ras, spacing

def scan_series(directory: str, *, policy: InputPolicy = InputPolicy(), source: str | None = None) -> DicomSeries:
    """Read every header of a series directory, check it is one evenly spaced volume, sort it.

    Args:
        directory: a directory of single-frame DICOM slices of one series.
        policy: the job's input policy (integer and float32 values pass it).
        source: what the errors and warnings name instead of `directory`, a file as
            ``<source>/<name>``: for a series downloaded from S3, its URI without the trailing
            ``/`` (so a file is named by its object's URI); default `directory`.

    Returns:
        The series index (see :class:`DicomSeries`).

    Raises:
        InputError: naming the directory (and file): see the module docstring for what is refused.
    """
    shown = source or directory
    if not os.path.exists(directory):
        raise InputError(f"{shown}: directory not found")
    if not os.path.isdir(directory):
        if directory.lower().endswith(DICOM_SUFFIX) or _has_magic(directory):
            raise InputError(f"{directory}: a single DICOM file; a series is read from its directory: "
                             f"pass {os.path.dirname(directory) or '.'} (one series per directory)")
        raise InputError(f"{directory}: not a directory of DICOM files")
    try:
        entries = _files(directory)
    except OSError as exc:
        raise InputError(f"{shown}: cannot list the series directory: {exc}") from None
    headers: dict[str, pydicom.Dataset] = {}
    ignored: list[str] = []
    for name in entries:
        path = os.path.join(directory, name)
        where = f"{source}/{name}" if source else path
        if not _has_magic(path):
            if name.lower().endswith(DICOM_SUFFIX):
                raise InputError(f"{where}: no DICOM preamble ('DICM' at byte 128); rewrite it as a "
                                 "DICOM Part 10 file or move it out of the series directory")
            ignored.append(name)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InputError(f"{where}: unreadable DICOM header: {exc}") from None
        if "Rows" not in ds:
            ignored.append(name)
            continue
        headers[name] = ds
    if not headers:
        raise InputError(f"{shown}: no DICOM image files ({len(ignored)} other files ignored)")
    if ignored:
        logger.warning("%s: ignored %d entries that are not DICOM images: %s%s", shown, len(ignored),
                       ", ".join(ignored[:QUOTE_NAMES]), ", ..." if len(ignored) > QUOTE_NAMES else "")
    # from here on, `shown` names the series in the errors (a file: "<shown>/<name>")
    _group_by_series(shown, headers)
    _check_slices(shown, headers)

    uid_by_file = {}
    for name, ds in headers.items():
        uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if not uid:
            raise InputError(f"{shown}/{name}: the file meta has no TransferSyntaxUID")
        uid_by_file[name] = str(uid)
    _check_decodable(shown, uid_by_file)

    rows = int(_check_equal(shown, headers, "Rows"))
    cols = int(_check_equal(shown, headers, "Columns"))
    bits = int(_check_equal(shown, headers, "BitsAllocated"))
    signed = int(_check_equal(shown, headers, "PixelRepresentation"))
    _check_equal(shown, headers, "PhotometricInterpretation")
    if bits not in (8, 16, 32):
        raise InputError(f"{shown}: BitsAllocated {bits}; 8, 16 and 32 are supported")
    source_dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").name

    files, ras, spacing = _volume_geometry(shown, headers)
    slopes = tuple(_scalar(headers[f], "RescaleSlope", 1.0, f"{shown}/{f}") for f in files)
    intercepts = tuple(_scalar(headers[f], "RescaleIntercept", 0.0, f"{shown}/{f}") for f in files)
    rescaled = any(s != 1.0 or i != 0.0 for s, i in zip(slopes, intercepts, strict=True))
    dtype, _ = check_dtype(shown, ("float32" if rescaled else source_dtype,), policy)
    return DicomSeries(
        directory=directory,
        files=files,
        slopes=slopes,
        intercepts=intercepts,
        shape=(len(files), rows, cols),
        source_dtype=source_dtype,
        dtype=dtype,
        affine=tuple(float(v) for v in ras.ravel()),
        spacing=spacing,
        orientation=_axis_codes(ras),
        transfer_syntaxes=tuple(sorted(set(uid_by_file.values()))),
        ignored=tuple(ignored),
    )


_series_cache: OrderedDict[tuple[str, int], DicomSeries] = OrderedDict()
_slice_cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_slice_cache_bytes = 0


def _series_key(directory: str, shown: str | None = None) -> tuple[str, int]:
    try:
        return directory, os.stat(directory).st_mtime_ns
    except OSError as exc:
        raise InputError(f"{shown or directory}: cannot read the series directory: {exc}") from None


def _remember(key: tuple[str, int], series: DicomSeries) -> None:
    _series_cache[key] = series
    _series_cache.move_to_end(key)
    while len(_series_cache) > MAX_CACHED_SERIES:
        _series_cache.popitem(last=False)


def _shown(path: str) -> str:
    """How errors name a series: a URI redacted and without its trailing ``/`` (a file of it is
    then ``<shown>/<name>``, its object's URI); a local path as given."""
    return redact_uri(path).rstrip("/") if is_uri(path) else path


def remote_series_entry(uri: str, identity: str, cache_dir: str | None) -> Path:
    """The cache folder of a series in S3: keyed by its folder name, the URI and the identity of
    its listing (:func:`pipelines.readers.remote.listing_identity`), so that every node names it
    alike and a changed series gets another entry."""
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uri_name(uri))
    uri_hash = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return input_cache_folder(cache_dir) / f"{stem or 'series'}-{uri_hash}-{identity[:12]}{CACHE_SUFFIX}"


def _check_series_uri(uri: str) -> None:
    """Refuse a URI that does not name a series folder in S3 (see the module docstring)."""
    shown = _shown(uri)
    if uri_scheme(uri) != "s3":
        raise InputError(f"{shown}: {HTTP_SERIES_REFUSAL}")
    if not is_folder_uri(uri):
        folder = shown.rsplit("/", 1)[0] + "/"
        raise InputError(f"{shown}: names one object, not a series folder; a DICOM series in S3 is the objects "
                         f"directly under a prefix: give its folder with the trailing '/' ({folder})")


def _download_series(uri: str, rows: list[dict], entry: Path) -> None:
    """Download the listed objects of a series (hidden names skipped) into a temporary sibling of
    `entry`, renamed to `entry` when complete; a process that loses the race to another keeps
    the other's entry. Earlier entries of the same URI are deleted after.

    Raises:
        InputError: an object missing, replaced since the listing, or unreadable (naming its URI).
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.with_name(f".{entry.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        download_folder(uri, [r for r in rows if not folder_object_name(uri, r["key"]).startswith(".")], partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, entry)
    except OSError as exc:  # another process completed the same entry first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not entry.is_dir():
            raise InputError(f"{_shown(uri)}: cannot move the downloaded series into its cache folder "
                             f"{entry}: {exc}") from None
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for stale in entry.parent.glob(f"{prefix}*{CACHE_SUFFIX}"):  # earlier versions of the same series
        if stale.name != entry.name:
            shutil.rmtree(stale, ignore_errors=True)


def _local_copy(info: SceneInfo) -> str:
    """The folder a scene's slices are read from: its directory, or for a series in S3 its cache
    entry, downloaded again here if missing (another node) after checking that the listing still
    has the identity the entry was opened with.

    Raises:
        InputError: the objects under the prefix changed since the open (run the job again).
    """
    if info.data_path is None:
        return info.path
    entry = Path(info.data_path)
    if not entry.is_dir() and is_uri(info.path):
        rows = list_folder(info.path)
        if remote_series_entry(info.path, listing_identity(info.path, rows), str(entry.parent)) != entry:
            raise InputError(f"{redact_uri(info.path)}: the objects under this prefix changed after the series was "
                             "opened (an object added, removed or replaced); run the job again")
        _download_series(info.path, rows, entry)
    return str(entry)


def _series(info: SceneInfo) -> DicomSeries:
    """The series index of a scene in this process: scanned again in a process that did not open
    it, or after the directory changed, and then checked against what :meth:`DicomReader.open` saw."""
    directory = _local_copy(info)
    shown = _shown(info.path)
    key = _series_key(directory, shown)
    series = _series_cache.get(key)
    if series is None:
        series = scan_series(directory, source=shown if info.data_path is not None else None)
        if (series.shape, series.affine, series.dtype) != (info.shape, info.affine, info.dtype):
            raise InputError(f"{shown}: the series changed since it was opened (now shape {series.shape}, "
                             f"dtype {series.dtype}; then {info.shape}, {info.dtype}); run the job again")
    _remember(key, series)
    return series


def _stored_slice(series: DicomSeries, z: int) -> np.ndarray:
    """Stored values ``(rows, cols)`` of slice `z`, from this process's LRU cache or decoded."""
    global _slice_cache_bytes
    path = os.path.join(series.directory, series.files[z])
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    pixels = _slice_cache.get(key)
    if pixels is not None:
        _slice_cache.move_to_end(key)
        return pixels
    pixels = pydicom.dcmread(path).pixel_array
    if pixels.shape != series.shape[1:]:
        raise ValueError(f"decoded shape {pixels.shape}, expected {series.shape[1:]}")
    pixels = pixels.astype(series.source_dtype, copy=False)
    pixels.flags.writeable = False
    if pixels.nbytes <= SLICE_CACHE_MB * 2**20:
        _slice_cache[key] = pixels
        _slice_cache_bytes += pixels.nbytes
        while _slice_cache_bytes > SLICE_CACHE_MB * 2**20:
            _slice_cache_bytes -= _slice_cache.popitem(last=False)[1].nbytes
    return pixels


def clear_caches() -> None:
    """Forget every series index and decoded slice this process keeps."""
    global _slice_cache_bytes
    _series_cache.clear()
    _slice_cache.clear()
    _slice_cache_bytes = 0


class DicomReader:
    """A DICOM series directory (single-frame slices) as one (z, y, x) volume, read slice by slice."""

    name = "dicom"
    suffixes = (DICOM_SUFFIX,)

    def open(self, path: str, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
        """A series' metadata from its headers (see :func:`scan_series` for what is checked); a
        series in S3 (``s3://bucket/prefix/``) is downloaded to its cache folder first.

        Raises:
            InputError: naming the directory (or URI) and file: see the module docstring.
        """
        path = str(path)
        if is_uri(path):
            return self._open_remote(path, policy)
        key = _series_key(path) if os.path.isdir(path) else None
        series = scan_series(path, policy=policy)
        if key is not None:
            _remember(key, series)
        return self._info(path, series)

    def _open_remote(self, uri: str, policy: InputPolicy) -> SceneInfo:
        """A series at ``s3://bucket/prefix/``: its objects listed, downloaded into the cache entry
        of that listing unless it is there, and scanned there (see the module docstring)."""
        _check_series_uri(uri)
        rows = list_folder(uri)
        entry = remote_series_entry(uri, listing_identity(uri, rows), policy.cache_dir)
        if not entry.is_dir():
            _download_series(uri, rows, entry)
        try:
            series = scan_series(str(entry), policy=policy, source=_shown(uri))
        except InputError:
            shutil.rmtree(entry, ignore_errors=True)  # a refused series keeps no copy
            raise
        _remember(_series_key(str(entry)), series)
        return self._info(uri, series, data_path=str(entry))

    def _info(self, path: str, series: DicomSeries, data_path: str | None = None) -> SceneInfo:
        return SceneInfo(
            path=path,
            shape=series.shape,
            count=1,
            dtype=series.dtype,
            crs_wkt=None,
            crs=None,
            transform=None,
            nodata=None,
            block_shape=(1, *series.shape[1:]),
            format=self.name,
            source_dtype=series.source_dtype,
            affine=series.affine,
            spacing=series.spacing,
            orientation=series.orientation,
            data_path=data_path,
        )

    def read(self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """One halo window: decode the slices of its z range, cut rows and columns, rescale, pad.

        Returns:
            ``(pixels, valid)``: pixels ``(1, z, y, x)`` of ``info.dtype`` (rescaled per slice),
            valid ``(z, y, x)`` bool (all True: no nodata), reflect-padded to the full window.

        Raises:
            InputError: naming the file and window when a slice cannot be decoded, or the bands
                ask for a channel other than 1.
        """
        if bands is not None and tuple(bands) != (1,):
            raise InputError(f"{_shown(info.path)}: a DICOM series has one channel; bands {list(bands)} ask for "
                             "others (set bands: [1] or leave it out)")
        series = _series(info)
        zs, rs, cs = window.read
        pixels = np.empty((1, *window.read_shape), dtype=info.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            try:
                stored = _stored_slice(series, z)
            except (InvalidDicomError, OSError, ValueError, RuntimeError, NotImplementedError, EOFError) as exc:
                raise InputError(f"{_shown(info.path)}/{series.files[z]}: decoding slice {z} for window "
                                 f"{list(window.index)} failed: {exc}") from None
            cut = stored[rs, cs]
            if series.rescaled:
                pixels[0, i] = cut * series.slopes[z] + series.intercepts[z]
            else:
                pixels[0, i] = cut
        return finish_window(pixels, window, info)

    def close(self) -> None:
        clear_caches()
