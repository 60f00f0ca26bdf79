"""Quicklook PNGs: the input at reduced resolution, the class mask over it in the card's colours,
and a legend; `<root>/quicklooks/<scene>.png`, written by the job when a scene is finished.

- 2D (`write_quicklook_2d`): the coarsest overview level whose long side is at least
  `QUICKLOOK_MIN_SIDE` px (level 0 only when the scene itself is no bigger), and the input read
  at that level's size through the reader's `read_decimated` (GeoTIFF: rasterio's ``out_shape``
  read; GDAL takes the file's overviews when it has them, else decimates the full-resolution
  blocks while reading, nearest neighbour). A format without one, or a scene by URI without
  overviews (it would be fetched whole for a thumbnail), gets the mask over grey.
- 3D (`write_quicklook_3d`): three orthogonal mid slices of the array axes (z, y, x): the
  z = mid plane ("axial" for an axis-aligned scan), y = mid ("coronal") and x = mid ("sagittal"),
  each read through the scene's reader as a one-voxel-thick window, drawn with pixels stretched
  to the voxel spacing (anisotropic volumes keep their aspect), z upwards.

Bands: the card's `quicklook_model_bands` (its `quicklook_bands`, else the first three model
bands, or the first), mapped to file bands through the job's `bands`. Each band is stretched
between its 2nd and 98th percentiles over valid pixels. Memory: one level (< 2 x
QUICKLOOK_MIN_SIDE per side unless the scene fits in one chunk) or three slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw

from pipelines.readers import READERS, SceneInfo, read_window
from pipelines.writers.outroot import as_location, upload_from, zarr_store
from schemas import store as layout
from schemas.model_card import default_class_colors
from schemas.window import ChunkWindow

QUICKLOOKS_DIR = "quicklooks"
QUICKLOOK_MIN_SIDE = 1024  # px on the long side the chosen overview level must reach
OVERLAY_ALPHA = 0.45  # opacity of the class colours over the image
LEGEND_ROW = 18  # px per legend row
LEGEND_WIDTH = 180  # px
BACKGROUND = (32, 32, 32)


def quicklook_path(root: Path, scene: str) -> Path:
    """`<root>/quicklooks/<scene>.png`."""
    return as_location(root) / QUICKLOOKS_DIR / f"{scene}.png"


def choose_level(records: Sequence[dict], min_side: int = QUICKLOOK_MIN_SIDE) -> dict:
    """The coarsest level record (attrs['tessera']['overviews']) whose long side is >= `min_side`;
    level 0 when none is (a scene smaller than `min_side`)."""
    fitting = [r for r in records if max(r["shape"]) >= min_side]
    return max(fitting, key=lambda r: r["level"]) if fitting else min(records, key=lambda r: r["level"])


def stretch(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, H, W) any dtype -> (H, W, 3) uint8: each band linearly between its 2nd and 98th
    percentile over `valid` pixels (one band -> grey); invalid pixels dark grey."""
    bands = []
    for band in pixels.astype(np.float64):
        values = band[valid & np.isfinite(band)]
        lo, hi = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
        scaled = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        bands.append(np.nan_to_num(scaled * 255).astype(np.uint8))
    rgb = np.stack(bands * 3 if len(bands) == 1 else bands[:3], axis=-1)
    rgb[~valid] = BACKGROUND
    return rgb


