"""A CT series through a whole job on a real local Ray: a DICOM directory in, an OME-Zarr volume,
26-connected regions in mm³ and scanner mm, and a NIfTI export on the input's affine out; a
series with a missing slice fails alone with its reason."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from scipy import ndimage
from skimage.measure import label, regionprops

from pipelines.plan.pyramid import mode_downsample
from pipelines.readers import open_scene
from pipelines.run.job import run_job
from schemas import store as layout
from schemas.job import JobSpec
from tests.helpers import oracle_checkpoint
from tests.readers.test_dicom import write_series
from workers.models.oracles import threshold_oracle_numpy

pytestmark = pytest.mark.usefixtures("ray_local")


def _ct(shape=(14, 20, 22), seed=3) -> np.ndarray:
    """(z, y, x) int16 stored values: smooth blobs, HU = stored - 1024 in about -1000..1000."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return np.clip(1024 + field / field.std() * 600, 0, 4000).astype(np.int16)


def _whole(info) -> np.ndarray:
    """The whole volume as the job's reader returns it, ``(C, z, y, x)``."""
    from pipelines.readers import read_window
    from schemas.window import ChunkWindow

    whole = tuple(slice(0, n) for n in info.shape)
    return read_window(info, ChunkWindow(index=(0, 0, 0), core=whole, read=whole, pad=((0, 0),) * 3))[0]


