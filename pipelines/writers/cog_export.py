"""Export a 2D scene's ``classes`` as a Cloud-Optimized GeoTIFF that QGIS and GDAL open as it is.

GIS tools read the Zarr v3 store poorly: the GDAL in rasterio's wheels (3.10, as in most installed
QGIS) refuses it with "Unsupported codec: bytes". The export is a COG with the scene's CRS and
transform (bit for bit, the store's float64 affine), 512 px internal tiles, DEFLATE, nodata 255,
a colour table of the class colours, class names in the band description and metadata, and
internal overviews downsampled by mode (the most frequent class; never an average of class ids).

Memory: the store is streamed a row of Zarr chunks at a time into a tiled GeoTIFF in the work
folder; GDAL's COG driver then builds the overviews and lays the file out (overviews before the
full-resolution tiles, as a COG reader expects) through its block cache, never holding the scene.
The file appears atomically: a reader never sees half a COG.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.writers.atomic import atomic_path
from pipelines.writers.zarr_masks import open_classes
from schemas import store as layout
from schemas.store import GeoGrid

COG_BLOCK = 512


def default_class_colors(n: int) -> list[tuple[int, int, int]]:
    """A deterministic, distinguishable RGB colour per class id 0..n-1 (tab10, then a golden-angle hue walk)."""
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    out = []
    for k in range(n):
        if k < len(tab10):
            out.append(tab10[k])
            continue
        import colorsys

        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65, 0.9)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def parse_hex_colors(colors: Sequence[str] | None, n: int) -> list[tuple[int, int, int]]:
    """``["#rrggbb", ...]`` -> RGB tuples; the default palette where `colors` is None or short."""
    palette = default_class_colors(n)
    for k, value in enumerate((colors or [])[:n]):
        text = str(value).lstrip("#")
        if len(text) == 6:
            palette[k] = tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
    return palette


def export_cog(zarr_path: Path, out_path: Path, *, grid: GeoGrid, class_names: Sequence[str],
               class_colors: Sequence[str] | None = None, work_dir: Path | None = None) -> Path:
    """Write the store's ``classes`` as a COG at `out_path` (replaced atomically).

    Args:
        zarr_path: a 2D store (`pipelines.writers.zarr_masks`).
        out_path: the ``.tif`` to write.
        grid: the store's geometry (CRS and transform of the file).
        class_names: names of class ids 0..K-1 (band metadata and the colour table's extent).
        class_colors: ``#rrggbb`` per class (default: :func:`default_class_colors`).
        work_dir: folder for the intermediate tiled GeoTIFF (default: beside `out_path`).

    Returns:
        `out_path`.

    Raises:
        ValueError: the store's ``classes`` is not 2D.
    """
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.shutil import copy as rio_copy

    classes = open_classes(zarr_path)
    if classes.ndim != 2:
        raise ValueError(f"{zarr_path}: classes has {classes.ndim} axes; a COG export needs a (y, x) scene")
    height, width = classes.shape
    row_step = classes.chunks[0]
    colors = parse_hex_colors(class_colors, len(class_names))
    colormap = {k: (*rgb, 255) for k, rgb in enumerate(colors)}
    colormap[layout.NODATA_CLASS] = (0, 0, 0, 0)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
        "nodata": layout.NODATA_CLASS, "tiled": True, "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK,
        "compress": "deflate", "transform": Affine(*grid.transform), "BIGTIFF": "IF_SAFER",
        "crs": CRS.from_wkt(grid.crs_wkt) if grid.crs_wkt else None,
    }
    tmp_parent = Path(work_dir) if work_dir is not None else Path(out_path).parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_parent, prefix=".cog-") as tmp:
        staged = Path(tmp) / "classes.tif"
        with rasterio.open(staged, "w", **profile) as dst:
            for y0 in range(0, height, row_step):
                rows = np.asarray(classes[y0:y0 + row_step, :])
                dst.write(rows, 1, window=((y0, y0 + rows.shape[0]), (0, width)))
            dst.write_colormap(1, colormap)
            dst.set_band_description(1, "classes")
            dst.update_tags(1, **{f"CLASS_{k}": name for k, name in enumerate(class_names)})
            dst.update_tags(CLASS_NAMES=",".join(class_names))
        with atomic_path(Path(out_path)) as target:
            rio_copy(staged, target, driver="COG", BLOCKSIZE=COG_BLOCK, COMPRESS="DEFLATE",
                     OVERVIEWS="IGNORE_EXISTING", OVERVIEW_RESAMPLING="MODE", RESAMPLING="NEAREST",
                     BIGTIFF="IF_SAFER")
    return Path(out_path)