def overlay(rgb: np.ndarray, labels: np.ndarray, colors: Sequence[str], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 with each class's colour blended in at `alpha` (nodata 255 left as is)."""
    palette = np.zeros((256, 3), dtype=np.float64)
    for k, c in enumerate(colors):
        palette[k] = layout.hex_to_rgba(c)[:3]
    mask = labels != layout.NODATA_CLASS
    out = rgb.astype(np.float64)
    out[mask] = (1 - alpha) * out[mask] + alpha * palette[labels[mask]]
    return np.round(out).astype(np.uint8)


def with_legend(image: Image.Image, names: Sequence[str], colors: Sequence[str]) -> Image.Image:
    """`image` with a legend panel (LEGEND_WIDTH px) on its right: a swatch and the name per class.
    Size: ``(W + LEGEND_WIDTH, max(H, LEGEND_ROW * (n_classes + 1)))``."""
    width, height = image.size
    canvas = Image.new("RGB", (width + LEGEND_WIDTH, max(height, LEGEND_ROW * (len(names) + 1))), BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (name, color) in enumerate(zip(names, colors)):
        y = LEGEND_ROW // 2 + k * LEGEND_ROW
        draw.rectangle([width + 6, y, width + 6 + LEGEND_ROW - 4, y + LEGEND_ROW - 4], fill=color)
        draw.text((width + LEGEND_ROW + 8, y + 1), f"{k} {name}", fill=(235, 235, 235))
    return canvas


def _colors(attrs: dict) -> list[str]:
    """The store's class colours, or the default palette (a store written before it had them)."""
    names = attrs[layout.KEY_CLASS_NAMES]
    return list(attrs.get(layout.KEY_CLASS_COLORS) or default_class_colors(len(names)))


def _file_bands(model_bands: Sequence[int], job_bands: Sequence[int] | None) -> list[int]:
    """1-based file bands of 0-based model bands (the job's `bands` maps model order -> file)."""
    return [job_bands[b] if job_bands else b + 1 for b in model_bands]


def _read_decimated(info: SceneInfo, bands: list[int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(B, h, w) pixels and (h, w) valid of a 2D scene at `shape` through its reader's
    `read_decimated`, or None for a reader without one (only GDAL rasters have it) or where it
    would be costly (a remote scene without overviews)."""
    reader = READERS[info.format]
    if not hasattr(reader, "read_decimated"):
        return None
    return reader.read_decimated(info, shape, bands=tuple(bands))


def write_quicklook_2d(zarr_path: Path, out_path: Path, *, info: SceneInfo, model_bands: Sequence[int],
                       job_bands: Sequence[int] | None = None, min_side: int = QUICKLOOK_MIN_SIDE) -> Path:
    """Render a 2D store's quicklook (see the module docstring) to `out_path`, atomically.

    Args:
        zarr_path: a store with overviews (`pipelines.writers.overviews.build_overviews`).
        out_path: the PNG to write.
        info: the scene's input (read at the chosen level's size).
        model_bands: 0-based model bands to show (`ModelCard.quicklook_model_bands`).
        job_bands: the job's 1-based file band per model band, or None (file order).
        min_side: see `choose_level`.
    """
    group = zarr.open_group(zarr_store(zarr_path, read_only=True), mode="r")
    attrs = group.attrs[layout.TESSERA_ATTR]
    records = attrs.get(layout.KEY_OVERVIEWS) or [  # a store without levels: level 0
        {"level": 0, "path": layout.classes_path(2), "shape": list(group[layout.classes_path(2)].shape)}]
    record = choose_level(records, min_side)
    labels = group[record["path"]][:]
    read = _read_decimated(info, _file_bands(model_bands, job_bands), tuple(labels.shape))
    if read is None:
        rgb = np.full((*labels.shape, 3), 128, dtype=np.uint8)
    else:
        rgb = stretch(*read)
    colors = _colors(attrs)
    image = Image.fromarray(overlay(rgb, labels, colors))
    return _save(with_legend(image, attrs[layout.KEY_CLASS_NAMES], colors), out_path)


def _slice_window(shape: tuple[int, ...], axis: int, index: int) -> ChunkWindow:
    """A one-voxel-thick window through the whole volume at `index` along `axis`."""
    core = tuple(slice(index, index + 1) if a == axis else slice(0, n) for a, n in enumerate(shape))
    return ChunkWindow(index=(0,) * len(shape), core=core, read=core, pad=((0, 0),) * len(shape))


def write_quicklook_3d(zarr_path: Path, out_path: Path, *, info: SceneInfo, model_bands: Sequence[int],
                       job_bands: Sequence[int] | None = None) -> Path:
    """Render a volume store's three mid slices (see the module docstring) to `out_path`.

    Panels left to right: z mid (y down, x right), y mid and x mid (z up); each resized so one
    screen pixel is the finest spacing of its two axes in both directions (nearest neighbour).
    """
    group = zarr.open_group(zarr_store(zarr_path, read_only=True), mode="r")
    attrs = group.attrs[layout.TESSERA_ATTR]
    classes = group[layout.classes_path(3)]
    spacing = attrs[layout.KEY_SPACING_MM]
    colors = _colors(attrs)
    shape = tuple(classes.shape)
    band = _file_bands(model_bands[:1], job_bands)
    panels = []
    for axis in range(3):
        mid = shape[axis] // 2
        window = _slice_window(shape, axis, mid)
        pixels, valid = read_window(info, window, bands=tuple(band))
        labels = classes[window.core]
        pixels, valid, labels = np.squeeze(pixels, axis=axis + 1), np.squeeze(valid, axis=axis), \
            np.squeeze(labels, axis=axis)
        rows_axis, cols_axis = [a for a in range(3) if a != axis]
        rgb = overlay(stretch(pixels, valid), labels, colors)
        if rows_axis == 0:  # z upwards
            rgb = rgb[::-1]
        finest = min(spacing[rows_axis], spacing[cols_axis])
        size = (max(1, round(rgb.shape[1] * spacing[cols_axis] / finest)),
                max(1, round(rgb.shape[0] * spacing[rows_axis] / finest)))
        panels.append(Image.fromarray(rgb).resize(size, Image.NEAREST))
    gap = 4
    strip = Image.new("RGB", (sum(p.width for p in panels) + gap * 2, max(p.height for p in panels)), BACKGROUND)
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.width + gap
    return _save(with_legend(strip, attrs[layout.KEY_CLASS_NAMES], colors), out_path)


def _save(image: Image.Image, out_path: Path) -> Path:
    with upload_from(out_path) as tmp:  # a rename locally, one PUT on S3
        image.save(tmp, format="PNG")
    return out_path


def write_quicklook(zarr_path: Path, out_path: Path, *, info: SceneInfo, model_bands: Sequence[int],
                    job_bands: Sequence[int] | None = None) -> Path:
    """`write_quicklook_3d` for a volume store, `write_quicklook_2d` otherwise."""
    attrs = zarr.open_group(zarr_store(zarr_path, read_only=True), mode="r").attrs[layout.TESSERA_ATTR]
    render = write_quicklook_3d if layout.KEY_AFFINE in attrs else write_quicklook_2d
    return render(zarr_path, out_path, info=info, model_bands=model_bands, job_bands=job_bands)
