"""GeoTIFF / COG reader: open a scene's metadata, read one halo window at a time.

Never reads a whole scene: `read_window` reads the window's in-bounds part with a rasterio
windowed read, then pads it to the full window (reflect at scene edges).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.tiling import ChunkWindow, pad_window
from schemas.errors import InputError

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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
        with rasterio.open(scene.path) as ds:
            pixels = ds.read(indexes, window=rio_window)
    except RasterioError as exc:
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
