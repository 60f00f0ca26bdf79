"""Instance models in the predictor: the oracle plugin, Mask R-CNN, registered plugins, actors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label

from pipelines.plan.chunks import plan_chunks
from schemas.errors import ModelCardError
from schemas.instances import InstanceWindow
from schemas.model_card import ModelCard
from schemas.records import ChunkTask, Prediction, ReadWindow
from workers.actors import PredictorActor
from workers.checkpoints import build_from_checkpoint, load_checkpoint, save_checkpoint
from workers.options import InstanceOptions, PredictorOptions
from workers.predictor import Predictor
from workers.registry import build_model, model_kind, register_instance_model, unregister_instance_model
from workers.stitch import InstanceResult, LabelImage

CPU = dict(device="cpu", torch_threads=1)
MRCNN_ARGS = {"backbone": "resnet18", "min_size": None, "image_mean": [0.0] * 4, "image_std": [1.0] * 4,
              "box_detections_per_img": 4, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


def card_fields(architecture, arch_args=None, *, bands=2, classes=3, tile_size=256) -> dict:
    """Card fields (no name, weights) with identity normalisation: the model sees raw values."""
    return {"architecture": architecture, "arch_args": arch_args or {}, "in_channels": bands,
            "classes": [{"id": i, "name": f"c{i}"} for i in range(classes)],
            "bands": [{"name": f"b{i}", "mean": 0.0, "std": 1.0} for i in range(bands)],
            "tile_size": tile_size, "halo": 8}


def checkpoint(tmp_path, architecture, arch_args=None, **fields):
    fields = card_fields(architecture, arch_args, **fields)
    model = build_model(architecture, in_channels=fields["in_channels"], num_classes=len(fields["classes"]),
                        arch_args=fields["arch_args"])
    return load_checkpoint(save_checkpoint(model, fields, tmp_path / "model", name=architecture.replace(":", "_")))


def blobs(shape, seed, *, bands=2, density=0.35, classes=None) -> np.ndarray:
    """(bands, *shape) float32: channel 0 random 0/1 blobs, channel 1 a class per pixel."""
    rng = np.random.default_rng(seed)
    x = np.zeros((bands, *shape), np.float32)
    x[0] = rng.random(shape) < density
    x[1] = 1.0 if classes is None else rng.integers(1, classes, size=shape)
    return x


def check_instance_window(result: InstanceResult, *, core, valid=None, num_classes=3):
    """Invariants every InstanceResult keeps, whatever the model."""
    inst = result.instances
    assert isinstance(inst, InstanceWindow)
    n = inst.count
    assert set(np.unique(inst.ids)) <= set(range(n + 1)) and set(range(1, n + 1)) <= set(np.unique(inst.ids))
    if valid is not None:
        assert not inst.ids[~valid].any()
    core_ids = inst.ids[core]
    np.testing.assert_array_equal(inst.core_pixels, np.bincount(core_ids.ravel(), minlength=n + 1)[1:])
    assert ((inst.class_id >= 1) & (inst.class_id < num_classes)).all()
    assert ((inst.score >= 0) & (inst.score <= 1)).all()
    want = np.concatenate([[0], inst.class_id])[core_ids].astype(np.uint8)
    if valid is not None:
        want[~valid[core]] = 255
    np.testing.assert_array_equal(result.labels, want)
    first = [np.flatnonzero(inst.ids.ravel() == k)[0] for k in range(1, n + 1)]
    assert first == sorted(first)  # ids in raster order


def test_oracle_through_the_predictor_equals_skimage_label_on_the_window(tmp_path):
    ckpt = checkpoint(tmp_path, "instance_oracle", {"class_channel": 1})
    pred = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=PredictorOptions(**CPU))
    x = blobs((50, 61), seed=0, classes=3)
    core = (slice(8, 42), slice(8, 53))
    result = pred.predict_result(x, core=core)
    want = label(x[0] > 0.5, connectivity=2)
    np.testing.assert_array_equal(result.instances.ids, want)
    classes = [int(x[1][want == k].max()) for k in range(1, want.max() + 1)]
    np.testing.assert_array_equal(result.instances.class_id, classes)
    np.testing.assert_array_equal(result.instances.band_sums[:, 0], result.instances.core_pixels)  # channel 0 is 1
    check_instance_window(result, core=core)
    labels, probs = pred.predict_core(x, core=core)  # the semantic-shaped API gives the class map
    np.testing.assert_array_equal(labels, result.labels)
    assert probs is None


def test_oracle_with_given_labels_renumbers_each_tile_and_keeps_touching_ids_apart():
    model = build_model("instance_oracle", in_channels=1, num_classes=2, arch_args={"given_labels": True})
    ids = np.array([[0, 9, 9, 4],
                    [7, 9, 4, 4],
                    [7, 0, 0, 0]], dtype=np.float32)
    (out,) = model(torch.from_numpy(ids)[None, None])
    # 9, 4 and 7 touch; each stays one object, numbered in raster order of its first pixel
    np.testing.assert_array_equal(out.ids, [[0, 1, 1, 2], [3, 1, 2, 2], [3, 0, 0, 0]])
    (empty,) = model(torch.zeros(1, 1, 2, 2))
    assert not empty.ids.any()
    with pytest.raises(ModelCardError, match="given_labels must be true or false"):
        build_model("instance_oracle", in_channels=1, num_classes=2, arch_args={"given_labels": "yes"})


def test_oracle_with_nodata_and_in_3d(tmp_path):
    ckpt = checkpoint(tmp_path, "instance_oracle")
    pred = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=PredictorOptions(**CPU))
    x = blobs((40, 44), seed=1)
    valid = np.ones((40, 44), bool)
    valid[:, 20] = False  # a nodata column cuts objects in two
    valid[0:5] = False
    core = (slice(4, 36), slice(4, 40))
    result = pred.predict_result(x, valid, core=core)
    np.testing.assert_array_equal(result.instances.ids, label((x[0] > 0.5) & valid, connectivity=2))
    check_instance_window(result, core=core, valid=valid)
    volume = blobs((10, 12, 14), seed=2, density=0.2)
    result = pred.predict_result(volume, core=(slice(2, 8), slice(2, 10), slice(2, 12)))
    np.testing.assert_array_equal(result.instances.ids, label(volume[0] > 0.5, connectivity=3))


def test_tiled_oracle_equals_the_whole_window_for_objects_that_fit_the_overlap(tmp_path):
    # Objects of at most 3 x 3 px on a 70 x 90 window cut into 32-px tiles with 16 px of
    # overlap: every object lies wholly inside some tile; a tile cutting it sees a smaller
    # part, which the whole copy beats (equal scores: the larger mask first).
    rng = np.random.default_rng(3)
    x = np.zeros((2, 70, 90), np.float32)
    for r, c in zip(rng.integers(0, 67, 60), rng.integers(0, 87, 60)):
        x[0, r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = 1
    ckpt = checkpoint(tmp_path, "instance_oracle")
    whole = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=PredictorOptions(**CPU, tile_size=128))
    tiled = Predictor(build_from_checkpoint(ckpt), ckpt.card,
                      options=PredictorOptions(**CPU, tile_size=32, tile_overlap=0.5, batch_size=4))
    want = whole.predict_result(x).instances
    got = tiled.predict_result(x).instances
    np.testing.assert_array_equal(want.ids, label(x[0] > 0.5, connectivity=2))
    np.testing.assert_array_equal(got.ids, want.ids)


@pytest.fixture(scope="module")
def maskrcnn():
    """(model, card): a randomly initialised Mask R-CNN, ResNet-18 FPN, 4 bands, 2 classes +
    background, at native resolution; the card scales 0..255 values to about [-2, 2]."""
    torch.manual_seed(0)
    model = build_model("maskrcnn", in_channels=4, num_classes=3, arch_args=MRCNN_ARGS).eval()
    fields = card_fields("maskrcnn", MRCNN_ARGS, bands=4)
    fields["bands"] = [{"name": f"b{i}", "mean": 127.0, "std": 64.0} for i in range(4)]
    card = ModelCard.model_validate({**fields, "name": "mrcnn", "weights": "w.safetensors", "weights_sha256": "0" * 64})
    return model, card


def test_maskrcnn_on_a_four_band_window_gives_a_valid_instance_window(maskrcnn):
    model, card = maskrcnn
    pred = Predictor(model, card, options=PredictorOptions(**CPU, instances=InstanceOptions(score_threshold=0.0)))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(4, 72, 88)).astype(np.uint16)  # any dtype: the card normalises
    valid = np.ones((72, 88), bool)
    valid[:6] = False
    core = (slice(8, 64), slice(8, 80))
    result = pred.predict_result(x, valid, core=core)
    assert result.instances.count >= 1  # a random model with score threshold 0 still detects
    check_instance_window(result, core=core, valid=valid)
    inst = result.instances
    for k in range(1, inst.count + 1):
        mask = np.zeros(valid.shape, bool)
        mask[core] = inst.ids[core] == k
        np.testing.assert_array_equal(inst.band_sums[k - 1], x[:, mask].astype(np.float64).sum(axis=1))
    # a high score threshold keeps nothing: an all-background window
    empty = Predictor(model, card, options=PredictorOptions(**CPU, instances=InstanceOptions(score_threshold=1.0)))
    nothing = empty.predict_result(x, valid, core=core)
    assert nothing.instances.count == 0 and set(np.unique(nothing.labels)) <= {0, 255}


def test_maskrcnn_native_resolution_keeps_the_tile_size(maskrcnn):
    model = maskrcnn[0]
    images = [torch.rand(4, 45, 70)]
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(45, 70)]  # not resized (torchvision would scale 45 px up to 800)
    assert tuple(batch.tensors.shape[-2:]) == (64, 96)  # padded to the FPN's multiple of 32
    torch.testing.assert_close(batch.tensors[0, :, :45, :70], images[0])  # identity image_mean / image_std
    with torch.inference_mode():
        out = model(images)
    assert tuple(out[0]["masks"].shape[-2:]) == (45, 70)
    resized = build_model("maskrcnn", in_channels=4, num_classes=3,
                          arch_args={**MRCNN_ARGS, "min_size": 96, "max_size": 200})
    assert resized.transform(images)[0].image_sizes == [(96, 149)]  # torchvision's resize, when asked


@pytest.mark.slow
def test_maskrcnn_mobilenet_backbone_takes_four_bands():
    torch.manual_seed(0)
    model = build_model("maskrcnn", in_channels=4, num_classes=3,
                        arch_args={**MRCNN_ARGS, "backbone": "mobilenet_v3_large"}).eval()
    with torch.inference_mode():
        out = model([torch.rand(4, 45, 70)])
    assert tuple(out[0]["masks"].shape[1:]) == (1, 45, 70)


def test_instance_models_refuse_what_averages_probabilities(tmp_path):
    ckpt = checkpoint(tmp_path, "instance_oracle")
    model = build_from_checkpoint(ckpt)
    for options, word in ((dict(tta=("hflip",)), "tta"), (dict(scales=(1.0, 0.5)), "scales")):
        with pytest.raises(ValueError, match=f"instance model: {word}"):
            Predictor(model, ckpt.card, options=PredictorOptions(**CPU, **options))
    pred = Predictor(model, ckpt.card, options=PredictorOptions(**CPU))
    with pytest.raises(ValueError, match="no class probabilities"):
        pred.predict_result(blobs((8, 8), seed=0), with_probabilities=True)
    with pytest.raises(ValueError, match="no class probabilities"):
        pred.predict_probabilities(blobs((8, 8), seed=0))
    assert pred.windows_per_pass((8, 8)) == 1


def test_registered_plugins_label_images_and_masks_through_checkpoints(tmp_path):
    def label_image_plugin(in_channels, num_classes, *, threshold=0.0):
        """A plain callable: 4-connected components of channel 0 > threshold, scored by their mean."""
        def run(x):
            out = []
            for tile in x.numpy():
                ids = label(tile[0] > threshold, connectivity=1)
                means = np.array([tile[0][ids == k].mean() for k in range(1, ids.max() + 1)])
                out.append(LabelImage(ids, scores=np.clip(means, 0, 1), classes=np.full(len(means), 2)))
            return out
        return run

    def mask_plugin(in_channels, num_classes):
        """Masks, scores and classes without boxes: one full-tile soft mask per tile."""
        return lambda x: [{"masks": torch.sigmoid(t[:1]), "scores": torch.tensor([0.9]),
                           "labels": torch.tensor([1])} for t in x]

    register_instance_model("test_label_image", label_image_plugin)
    register_instance_model("test_masks", mask_plugin)
    try:
        assert model_kind("test_label_image") == "instance"
        with pytest.raises(ValueError, match="already registered"):
            register_instance_model("test_masks", mask_plugin)
        with pytest.raises(ValueError, match="without ':'"):
            register_instance_model("pkg.mod:fn", mask_plugin)
        x = np.zeros((2, 20, 30), np.float32)
        x[0, 2:6, 2:6] = 0.4
        x[0, 10:14, 20:25] = 0.8
        ckpt = checkpoint(tmp_path, "test_label_image", {"threshold": 0.1})
        pred = Predictor(build_from_checkpoint(ckpt), ckpt.card,
                         options=PredictorOptions(**CPU, instances=InstanceOptions(score_threshold=0.5)))
        inst = pred.predict_result(x).instances
        np.testing.assert_array_equal(inst.ids, (x[0] == 0.8).astype(np.uint32))  # the 0.4 object scores 0.4
        np.testing.assert_array_equal(inst.class_id, [2])
        np.testing.assert_allclose(inst.score, [0.8])
        ckpt = checkpoint(tmp_path, "test_masks")
        pred = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=PredictorOptions(**CPU))
        inst = pred.predict_result(x).instances
        np.testing.assert_array_equal(inst.ids, (torch.sigmoid(torch.from_numpy(x[0])).numpy() > 0.5))
    finally:
        unregister_instance_model("test_label_image")
        unregister_instance_model("test_masks")
    with pytest.raises(ModelCardError, match="unknown architecture 'test_masks'"):
        build_from_checkpoint(ckpt)  # a card can name a plugin only while Python has it registered
    with pytest.raises(ValueError, match="not an instance model registered"):
        unregister_instance_model("instance_oracle")


def _reads(x, chunk, halo):
    """ReadWindows of scene `x` (C, H, W) cut into chunks with a halo (zero padding = nodata)."""
    out = []
    for w in plan_chunks(x.shape[1:], chunk, halo):
        pixels = np.pad(x[(slice(None), *w.read)], ((0, 0), *w.pad))
        valid = np.pad(np.ones(x.shape[1:], bool)[w.read], w.pad)
        out.append(ReadWindow(task=ChunkTask(scene_id=0, window=w), pixels=pixels, valid=valid, read_s=0.0))
    return out


def _same_predictions(a: list[Prediction], b: list[Prediction]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.task == q.task and p.error == q.error
        np.testing.assert_array_equal(p.labels, q.labels)
        for name in ("ids", "class_id", "score", "core_pixels", "band_sums"):
            x, y = getattr(p.instances, name), getattr(q.instances, name)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def test_actor_predictions_carry_the_instances_and_cross_ray_unchanged(tmp_path, ray_local):
    ckpt = checkpoint(tmp_path, "instance_oracle")
    x = blobs((40, 40), seed=4)
    reads = _reads(x, 20, 6)
    local = PredictorActor(str(ckpt.card_path), PredictorOptions(**CPU)).predict_windows(reads)
    assert all(isinstance(p, Prediction) and p.instances is not None and not p.error for p in local)
    for p, r in zip(local, reads):
        np.testing.assert_array_equal(p.instances.ids, label((r.pixels[0] > 0.5) & r.valid, connectivity=2))
        assert p.labels.shape == r.task.window.core_shape

    @ray_local.remote(num_cpus=0)
    def echo(predictions):  # unpickled and pickled again in a worker, as between the split stages
        return predictions

    _same_predictions(local, ray_local.get(echo.remote(local)))


@pytest.mark.slow
def test_split_predict_actor_returns_instances_through_ray(tmp_path, ray_local):
    from pipelines.run.split import SplitPredictActor

    ckpt = checkpoint(tmp_path, "instance_oracle")
    options = PredictorOptions(**CPU)
    reads = _reads(blobs((40, 40), seed=4), 20, 6)
    local = PredictorActor(str(ckpt.card_path), options).predict_windows(reads)
    actor = ray_local.remote(SplitPredictActor).options(num_cpus=0).remote(
        predictor={"card_path": str(ckpt.card_path), "options": options})
    count, remote = ray_local.get(actor.run.options(num_returns=2).remote(reads))
    ray_local.kill(actor)
    assert count == len(reads)
    _same_predictions(local, remote)
