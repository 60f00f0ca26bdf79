"""A 2D model run slice by slice (2.5D) over NIfTI volumes through a whole job on a real local Ray:
the labels equal the 2D model run on each slice of the volume in a loop, across the array axis the
affine makes axial (the first for one volume, the last for a permuted one); an image in the same
job fails alone, naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from pipelines.readers import open_scene
from pipelines.run.job import run_job
from schemas import store as layout
from schemas.job import JobSpec
from schemas.model_card import slice_array_axis
from tests.helpers import smooth_scene, write_geotiff
from workers.checkpoints import save_checkpoint
from workers.models.oracles import ThresholdOracle

pytestmark = pytest.mark.usefixtures("ray_local")

MEAN, STD = 0.0, 400.0
CONTEXT, RADIUS = 2, 1  # a 5 x 3 x 3 neighbourhood: another slice axis gives other labels


def _reference(volume: np.ndarray, axis: int) -> np.ndarray:
    """(z, y, x) uint8 labels of the 2D oracle run on each slice across `axis` of a (z, y, x)
    volume: the slice and its CONTEXT neighbours on each side as channels, the volume reflected
    beyond its ends (what the job's reader pads a halo window with), one forward pass per slice."""
    normalised = (volume.astype(np.float32) - np.float32(MEAN)) * np.float32(1 / STD)
    moved = np.moveaxis(normalised, axis, 0)  # (S, A, B)
    padded = np.pad(moved, [(CONTEXT, CONTEXT), (RADIUS, RADIUS), (RADIUS, RADIUS)], mode="reflect")
    model2d = ThresholdOracle(2 * CONTEXT + 1, 4, radius=RADIUS)
    labels = []
    with torch.inference_mode():
        for s in range(moved.shape[0]):
            image = torch.from_numpy(np.ascontiguousarray(padded[s:s + 2 * CONTEXT + 1]))[None]
            logits = model2d(image)[0, :, RADIUS:-RADIUS, RADIUS:-RADIUS]
            labels.append(logits.argmax(0).numpy().astype(np.uint8))
    return np.moveaxis(np.stack(labels), 0, axis)


def test_a_2d_model_runs_slice_by_slice_over_volumes_as_the_per_slice_loop(tmp_path):
    nib = pytest.importorskip("nibabel")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    # (i, j, k) -> RAS: "plain" stores i to R, j to A, k to S (read as (z, y, x): z axial);
    # "permuted" stores i to S, j to R, k to A (read as (z, y, x): x axial)
    directions = {"plain": np.eye(3), "permuted": np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])}
    for name, rotation in directions.items():
        field = ndimage.gaussian_filter(rng.normal(size=(32, 32, 16)), 1.2)
        data = (field / field.std() * 500).astype(np.int16)  # (i, j, k)
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([0.9, 0.8, 2.0])
        affine[:3, 3] = (-20.0, 14.5, 3.0)
        nib.save(nib.Nifti1Image(data, affine), inputs / f"{name}.nii.gz")
    image = write_geotiff(inputs / "image.tif", smooth_scene((24, 24), bands=1), nodata=None)
    card = save_checkpoint(ThresholdOracle(2 * CONTEXT + 1, 4, radius=RADIUS), {
        "architecture": "oracle_threshold", "arch_args": {"radius": RADIUS}, "in_channels": 1,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(4)],
        "bands": [{"name": "ct", "mean": MEAN, "std": STD}], "tile_size": 64, "halo": 2,
        "slices": {"axis": "axial", "context": CONTEXT},
    }, tmp_path / "model", name="axial-2.5d")
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": [str(inputs / "plain.nii.gz"), str(inputs / "permuted.nii.gz"), str(image)],
        "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 16, "halo": 2},
        "resources": {"actors": 1, "torch_threads": 1},
        "output": {"root": str(root)},
    })
    result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["plain"] == status["permuted"] == ("complete", None)
    assert status["image"][0] == "failed"
    assert "image.tif" in status["image"][1] and "slice-wise" in status["image"][1]

    axes = {}
    for name in directions:
        info = open_scene(str(inputs / f"{name}.nii.gz"))
        axes[name] = slice_array_axis("axial", info.orientation, source=info.path)
        volume = np.asarray(nib.load(inputs / f"{name}.nii.gz").dataobj).transpose(2, 1, 0)  # (z, y, x)
        classes = zarr.open_group(str(root / f"{name}.zarr"), mode="r")[layout.classes_path(3)][:]
        expected = _reference(volume, axes[name])
        np.testing.assert_array_equal(classes, expected)
        # the slice-wise 2D labels are not those of another slice axis (the test would catch a mix-up)
        assert not np.array_equal(expected, _reference(volume, (axes[name] + 1) % 3))
    assert axes == {"plain": 0, "permuted": 2}
