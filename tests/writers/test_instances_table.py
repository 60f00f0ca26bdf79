"""Tests of the instance outputs from the write stage on: the store's `instances` array written by
`write_stage`, the driver's merge and relabel (`write_instances`), resumable and idempotent, and
the `instances` GeoParquet table as GeoPandas and DuckDB read it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from pyproj import CRS
from skimage.measure import regionprops

from pipelines.plan.chunks import chunk_grid_shape, plan_chunks
from pipelines.readers import SceneInfo
from pipelines.run.stages import SceneContext, write_stage
from pipelines.stats.instances import InstanceChunk, merge_instance_ids
from pipelines.writers.instances_table import (
    instance_chunk_loader,
    relabel_chunk,
    scene_max_instance_id,
    write_instances,
)
from pipelines.writers.zarr_masks import create_scene_store, write_instance_chunk
from schemas.instances import INSTANCES, instances_file
from schemas.records import ChunkTask, Prediction
from schemas.store import GeoGrid
from schemas.tables import INSTANCES_SCHEMA
from tests.stats.instance_cases import oracle_window, splits_and_duplicates
from tests.stats.test_instances import awkward_scene

CHUNK, HALO = 8, 3
TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
CLASS_NAMES = ("background", "tree", "house", "pond")


def scene_classes(truth: np.ndarray) -> np.ndarray:
    return np.where(truth > 0, 1 + truth % 3, 0).astype(np.uint8)


def write_scene(tmp_path: Path, truth: np.ndarray, *, with_instances: bool = True) -> SceneContext:
    """A store and work folder holding every chunk of `truth` as the write stage leaves them."""
    crs_wkt = CRS.from_epsg(32633).to_wkt()
    info = SceneInfo(path=str(tmp_path / "scene.tif"), shape=truth.shape, count=2, dtype="uint16", crs_wkt=crs_wkt,
                     crs="EPSG:32633", transform=TRANSFORM, nodata=None, block_shape=(CHUNK, CHUNK))
    grid_shape = chunk_grid_shape(truth.shape, CHUNK)
    ctx = SceneContext(scene_id=0, name="scene", info=info, bands=None, zarr_path=str(tmp_path / "scene.zarr"),
                       work_dir=str(tmp_path / "work"), fingerprint="f" * 64, grid_shape=grid_shape,
                       chunk_shape=(CHUNK, CHUNK))
    Path(ctx.work_dir).mkdir()
    create_scene_store(Path(ctx.zarr_path), shape=truth.shape, chunk_shape=(CHUNK, CHUNK),
                       grid=GeoGrid(transform=TRANSFORM, crs_wkt=crs_wkt), class_names=CLASS_NAMES, provenance={},
                       instances_max_id=scene_max_instance_id(grid_shape, (CHUNK, CHUNK)) if with_instances else None)
    classes = scene_classes(truth)
    for w in plan_chunks(truth.shape, CHUNK, HALO):
        prediction = Prediction(task=ChunkTask(scene_id=0, window=w), labels=classes[w.core], probabilities=None,
                                read_s=0.0, predict_s=0.0, instances=oracle_window(truth, w, n_bands=2))
        result = write_stage(prediction, scenes={0: ctx})
        assert result.error == ""
    return ctx


def finish(tmp_path: Path, ctx: SceneContext):
    return write_instances(tmp_path, ctx.name, zarr_path=Path(ctx.zarr_path), work_dir=Path(ctx.work_dir),
                           indices=[w.index for w in plan_chunks(ctx.info.shape, CHUNK, HALO)],
                           grid_shape=ctx.grid_shape, grid=GeoGrid(transform=TRANSFORM, crs_wkt=ctx.info.crs_wkt),
                           class_names=CLASS_NAMES)


def store_digest(zarr_path: str) -> str:
    """sha256 over the bytes of every chunk file of `instances`."""
    h = hashlib.sha256()
    for f in sorted((Path(zarr_path) / INSTANCES).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(zarr_path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def scene(tmp_path):
    truth = np.pad(awkward_scene(), ((0, 3), (0, 6)))  # 33 x 33: 5 x 5 chunks, the last ones partial
    return truth, write_scene(tmp_path, truth)


def test_the_write_stage_writes_provisional_ids_and_instance_files_before_the_marker(scene):
    truth, ctx = scene
    array = zarr.open_array(ctx.zarr_path, path=INSTANCES, mode="r")
    assert array.dtype == np.uint32 and array.fill_value == 0 and array.chunks == (CHUNK, CHUNK)
    assert array.metadata.dimension_names == ("y", "x")
    stored = array[:]
    assert np.array_equal(stored > 0, truth > 0)
    work = Path(ctx.work_dir)
    for w in plan_chunks(truth.shape, CHUNK, HALO):
        key = ChunkTask(scene_id=0, window=w).key
        inst = work / instances_file(key)
        assert inst.is_file() and (work / f"{key}.json").stat().st_mtime_ns >= inst.stat().st_mtime_ns
        chunk = InstanceChunk.from_npz(inst)
        assert np.array_equal(stored[w.core], chunk.provisional_core())
        assert chunk.window_origin == w.window_origin


def test_merge_relabels_only_the_chunks_holding_non_root_ids_and_equals_the_truth(tmp_path, scene):
    truth, ctx = scene
    indices = [w.index for w in plan_chunks(truth.shape, CHUNK, HALO)]
    load = instance_chunk_loader(Path(ctx.work_dir))
    relabel = merge_instance_ids(indices, load, grid_shape=ctx.grid_shape).relabel
    expected = {i for i in indices
                if set(map(int, np.unique(load(i).provisional_core()))) & set(relabel)}
    summary = finish(tmp_path, ctx)
    assert 0 < summary.n_chunks_relabelled == summary.n_chunks_rewritten == len(expected) < len(indices)
    stitched = zarr.open_array(ctx.zarr_path, path=INSTANCES, mode="r")[:]
    assert splits_and_duplicates(stitched, truth) == (0, 0)
    assert summary.n_instances == len(np.unique(truth[truth > 0])) == len(np.unique(stitched[stitched > 0]))
    assert summary.n_relabelled_ids == len(relabel)


def test_a_rerun_rewrites_nothing_and_an_interrupted_relabel_converges_to_the_same_bytes(tmp_path, scene):
    truth, ctx = scene
    before = tmp_path / "before.zarr"
    shutil.copytree(ctx.zarr_path, before)
    finish(tmp_path, ctx)
    clean = store_digest(ctx.zarr_path)
    table = (tmp_path / "tables" / "instances" / "scene.parquet").read_bytes()
    again = finish(tmp_path, ctx)
    assert again.n_chunks_rewritten == 0 and again.n_chunks_relabelled > 0
    assert store_digest(ctx.zarr_path) == clean
    assert (tmp_path / "tables" / "instances" / "scene.parquet").read_bytes() == table

    # the driver died half-way through the relabel: half the chunks hold final ids, half provisional
    shutil.rmtree(ctx.zarr_path)
    shutil.copytree(before, ctx.zarr_path)
    load = instance_chunk_loader(Path(ctx.work_dir))
    indices = [w.index for w in plan_chunks(truth.shape, CHUNK, HALO)]
    relabel = merge_instance_ids(indices, load, grid_shape=ctx.grid_shape).relabel
    keys, finals = np.array(list(relabel), np.uint64), np.array(list(relabel.values()), np.uint64)
    done = [i for i in indices[: len(indices) // 2] if relabel_chunk(Path(ctx.zarr_path), load(i), keys, finals)[1]]
    assert done
    resumed = finish(tmp_path, ctx)
    assert resumed.n_chunks_rewritten == resumed.n_chunks_relabelled - len(done)
    assert store_digest(ctx.zarr_path) == clean
    assert (tmp_path / "tables" / "instances" / "scene.parquet").read_bytes() == table


def test_the_table_matches_regionprops_and_is_geoparquet_that_geopandas_and_duckdb_read(tmp_path, scene):
    import duckdb
    import geopandas

    truth, ctx = scene
    finish(tmp_path, ctx)
    path = tmp_path / "tables" / "instances" / "scene.parquet"
    stitched = zarr.open_array(ctx.zarr_path, path=INSTANCES, mode="r")[:].astype(np.int64)
    props = {p.label: p for p in regionprops(stitched)}

    table = pq.read_table(path)
    assert table.schema.equals(INSTANCES_SCHEMA, check_metadata=False)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and set(column["geometry_types"]) <= {"Polygon", "MultiPolygon"}
    assert CRS.from_json_dict(column["crs"]).to_epsg() == 32633
    assert column["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}

    frame = geopandas.read_parquet(path)
    assert frame.crs.to_epsg() == 32633
    assert sorted(props) == frame["instance_id"].tolist()
    assert (frame.geometry.is_valid).all()
    np.testing.assert_allclose(frame.geometry.area, frame["pixel_count"] * 100.0, rtol=1e-12)
    np.testing.assert_allclose(frame["area_crs2"], frame["pixel_count"] * 100.0)
    np.testing.assert_allclose(frame["area_m2"], frame["area_crs2"], rtol=2e-3)  # UTM scale near the meridian
    bounds = frame.geometry.bounds  # geopandas reads the covering column as a filter, not as data
    for k, name in (("xmin", "minx"), ("ymin", "miny"), ("xmax", "maxx"), ("ymax", "maxy")):
        np.testing.assert_array_equal(table.column("bbox").combine_chunks().field(k).to_numpy(), bounds[name])
    for row in frame.itertuples():
        p = props[row.instance_id]
        g = int(truth[stitched == row.instance_id][0])
        assert row.pixel_count == p.area
        assert (row.min_row, row.min_col, row.max_row + 1, row.max_col + 1) == p.bbox
        assert row.centroid_row == pytest.approx(p.centroid[0]) and row.centroid_col == pytest.approx(p.centroid[1])
        assert row.centroid_x_crs == pytest.approx(500000.0 + 10 * (p.centroid[1] + 0.5))
        assert row.centroid_y_crs == pytest.approx(5000000.0 - 10 * (p.centroid[0] + 0.5))
        assert row.class_id == 1 + g % 3 and row.class_name == CLASS_NAMES[1 + g % 3]
        assert row.score == pytest.approx((g % 7 + 1) / 8)
        np.testing.assert_allclose(row.band_means, [g, 2 * g])
        # the polygon covers exactly the instance's pixel centres
        assert row.geometry.area == pytest.approx(p.area * 100.0)
        assert 13.0 < row.centroid_lon < 16.0 and 44.0 < row.centroid_lat < 46.0
    ring = frame[frame["instance_id"] == int(stitched[20, 17])].geometry.iloc[0]
    assert len(ring.interiors) == 1  # the ring's hole is kept
    two_parts = frame[frame["instance_id"] == int(stitched[1, 5])].geometry.iloc[0]
    assert two_parts.geom_type == "MultiPolygon" and len(two_parts.geoms) == 2

    con = duckdb.connect()
    n, pixels = con.execute(f"SELECT count(*), sum(pixel_count) FROM read_parquet('{path}')").fetchone()
    assert n == len(props) and pixels == int((truth > 0).sum())
    xmin = con.execute(f"SELECT min(bbox.xmin) FROM read_parquet('{path}')").fetchone()[0]
    assert xmin == pytest.approx(column["bbox"][0])


def test_an_empty_scene_writes_an_empty_table(tmp_path):
    truth = np.zeros((10, 12), dtype=np.int64)
    ctx = write_scene(tmp_path, truth)
    summary = finish(tmp_path, ctx)
    assert summary.n_instances == 0
    import geopandas

    frame = geopandas.read_parquet(tmp_path / "tables" / "instances" / "scene.parquet")
    assert len(frame) == 0 and frame.crs.to_epsg() == 32633


def test_a_store_without_instances_fails_the_chunk_with_the_scene_named(tmp_path):
    truth = np.zeros((8, 8), dtype=np.int64)
    truth[2:4, 2:4] = 1
    with pytest.raises(AssertionError):  # write_scene asserts every chunk succeeded
        write_scene(tmp_path, truth, with_instances=False)
    w = plan_chunks(truth.shape, CHUNK, HALO)[0]
    ctx_path = tmp_path / "scene.zarr"
    with pytest.raises(ValueError, match=f"{ctx_path}: no `instances` array"):
        write_instance_chunk(ctx_path, w.core, np.zeros((8, 8), np.uint64))


def test_the_instances_dtype_grows_to_uint64_past_uint32_ids(tmp_path):
    grid_shape, chunk_shape = (300, 300), (256, 256)  # 90000 chunks of 65537 ids: past 2**32
    assert scene_max_instance_id(grid_shape, chunk_shape) >= 2**32
    create_scene_store(tmp_path / "big.zarr", shape=(300 * 256, 300 * 256), chunk_shape=chunk_shape,
                       grid=GeoGrid(transform=TRANSFORM), class_names=CLASS_NAMES, provenance={},
                       instances_max_id=scene_max_instance_id(grid_shape, chunk_shape))
    array = zarr.open_array(str(tmp_path / "big.zarr"), path=INSTANCES, mode="r+")
    assert array.dtype == np.uint64
    write_instance_chunk(tmp_path / "big.zarr", (slice(0, 256), slice(0, 256)), np.full((256, 256), 2**33, np.uint64))
    assert int(array[0, 0]) == 2**33


def test_a_scene_without_a_crs_has_a_null_geoparquet_crs_and_no_lon_lat(tmp_path, scene):
    """GeoParquet reads a missing `crs` as OGC:CRS84; a scene without a CRS says null (unknown)."""
    truth, ctx = scene
    write_instances(tmp_path, "nocrs", zarr_path=Path(ctx.zarr_path), work_dir=Path(ctx.work_dir),
                    indices=[w.index for w in plan_chunks(truth.shape, CHUNK, HALO)], grid_shape=ctx.grid_shape,
                    grid=GeoGrid(transform=TRANSFORM, crs_wkt=None), class_names=CLASS_NAMES)
    table = pq.read_table(tmp_path / "tables" / "instances" / "nocrs.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    assert "crs" in geo["columns"]["geometry"] and geo["columns"]["geometry"]["crs"] is None
    assert table.column("centroid_lon").null_count == table.num_rows > 0
