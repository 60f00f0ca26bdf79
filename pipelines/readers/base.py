"""The reader protocol: what a job needs from any input format.

A reader opens a scene (metadata only: n-D shape, channels, dtype, nodata, georeferencing or
voxel geometry) and reads one halo window at a time, padded to the full window; it never reads a
whole scene. One reader per format lives in this package, one file each
(:mod:`pipelines.readers.geotiff`, ...), registered by file suffix in
:mod:`pipelines.readers`; the job calls :func:`pipelines.readers.open_scene` and
:func:`pipelines.readers.read_window` and never names a format.

Input policy is decided here, when a scene is opened, so that a scene the model cannot take fails
before any of its chunks is planned, with an error naming the file:

- integer, float32 and float64 channels are read as they are (the predictor normalises them per
  the model card);
- complex channels (SAR single-look complex, interferograms) are refused unless the job asks for a
  derived real channel (``complex_bands: magnitude`` or ``db``, :data:`COMPLEX_DERIVATIONS`);
  casting complex values to real silently drops the imaginary part;
- anything else (e.g. float16, bool) is refused.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from schemas.errors import InputError

if TYPE_CHECKING:
    from schemas.window import ChunkWindow

#: How complex channels may be turned into real ones (the job spec's ``complex_bands``):
#: ``magnitude`` = ``|z|``; ``db`` = ``10 * log10(|z|^2)`` floored at :data:`DB_FLOOR`.
COMPLEX_DERIVATIONS = ("magnitude", "db")
#: ``db`` of a zero sample (``|z|^2`` floored at 1e-10): finite, so the model never sees -inf.
DB_FLOOR = -100.0
#: Folder in the system temp dir for input caches when the policy names none.
DEFAULT_CACHE_NAME = "tessera-inputs"


@dataclass(frozen=True)
class InputPolicy:
    """How a reader turns what a file holds into what the model gets.

    Attributes:
        complex_bands: ``"refuse"`` (default) or one of :data:`COMPLEX_DERIVATIONS`.
        bands: the job's 1-based channel choice (``bands:`` in the job spec), or None. A reader
            whose format is ambiguous without one (a 4D NIfTI: channels or time points?) refuses
            a file when it is None; the others ignore it.
        cache_dir: folder for converted copies of inputs that cannot be read by window in place
            (a ``.nii.gz``, a NIfTI given by URI: see :mod:`pipelines.readers.nifti`; a DICOM
            series in S3: :mod:`pipelines.readers.dicom`); the job sets ``<root>/_work/inputs``.
            None: a ``tessera-inputs`` folder in the system temp dir (:func:`input_cache_folder`).
        assets: the STAC asset keys a STAC item's scene stacks, in channel order (``stac.assets``
            in the job spec: :mod:`pipelines.readers.stac`), or None; the other readers ignore it.
    """

    complex_bands: str = "refuse"
    bands: tuple[int, ...] | None = None
    cache_dir: str | None = None
    assets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.complex_bands not in ("refuse", *COMPLEX_DERIVATIONS):
            raise ValueError(f"complex_bands must be 'refuse' or one of {COMPLEX_DERIVATIONS}, "
                             f"got {self.complex_bands!r}")
        if self.bands is not None:
            bands = tuple(self.bands)
            if not bands or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                                for b in bands):
                raise ValueError(f"bands must be 1-based channel indexes (ints >= 1), got {self.bands!r}")
            object.__setattr__(self, "bands", tuple(int(b) for b in bands))
        if self.assets is not None:
            object.__setattr__(self, "assets", tuple(str(a) for a in self.assets))


def input_cache_folder(cache_dir: str | None) -> Path:
    """The folder of the readers' local input caches: `cache_dir` (``InputPolicy.cache_dir``), or
    :data:`DEFAULT_CACHE_NAME` in the system temp dir when it is None."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / DEFAULT_CACHE_NAME


