"""GeoTIFF / COG reader: open a scene's metadata, read one halo window at a time.

Never reads a whole scene: `read_window` reads the window's in-bounds part with a rasterio
windowed read, then pads it to the full window (reflect at scene edges).

A halo window touches blocks its neighbours also need: with 512-px blocks a 1024-px chunk plus
a 32-px halo decodes 4 x 4 blocks for 2 x 2 blocks of core, 4x the decoding. So each process keeps
its last few datasets open (keyed by path, size and mtime: a replaced file is reopened) and GDAL's
block cache, capped at `GDAL_CACHE_MB`, serves the blocks neighbours share; the job orders chunks
in narrow stripes (`pipelines.plan.chunks.stripe_order`) so the blocks still needed stay in that cache.

Remote COGs (``https://``, ``http://``, ``s3://``: :mod:`pipelines.readers.remote`) open through
GDAL's ``/vsicurl/`` and ``/vsis3/`` under the remote GDAL options (`remote.gdal_options`, set
with ``rasterio.Env`` around every open and read, so each worker process has them): a window
fetches the byte ranges of the tiles it touches, never the whole file. ``SceneInfo.path`` keeps
the URI; the GDAL path is derived from it where the file is opened.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.readers.base import InputPolicy, SceneInfo, check_dtype, derive_real, finish_window, valid_mask
from pipelines.readers.remote import check_remote, gdal_options, gdal_path
from schemas.errors import InputError
from schemas.uris import is_uri
from schemas.window import ChunkWindow

GDAL_CACHE_MB = 96
"""GDAL block cache per reading process (GDAL's default is 5 % of RAM). A stripe of 4 chunks of
1024 px with 32-px halos over 512-px blocks of 4 uint16 bands needs 10 x 4 blocks, 80 MB."""
MAX_OPEN_DATASETS = 4
_open: OrderedDict[tuple[str, int, int], rasterio.io.DatasetReader] = OrderedDict()
_cache_set = False


def remote_env(path: str) -> contextlib.AbstractContextManager:
    """``rasterio.Env`` with the remote GDAL options for a URI; nothing for a local path."""
    return rasterio.Env(**gdal_options(path)) if is_uri(path) else contextlib.nullcontext()


def open_raster(path: str) -> rasterio.io.DatasetReader:
    """rasterio.open of a local path, or of a URI's GDAL path (call under `remote_env`)."""
    return rasterio.open(gdal_path(path) if is_uri(path) else path)


def cached_dataset(path: str) -> rasterio.io.DatasetReader:
    """An open dataset of `path`, reused while the file is unchanged (see module docstring); a
    URI's is reused for the life of the process (an input object changing during a job is not
    noticed: its identity is taken once, when the job starts)."""
    global _cache_set
    if not _cache_set:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 2**20)
        _cache_set = True
    if is_uri(path):
        key = (path, 0, 0)
    else:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
    ds = _open.get(key)
    if ds is None or ds.closed:
        ds = open_raster(path)
        _open[key] = ds
        while len(_open) > MAX_OPEN_DATASETS:
            _open.popitem(last=False)[1].close()
    _open.move_to_end(key)
    return ds


def close_datasets() -> None:
    """Close every dataset this process keeps open."""
    while _open:
        _open.popitem()[1].close()


