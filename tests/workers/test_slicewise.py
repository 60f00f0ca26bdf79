"""Slice-wise (2D and 2.5D) models over volumes: the SliceWise wrapper against a slice-by-slice
loop for each axis, the predictor and the actor (slice axis moved first and back) against the
same loop, the slice orientation from a volume's affine, and the card and job checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.plan.chunks import plan_chunks
from pipelines.readers import SceneInfo
from pipelines.run.resolve import check_scene_fits_model, check_slice_mode, scene_slice_axis
from schemas.errors import InputError, ModelCardError
from schemas.model_card import ModelCard, parse_model_card, slice_array_axis
from schemas.records import ChunkTask, ReadWindow
from workers.actors import PredictorActor
from workers.checkpoints import build_from_checkpoint, load_checkpoint, save_checkpoint
from workers.models.oracles import ThresholdOracle
from workers.models.slicewise import SliceWise
from workers.models.unet import UNet
from workers.predictor import Predictor, PredictorOptions

MEAN, STD = 100.0, 50.0


def _unet2d(in_channels: int, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(in_channels, num_classes, base_channels=4, depth=2).eval()


def _stack_numpy(volume: np.ndarray, axis: int, s: int, context: int, *, pad: str = "edge") -> np.ndarray:
    """((2c + 1) * C, A, B) input of slice s of a (C, D, H, W) volume across spatial `axis`: the
    slices s - c .. s + c (beyond the ends: `pad`, numpy.pad's mode), offset-major, bands within."""
    moved = np.moveaxis(volume, 1 + axis, 0)  # (S, C, A, B)
    padded = np.pad(moved, [(context, context)] + [(0, 0)] * 3, mode=pad)
    return padded[s:s + 2 * context + 1].reshape(-1, *moved.shape[2:])


def _loop_reference(model2d: torch.nn.Module, volume: np.ndarray, axis: int, context: int, *,
                    pad: str = "edge") -> np.ndarray:
    """(K, D, H, W) logits: the 2D model run on each slice alone, one forward pass per slice."""
    n_slices = volume.shape[1 + axis]
    outs = []
    with torch.inference_mode():
        for s in range(n_slices):
            image = torch.from_numpy(_stack_numpy(volume, axis, s, context, pad=pad))[None]
            outs.append(model2d(image)[0].numpy())  # (K, A, B)
    return np.moveaxis(np.stack(outs), 0, 1 + axis)


def _volume(shape=(8, 12, 16), bands=2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(bands, *shape)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("context", [0, 2])
def test_slicewise_equals_the_2d_model_run_slice_by_slice(axis, context):
    volume = _volume()
    model2d = _unet2d(2 * (2 * context + 1))
    wrapped = SliceWise(model2d, axis=axis, context=context).eval()
    with torch.inference_mode():
        got = wrapped(torch.from_numpy(volume)[None])[0].numpy()
    expected = _loop_reference(model2d, volume, axis, context)
    assert got.shape == (3, *volume.shape[1:])
    # a batch of slices and one slice per pass take other conv kernels: float rounding only (measured
    # up to 6e-8); the per-pixel oracle below is exact
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(0), expected.argmax(0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_with_a_per_pixel_oracle_is_exact_and_stacks_neighbours_offset_major(axis):
    """The oracle averages its channels: 2.5D with context 1 averages a slice with its two
    neighbours (the edge slice repeated at the ends), exactly."""
    volume = _volume((5, 6, 7), bands=2)
    model2d = ThresholdOracle(2 * 3, 4)
    got = SliceWise(model2d, axis=axis, context=1)(torch.from_numpy(volume)[None])[0].numpy()
    np.testing.assert_array_equal(got, _loop_reference(model2d, volume, axis, 1))
    # channel order: offset -1 (bands 0, 1), offset 0 (bands 0, 1), offset +1 (bands 0, 1)
    stacked = SliceWise(model2d, axis=axis, context=1).stack_context(
        torch.from_numpy(volume)[None].movedim(2 + axis, 1))[0].numpy()  # (S, 6, A, B)
    moved = np.moveaxis(volume, 1 + axis, 0)
    np.testing.assert_array_equal(stacked[0, 0:2], moved[0])  # the first slice repeated below it
    np.testing.assert_array_equal(stacked[0, 2:4], moved[0])
    np.testing.assert_array_equal(stacked[0, 4:6], moved[1])
    np.testing.assert_array_equal(stacked[-1, 4:6], moved[-1])  # the last repeated above it
    np.testing.assert_array_equal(stacked[2, 0:2], moved[1])


def test_slicewise_refuses_other_tiles_and_axes():
    with pytest.raises(ValueError, match="axis must be a spatial axis"):
        SliceWise(ThresholdOracle(1, 2), axis=3)
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        SliceWise(ThresholdOracle(1, 2))(torch.zeros(1, 1, 4, 4))


def _card_fields(*, bands=1, context=0, axis="axial", architecture="unet", arch_args=None, halo=2) -> dict:
    return {
        "architecture": architecture, "arch_args": {"base_channels": 4, "depth": 2} if arch_args is None else arch_args,
        "in_channels": bands,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(3)],
        "bands": [{"name": f"b{i}", "mean": MEAN, "std": STD} for i in range(bands)],
        "tile_size": 16, "halo": halo, "stride": 4, "slices": {"axis": axis, "context": context},
    }


def _slicewise_checkpoint(tmp_path, *, bands=1, context=1, axis="axial"):
    card_fields = _card_fields(bands=bands, context=context, axis=axis)
    model2d = _unet2d(bands * (2 * context + 1))
    return save_checkpoint(model2d, card_fields, tmp_path, name="slices"), model2d


def test_a_slicewise_card_builds_its_2d_model_with_the_context_channels_wrapped(tmp_path):
    card_path, model2d = _slicewise_checkpoint(tmp_path, bands=2, context=1)
    ckpt = load_checkpoint(card_path)
    assert ckpt.card.in_channels == 2 and ckpt.card.model_in_channels == 6
    model = build_from_checkpoint(ckpt)
    assert isinstance(model, SliceWise) and model.axis == 0 and model.context == 1
    volume = _volume((4, 8, 12), bands=2)
    with torch.inference_mode():
        got = model(torch.from_numpy(volume)[None])[0].numpy()
        expected = SliceWise(model2d, axis=0, context=1)(torch.from_numpy(volume)[None])[0].numpy()
    np.testing.assert_array_equal(got, expected)  # the weights saved are the weights loaded


@pytest.mark.parametrize(("axis", "channels_last"), [(0, False), (1, False), (2, False), (2, True)])
def test_the_predictor_and_actor_run_a_slicewise_card_as_the_slice_by_slice_loop(tmp_path, axis, channels_last):
    """A whole window as one tile: each slice's labels are the 2D model's on that slice and its
    neighbours (normalised per the card), the window's first and last slice repeated beyond its
    ends; through the actor the scene's slice axis is moved first and the labels moved back."""
    card_path, model2d = _slicewise_checkpoint(tmp_path, bands=1, context=1)
    raw = (MEAN + STD * _volume((8, 12, 16), bands=1, seed=axis)).astype(np.float32)
    normalised = (raw - np.float32(MEAN)) * np.float32(1 / STD)
    expected = _loop_reference(model2d, normalised, axis, 1).argmax(0)
    # channels-last: 3D tiles in channels_last_3d, the 2D model's batch of slices in channels_last
    options = PredictorOptions(device="cpu", tile_size=16, channels_last=channels_last, fold_batchnorm=channels_last)

    ckpt = load_checkpoint(card_path)
    direct = Predictor(SliceWise(build_from_checkpoint(ckpt).model2d, axis=axis, context=1), ckpt.card,
                       options=options)
    np.testing.assert_array_equal(direct.predict_labels(raw), expected)

    actor = PredictorActor(str(card_path), options)
    (window,) = plan_chunks(raw.shape[1:], 16, 0)
    read = ReadWindow(task=ChunkTask(scene_id=0, window=window), pixels=raw, valid=np.ones(raw.shape[1:], bool),
                      read_s=0.0, slice_axis=axis)
    prediction = actor.predict_one(read)
    np.testing.assert_array_equal(prediction.labels, expected)
    (batched,) = actor.predict_batch([read])
    np.testing.assert_array_equal(batched.labels, expected)
    assert batched.labels.flags.c_contiguous


# (z, y, x) voxel -> RAS mm affines: the axis codes nibabel gives them, and the array axis of
# each slice orientation
_SPACING = np.diag([2.5, 0.9, 0.8])
_ORIENTATIONS = {
    # z runs to S, y to A, x to R (a NIfTI stored RAS, read as (z, y, x))
    "ras": (np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]]), "SAR", {"axial": 0, "coronal": 1, "sagittal": 2}),
    # DICOM's LPS: rows run to P, columns to L, slices to S
    "lps": (np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]]), "SPL", {"axial": 0, "coronal": 1, "sagittal": 2}),
    # permuted: array axis 0 runs R->L, axis 1 to S, axis 2 to A (a sagittal acquisition stored z-first)
    "permuted": (np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]]), "LSA", {"axial": 1, "coronal": 2, "sagittal": 0}),
}


