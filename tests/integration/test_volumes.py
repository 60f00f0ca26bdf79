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
    classes = store[layout.CLASSES][:]
    np.testing.assert_array_equal(classes, expected)
    assert store.attrs["ome"]["version"] == "0.5"
    assert store[layout.CLASSES].chunks == (8, 8, 8)
    # overview levels listed in the root OME multiscales, colours in its image-label, a quicklook
    datasets = store.attrs["ome"]["multiscales"][0]["datasets"]
    records = store.attrs[layout.TESSERA_ATTR][layout.KEY_OVERVIEWS]
    assert [d["path"] for d in datasets] == [r["path"] for r in records] and len(records) > 1
    np.testing.assert_array_equal(store[datasets[1]["path"]][:], mode_downsample(classes, records[1]["factors"]))
    assert [c["label-value"] for c in store.attrs["ome"]["image-label"]["colors"]] == [0, 1, 2, 3, 255]
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


def test_nifti_volumes_in_ras_and_lps_run_and_export_on_their_own_affine(tmp_path):
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
        "resources": {"actors": 1, "torch_threads": 1},
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
    assert (root / "_work" / "inputs").is_dir()  # the .nii.gz inputs' one-time conversion


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