@dataclass(frozen=True)
class SceneInfo:
    """What a job needs to know about one input scene (no pixels); small and picklable.

    Attributes:
        path: the input as given.
        format: the name of the reader that opened it (key of ``pipelines.readers.READERS``).
        shape: spatial size in px / voxels, ``(rows, cols)`` or ``(z, rows, cols)``.
        count: number of channels (bands) in the file.
        dtype: numpy dtype name of the channels as the reader returns them (after any
            complex derivation).
        crs_wkt: the CRS as WKT2 (2D georeferenced scenes), or None.
        crs: short CRS string ("EPSG:32633" when it has an EPSG code, else WKT), or None.
        transform: affine ``(a, b, c, d, e, f)`` pixel -> CRS, rasterio order (2D), or None.
        nodata: the nodata value, or None.
        block_shape: the file's internal block (chunk) shape, one entry per spatial axis.
        source_dtype: numpy dtype name of the channels in the file.
        derive: how complex channels become real (``InputPolicy.complex_bands``), or None.
        affine: 4x4 voxel index -> scanner RAS mm matrix, row-major (3D volumes), or None; the
            index is in the array's axis order ``(z, y, x)`` (as ``schemas.store.VolumeGrid``).
        spacing: size of a voxel per spatial axis (mm for volumes), or None.
        orientation: axis codes of the array axes (e.g. ``"SAR"``: z runs to S, y to A, x to R),
            or None.
        data_path: where the reader reads the pixels when that is not ``path`` itself (a
            ``.nii.gz`` converted to a Zarr cache, the image array inside an OME-Zarr group, the
            local cache folder of a DICOM series in S3), or None. Set by the reader's ``open``, so
            that ``read`` in another process finds it.
    """

    path: str
    shape: tuple[int, ...]
    count: int
    dtype: str
    crs_wkt: str | None
    crs: str | None
    transform: tuple[float, float, float, float, float, float] | None
    nodata: float | None
    block_shape: tuple[int, ...]
    format: str = "geotiff"
    source_dtype: str | None = None
    derive: str | None = None
    affine: tuple[float, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    data_path: str | None = None

    @classmethod
    def of_volume(cls, path: str, *, fmt: str, shape: tuple[int, ...], count: int, dtype: str, source_dtype: str,
                  derive: str | None, block_shape: tuple[int, ...], affine: np.ndarray,
                  data_path: str | None = None) -> SceneInfo:
        """A volume's SceneInfo: no CRS, transform or nodata; `affine` the 4x4 voxel (z, y, x) ->
        scanner mm (RAS) matrix, kept exactly (float64); spacing its column norms; orientation
        the axis codes of the array axes (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        affine = np.asarray(affine, dtype=np.float64)
        return cls(path=path, shape=tuple(int(n) for n in shape), count=int(count), dtype=dtype, crs_wkt=None,
                   crs=None, transform=None, nodata=None, block_shape=tuple(int(n) for n in block_shape),
                   format=fmt, source_dtype=source_dtype, derive=derive,
                   affine=tuple(float(v) for v in affine.ravel()),
                   spacing=tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
                   orientation="".join(nib.aff2axcodes(affine)), data_path=data_path)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def pixel_area_crs2(self) -> float | None:
        """Area of one pixel in squared CRS units, ``|det(A)|`` of the 2D affine; None without one."""
        if self.transform is None:
            return None
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)


class Reader(Protocol):
    """One input format. Implementations are small, stateless apart from caches of open files.

    Attributes:
        name: the format's name (stored in ``SceneInfo.format``).
        suffixes: lower-case file suffixes it claims (``".tif"``, ``".nii.gz"``).
    """

    name: str
    suffixes: tuple[str, ...]

    def open(self, path: str, *, policy: InputPolicy) -> SceneInfo:
        """Metadata of one scene, input policy applied.

        Raises:
            InputError: naming the file: missing, unreadable, or refused by the policy.
        """
        ...

    def read(self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """One halo window, padded to the full window.

        Args:
            info: from :meth:`open` of this reader.
            window: the chunk window (its ``read`` slices are inside the scene).
            bands: 1-based channel indexes in model order (None: all).

        Returns:
            ``(pixels, valid)``: pixels ``(C, *window_shape)`` of ``info.dtype``; valid
            ``window_shape`` bool, False where every channel is nodata or NaN.

        Raises:
            InputError: naming the file and the window when the read fails.
        """
        ...

    def close(self) -> None:
        """Close whatever files this process keeps open for the reader."""
        ...


def check_dtype(path: str, dtypes: tuple[str, ...], policy: InputPolicy) -> tuple[str, str | None]:
    """The dtype a reader returns for channels of `dtypes`, and the derivation applied.

    Returns:
        ``(dtype, derive)``: the common dtype of the channels (``numpy.result_type``), or
        ``"float32"`` with ``derive`` set for complex channels under a derivation policy.

    Raises:
        InputError: complex channels without a derivation, or a dtype that is neither integer,
            float32 nor float64; the message names the file and what to set.
    """
    kinds = [np.dtype(d) for d in dtypes]
    if any(d.kind == "c" for d in kinds):
        if policy.complex_bands == "refuse":
            raise InputError(
                f"{path}: complex-valued bands ({', '.join(sorted({d.name for d in kinds}))}, e.g. SAR SLC); "
                "a model takes real values: set complex_bands: magnitude (|z|) or db (10 log10 |z|^2) "
                "in the job spec to derive them"
            )
        if not all(d.kind == "c" for d in kinds):
            raise InputError(f"{path}: mixes complex and real bands ({', '.join(d.name for d in kinds)}); "
                             "split them into separate files")
        return "float32", policy.complex_bands
    bad = sorted({d.name for d in kinds if not (d.kind in "iu" or d in (np.float32, np.float64))})
    if bad:
        raise InputError(f"{path}: bands of type {', '.join(bad)} are not supported "
                         "(integer, float32 and float64 are)")
    return np.result_type(*kinds).name, None


def derive_real(values: np.ndarray, derive: str | None) -> np.ndarray:
    """Complex samples -> the real channel the policy asked for (float32); others unchanged.

    ``magnitude``: ``|z|``; ``db``: ``10 * log10(max(|z|^2, 1e-10))``, so a zero sample gives
    :data:`DB_FLOOR` (-100 dB) instead of -inf.
    """
    if derive is None:
        return values
    power = values.real.astype(np.float64) ** 2 + values.imag.astype(np.float64) ** 2
    if derive == "magnitude":
        return np.sqrt(power).astype(np.float32)
    if derive == "db":
        return (10.0 * np.log10(np.maximum(power, 1e-10))).astype(np.float32)
    raise ValueError(f"unknown derivation {derive!r}; expected one of {COMPLEX_DERIVATIONS}")


def valid_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """``pixels.shape[1:]`` bool: a pixel is valid unless every channel is nodata (or NaN).

    Args:
        pixels: ``(C, *spatial)`` values of any numeric dtype (complex included).
        nodata: the file's nodata value, or None.
    """
    invalid = np.zeros(pixels.shape[1:], dtype=bool)
    if np.issubdtype(pixels.dtype, np.floating) or np.issubdtype(pixels.dtype, np.complexfloating):
        invalid |= np.isnan(pixels).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (pixels == np.asarray(nodata).astype(pixels.dtype)).all(axis=0)
    return ~invalid


def finish_window(pixels: np.ndarray, window: ChunkWindow, info: SceneInfo) -> tuple[np.ndarray, np.ndarray]:
    """What every reader does with the in-bounds part of a window it read: the valid mask (from
    `info.nodata` and NaN, before any derivation), complex channels derived per `info.derive`,
    both padded to the full window (reflect).

    Args:
        pixels: ``(C, *window.read_shape)`` values as read from the file.

    Returns:
        ``(pixels (C, *window_shape), valid window_shape bool)``.
    """
    from pipelines.plan.chunks import pad_window

    valid = valid_mask(pixels, info.nodata)
    return pad_window(derive_real(pixels, info.derive), window), pad_window(valid, window)