class GeoTiffReader:
    """GeoTIFF / COG (and any other 2D raster GDAL opens) through rasterio windowed reads."""

    name = "geotiff"
    suffixes = (".tif", ".tiff", ".vrt", ".jp2")

    def open(self, path: str, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
        """A scene's metadata; complex or unsupported band types per `policy` (see
        `pipelines.readers.base.check_dtype`).

        Raises:
            InputError: the file is missing, not a raster GDAL can open, has no bands, or has
                bands the policy refuses.
        """
        path = str(path)
        if is_uri(path):
            check_remote(path)
        elif not Path(path).exists():
            raise InputError(f"{path}: file not found")
        try:
            with remote_env(path), open_raster(path) as ds:
                if ds.count < 1:
                    raise InputError(f"{path}: raster has no bands")
                dtype, derive = check_dtype(path, tuple(ds.dtypes), policy)
                crs_wkt = ds.crs.to_wkt() if ds.crs else None
                crs = None
                if ds.crs:
                    epsg = ds.crs.to_epsg()
                    crs = f"EPSG:{epsg}" if epsg else crs_wkt
                return SceneInfo(
                    path=path,
                    shape=(ds.height, ds.width),
                    count=ds.count,
                    dtype=dtype,
                    crs_wkt=crs_wkt,
                    crs=crs,
                    transform=tuple(ds.transform)[:6],
                    nodata=ds.nodata,
                    block_shape=tuple(ds.block_shapes[0]),
                    format=self.name,
                    source_dtype=np.result_type(*ds.dtypes).name,
                    derive=derive,
                )
        except RasterioError as exc:
            raise InputError(f"{path}: cannot open as a raster: {exc}") from None

    def read(
        self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read one halo window of a scene and pad it to the full window.

        Args:
            info: from `open`.
            window: the chunk window; its `read` slices are in bounds by construction.
            bands: 1-based band indexes to read, in model order (default: all).

        Returns:
            (pixels, valid): pixels (B, H, W) of `info.dtype` (complex bands derived per the
            policy), valid (H, W) bool (False where every band equals nodata, or is NaN), both
            of window_shape, reflect-padded at edges.

        Raises:
            InputError: naming the file and window when the read fails (corrupt block, I/O error).
        """
        indexes = list(bands) if bands is not None else list(range(1, info.count + 1))
        (r, c) = window.read
        rio_window = Window(c.start, r.start, c.stop - c.start, r.stop - r.start)
        try:
            with remote_env(info.path):
                ds = cached_dataset(info.path)
                out_dtype = None if info.source_dtype in (None, ds.dtypes[0]) else info.source_dtype
                pixels = ds.read(indexes, window=rio_window, out_dtype=out_dtype)
        except (RasterioError, OSError) as exc:
            close_datasets()  # a failed read may leave a handle in a bad state
            raise InputError(
                f"{info.path}: read failed for rows {r.start}:{r.stop}, cols {c.start}:{c.stop}: {exc}"
            ) from None
        return finish_window(pixels, window, info)

    def read_decimated(self, info: SceneInfo, out_shape: tuple[int, int], *, bands: tuple[int, ...] | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole scene at a reduced size (quicklooks): rasterio's ``out_shape`` read, nearest
        neighbour, so GDAL reads the file's overview closest to `out_shape` when it has one and
        decimates the full-resolution blocks through its block cache when not. Memory: the
        output, never the full-resolution scene.

        A scene given by URI is read this way only where the file has an overview at least half
        as fine as the reduction asks (a COG's): decimating full-resolution blocks would fetch
        the whole object over the network for a thumbnail. Without one: None.

        Args:
            info: from `open`.
            out_shape: ``(rows, cols)`` wanted, px.
            bands: 1-based band indexes (default: all).

        Returns:
            (pixels (B, rows, cols) of `info.dtype`, complex bands derived per the policy;
            valid (rows, cols) bool, as `read`'s).

        Raises:
            InputError: naming the file when the read fails.
        """
        indexes = list(bands) if bands is not None else list(range(1, info.count + 1))
        try:
            with remote_env(info.path):
                ds = cached_dataset(info.path)
                reduction = max(ds.height / max(1, out_shape[0]), ds.width / max(1, out_shape[1]))
                if is_uri(info.path) and reduction >= 2 and max(ds.overviews(indexes[0]) or [1]) < reduction / 2:
                    return None
                pixels = ds.read(indexes, out_shape=(len(indexes), *out_shape), resampling=Resampling.nearest)
        except (RasterioError, OSError) as exc:
            close_datasets()
            raise InputError(f"{info.path}: decimated read to {out_shape} failed: {exc}") from None
        return derive_real(pixels, info.derive), valid_mask(pixels, info.nodata)

    def close(self) -> None:
        close_datasets()
