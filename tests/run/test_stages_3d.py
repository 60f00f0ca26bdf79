"""The n-dimensional core end to end, before any 3D reader ships: a volume format added as one
small reader class, read in halo windows by the real read stage, predicted by the real predictor
(a 3D oracle, overlapping tiles, Gaussian blend), written by the real write stage into a 3D store,
its partial statistics merged across chunk faces, edges and corners. The stitched volume must
equal the oracle on the whole volume, voxel for voxel, and the merged regions must equal
skimage's 26-connected labelling of it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from skimage.measure import label, regionprops

from pipelines.plan.chunks import chunk_grid_shape, pad_window, plan_chunks
from pipelines.readers import READERS, SceneInfo, read_window
from pipelines.readers.base import InputPolicy, valid_mask
from pipelines.run.stages import SceneContext, read_stage, write_stage
from pipelines.stats.merge import merge_regions
from pipelines.stats.partials import ChunkRegions
from pipelines.writers.zarr_masks import create_scene_store, scene_grid
from schemas import store as layout
from schemas.records import ChunkTask, Prediction
from tests.helpers import oracle_checkpoint
from workers.checkpoints import build_from_checkpoint, load_checkpoint
from workers.models.oracles import threshold_oracle_numpy
from workers.options import PredictorOptions
from workers.predictor import Predictor

SHAPE, CHUNK, HALO = (19, 23, 21), (8, 8, 8), 3
AFFINE = (0.0, 0.0, 0.8, -100.0, 0.0, 0.8, 0.0, 50.0, 3.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 1.0)


class NumpyVolumeReader:
    """A volume format in a dozen lines: (C, z, y, x) arrays saved with numpy."""

    name = "npyvol"
    suffixes = (".npyvol",)

    def open(self, path: str, *, policy: InputPolicy) -> SceneInfo:
        data = np.load(path, mmap_mode="r")
        return SceneInfo(path=path, shape=tuple(data.shape[1:]), count=data.shape[0], dtype=data.dtype.name,
                         crs_wkt=None, crs=None, transform=None, nodata=0, block_shape=tuple(data.shape[1:]),
                         format=self.name, affine=AFFINE, spacing=(3.0, 0.8, 0.8), orientation="SAR")

    def read(self, info, window, *, bands=None):
        data = np.load(info.path, mmap_mode="r")
        pixels = np.asarray(data[(slice(None), *window.read)])
        if bands is not None:
            pixels = pixels[[b - 1 for b in bands]]
        return pad_window(pixels, window), pad_window(valid_mask(pixels, info.nodata), window)

    def close(self) -> None:
        pass


@pytest.fixture
def volume(tmp_path, monkeypatch):
    from scipy.ndimage import gaussian_filter

    monkeypatch.setitem(READERS, NumpyVolumeReader.name, NumpyVolumeReader())
    rng = np.random.default_rng(11)
    field = np.stack([gaussian_filter(rng.normal(size=SHAPE), 2.0) for _ in range(2)])
    data = np.clip(10000 + field / field.std() * 4000, 1, 20000).astype(np.uint16)
    data[:, :8] = 0  # the first plane of chunks is wholly nodata: skipped
    data[:, :, :, -3:] = 0
    path = tmp_path / "ct.npyvol"
    with open(path, "wb") as fh:
        np.save(fh, data)
    return data, str(path)


def test_a_volume_goes_through_the_stages_and_equals_the_whole_volume_oracle(tmp_path, volume):
    from pipelines.readers import open_scene

    data, path = volume
    info = open_scene(path)
    assert info.format == "npyvol" and info.ndim == 3 and info.shape == SHAPE
    card_path = oracle_checkpoint(tmp_path / "model", bands=2, tile_size=8)
    ckpt = load_checkpoint(card_path)
    # tiles of 6 voxels with 50 % overlap inside 14-voxel windows: blended, not one pass per window
    predictor = Predictor(build_from_checkpoint(ckpt), ckpt.card,
                          options=PredictorOptions(device="cpu", tile_size=6, tile_overlap=0.5, batch_size=4))
    zarr_path = tmp_path / "ct.zarr"
    create_scene_store(zarr_path, shape=SHAPE, chunk_shape=CHUNK, grid=scene_grid(info),
                       class_names=ckpt.card.class_names, provenance={"fingerprint": "test"},
                       image=(info.count, info.dtype))
    ctx = SceneContext(scene_id=0, name="ct", info=info, bands=None, zarr_path=str(zarr_path),
                       work_dir=str(tmp_path / "work"), fingerprint="test",
                       grid_shape=chunk_grid_shape(SHAPE, CHUNK), chunk_shape=CHUNK)
    (tmp_path / "work").mkdir()
    windows = plan_chunks(SHAPE, CHUNK, HALO)
    skipped = 0
    for w in windows:
        read = read_stage(ChunkTask(scene_id=0, window=w), scenes={0: ctx})
        assert read.error == ""
        if read.skip:
            skipped += 1
            prediction = Prediction.passed_on(read)
        else:
            assert read.pixels.shape == (2, *w.window_shape)
            labels, _ = predictor.predict_core(read.pixels, read.valid, core=read.core_in_window)
            prediction = Prediction(task=read.task, labels=labels, probabilities=None, read_s=read.read_s,
                                    predict_s=0.0, image=read.core_image())
        result = write_stage(prediction, scenes={0: ctx})
        assert result.error == "" and result.key == read.task.key
    assert skipped == 3 * 3  # the first plane of chunks
    classes = zarr.open_array(str(zarr_path), path=layout.classes_path(3), mode="r")[:]
    # the root image is the input, channel for channel (the skipped chunks read as the fill, 0 = their input)
    image = zarr.open_array(str(zarr_path), path=layout.image_path(0), mode="r")
    assert image.dtype == np.uint16 and image.chunks == (2, *CHUNK)
    np.testing.assert_array_equal(image[:], data)

    valid = ~(data == 0).all(axis=0)
    x = ((data.astype(np.float32) - np.float32(10000.0)) * (np.float32(1.0) / np.float32(3000.0))) * valid
    expected = np.where(valid, threshold_oracle_numpy(x, 4), layout.NODATA_CLASS).astype(np.uint8)
    np.testing.assert_array_equal(classes, expected)

    merged = merge_regions([ChunkRegions.from_npz(tmp_path / "work" / f"{ChunkTask(0, w).key}.npz") for w in windows],
                           ndim=3)
    props = []
    for k in np.unique(expected[expected != layout.NODATA_CLASS]):
        props += [(k, p.area, tuple(p.bbox), tuple(np.round(p.centroid, 9)))
                  for p in regionprops(label(expected == k, connectivity=3))]
    ours = [(int(merged.class_id[i]), int(merged.pixel_count[i]),
             (int(merged.min_plane[i]), int(merged.min_row[i]), int(merged.min_col[i]),
              int(merged.max_plane[i]) + 1, int(merged.max_row[i]) + 1, int(merged.max_col[i]) + 1),
             tuple(np.round((merged.centroid_plane[i], merged.centroid_row[i], merged.centroid_col[i]), 9)))
            for i in range(len(merged))]
    assert len(ours) == len(props) > 10
    assert sorted(ours) == sorted(props)
    assert read_window(info, windows[-1])[0].shape == (2, *windows[-1].window_shape)
