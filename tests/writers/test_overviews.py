"""Overview levels in real Zarr stores: values, per-level georeferencing (2D) and OME transforms
(3D), image-label colours, chunk-wise computation with bounded memory, idempotence, and the
upgrade of an older complete store."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import zarr

from pipelines.plan.pyramid import mean_downsample, mode_downsample
from pipelines.writers.overviews import add_overviews, build_overviews
from pipelines.writers.zarr_masks import create_scene_store, mark_complete, write_chunk
from schemas import store as layout
from schemas.errors import OutputError
from schemas.model_card import DEFAULT_PALETTE

UTM = "EPSG:32633"
NAMES = ("water", "forest", "urban")
COLORS = ("#1f77b4", "#2ca02c", "#d62728")


def _store_2d(path, labels, chunk=32, transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)):
    grid = layout.GeoGrid(transform=transform, crs_wkt=UTM)
    create_scene_store(path, shape=labels.shape, chunk_shape=(chunk, chunk), grid=grid, class_names=NAMES,
                       provenance={"fingerprint": "f" * 64})
    write_chunk(path, tuple(slice(0, n) for n in labels.shape), labels)
    return grid


def _labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, shape).astype(np.uint8)
    labels[: shape[0] // 5] = layout.NODATA_CLASS  # a nodata band
    return labels


def test_2d_levels_equal_the_chained_numpy_mode_and_carry_their_transforms(tmp_path):
    path = tmp_path / "s.zarr"
    labels = _labels((150, 97))
    grid = _store_2d(path, labels)
    reports = build_overviews(path, class_colors=COLORS)
    group = zarr.open_group(str(path), mode="r")
    want = labels
    shapes = [(75, 49), (38, 25), (19, 13)]
    assert [r.shape for r in reports] == shapes
    for level, shape in enumerate(shapes, start=1):
        want = mode_downsample(want, (2, 2))
        level_array = group[layout.classes_path(2, level)]
        np.testing.assert_array_equal(level_array[:], want)
        assert level_array.chunks == tuple(min(32, n) for n in shape) and level_array.shape == shape
        ref = group[f"overviews/{level}/spatial_ref"].attrs["GeoTransform"].split()
        assert [float(v) for v in ref] == [500000.0, 10.0 * 2**level, 0.0, 5000000.0, 0.0, -10.0 * 2**level]
        x = group[f"overviews/{level}/x"][:]
        np.testing.assert_allclose(x[:2], 500000.0 + 10.0 * 2**level * np.array([0.5, 1.5]))
    attrs = group.attrs.asdict()
    assert attrs[layout.ZARR_CONVENTIONS_ATTR] == [layout.MULTISCALES_CONVENTION, layout.SPATIAL_CONVENTION]
    entries = attrs[layout.MULTISCALES_ATTR]["layout"]
    assert [e["asset"] for e in entries] == ["classes", *(f"overviews/{k}/classes" for k in (1, 2, 3))]
    assert [e.get("derived_from") for e in entries] == [None, "classes", "overviews/1/classes", "overviews/2/classes"]
    assert [e["transform"]["scale"] for e in entries] == [[1.0, 1.0]] + [[2.0, 2.0]] * 3
    records = attrs[layout.TESSERA_ATTR][layout.KEY_OVERVIEWS]
    assert [r["transform"] for r in records] == [list(grid.level((2**k, 2**k)).transform) for k in range(4)]
    assert [e["spatial:transform"] for e in entries] == [r["transform"] for r in records]
    assert [e["spatial:shape"] for e in entries] == [list(labels.shape), *map(list, shapes)]
    assert attrs["spatial:transform"] == list(grid.transform) and attrs["spatial:dimensions"] == ["y", "x"]
    assert attrs[layout.TESSERA_ATTR][layout.KEY_CLASS_COLORS] == list(COLORS)


def test_2d_levels_open_georeferenced_in_xarray(tmp_path):
    rioxarray = pytest.importorskip("rioxarray")
    xr = pytest.importorskip("xarray")
    path = tmp_path / "s.zarr"
    _store_2d(path, _labels((100, 90)))
    build_overviews(path)
    mark_complete(path)
    level = xr.open_zarr(path, group="overviews/1")
    assert rioxarray is not None and level.rio.crs.to_epsg() == 32633
    assert tuple(level.classes.rio.transform())[:6] == (20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0)
    assert level.classes.shape == (50, 45)


def test_rotated_2d_grid_scales_the_affine_columns():
    grid = layout.GeoGrid(transform=(8.0, 6.0, 100.0, 6.0, -8.0, 200.0))
    assert grid.level((4, 2)).transform == (16.0, 24.0, 100.0, 12.0, -32.0, 200.0)


def test_levels_are_computed_chunk_by_chunk_with_memory_bounded_by_the_chunk(tmp_path, monkeypatch):
    import pipelines.writers.overviews as overviews

    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_BLOCKS", 10**9)  # this process's memory, whatever Ray is up
    chunk = 64
    peaks = {}
    for side in (512, 1024):
        path = tmp_path / f"s{side}.zarr"
        labels = np.tile(_labels((256, 256), seed=3), (side // 256, side // 256))
        _store_2d(path, labels, chunk=chunk)
        tracemalloc.start()
        try:
            reports = build_overviews(path)
            _, peaks[side] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        n_chunks = (side // chunk) ** 2
        # every output chunk read exactly its 2x2 input chunks, never more
        assert [r.n_blocks for r in reports] == [n_chunks // 4**k for k in range(1, len(reports) + 1)]
        assert max(r.max_block_elements for r in reports) == (2 * chunk) ** 2
    # 4x the pixels, about the same peak (Python-side allocations, numpy and zarr buffers included)
    assert peaks[1024] < 1.5 * peaks[512], peaks
    assert peaks[1024] < 1024 * 1024 / 3, f"peak {peaks[1024]} B for a 1 MiB scene"


def test_large_levels_are_built_as_ray_tasks_with_the_same_bytes(tmp_path, monkeypatch, ray_local):
    import pipelines.writers.overviews as overviews

    labels = np.tile(_labels((128, 128), seed=5), (4, 4))[:500, :470]  # level 1: 16 x 15 chunks of 16
    here, there = tmp_path / "here.zarr", tmp_path / "ray.zarr"
    _store_2d(here, labels, chunk=16)
    _store_2d(there, labels, chunk=16)
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_BLOCKS", 10**9)
    local = build_overviews(here, class_colors=COLORS)
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_BLOCKS", 64)
    assert build_overviews(there)[0].tasks == 0  # one machine: built here
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_NODES", 1)  # as on a cluster
    remote = build_overviews(there, class_colors=COLORS)
    assert [r.tasks for r in local] == [0] * len(local)
    assert remote[0].tasks > 1 and remote[0].n_blocks == 16 * 15  # level 1 on Ray, in bands of chunk rows
    assert [r.tasks for r in remote[2:]] == [0] * len(remote[2:])  # small levels here
    assert [(r.shape, r.n_blocks, r.max_block_elements) for r in remote] == [
        (r.shape, r.n_blocks, r.max_block_elements) for r in local]
    a, b = zarr.open_group(str(here), mode="r"), zarr.open_group(str(there), mode="r")
    for level in range(1, len(local) + 1):
        np.testing.assert_array_equal(a[layout.classes_path(2, level)][:], b[layout.classes_path(2, level)][:])
    assert a.attrs.asdict() == b.attrs.asdict()


def test_large_volume_levels_and_image_levels_are_built_as_ray_tasks_with_the_same_bytes(tmp_path, monkeypatch,
                                                                                       ray_local):
    import pipelines.writers.overviews as overviews

    grid = layout.VolumeGrid(affine=np.eye(4))
    labels = _labels((40, 21, 18), seed=2)
    image = np.random.default_rng(2).normal(0, 100, (1, *labels.shape)).astype(np.float32)
    stores = []
    for name in ("here", "ray"):
        path = tmp_path / f"{name}.zarr"
        create_scene_store(path, shape=labels.shape, chunk_shape=(4, 8, 8), grid=grid, class_names=NAMES,
                           provenance={"fingerprint": "f" * 64}, image=(1, "float32"))
        write_chunk(path, tuple(slice(0, n) for n in labels.shape), labels, image=image)
        stores.append(path)
    here, there = stores
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_BLOCKS", 10**9)
    local = build_overviews(here, class_colors=COLORS)
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_BLOCKS", 8)
    monkeypatch.setattr(overviews, "DISTRIBUTED_MIN_NODES", 1)  # as on a cluster
    remote = build_overviews(there, class_colors=COLORS)
    # level 1 (20 x 11 x 9 in chunks of 4 x 8 x 8: 5 x 2 x 2): the classes in bands of chunk rows
    # along z, the image likewise along its first spatial axis (its axis 0, the channels, is one
    # chunk): 2 to 5 tasks each (at most 2 x the cluster's CPUs)
    assert local[0].tasks == 0 and remote[0].tasks >= 2 * 2
    a, b = zarr.open_group(str(here), mode="r"), zarr.open_group(str(there), mode="r")
    for level in range(1, len(local) + 1):
        np.testing.assert_array_equal(a[layout.classes_path(3, level)][:], b[layout.classes_path(3, level)][:])
        np.testing.assert_array_equal(a[layout.image_path(level)][:], b[layout.image_path(level)][:])
    np.testing.assert_array_equal(b["1"][:], mean_downsample(image, (1, 2, 2, 2)))


def test_rebuilding_writes_the_same_levels_and_metadata(tmp_path):
    path = tmp_path / "s.zarr"
    _store_2d(path, _labels((80, 70)))
    build_overviews(path, class_colors=COLORS)
    first = (zarr.open_group(str(path)).attrs.asdict(), zarr.open_array(str(path), path="overviews/1/classes")[:])
    build_overviews(path)  # colours now come from the store
    second = (zarr.open_group(str(path)).attrs.asdict(), zarr.open_array(str(path), path="overviews/1/classes")[:])
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])


def test_a_scene_within_one_chunk_gets_level_0_alone(tmp_path):
    path = tmp_path / "s.zarr"
    _store_2d(path, _labels((20, 30)))
    assert build_overviews(path) == ()
    group = zarr.open_group(str(path), mode="r")
    assert [e["asset"] for e in group.attrs[layout.MULTISCALES_ATTR]["layout"]] == ["classes"]
    assert group.attrs[layout.TESSERA_ATTR][layout.KEY_CLASS_COLORS] == list(DEFAULT_PALETTE[:3])


def test_3d_levels_scale_translation_and_image_label(tmp_path):
    # axis-aligned, anisotropic: z along S at 3 mm, y along A and x along R at 0.8 mm
    affine = [[0, 0, 0.8, -100.0], [0, 0.8, 0, 50.0], [3.0, 0, 0, 20.0], [0, 0, 0, 1]]
    grid = layout.VolumeGrid(affine=affine)
    path = tmp_path / "v.zarr"
    volume = _labels((10, 40, 36), seed=5)
    create_scene_store(path, shape=volume.shape, chunk_shape=(8, 8, 8), grid=grid, class_names=NAMES,
                       provenance={"fingerprint": "f" * 64}, image=(1, "float32"))
    write_chunk(path, tuple(slice(0, n) for n in volume.shape), volume,
                image=volume[None].astype(np.float32))
    reports = build_overviews(path, class_colors=COLORS)
    group = zarr.open_group(str(path), mode="r")
    label_group = group[layout.LABEL_IMAGE]
    ome = label_group.attrs[layout.OME_ATTR]
    datasets = ome["multiscales"][0]["datasets"]
    factors = [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
    assert [f"{layout.LABEL_IMAGE}/{d['path']}" for d in datasets] == [layout.classes_path(3, k) for k in range(4)]
    # the root image has the same levels, with a channel axis (scale 1, translation 0) in front
    image_datasets = group.attrs[layout.OME_ATTR]["multiscales"][0]["datasets"]
    assert [d["path"] for d in image_datasets] == ["0", "1", "2", "3"]
    for d, image_d in zip(datasets, image_datasets):
        assert [t["type"] for t in image_d["coordinateTransformations"]] == ["scale", "translation"]
        for t, image_t in zip(d["coordinateTransformations"], image_d["coordinateTransformations"]):
            assert image_t[t["type"]] == [1.0 if t["type"] == "scale" else 0.0, *t[t["type"]]]
    assert group.attrs[layout.OME_ATTR]["multiscales"][0]["type"] == "mean"
    assert [r.shape for r in reports] == [(10, 20, 18), (5, 10, 9), (3, 5, 5)]
    want = volume
    for level, ((fz, fy, fx), d) in enumerate(zip(factors, datasets)):
        scale, translation = (t[t["type"]] for t in d["coordinateTransformations"])
        assert scale == pytest.approx([3.0 * fz, 0.8 * fy, 0.8 * fx])
        # the level's voxel (0, 0, 0) sits at the centre of the level-0 block it summarises
        centre = np.array([(fz - 1) / 2, (fy - 1) / 2, (fx - 1) / 2, 1.0])
        s, a, r = (np.asarray(affine) @ centre)[[2, 1, 0]]
        assert translation == pytest.approx([s, a, r])
        level_grid = grid.level((fz, fy, fx))
        np.testing.assert_allclose(np.asarray(level_grid.affine)[:3, 3], [r, a, s])
        if level:
            want = mode_downsample(want, tuple(f1 // f0 for f0, f1 in zip(factors[level - 1], factors[level])))
            np.testing.assert_array_equal(label_group[d["path"]][:], want)
            assert group[d["path"]].shape == (1, *want.shape)
    label = ome["image-label"]
    assert ome["version"] == label["version"] == "0.5"
    assert label["colors"][:3] == [{"label-value": 0, "rgba": [31, 119, 180, 255]},
                                   {"label-value": 1, "rgba": [44, 160, 44, 255]},
                                   {"label-value": 2, "rgba": [214, 39, 40, 255]}]
    assert label["colors"][3] == {"label-value": 255, "rgba": [0, 0, 0, 0]}
    assert [p["name"] for p in label["properties"]] == [*NAMES, "nodata"]
    assert label["source"] == {"image": "../../"}
    assert group[layout.LABELS].attrs[layout.OME_ATTR] == {"version": "0.5", "labels": ["classes"]}
    assert "image-label" not in group.attrs[layout.OME_ATTR]


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_3d_image_levels_are_block_means_of_the_level_before(tmp_path, dtype):
    # odd sizes: the blocks at the far edges are cut short; the mean is over the voxels they have
    grid = layout.VolumeGrid(affine=[[0, 0, 0.7, 0], [0, 0.7, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    shape, chunk = (9, 21, 19), (4, 8, 8)
    rng = np.random.default_rng(3)
    image = rng.normal(0, 400, (2, *shape)).astype(dtype)
    if dtype == "float32":
        image[0, :3, :5, :5] = np.nan  # nodata: left out of a block's mean, NaN where the whole block is
    path = tmp_path / "v.zarr"
    create_scene_store(path, shape=shape, chunk_shape=chunk, grid=grid, class_names=NAMES,
                       provenance={"fingerprint": "f" * 64}, image=(2, dtype))
    for z in range(0, shape[0], chunk[0]):
        for y in range(0, shape[1], chunk[1]):
            for x in range(0, shape[2], chunk[2]):
                core = (slice(z, z + chunk[0]), slice(y, y + chunk[1]), slice(x, x + chunk[2]))
                write_chunk(path, core, np.zeros([len(range(*s.indices(n))) for s, n in zip(core, shape)], np.uint8),
                            image=image[(slice(None), *core)])
    reports = build_overviews(path, class_colors=COLORS)
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["0"][:], image)
    records = group.attrs[layout.TESSERA_ATTR][layout.KEY_OVERVIEWS]
    assert [r["image_path"] for r in records] == [str(k) for k in range(len(records))]
    assert len(reports) >= 2
    level0 = image
    for record in records[1:]:
        fz, fy, fx = record["factors"]
        level1 = group[record["image_path"]][:]
        assert level1.dtype == np.dtype(dtype) and level1.shape == (2, *record["shape"])
        # numpy block means, written out: pad each axis to a multiple of its factor with NaN
        padded_shape = [2, *(-(-n // f) * f for n, f in zip(level0.shape[1:], (fz, fy, fx)))]
        padded = np.full(padded_shape, np.nan)
        padded[:, :level0.shape[1], :level0.shape[2], :level0.shape[3]] = level0
        blocks = padded.reshape(2, padded_shape[1] // fz, fz, padded_shape[2] // fy, fy, padded_shape[3] // fx, fx)
        with warnings.catch_warnings():  # "Mean of empty slice" where a whole block is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmean(blocks, axis=(2, 4, 6))
        want = want.astype(dtype) if dtype == "float32" else np.rint(want).astype(dtype)
        np.testing.assert_array_equal(level1, want)
        np.testing.assert_array_equal(mean_downsample(level0, (1, fz, fy, fx)), want)
        level0 = level1
    # the first level: the top-left block of channel 0 is all NaN at level 1 where the block is
    if dtype == "float32":
        assert np.isnan(group["1"][0, 0, 0, 0]) and not np.isnan(group["1"][1, 0, 0, 0])
    # rebuilt: the same levels
    before = {k: group[k][:] for k in group.array_keys()}
    build_overviews(path)
    again = zarr.open_group(str(path), mode="r")
    assert sorted(again.array_keys()) == sorted(before)
    for k, v in before.items():
        np.testing.assert_array_equal(again[k][:], v)


def test_oblique_volume_levels_translate_by_the_half_block_only(tmp_path):
    grid = layout.VolumeGrid(affine=[[0.6, 0.6, 0, 0], [-0.6, 0.6, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    ome = grid.ome_multiscales([("0", (1, 1, 1)), ("1", (2, 2, 2))])
    level0, level1 = ome["multiscales"][0]["datasets"]
    assert [t["type"] for t in level0["coordinateTransformations"]] == ["scale"]
    assert level1["coordinateTransformations"][1]["translation"] == pytest.approx(
        [s / 2 for s in grid.spacing_mm])


def test_add_overviews_upgrades_a_complete_store_and_refuses_a_partial_one(tmp_path):
    path = tmp_path / "old.zarr"
    _store_2d(path, _labels((70, 70)))
    with pytest.raises(OutputError, match="old.zarr: status 'partial'"):
        add_overviews(path)
    mark_complete(path)
    add_overviews(path)
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"][layout.TESSERA_ATTR][layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE
    assert "overviews/1/classes" in meta["consolidated_metadata"]["metadata"]
    level1 = zarr.open_array(str(path), path="overviews/1/classes")[:]
    assert level1.shape == (35, 35)
    add_overviews(path)  # again, over its own consolidated metadata: the same levels
    np.testing.assert_array_equal(zarr.open_array(str(path), path="overviews/1/classes")[:], level1)