def _volume_info(name: str, *, shape=(6, 8, 10)) -> SceneInfo:
    directions, _, _ = _ORIENTATIONS[name]
    affine = np.eye(4)
    affine[:3, :3] = directions @ _SPACING
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return SceneInfo.of_volume(f"{name}.nii", fmt="nifti", shape=shape, count=1, dtype="float32",
                               source_dtype="float32", derive=None, block_shape=shape, affine=affine)


@pytest.mark.parametrize("name", list(_ORIENTATIONS))
def test_slice_orientations_map_to_array_axes_by_the_affine(name):
    _, codes, axes = _ORIENTATIONS[name]
    info = _volume_info(name)
    assert info.orientation == codes
    for axis, index in axes.items():
        assert slice_array_axis(axis, info.orientation, source=info.path) == index
        assert scene_slice_axis(info, _card(axis=axis)) == index


def test_an_oblique_volume_slices_across_the_axis_closest_to_the_named_direction():
    angle = np.deg2rad(25)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ _ORIENTATIONS["ras"][0] @ _SPACING  # tilted 25 degrees about R
    info = SceneInfo.of_volume("tilted.nii", fmt="nifti", shape=(6, 8, 10), count=1, dtype="float32",
                               source_dtype="float32", derive=None, block_shape=(6, 8, 10), affine=affine)
    assert slice_array_axis("axial", info.orientation, source=info.path) == 0
    assert slice_array_axis("coronal", info.orientation, source=info.path) == 1


