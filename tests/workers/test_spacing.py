"""Volumes predicted at the spacing a model card declares: the target spacing per axis (3D and
slice-wise cards, tolerance), and windows read from a NIfTI through the real reader and predicted by
the actor at the card's spacing, equal to the whole (reflect-padded) volume resampled the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipelines.plan.chunks import plan_chunks
from pipelines.readers import SceneInfo, open_scene, read_window
from pipelines.run.resolve import check_scene_fits_model
from schemas.errors import InputError
from schemas.model_card import ModelCard
from schemas.records import ChunkTask, ReadWindow
from workers.actors import PredictorActor
from workers.checkpoints import save_checkpoint
from workers.models.oracles import ThresholdOracle
from workers.predictor import PredictorOptions
from workers.spacing import SPACING_RTOL, model_spacing, resampled_shape

MEAN, STD = 0.0, 400.0
HALO, CHUNK = 2, 8


def _card_fields(*, spacing_mm=(1.0, 0.8, 0.8), slices=None) -> dict:
    return {
        "architecture": "oracle_threshold", "arch_args": {}, "in_channels": 1,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(4)],
        "bands": [{"name": "ct", "mean": MEAN, "std": STD}], "tile_size": 64, "halo": HALO,
        **({"spacing_mm": list(spacing_mm)} if spacing_mm is not None else {}),
        **({"slices": slices} if slices else {}),
    }


def _card(**kw) -> ModelCard:
    return ModelCard.model_validate({**_card_fields(**kw), "name": "m", "weights": "w.safetensors",
                                     "weights_sha256": "0" * 64})


def test_the_model_spacing_of_3d_and_slicewise_cards():
    card = _card(spacing_mm=(1.0, 0.8, 0.8))
    assert model_spacing(card, (2.0, 0.8, 0.8)) == (1.0, 0.8, 0.8)
    assert model_spacing(card, (1.0 * (1 + SPACING_RTOL / 2), 0.8, 0.8)) is None  # within the tolerance
    assert model_spacing(card, None) is None and model_spacing(card, (0.5, 0.5)) is None  # no spacing; an image
    assert model_spacing(_card(spacing_mm=None), (2.0, 0.8, 0.8)) is None
    axial = _card(spacing_mm=(0.5, 0.6), slices={"axis": "axial"})
    assert model_spacing(axial, (3.0, 0.8, 0.9), slice_axis=0) == (3.0, 0.5, 0.6)  # the slice axis kept
    assert model_spacing(axial, (0.8, 0.9, 3.0), slice_axis=2) == (0.5, 0.6, 3.0)
    assert model_spacing(axial, (3.0, 0.5, 0.6), slice_axis=0) is None
    with pytest.raises(ValueError, match="slice-wise: its spacing_mm must be the in-plane"):
        model_spacing(_card(spacing_mm=(1.0, 0.5, 0.6), slices={"axis": "axial"}), (3.0, 0.8, 0.9), slice_axis=0)
    assert resampled_shape((12, 12, 12), (2.0, 0.8, 0.8), (1.0, 0.8, 1.6)) == (24, 12, 6)


def test_a_card_spacing_that_does_not_fit_a_volume_is_refused_naming_the_file():
    affine = np.diag([2.0, 0.8, 0.8, 1.0])[[2, 1, 0, 3]][:, [2, 1, 0, 3]]
    info = SceneInfo.of_volume("ct.nii", fmt="nifti", shape=(6, 8, 8), count=1, dtype="int16", source_dtype="int16",
                               derive=None, block_shape=(6, 8, 8), affine=affine)
    bad = _card(spacing_mm=(0.5, 0.6))  # a 2D spacing on a card without slices
    with pytest.raises(InputError, match=r"ct\.nii: model 'm': spacing_mm \[0\.5, 0\.6\] does not give the 3 axes"):
        check_scene_fits_model(info, bands=None, card=bad)
    check_scene_fits_model(info, bands=None, card=_card())


def _oracle_probabilities(volume: np.ndarray) -> torch.Tensor:
    """(K, *volume) softmax of the pointwise oracle on a raw (z, y, x) volume, as the predictor
    normalises and runs it."""
    x = (torch.from_numpy(volume.astype(np.float32))[None, None] - MEAN) * (1.0 / torch.tensor(STD))
    return torch.softmax(ThresholdOracle(1, 4)(x), dim=1)[0]


def _predict_through_the_actor(tmp_path, volume_ijk: np.ndarray, spacing_ijk, card_spacing) -> np.ndarray:
    nib = pytest.importorskip("nibabel")
    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(volume_ijk, np.diag([*spacing_ijk, 1.0])), path)
    info = open_scene(str(path))
    card = save_checkpoint(ThresholdOracle(1, 4), _card_fields(spacing_mm=card_spacing), tmp_path / "model",
                           name="spaced")
    actor = PredictorActor(str(card), PredictorOptions(device="cpu", tile_size=64))
    reads = []
    for window in plan_chunks(info.shape, CHUNK, HALO):
        pixels, valid = read_window(info, window)
        reads.append(ReadWindow(task=ChunkTask(scene_id=0, window=window), pixels=pixels, valid=valid, read_s=0.0,
                                spacing_mm=info.spacing))
    labels = np.zeros(info.shape, np.uint8)
    for prediction in actor.predict_windows(reads):
        assert not prediction.error, prediction.error
        labels[prediction.task.window.core] = prediction.labels
    return labels


def test_windows_are_predicted_at_the_card_spacing_and_resampled_back(tmp_path):
    """z at 2 mm, the card at 1 mm: each window is upsampled 2x along z, segmented, and its
    probabilities are downsampled back; the chunks equal the whole volume (reflect-padded by the
    halo, as the reader pads) resampled the same way, cropped."""
    rng = np.random.default_rng(2)
    field = ndimage.gaussian_filter(rng.normal(size=(16, 16, 12)), 1.0)
    volume_ijk = (field / field.std() * 500).astype(np.int16)
    labels = _predict_through_the_actor(tmp_path, volume_ijk, (0.8, 0.8, 2.0), (1.0, 0.8, 0.8))

    volume = volume_ijk.transpose(2, 1, 0)  # (z, y, x), spacing (2.0, 0.8, 0.8)
    padded = np.pad(volume, HALO, mode="reflect").astype(np.float32)
    up = F.interpolate(torch.from_numpy(padded)[None, None], scale_factor=(2, 1, 1), mode="trilinear",
                       align_corners=False)[0, 0].numpy()
    probs = F.interpolate(_oracle_probabilities(up)[None], size=padded.shape, mode="trilinear",
                          align_corners=False)[0]
    expected = probs.argmax(0).numpy().astype(np.uint8)[HALO:-HALO, HALO:-HALO, HALO:-HALO]
    # compared where the two best probabilities differ by more than 1e-5: a window's softmax and
    # interpolation may round an ulp differently from the whole volume's (vector lanes vs tails
    # fall on other voxels, and CPUs differ), which can only flip a near-tie
    top2 = probs.topk(2, dim=0).values
    sure = ((top2[0] - top2[1]) > 1e-5).numpy()[HALO:-HALO, HALO:-HALO, HALO:-HALO]
    assert sure.mean() > 0.75  # the rest are mostly exact ties of saturated probabilities
    np.testing.assert_array_equal(labels[sure], expected[sure])
    at_own_spacing = _oracle_probabilities(volume).argmax(0).numpy()
    assert (labels != at_own_spacing).any()  # resampling changed some labels: it did happen


def test_a_volume_within_the_tolerance_runs_at_its_own_spacing(tmp_path):
    rng = np.random.default_rng(3)
    volume_ijk = (rng.normal(size=(10, 9, 8)) * 500).astype(np.int16)
    labels = _predict_through_the_actor(tmp_path, volume_ijk, (0.8, 0.8, 1.004), (1.0, 0.8, 0.8))
    expected = _oracle_probabilities(volume_ijk.transpose(2, 1, 0)).argmax(0).numpy()
    np.testing.assert_array_equal(labels, expected)
