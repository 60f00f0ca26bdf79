"""Region polygons: rebuilt from a store's classes chunk by chunk, dissolved per region with holes
kept; rasterised back they are the global 8-connected labelling, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio.features
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine
from skimage.measure import label

from pipelines.writers.region_polygons import export_region_polygons, trace_regions
from schemas.errors import OutputError
from schemas.store import NODATA_CLASS
from tests.helpers import classes_store

UTM = CRS.from_epsg(32633).to_wkt()
TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 4649776.0)


def _store(tmp_path, labels, *, chunk=16):
    return classes_store(tmp_path / "s.zarr", labels, chunk=chunk, transform=TRANSFORM, crs_wkt=UTM)


def _labels() -> np.ndarray:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(75, 90), dtype=np.uint8)
    labels = np.repeat(np.repeat(labels[:25, :30], 3, axis=0), 3, axis=1)  # blobs of 3x3 pixels and larger
    labels[9:51, 19:61] = 0  # a frame of class 0 that keeps other class-1 blobs off the ring
    labels[10:50, 20:60] = 1  # a ring of class 1 (across chunk borders) around a hole of class 2
    labels[20:40, 30:50] = 2
    labels[0:6, 0:6] = NODATA_CLASS
    labels[53:65, 60:72] = 2
    for k in range(8):  # a diagonal staircase of class 0 on class 2: 8-connected, touching only at corners
        labels[55 + k, 62 + k] = 0
    return labels


def _rasterised(geoms, ids, shape, transform) -> np.ndarray:
    return rasterio.features.rasterize(zip(geoms, ids), out_shape=shape, transform=Affine(*transform), fill=0,
                                       dtype="int64")


def test_polygons_rasterise_back_to_the_global_labelling_with_holes_and_corner_parts(tmp_path):
    labels = _labels()
    path, grid = _store(tmp_path, labels)
    out = export_region_polygons(path, tmp_path / "s.regions.parquet", scene="s", grid=grid,
                                 class_names=("water", "land", "urban"))
    table = pq.read_table(out)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    ids = table.column("region_id").to_numpy()
    back = _rasterised(geoms, ids, labels.shape, TRANSFORM)
    truth = label(labels, background=NODATA_CLASS, connectivity=2)
    # equal up to renumbering: a bijection between region ids and the global labels
    assert np.array_equal(back > 0, truth > 0)
    pairs = np.unique(np.stack([back[truth > 0], truth[truth > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == truth.max() == len(ids)
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))
    # each polygon's area is its pixels' area; class and name as stored
    np.testing.assert_allclose(shapely.area(geoms), table.column("pixel_count").to_numpy() * 100.0)
    np.testing.assert_allclose(table.column("area_crs2").to_numpy(), shapely.area(geoms))
    cls = table.column("class_id").to_numpy()
    for rid, c in zip(ids, cls):
        assert set(np.unique(labels[back == rid])) == {c}
    # the ring keeps its hole; the staircase is one region of parts touching only at corners
    ring = geoms[int(back[12, 22]) - 1]
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1
    stair = geoms[int(back[55, 62]) - 1]
    assert stair.geom_type == "MultiPolygon" and len(stair.geoms) == 8
    assert all(shapely.is_valid(geoms))
    # the GeoParquet opens in GeoPandas with the scene's CRS and the bbox covering
    gpd = pytest.importorskip("geopandas")
    frame = gpd.read_parquet(out)
    assert frame.crs == CRS.from_wkt(UTM) and len(frame) == len(ids)
    box = table.column("bbox").combine_chunks()
    np.testing.assert_allclose(box.field("xmin").to_numpy(), shapely.bounds(geoms)[:, 0])


def test_region_ids_do_not_depend_on_the_store_chunking(tmp_path):
    labels = _labels()
    a, _ = _store(tmp_path / "a", labels, chunk=16)
    b, _ = _store(tmp_path / "b", labels, chunk=40)
    ma, pa_ = trace_regions(a)
    mb, pb = trace_regions(b)
    assert np.array_equal(ma.class_id, mb.class_id) and np.array_equal(ma.pixel_count, mb.pixel_count)
    assert all(x.equals(y) for x, y in zip(pa_, pb))


def test_a_regions_table_that_disagrees_with_the_store_is_an_error(tmp_path):
    import pyarrow as pa

    labels = _labels()
    path, grid = _store(tmp_path, labels)
    table = tmp_path / "regions.parquet"
    pq.write_table(pa.table({"region_id": pa.array([1], pa.int64()), "class_id": pa.array([0], pa.uint8()),
                             "pixel_count": pa.array([9], pa.int64())}), table)
    with pytest.raises(OutputError, match="differ from this table"):
        export_region_polygons(path, tmp_path / "x.parquet", scene="s", grid=grid, class_names=("a",),
                               regions_table=table)
    assert not (tmp_path / "x.parquet").exists()