def test_a_dicom_series_runs_to_a_volume_store_regions_in_mm3_and_a_nifti_export(tmp_path):
    nib = pytest.importorskip("nibabel")
    stored = _ct()
    series = tmp_path / "ct-series"
    write_series(series, stored, orientation="oblique")
    broken = tmp_path / "broken-series"
    write_series(broken, _ct(seed=4), orientation="axial")
    sorted(broken.iterdir())[5].unlink()  # a missing slice somewhere in the series
    card = oracle_checkpoint(tmp_path / "model", bands=1, mean=0.0, std=500.0, tile_size=8, halo=2)
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": [str(series), str(broken)], "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8, "tile_overlap": 0.5},
        "resources": {"actors": 1, "torch_threads": 1},
        "output": {"root": str(root), "export": ["nifti"]},
    })
    result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["ct-series"] == ("complete", None)
    assert status["broken-series"][0] == "failed" and "broken-series" in status["broken-series"][1]

    info = open_scene(series)
    hu = stored.astype(np.float64) - 1024
    expected = threshold_oracle_numpy((hu / 500.0)[None].astype(np.float32), 4)
    store = zarr.open_group(str(root / "ct-series.zarr"), mode="r")
    classes = store[layout.classes_path(3)][:]
    np.testing.assert_array_equal(classes, expected)
    assert store.attrs["ome"]["version"] == "0.5"
    assert store[layout.classes_path(3)].chunks == (8, 8, 8)
    # the root image is the series as the reader reads it (HU after the rescale), in its dtype
    image = store[layout.image_path(0)]
    assert image.dtype == np.dtype(info.dtype) and image.shape == (1, *info.shape) and image.chunks == (1, 8, 8, 8)
    np.testing.assert_array_equal(image[:], _whole(info))
    np.testing.assert_allclose(image[0], hu)
    # overview levels listed in the OME multiscales of labels/classes, colours in its image-label, a quicklook
    labels = store[layout.LABEL_IMAGE]
    datasets = labels.attrs["ome"]["multiscales"][0]["datasets"]
    records = store.attrs[layout.TESSERA_ATTR][layout.KEY_OVERVIEWS]
    assert [f"{layout.LABEL_IMAGE}/{d['path']}" for d in datasets] == [r["path"] for r in records]
    assert len(records) > 1
    np.testing.assert_array_equal(labels[datasets[1]["path"]][:], mode_downsample(classes, records[1]["factors"]))
    assert [c["label-value"] for c in labels.attrs["ome"]["image-label"]["colors"]] == [0, 1, 2, 3, 255]
    assert labels.attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    assert [d["path"] for d in store.attrs["ome"]["multiscales"][0]["datasets"]] == [r["image_path"] for r in records]
    assert (root / "quicklooks" / "ct-series.png").is_file()

    affine = np.asarray(info.affine, dtype=np.float64).reshape(4, 4)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    table = pq.read_table(root / "tables" / "volume_regions" / "ct-series.parquet").to_pylist()
    want = sorted((int(k), int(p.area), tuple(int(b) for b in p.bbox))
                  for k in np.unique(expected) for p in regionprops(label(expected == k, connectivity=3)))
    got = sorted((r["class_id"], r["voxel_count"], (r["min_plane"], r["min_row"], r["min_col"], r["max_plane"] + 1,
                                                    r["max_row"] + 1, r["max_col"] + 1)) for r in table)
    assert got == want and len(got) > 3
    biggest = max(table, key=lambda r: r["voxel_count"])
    assert biggest["volume_mm3"] == pytest.approx(biggest["voxel_count"] * voxel_mm3, rel=1e-12)
    centre = np.array([biggest["centroid_plane"], biggest["centroid_row"], biggest["centroid_col"], 1.0])
    np.testing.assert_allclose((affine @ centre)[:3], [biggest[f"centroid_{a}_mm"] for a in "ras"], atol=1e-9)
    # mean input intensity (HU after the rescale) per region, against the voxels skimage finds
    for r in sorted(table, key=lambda r: -r["voxel_count"])[:5]:
        box = (r["min_plane"], r["min_row"], r["min_col"], r["max_plane"] + 1, r["max_row"] + 1, r["max_col"] + 1)
        region = next(p for p in regionprops(label(expected == r["class_id"], connectivity=3)) if p.bbox == box)
        z, y, x = region.coords.T
        assert r["mean_intensity"] == pytest.approx(hu[z, y, x].mean(), rel=1e-6)
    scene = pq.read_table(root / "tables" / "scenes" / "ct-series.parquet").to_pylist()[0]
    assert scene["class_areas"] is None
    assert [c["voxel_count"] for c in scene["class_volumes"]] == [int((expected == k).sum()) for k in range(4)]

    img = nib.load(root / "ct-series.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), classes.transpose(2, 1, 0))
    np.testing.assert_allclose(img.affine[:, [2, 1, 0, 3]], affine, atol=1e-4)  # float32 sform
    assert not (root / "broken-series.nii.gz").exists()


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_nifti_volumes_in_ras_and_lps_run_and_export_on_their_own_affine(tmp_path, stages):
    nib = pytest.importorskip("nibabel")
    inputs = tmp_path / "nifti"
    inputs.mkdir()
    volumes = {}
    for name, flips in (("ras", (1, 1, 1)), ("lps", (-1, -1, 1))):
        data = (_ct(shape=(18, 15, 11), seed=7) - 1024).astype(np.int16).transpose(2, 1, 0)  # (i, j, k)
        affine = np.diag([0.8 * flips[0], 0.9 * flips[1], 2.5 * flips[2], 1.0]).astype(np.float32)
        affine[:3, 3] = (12.5, -40.25, 7.0)
        nib.save(nib.Nifti1Image(data, affine.astype(np.float64)), inputs / f"{name}.nii.gz")
        volumes[name] = (data, nib.load(inputs / f"{name}.nii.gz").affine)
    good = (inputs / "ras.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(good[: len(good) // 2])  # truncated in the data
    card = oracle_checkpoint(tmp_path / "model", bands=1, mean=0.0, std=500.0, tile_size=8, halo=2)
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": ["nifti/*.nii.gz"], "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8},
        # split: the input image travels on the Prediction records from the actor to the write tasks
        "resources": {"actors": 1, "torch_threads": 1, "stages": stages,
                      **({"cpus_per_actor": 0.5} if stages == "split" else {})},
        "output": {"root": str(root), "export": ["nifti"]},
    })
    result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["ras"] == status["lps"] == ("complete", None)
    assert status["cut"][0] == "failed" and "cut.nii.gz" in status["cut"][1] and "truncated" in status["cut"][1]
    for name, (data, affine) in volumes.items():
        expected = threshold_oracle_numpy((data.astype(np.float32) / 500.0)[None], 4)  # (i, j, k)
        img = nib.load(root / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
        assert np.array_equal(img.affine, affine)  # the input's affine, bit for bit
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(affine) == tuple(name.upper())
        # a voxel at a known scanner point: the same voxel in the input and in the export
        ras = affine @ np.array([3, 4, 5, 1.0])
        assert tuple(np.rint(np.linalg.inv(img.affine) @ ras)[:3].astype(int)) == (3, 4, 5)
        # the store's root image is the input volume, voxel for voxel, in array order (z, y, x) = (k, j, i)
        store = zarr.open_group(str(root / f"{name}.zarr"), mode="r")
        image = store[layout.image_path(0)]
        assert image.dtype == np.int16 and image.shape == (1, *data.shape[::-1])
        np.testing.assert_array_equal(image[0], data.transpose(2, 1, 0))
        np.testing.assert_array_equal(store[layout.classes_path(3)][:], expected.transpose(2, 1, 0))
        _check_ome_layout(store, card)
    assert (root / "_work" / "inputs").is_dir()  # the .nii.gz inputs' one-time conversion


def _check_ome_layout(store: zarr.Group, card) -> None:
    """The OME-Zarr 0.5 layout of a volume store: the root image (channel axis, then z, y, x in mm,
    datasets 0..n), the `labels` group listing `classes`, and the label image `labels/classes`
    (the same spatial levels, image-label with the card's colours and `source` back to the root)."""
    from workers.checkpoints import load_checkpoint

    records = store.attrs[layout.TESSERA_ATTR][layout.KEY_OVERVIEWS]
    n = len(records)
    assert n > 1
    root = store.attrs["ome"]
    assert root["version"] == "0.5" and len(root["multiscales"]) == 1
    image = root["multiscales"][0]
    assert image["axes"] == [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]
    assert [d["path"] for d in image["datasets"]] == [str(k) for k in range(n)]
    assert store.attrs.get("ome", {}).get("image-label") is None
    assert store[layout.LABELS].attrs["ome"] == {"version": "0.5", "labels": ["classes"]}
    label = store[layout.LABEL_IMAGE].attrs["ome"]
    assert label["version"] == "0.5"
    classes = label["multiscales"][0]
    assert classes["axes"] == image["axes"][1:]
    assert [d["path"] for d in classes["datasets"]] == [str(k) for k in range(n)]
    for record, image_d, label_d in zip(records, image["datasets"], classes["datasets"]):
        assert store[image_d["path"]].shape[1:] == store[f"{layout.LABEL_IMAGE}/{label_d['path']}"].shape \
            == tuple(record["shape"])
        for t_image, t_label in zip(image_d["coordinateTransformations"], label_d["coordinateTransformations"],
                                    strict=True):
            kind = t_label["type"]
            assert t_image["type"] == kind and t_image[kind] == [1.0 if kind == "scale" else 0.0, *t_label[kind]]
        scale = label_d["coordinateTransformations"][0]["scale"]
        spacing = store.attrs[layout.TESSERA_ATTR][layout.KEY_SPACING_MM]
        assert scale == pytest.approx([s * f for s, f in zip(spacing, record["cumulative"])])
    colours = load_checkpoint(card).card.class_colors
    image_label = label["image-label"]
    assert image_label["source"] == {"image": "../../"}
    assert image_label["colors"] == [{"label-value": k, "rgba": layout.hex_to_rgba(c)} for k, c in enumerate(colours)] \
        + [{"label-value": 255, "rgba": [0, 0, 0, 0]}]


def test_the_real_totalsegmentator_ct_runs_chunked_and_exports_on_its_affine(tmp_path):
    from tests.conftest import SHARED_DATA

    ct = SHARED_DATA / "medical" / "totalseg_ct" / "example_ct.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{ct} not present (shared test data)")
    nib = pytest.importorskip("nibabel")
    card = oracle_checkpoint(tmp_path / "model", bands=1, mean=0.0, std=400.0, tile_size=32, halo=2)
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": [str(ct)], "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 48, "halo": 2, "tile_size": 32},
        "resources": {"actors": 1, "torch_threads": 1},
        "output": {"root": str(root), "export": ["nifti"]},
    })
    result = run_job(spec, base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"], result.scenes[0].error
    source = nib.load(ct)
    hu = np.asarray(source.dataobj, dtype=np.float32)  # (i, j, k) int32 HU
    expected = threshold_oracle_numpy((hu / np.float32(400.0))[None], 4)
    out = nib.load(root / "example_ct.nii.gz")
    assert out.shape == source.shape == (122, 101, 112)
    assert np.array_equal(out.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)
    table = pq.read_table(root / "tables" / "volume_regions" / "example_ct.parquet")
    voxel_mm3 = abs(np.linalg.det(source.affine[:3, :3]))
    assert sum(table.column("voxel_count").to_pylist()) == expected.size
    np.testing.assert_allclose(sum(table.column("volume_mm3").to_pylist()), expected.size * voxel_mm3, rtol=1e-9)
