"""GeoTIFF / COG reader: open a scene's metadata, read one halo window at a time.

Never reads a whole scene: `read_window` reads the window's in-bounds part with a rasterio
windowed read, then pads it to the full window (reflect at scene edges).

A halo window touches blocks its neighbours also need: with 512-px blocks a 1024-px chunk plus
a 32-px halo decodes 4 x 4 blocks for 2 x 2 blocks of core, 4x the decoding. So each process keeps
its last few datasets open (keyed by path, size and mtime: a replaced file is reopened) and GDAL's
block cache, capped at `GDAL_CACHE_MB`, serves the blocks neighbours share; the job orders chunks
in narrow stripes (`pipelines.tiling.stripe_order`) so the blocks still needed stay in that cache.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.tiling import ChunkWindow, pad_window
from schemas.errors import InputError

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
GDAL_CACHE_MB = 96
"""GDAL block cache per reading process (GDAL's default is 5 % of RAM). A stripe of 4 chunks of
1024 px with 32-px halos over 512-px blocks of 4 uint16 bands needs 10 x 4 blocks, 80 MB."""
MAX_OPEN_DATASETS = 4
_open: OrderedDict[tuple[str, int, int], rasterio.io.DatasetReader] = OrderedDict()
_cache_set = False


def _dataset(path: str) -> rasterio.io.DatasetReader:
    """An open dataset of `path`, reused while the file is unchanged (see module docstring)."""
    global _cache_set
    if not _cache_set:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 2**20)
        _cache_set = True
    if "://" in path:
        key = (path, 0, 0)
    else:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
    ds = _open.get(key)
    if ds is None or ds.closed:
        ds = rasterio.open(path)
        _open[key] = ds
        while len(_open) > MAX_OPEN_DATASETS:
            _open.popitem(last=False)[1].close()
    _open.move_to_end(key)
    return ds


def close_datasets() -> None:
    """Close every dataset this process keeps open."""
    while _open:
        _open.popitem()[1].close()


@dataclass(frozen=True)
class SceneInfo:
    """What a job needs to know about one raster scene (no pixels).

    Attributes:
        path: the file path as given.
        shape: (rows, cols) in px.
        count: number of bands in the file.
        dtype: numpy dtype name of the bands.
        crs_wkt: the CRS as WKT2, or None when the file has no CRS.
        crs: short CRS string ("EPSG:32633" when it has an EPSG code, else WKT).
        transform: affine (a, b, c, d, e, f) pixel -> CRS, rasterio order.
        nodata: the nodata value, or None.
        block_shape: (rows, cols) of the file's internal blocks of band 1.
    """

    path: str
    shape: tuple[int, int]
    count: int
    dtype: str
    crs_wkt: str | None
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    block_shape: tuple[int, int]

    @property
    def pixel_area_crs2(self) -> float:
        """Area of one pixel in squared CRS units: |det(A)| of the affine."""
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)


def scene_name(path: str | Path) -> str:
    """A safe output name for a scene: the file stem with anything but [A-Za-z0-9._-] replaced.

    Scene names come from catalogues and file names, which are untrusted: the result can never
    contain a path separator or be '.'/'..', so `<root>/<name>.zarr` stays under the root.
    """
    stem = Path(str(path)).name
    for suffix in (".tif", ".tiff", ".TIF", ".TIFF", ".vrt", ".jp2"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    safe = _SAFE_NAME.sub("_", stem).strip("._-")
    return safe[:200] or "scene"


def open_scene(path: str | Path) -> SceneInfo:
    """Read a scene's metadata.

    Raises:
        InputError: the file is missing, not a raster GDAL can open, or has no bands.
    """
    path = str(path)
    if "://" not in path and not Path(path).exists():
        raise InputError(f"{path}: file not found")
    try:
        with rasterio.open(path) as ds:
            if ds.count < 1:
                raise InputError(f"{path}: raster has no bands")
            crs_wkt = ds.crs.to_wkt() if ds.crs else None
            crs = None
            if ds.crs:
                epsg = ds.crs.to_epsg()
                crs = f"EPSG:{epsg}" if epsg else crs_wkt
            return SceneInfo(
                path=path,
                shape=(ds.height, ds.width),
                count=ds.count,
                dtype=ds.dtypes[0],
                crs_wkt=crs_wkt,
                crs=crs,
                transform=tuple(ds.transform)[:6],
                nodata=ds.nodata,
                block_shape=tuple(ds.block_shapes[0]),
            )
    except RasterioError as exc:
        raise InputError(f"{path}: cannot open as a raster: {exc}") from None


def read_window(
    scene: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one halo window of a scene and pad it to the full window.

    Args:
        scene: from `open_scene`.
        window: the chunk window; its `read` slices are in bounds by construction.
        bands: 1-based band indexes to read, in model order (default: all).

    Returns:
        (pixels, valid): pixels (B, H, W) in the file's dtype, valid (H, W) bool (False where
        every band equals nodata, or is NaN), both of window_shape, reflect-padded at edges.

    Raises:
        InputError: naming the file and window when the read fails (corrupt block, I/O error).
    """
    indexes = list(bands) if bands is not None else list(range(1, scene.count + 1))
    (r, c) = window.read
    rio_window = Window(c.start, r.start, c.stop - c.start, r.stop - r.start)
    try:
        pixels = _dataset(scene.path).read(indexes, window=rio_window)
    except (RasterioError, OSError) as exc:
        close_datasets()  # a failed read may leave a handle in a bad state
        raise InputError(
            f"{scene.path}: read failed for rows {r.start}:{r.stop}, cols {c.start}:{c.stop}: {exc}"
        ) from None
    valid = valid_mask(pixels, scene.nodata)
    return pad_window(pixels, window), pad_window(valid, window)


def valid_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W) bool: a pixel is valid unless every band is nodata (or NaN)."""
    invalid = np.zeros(pixels.shape[1:], dtype=bool)
    if np.issubdtype(pixels.dtype, np.floating):
        invalid |= np.isnan(pixels).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (pixels == np.asarray(nodata).astype(pixels.dtype)).all(axis=0)
    return ~invalid
