"""A volume's outputs: the `volume_regions` table (mm³, scanner mm) from the slab-by-slab merge
against skimage and the affine, and the NIfTI export against nibabel."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage.measure import label, regionprops

from pipelines.writers.regions_table import write_regions
from pipelines.writers.tables import table_path
from pipelines.writers.zarr_masks import create_scene_store, write_chunk
from schemas.store import VolumeGrid
from tests.stats.cases import NODATA, blobby_volume, chunk_parts

# an oblique LPS-like affine: voxel (z, y, x) -> RAS mm, anisotropic (3 x 0.8 x 0.7 mm)
_ROT = np.array([[0.0, -0.2, -0.98], [0.0, -0.98, 0.2], [1.0, 0.0, 0.0]])
_ROT[:, 1:] /= np.linalg.norm(_ROT[:, 1:], axis=0)
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT * np.array([3.0, 0.8, 0.7])
AFFINE[:3, 3] = (120.5, -80.25, 30.0)
CLASSES = [f"c{k}" for k in range(8)]


def test_volume_regions_table_equals_skimage_in_voxels_mm3_and_scanner_mm(tmp_path):
    mask = blobby_volume((14, 17, 19), seed=4)
    parts = chunk_parts(mask, (5, 6, 7), skip_empty=True)[0]
    grid = VolumeGrid(tuple(map(tuple, AFFINE)))
    slabs = sorted({p.chunk_index[0] for p in parts})
    summary = write_regions(tmp_path, "ct", ([p for p in parts if p.chunk_index[0] == i] for i in slabs),
                            work_dir=tmp_path, grid=grid, class_names=CLASSES)
    table = pq.read_table(table_path(tmp_path, "volume_regions", "ct")).to_pylist()
    assert not table_path(tmp_path, "regions", "ct").exists()
    voxel_mm3 = 3.0 * 0.8 * 0.7
    want = []
    for k in np.unique(mask[mask != NODATA]):
        for p in regionprops(label(mask == k, connectivity=3)):
            centre = AFFINE[:3, :3] @ np.asarray(p.centroid) + AFFINE[:3, 3]
            want.append((int(k), int(p.area), tuple(int(b) for b in p.bbox), tuple(np.round(centre, 6))))
    got = [(r["class_id"], r["voxel_count"],
            (r["min_plane"], r["min_row"], r["min_col"], r["max_plane"] + 1, r["max_row"] + 1, r["max_col"] + 1),
            tuple(np.round((r["centroid_r_mm"], r["centroid_a_mm"], r["centroid_s_mm"]), 6))) for r in table]
    assert len(got) == summary.n_regions > 20
    assert sorted(got) == sorted(want)
    for r in table:
        assert r["volume_mm3"] == pytest.approx(r["voxel_count"] * voxel_mm3, rel=1e-12)
        assert r["class_name"] == CLASSES[r["class_id"]]
    assert [r["region_id"] for r in table] == list(range(1, len(table) + 1))
    assert summary.class_pixels == tuple(int((mask == k).sum()) for k in range(len(CLASSES)))


def test_nifti_export_carries_the_affine_and_the_labels_voxel_for_voxel(tmp_path):
    nib = pytest.importorskip("nibabel")
    from pipelines.writers.nifti_export import export_nifti

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(9, 11, 13), dtype=np.uint8)
    labels[0, 0, :] = NODATA
    grid = VolumeGrid(tuple(map(tuple, AFFINE)))
    path = tmp_path / "ct.zarr"
    create_scene_store(path, shape=labels.shape, chunk_shape=(4, 4, 4), grid=grid, class_names=tuple(CLASSES[:4]),
                       provenance={"fingerprint": "t"}, image=(1, "int16"))
    for z in range(0, 9, 4):
        for y in range(0, 11, 4):
            for x in range(0, 13, 4):
                core = (slice(z, min(z + 4, 9)), slice(y, min(y + 4, 11)), slice(x, min(x + 4, 13)))
                write_chunk(path, core, labels[core], image=labels[None][(slice(None), *core)].astype(np.int16))
    out = export_nifti(path, tmp_path / "ct.nii.gz", grid=grid)
    img = nib.load(out)
    assert img.shape == (13, 11, 9) and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.transpose(2, 1, 0))
    # the file's affine takes (i, j, k) = (x, y, z) where the grid takes (z, y, x): the same points;
    # NIfTI-1 stores the sform in float32 (an affine read from a NIfTI file is float32 already)
    assert np.array_equal(img.affine[:, [2, 1, 0, 3]], AFFINE.astype(np.float32).astype(np.float64))
    assert int(img.header["sform_code"]) == 1
    # a label at a known scanner point lands on the same voxel
    z, y, x = 5, 3, 7
    ras = AFFINE @ np.array([z, y, x, 1.0])
    i, j, k = np.rint(np.linalg.inv(img.affine) @ ras)[:3].astype(int)
    assert (i, j, k) == (x, y, z) and np.asarray(img.dataobj)[i, j, k] == labels[z, y, x]
