"""Quicklook PNGs: the level they are drawn from, their size, the class colours over the image,
the legend, and a volume's three mid slices with their voxel aspect."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from pipelines.readers import open_scene
from pipelines.writers import quicklook as ql
from pipelines.writers.overviews import build_overviews
from pipelines.writers.zarr_masks import create_scene_store, write_chunk
from schemas import store as layout
from schemas.model_card import DEFAULT_PALETTE
from tests.helpers import write_geotiff

NAMES = ("water", "forest", "urban")
COLORS = ("#1f77b4", "#2ca02c", "#d62728")


def _rgb(color: str) -> tuple[int, int, int]:
    return tuple(layout.hex_to_rgba(color)[:3])


def _blended_on_black(color: str) -> tuple[int, int, int]:
    return tuple(int(round(ql.OVERLAY_ALPHA * v)) for v in _rgb(color))


def _scene_and_store(tmp_path, shape=(200, 160), chunk=32, overviews=True):
    """A constant 4-band GeoTIFF (it stretches to black, so the overlay is the colours alone at
    OVERLAY_ALPHA) and a store of three class stripes with a nodata corner, with overviews."""
    image = np.full((4, *shape), 5000, dtype=np.uint16)
    tif = write_geotiff(tmp_path / "s.tif", image, nodata=None)
    labels = np.zeros(shape, np.uint8)
    labels[:, shape[1] // 3:] = 1
    labels[:, 2 * shape[1] // 3:] = 2
    labels[:40, :40] = layout.NODATA_CLASS
    path = tmp_path / "s.zarr"
    create_scene_store(path, shape=shape, chunk_shape=(chunk, chunk),
                       grid=layout.GeoGrid(transform=(10.0, 0, 500000.0, 0, -10.0, 5000000.0), crs_wkt="EPSG:32633"),
                       class_names=NAMES, provenance={"fingerprint": "f" * 64})
    write_chunk(path, (slice(0, shape[0]), slice(0, shape[1])), labels)
    if overviews:
        build_overviews(path, class_colors=COLORS)
    return open_scene(tif), path


def test_2d_quicklook_comes_from_the_coarsest_level_long_enough(tmp_path):
    info, path = _scene_and_store(tmp_path)
    out = ql.write_quicklook_2d(path, tmp_path / "q" / "s.png", info=info, model_bands=(0, 1, 2), min_side=64)
    png = np.asarray(Image.open(out).convert("RGB"))
    # levels: 200x160, 100x80, 50x40 -> the 100x80 level is the coarsest with a side >= 64
    assert png.shape == (max(100, ql.LEGEND_ROW * 4), 80 + ql.LEGEND_WIDTH, 3)
    level = zarr.open_array(str(path), path="overviews/1/classes")[:]
    for k, color in enumerate(COLORS):
        assert (png[:100, :80][level == k] == _blended_on_black(color)).all()
        swatch_y = ql.LEGEND_ROW // 2 + k * ql.LEGEND_ROW + 2
        assert tuple(png[swatch_y, 80 + 8]) == _rgb(color)  # the legend shows the full colour
    assert (png[:100, :80][level == layout.NODATA_CLASS] == 0).all()  # image only, no colour


def test_2d_quicklook_of_a_small_scene_is_full_resolution(tmp_path):
    info, path = _scene_and_store(tmp_path, shape=(60, 50))
    out = ql.write_quicklook_2d(path, tmp_path / "s.png", info=info, model_bands=(0,))
    assert Image.open(out).size == (50 + ql.LEGEND_WIDTH, max(60, ql.LEGEND_ROW * 4))


def test_a_store_without_levels_or_colours_gets_a_full_resolution_quicklook_in_the_palette(tmp_path):
    info, path = _scene_and_store(tmp_path, shape=(60, 50), overviews=False)
    png = np.asarray(Image.open(ql.write_quicklook(path, tmp_path / "s.png", info=info, model_bands=(0, 1, 2))))
    assert png.shape[:2] == (max(60, ql.LEGEND_ROW * 4), 50 + ql.LEGEND_WIDTH)
    assert tuple(png[ql.LEGEND_ROW // 2 + 2, 50 + 8, :3]) == _rgb(DEFAULT_PALETTE[0])


def test_choose_level_and_stretch():
    records = [{"level": k, "shape": [4000 // 2**k, 3000 // 2**k]} for k in range(4)]
    assert ql.choose_level(records)["level"] == 1  # 2000 px; level 2 (1000 px) is too small
    assert ql.choose_level(records[:1], 5000)["level"] == 0
    ramp = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    rgb = ql.stretch(ramp, np.ones((10, 10), bool))
    assert rgb.shape == (10, 10, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert (rgb[..., 0] == rgb[..., 2]).all()  # one band -> grey


def test_3d_quicklook_shows_three_mid_slices_with_the_voxel_aspect(tmp_path):
    nib = pytest.importorskip("nibabel")
    shape = (10, 20, 24)  # (z, y, x); voxels 3 mm thick, 1 mm in plane
    xyz = np.full(shape[::-1], 100, dtype=np.int16)
    nii = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(xyz, np.diag([1.0, 1.0, 3.0, 1.0])), nii)
    info = open_scene(nii)
    labels = np.zeros(shape, np.uint8)
    labels[5:] = 1  # upper half (z >= 5) class 1
    path = tmp_path / "v.zarr"
    create_scene_store(path, shape=shape, chunk_shape=(8, 8, 8), grid=layout.VolumeGrid(affine=info.affine),
                       class_names=NAMES, provenance={"fingerprint": "f" * 64}, image=(1, info.dtype))
    write_chunk(path, tuple(slice(0, n) for n in shape), labels, image=xyz.transpose(2, 1, 0)[None])
    build_overviews(path, class_colors=COLORS)
    out = ql.write_quicklook(path, tmp_path / "v.png", info=info, model_bands=(0,))
    png = np.asarray(Image.open(out).convert("RGB"))
    # panels: z mid (20 x 24), y mid (z 10 x 3 mm -> 30 rows, 24 cols), x mid (30 rows, 20 cols)
    assert png.shape == (ql.LEGEND_ROW * 4, 24 + 24 + 20 + 8 + ql.LEGEND_WIDTH, 3)
    axial = png[:20, :24]
    assert (axial == _blended_on_black(COLORS[1])).all()  # z = 5 is class 1
    coronal = png[:30, 28:52]
    assert (coronal[:15] == _blended_on_black(COLORS[1])).all()  # z upwards: class 1 on top
    assert (coronal[15:30] == _blended_on_black(COLORS[0])).all()
    sagittal = png[:30, 56:76]
    assert (sagittal[:15] == _blended_on_black(COLORS[1])).all()