def test_a_bad_slice_axis_name_is_refused_naming_the_card_file(tmp_path):
    path = tmp_path / "cards" / "bad.json"
    fields = {**_card_fields(axis="transverse"), "name": "bad", "weights": "w.safetensors",
              "weights_sha256": "0" * 64}
    with pytest.raises(ModelCardError, match=r"bad\.json.*\n.*slices\.axis.*axial"):
        parse_model_card(json.dumps(fields), source=str(path))
    fields["slices"] = {"axis": "axial", "context": -1}
    with pytest.raises(ModelCardError, match=r"bad\.json.*\n.*slices\.context"):
        parse_model_card(json.dumps(fields), source=str(path))
    with pytest.raises(ValueError, match="unknown slice axis"):
        slice_array_axis("transverse", "SAR", source="x.nii")


def _card(**kw) -> ModelCard:
    return ModelCard.model_validate({**_card_fields(**kw), "name": "m", "weights": "w.safetensors",
                                     "weights_sha256": "0" * 64})


def test_slice_mode_checks_name_the_card_and_the_fix():
    with pytest.raises(ModelCardError, match=r"card\.json: slices .* 'unet3d' takes 3-D inputs; drop 'slices'"):
        check_slice_mode(_card(architecture="unet3d"), where="card.json", halo=4, tile_size=16)
    with pytest.raises(ModelCardError, match=r"card\.json: slices context 2 needs a halo of at least 2.*tiling\.halo"):
        check_slice_mode(_card(context=2), where="card.json", halo=1, tile_size=16)
    with pytest.raises(ModelCardError, match=r"card\.json: slices context 3 needs tiles of at least 7 slices"):
        check_slice_mode(_card(context=3), where="card.json", halo=4, tile_size=6)
    check_slice_mode(_card(context=2), where="card.json", halo=2, tile_size=5)
    check_slice_mode(_card(architecture="oracle_threshold", arch_args={}), where="card.json", halo=0, tile_size=8)


