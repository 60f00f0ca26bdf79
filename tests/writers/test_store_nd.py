"""Scene stores by grid kind: 2D GeoGrid stores byte-identical to the pre-grid writer, 3D
VolumeGrid stores with OME-Zarr 0.5 metadata, chunk writes in any order, grid validation."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.readers.base import SceneInfo
from pipelines.writers import zarr_masks
from pipelines.writers.zarr_masks import (
    create_scene_store,
    mark_complete,
    read_store_grid,
    read_store_state,
    scene_grid,
    write_chunk,
)
from schemas import store as layout
from schemas.store import GeoGrid, VolumeGrid

REPO = Path(__file__).resolve().parents[2]
# main before the grid types: the reference the 2D layout must keep byte for byte.
REFERENCE_COMMIT = "aa23489dc75cce558921be46f8e669a825d836c0"
WKT = ('PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
       '298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION['
       '"Transverse_Mercator"],PARAMETER["central_meridian",15],UNIT["metre",1]]')
CLASS_NAMES = ("background", "water body", "forest")
PROVENANCE = {layout.KEY_FINGERPRINT: "f" * 64, layout.KEY_MODEL: {"name": "m", "sha256": "0" * 64},
              layout.KEY_HALO: 8, layout.KEY_SOURCE: "scene.tif", layout.KEY_INPUT_SHA256: "1" * 64}

# 0.8 x 0.8 x 3 mm voxels, array axes (z, y, x): z runs along S (3 mm), y along A, x along R.
SPACING_ZYX = (3.0, 0.8, 0.8)
ORIGIN_RAS = (-100.0, 50.0, 20.0)
ALIGNED_AFFINE = ((0.0, 0.0, 0.8, -100.0),
                  (0.0, 0.8, 0.0, 50.0),
                  (3.0, 0.0, 0.0, 20.0),
                  (0.0, 0.0, 0.0, 1.0))


def _oblique_affine() -> np.ndarray:
    """Same spacing and origin, rotated 30 degrees about S and flipped along A."""
    t = math.radians(30.0)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([1.0, -1.0, 1.0])
    linear = rot @ flip @ np.array(ALIGNED_AFFINE)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = ORIGIN_RAS
    return affine


def _load_reference_writer(tmp_path: Path):
    """The store writer and layout of REFERENCE_COMMIT as modules (skip without git history)."""
    modules = {}
    for name, rel in (("ref_layout", "schemas/store.py"), ("ref_zarr_masks", "pipelines/writers/zarr_masks.py")):
        try:
            source = subprocess.run(["git", "-C", str(REPO), "show", f"{REFERENCE_COMMIT}:{rel}"],
                                    check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"reference commit {REFERENCE_COMMIT[:10]} not readable with git: {exc}")
        file = tmp_path / f"{name}.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(f"_tessera_{name}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    writer = modules["ref_zarr_masks"]
    writer.layout = modules["ref_layout"]  # its functions read `layout` at call time
    return writer


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cores(shape: tuple[int, ...], chunk: tuple[int, ...]) -> list[tuple[slice, ...]]:
    starts = [range(0, n, c) for n, c in zip(shape, chunk)]
    return [tuple(slice(s, min(s + c, n)) for s, c, n in zip(st, chunk, shape)) for st in itertools.product(*starts)]


@pytest.mark.parametrize(("transform", "crs_wkt", "with_probabilities"), [
    ((10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), WKT, True),
    ((10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), None, False),
    ((0.5, 0.25, 1234.5, 0.125, -0.5, -987.25), WKT, False),  # rotated grid
])
def test_2d_store_bytes_equal_reference_writer(tmp_path, transform, crs_wkt, with_probabilities):
    ref = _load_reference_writer(tmp_path)
    shape, chunk = (37, 29), (16, 16)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=shape, dtype=np.uint8)
    probs = rng.random((3, *shape)).astype(np.float16)
    common = dict(shape=shape, chunk_shape=chunk, class_names=CLASS_NAMES, provenance=PROVENANCE,
                  with_probabilities=with_probabilities)
    ref.create_scene_store(tmp_path / "ref.zarr", transform=transform, crs_wkt=crs_wkt, **common)
    create_scene_store(tmp_path / "new.zarr", grid=GeoGrid(transform, crs_wkt), **common)
    assert _tree_bytes(tmp_path / "new.zarr") == _tree_bytes(tmp_path / "ref.zarr")

    for core in _cores(shape, chunk):
        p = probs[(slice(None), *core)] if with_probabilities else None
        ref.write_chunk(tmp_path / "ref.zarr", core, labels[core], probabilities=p)
        write_chunk(tmp_path / "new.zarr", core, labels[core], probabilities=p)
    ref.mark_complete(tmp_path / "ref.zarr", {"n_chunks": 6})
    mark_complete(tmp_path / "new.zarr", {"n_chunks": 6})
    new, old = _tree_bytes(tmp_path / "new.zarr"), _tree_bytes(tmp_path / "ref.zarr")
    assert sorted(new) == sorted(old)
    assert len([k for k in new if "/c/" in k]) >= 4  # chunk files were compared, not only metadata
    assert new == old
    new_group = zarr.open_group(str(tmp_path / "new.zarr"), mode="r")
    old_group = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    assert dict(new_group.attrs) == dict(old_group.attrs)
    for name in old_group.array_keys():
        assert dict(new_group[name].attrs) == dict(old_group[name].attrs)
        np.testing.assert_array_equal(new_group[name][...], old_group[name][...])
    assert read_store_grid(tmp_path / "new.zarr") == GeoGrid(transform, crs_wkt)


def _create_volume(path: Path, grid: VolumeGrid, shape, chunk, *, with_probabilities=False) -> None:
    create_scene_store(path, shape=shape, chunk_shape=chunk, grid=grid, class_names=CLASS_NAMES,
                       provenance=PROVENANCE, with_probabilities=with_probabilities, image=(2, "int16"))


def test_3d_chunks_in_any_order_reproduce_the_volume_and_rewrite_same_bytes(tmp_path):
    shape, chunk = (7, 20, 18), (3, 8, 8)
    rng = np.random.default_rng(11)
    volume = rng.integers(0, 3, size=shape, dtype=np.uint8)
    probs = rng.random((3, *shape)).astype(np.float16)
    grid = VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX)
    path = tmp_path / "ct.zarr"
    _create_volume(path, grid, shape, chunk, with_probabilities=True)
    cores = _cores(shape, chunk)
    assert len(cores) == 27
    image = rng.integers(-1000, 3000, size=(2, *shape)).astype(np.int16)
    order = rng.permutation(len(cores))
    for i in order:
        write_chunk(path, cores[i], volume[cores[i]], probabilities=probs[(slice(None), *cores[i])],
                    image=image[(slice(None), *cores[i])])
    classes = zarr.open_array(str(path), path=layout.classes_path(3), mode="r")
    assert classes.shape == shape and classes.dtype == np.uint8
    assert classes.metadata.dimension_names == ("z", "y", "x")
    np.testing.assert_array_equal(classes[...], volume)
    stored_probs = zarr.open_array(str(path), path=layout.PROBABILITIES, mode="r")
    assert stored_probs.metadata.dimension_names == ("class", "z", "y", "x")
    np.testing.assert_array_equal(stored_probs[...], probs)
    stored_image = zarr.open_array(str(path), path=layout.image_path(0), mode="r")
    assert stored_image.metadata.dimension_names == ("c", "z", "y", "x")
    assert stored_image.dtype == np.int16 and stored_image.chunks == (2, *chunk)
    np.testing.assert_array_equal(stored_image[...], image)

    first = _tree_bytes(path)
    for i in order[::-1]:  # every chunk again, in the reverse order: a retry changes no byte
        write_chunk(path, cores[i], volume[cores[i]], probabilities=probs[(slice(None), *cores[i])],
                    image=image[(slice(None), *cores[i])])
    assert _tree_bytes(path) == first


def test_3d_ome_metadata_field_by_field(tmp_path):
    shape, chunk = (5, 6, 7), (4, 4, 4)
    path = tmp_path / "ct.zarr"
    _create_volume(path, VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX), shape, chunk)
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    # the root: the OME image of the input volume, channel axis first
    ome = root["attributes"]["ome"]
    assert set(ome) == {"version", "multiscales"}
    assert ome["version"] == "0.5"
    assert len(ome["multiscales"]) == 1
    multiscale = ome["multiscales"][0]
    space = [{"name": n, "type": "space", "unit": "millimeter"} for n in ("z", "y", "x")]
    assert multiscale["axes"] == [{"name": "c", "type": "channel"}, *space]
    assert len(multiscale["datasets"]) == 1
    dataset = multiscale["datasets"][0]
    assert dataset["path"] == "0" == layout.image_path(0)
    assert dataset["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 3.0, 0.8, 0.8]},
        {"type": "translation", "translation": [0.0, 20.0, 50.0, -100.0]},  # origin as (S, A, R)
    ]
    image_meta = json.loads((path / "0" / "zarr.json").read_text())
    assert image_meta["shape"] == [2, *shape] and image_meta["data_type"] == "int16"
    assert image_meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, *chunk]
    assert image_meta["dimension_names"] == [a["name"] for a in multiscale["axes"]]
    # the labels group lists the one label image, which points back to the root image
    labels = json.loads((path / "labels" / "zarr.json").read_text())
    assert labels["node_type"] == "group"
    assert labels["attributes"] == {"ome": {"version": "0.5", "labels": ["classes"]}}
    label_ome = json.loads((path / "labels" / "classes" / "zarr.json").read_text())["attributes"]["ome"]
    assert set(label_ome) == {"version", "multiscales"}  # image-label comes with the levels and colours
    label_multiscale = label_ome["multiscales"][0]
    assert label_multiscale["axes"] == space
    label_dataset = label_multiscale["datasets"][0]
    assert label_dataset["path"] == "0"
    assert label_dataset["coordinateTransformations"] == [
        {"type": "scale", "scale": [3.0, 0.8, 0.8]},
        {"type": "translation", "translation": [20.0, 50.0, -100.0]},
    ]
    # the label dataset is an integer array whose dimension_names are the axes names
    array_meta = json.loads((path / layout.classes_path(3) / "zarr.json").read_text())
    assert array_meta["shape"] == list(shape)
    assert array_meta["dimension_names"] == [a["name"] for a in label_multiscale["axes"]]
    assert array_meta["data_type"] == "uint8"
    # the OME transform maps voxels where the affine does (physical z, y, x == S, A, R)
    scale = np.array(label_dataset["coordinateTransformations"][0]["scale"])
    shift = np.array(label_dataset["coordinateTransformations"][1]["translation"])
    index = np.array([[0, 0, 0], [4, 5, 6], [1, 3, 2]], dtype=np.float64)
    ras = (np.array(ALIGNED_AFFINE) @ np.c_[index, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose((index * scale + shift)[:, ::-1], ras, rtol=0, atol=1e-12)
    # no 2D georeferencing arrays in a volume store: the image at the root, the classes under labels/
    group = zarr.open_group(str(path), mode="r")
    assert sorted(group.array_keys()) == ["0"]
    assert sorted(group.group_keys()) == ["labels"]
    assert sorted(group["labels/classes"].array_keys()) == ["0"]
    tessera = root["attributes"][layout.TESSERA_ATTR]
    assert tessera[layout.KEY_SPACING_MM] == [3.0, 0.8, 0.8]
    assert layout.KEY_TRANSFORM not in tessera and layout.KEY_CRS_WKT not in tessera


def test_classes_path_is_the_2d_path_and_the_3d_label_image_level():
    assert layout.classes_path(2) == "classes"
    assert layout.classes_path(2, 3) == "overviews/3/classes"
    assert layout.classes_path(GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), 1) == "overviews/1/classes"
    assert layout.classes_path(3) == "labels/classes/0"
    assert layout.classes_path(VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX), 2) == "labels/classes/2"
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        layout.classes_path(4)


@pytest.mark.parametrize("kind", ["oblique", "diagonal"])
def test_3d_affine_without_ome_equivalent_keeps_scale_only_and_exact_affine(tmp_path, kind):
    # diagonal: voxel axis 0 ("z") runs along R, so no OME z/y/x translation describes it
    affine = _oblique_affine() if kind == "oblique" else np.diag([0.8, 0.8, 3.0, 1.0])
    if kind == "diagonal":
        affine[:3, 3] = ORIGIN_RAS
    spacing = SPACING_ZYX if kind == "oblique" else (0.8, 0.8, 3.0)
    grid = VolumeGrid(affine, spacing)
    assert not grid.is_axis_aligned
    path = tmp_path / "oblique.zarr"
    _create_volume(path, grid, (4, 5, 6), (2, 5, 6))
    mark_complete(path)
    group = zarr.open_group(str(path), mode="r")
    dataset = group.attrs["ome"]["multiscales"][0]["datasets"][0]
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, *spacing]}]
    dataset = group["labels/classes"].attrs["ome"]["multiscales"][0]["datasets"][0]
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": list(spacing)}]
    stored = np.array(group.attrs[layout.TESSERA_ATTR][layout.KEY_AFFINE], dtype=np.float64)
    assert stored.shape == (4, 4)
    np.testing.assert_array_equal(stored, affine)  # exact float64 round trip, through JSON
    assert read_store_grid(path) == grid
    assert read_store_state(path)[layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE


def test_3d_mark_complete_keeps_ome_and_provenance(tmp_path):
    path = tmp_path / "ct.zarr"
    assert read_store_state(path) is None
    _create_volume(path, VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX), (3, 4, 4), (3, 4, 4))
    assert read_store_state(path)[layout.KEY_STATUS] == layout.STORE_STATUS_PARTIAL
    before = zarr.open_group(str(path), mode="r").attrs["ome"]
    labels_before = zarr.open_group(str(path), mode="r")["labels/classes"].attrs["ome"]
    mark_complete(path, {"n_chunks": 1})
    state = read_store_state(path)
    assert state[layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE
    assert state["n_chunks"] == 1 and state[layout.KEY_FINGERPRINT] == "f" * 64
    assert state[layout.KEY_CLASS_NAMES] == list(CLASS_NAMES)
    assert zarr.open_group(str(path), mode="r").attrs["ome"] == before
    assert zarr.open_group(str(path), mode="r")["labels/classes"].attrs["ome"] == labels_before
    assert (path / "zarr.json").is_file()


def test_spacing_defaults_to_affine_column_norms():
    grid = VolumeGrid(_oblique_affine())
    assert grid.spacing_mm == pytest.approx(SPACING_ZYX, rel=1e-12)
    assert VolumeGrid(np.array(ALIGNED_AFFINE).reshape(-1)) == VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX)


def test_scene_grid_picks_the_kind_from_the_reader_info():
    common = dict(path="s", count=1, dtype="uint8", crs=None, nodata=None)
    geo = SceneInfo(shape=(4, 5), crs_wkt=WKT, transform=(10.0, 0.0, 5.0, 0.0, -10.0, 9.0),
                    block_shape=(4, 5), **common)
    assert scene_grid(geo) == GeoGrid((10.0, 0.0, 5.0, 0.0, -10.0, 9.0), WKT)
    vol = SceneInfo(shape=(3, 4, 5), crs_wkt=None, transform=None, block_shape=(3, 4, 5), format="nifti",
                    affine=tuple(np.array(ALIGNED_AFFINE).reshape(-1)), spacing=SPACING_ZYX, **common)
    assert scene_grid(vol) == VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX)
    with pytest.raises(ValueError, match="neither a transform"):
        scene_grid(SceneInfo(shape=(3, 4), crs_wkt=None, transform=None, block_shape=(3, 4), **common))


def _with(matrix, row, col, value):
    m = np.array(matrix, dtype=np.float64)
    m[row, col] = value
    return m


@pytest.mark.parametrize(("make", "match"), [
    (lambda: GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0)), r"GeoGrid\.transform: expected 6 numbers"),
    (lambda: GeoGrid((1.0, 0.0, 0.0, 0.0, float("nan"), 0.0)), r"GeoGrid\.transform\[4\]: .*nan"),
    (lambda: GeoGrid((1.0, 0.0, float("inf"), 0.0, -1.0, 0.0)), r"GeoGrid\.transform\[2\]: .*inf"),
    (lambda: GeoGrid((1.0, "0", 0.0, 0.0, -1.0, 0.0)), r"GeoGrid\.transform\[1\]"),
    (lambda: GeoGrid((1.0, 2.0, 0.0, 0.5, 1.0, 0.0)), r"GeoGrid\.transform: singular"),
    (lambda: GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0), crs_wkt=4326), r"GeoGrid\.crs_wkt"),
    (lambda: VolumeGrid(np.eye(4)[:3]), r"VolumeGrid\.affine: expected a 4x4"),
    (lambda: VolumeGrid(_with(ALIGNED_AFFINE, 1, 2, float("nan"))), r"VolumeGrid\.affine\[1\]\[2\]"),
    (lambda: VolumeGrid(_with(ALIGNED_AFFINE, 3, 2, 1.0)), r"VolumeGrid\.affine: last row .*\[0, 0, 0, 1\]"),
    (lambda: VolumeGrid(_with(ALIGNED_AFFINE, 0, 2, 0.0)), r"VolumeGrid\.affine: singular"),
    (lambda: VolumeGrid(ALIGNED_AFFINE, (3.0, -0.8, 0.8)), r"VolumeGrid\.spacing_mm\[1\]: must be > 0"),
    (lambda: VolumeGrid(ALIGNED_AFFINE, (3.0, 0.8, 0.9)), r"VolumeGrid\.spacing_mm\[2\]: 0\.9 mm does not match"),
    (lambda: VolumeGrid(ALIGNED_AFFINE, (3.0, 0.8)), r"VolumeGrid\.spacing_mm: expected 3 numbers"),
    (lambda: VolumeGrid(ALIGNED_AFFINE, (3.0, 0.8, float("inf"))), r"VolumeGrid\.spacing_mm\[2\]"),
])
def test_bad_grids_raise_value_error_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_store_rejects_shapes_and_geometry_that_do_not_fit(tmp_path):
    volume = VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX)
    common = dict(class_names=CLASS_NAMES, provenance=PROVENANCE)
    with pytest.raises(ValueError, match=r"shape must be 3 positive integers"):
        create_scene_store(tmp_path / "a.zarr", shape=(4, 5), chunk_shape=(4, 5), grid=volume, **common)
    with pytest.raises(ValueError, match=r"chunk_shape must be 2 positive integers"):
        create_scene_store(tmp_path / "b.zarr", shape=(4, 5), chunk_shape=(0, 5),
                           grid=GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), **common)
    with pytest.raises(ValueError, match=r"grid must be a GeoGrid or a VolumeGrid, got tuple"):
        create_scene_store(tmp_path / "c.zarr", shape=(4, 5), chunk_shape=(4, 5),
                           grid=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), **common)
    with pytest.raises(ValueError, match=r"a volume store needs its input image"):
        create_scene_store(tmp_path / "d.zarr", shape=(4, 5, 6), chunk_shape=(4, 5, 6), grid=volume, **common)
    with pytest.raises(ValueError, match=r"a 2D store holds no input image"):
        create_scene_store(tmp_path / "e.zarr", shape=(4, 5), chunk_shape=(4, 5),
                           grid=GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), image=(1, "uint8"), **common)
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr", "d.zarr", "e.zarr"))

    path = tmp_path / "v.zarr"
    _create_volume(path, volume, (6, 8, 8), (3, 4, 4))
    with pytest.raises(ValueError, match=r"no `classes` for a core of 2 axes"):
        write_chunk(path, (slice(0, 4), slice(0, 4)), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"starts inside a chunk on axis 1"):
        write_chunk(path, (slice(0, 3), slice(2, 6), slice(0, 4)), np.zeros((3, 4, 4), np.uint8))
    classes = zarr.open_array(str(path), path=layout.classes_path(3), mode="r")
    assert (classes[...] == layout.NODATA_CLASS).all()  # nothing was written by the refused calls


def test_grid_values_are_frozen():
    grid = VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX)
    with pytest.raises(AttributeError):
        grid.spacing_mm = (1.0, 1.0, 1.0)
    assert hash(grid) == hash(VolumeGrid(ALIGNED_AFFINE, SPACING_ZYX))
    assert zarr_masks.scene_grid is scene_grid
