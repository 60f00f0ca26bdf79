"""The COG export: tiled, internal overviews by mode, georeferencing equal to the store's."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS

from pipelines.writers.cog_export import default_class_colors, export_cog, parse_hex_colors
from pipelines.writers.zarr_masks import create_scene_store
from schemas.store import NODATA_CLASS, GeoGrid
from tests.helpers import classes_store

UTM = CRS.from_epsg(32633).to_wkt()


def _store(tmp_path, labels, *, chunk=256, transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 4649776.0)):
    return classes_store(tmp_path / "s.zarr", labels, chunk=chunk, transform=transform, crs_wkt=UTM)


def test_cog_is_tiled_with_mode_overviews_and_the_store_georeferencing(tmp_path):
    rng = np.random.default_rng(0)
    # 2x2 blocks of one class, so the first mode overview is exactly the block class
    blocks = rng.integers(0, 3, size=(600, 550), dtype=np.uint8)
    labels = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)[:1100, :1030]
    labels[:40, :40] = NODATA_CLASS
    path, grid = _store(tmp_path, labels)
    out = export_cog(path, tmp_path / "s.tif", grid=grid, class_names=("water", "land", "urban"))
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.block_shapes[0] == (512, 512)
        assert src.crs == CRS.from_wkt(UTM)
        assert tuple(src.transform)[:6] == grid.transform
        assert src.nodata == NODATA_CLASS
        levels = src.overviews(1)  # factors 2, 4, ... until a level fits one 512 px tile
        assert levels[0] == 2 and all(b == 2 * a for a, b in zip(levels, levels[1:]))
        assert -(-max(labels.shape) // levels[-1]) <= 512
        np.testing.assert_array_equal(src.read(1), labels)
        # the overview is the mode of each 2x2 block, never an average of class ids
        half = src.read(1, out_shape=(550, 515))
        assert set(np.unique(half)) <= {0, 1, 2, NODATA_CLASS}
        np.testing.assert_array_equal(half[40:, 40:], labels[::2, ::2][40:, 40:])
        assert src.colormap(1)[1][:3] == default_class_colors(3)[1]
        assert src.tags(1)["CLASS_2"] == "urban"


def test_colors_from_the_card_override_the_palette():
    assert parse_hex_colors(["#ff0000", "00ff00"], 3)[:2] == [(255, 0, 0), (0, 255, 0)]
    assert len(set(default_class_colors(40))) == 40


def test_a_volume_store_is_refused(tmp_path):
    from schemas.store import VolumeGrid

    path = tmp_path / "v.zarr"
    grid = VolumeGrid(affine=np.eye(4).tolist(), spacing_mm=(1.0, 1.0, 1.0))
    create_scene_store(path, shape=(4, 8, 8), chunk_shape=(4, 8, 8), grid=grid, class_names=("a",), provenance={},
                       image=(1, "float32"))
    with pytest.raises(ValueError, match="needs a \\(y, x\\) scene"):
        export_cog(path, tmp_path / "v.tif", grid=GeoGrid(transform=(1, 0, 0, 0, -1, 0)), class_names=("a",))