def test_scenes_a_slicewise_card_cannot_take_are_refused_naming_the_file():
    image = SceneInfo(path="scene.tif", shape=(32, 32), count=1, dtype="uint16", crs_wkt=None, crs=None,
                      transform=None, nodata=None, block_shape=(16, 16), format="geotiff")
    with pytest.raises(InputError, match=r"scene\.tif: an image .* slice-wise .* volumes only"):
        check_scene_fits_model(image, bands=None, card=_card())
    volume = _volume_info("ras")
    check_scene_fits_model(volume, bands=None, card=_card())
    unoriented = SceneInfo(path="odd.zarr", shape=(6, 8, 10), count=1, dtype="float32", crs_wkt=None, crs=None,
                           transform=None, nodata=None, block_shape=(6, 8, 10), format="zarr")
    with pytest.raises(InputError, match=r"odd\.zarr: orientation None .* axial slices.*slice-wise"):
        check_scene_fits_model(unoriented, bands=None, card=_card())


def test_a_2d_card_without_slices_on_a_volume_points_to_the_slicewise_option():
    plain = ModelCard.model_validate({**{k: v for k, v in _card_fields().items() if k != "slices"},
                                      "name": "flat", "weights": "w.safetensors", "weights_sha256": "0" * 64})
    with pytest.raises(InputError, match=r"ras\.nii: a volume .* takes 2-D inputs; .*\"slices\": \{\"axis\""):
        check_scene_fits_model(_volume_info("ras"), bands=None, card=plain)


def _job(tmp_path, card, *, halo=None, ensemble=()):
    from schemas.job import JobSpec

    return JobSpec.model_validate({
        "inputs": [str(tmp_path / "ct.nii")], "model": {"card": str(card), "ensemble": list(ensemble)},
        "tiling": {"volume_chunk_size": 16, **({"halo": halo} if halo is not None else {})},
        "output": {"root": str(tmp_path / "out")},
    })


def test_resolving_a_slicewise_job_checks_halo_and_ensemble_and_fingerprints_the_slices(tmp_path):
    from pipelines.run.resolve import resolve_job

    card, _ = _slicewise_checkpoint(tmp_path, context=1)
    job = resolve_job(_job(tmp_path, card), base_dir=tmp_path)
    assert job.parameters(3)["slices"] == {"axis": "axial", "context": 1}
    with pytest.raises(ModelCardError, match=r"slices\.json: slices context 1 needs a halo of at least 1"):
        resolve_job(_job(tmp_path, card, halo=0), base_dir=tmp_path)
    plain = save_checkpoint(_unet2d(1), {k: v for k, v in _card_fields().items() if k != "slices"},
                            tmp_path / "plain", name="plain")
    assert "slices" not in resolve_job(_job(tmp_path, plain), base_dir=tmp_path).parameters(3)
    with pytest.raises(ModelCardError, match=r"plain\.json: ensemble member has slices none, .*slices\.json has "):
        resolve_job(_job(tmp_path, card, ensemble=[{"card": str(plain)}]), base_dir=tmp_path)
