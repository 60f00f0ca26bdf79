"""workers.stitch: the stitch interface, the semantic stitcher and the factory by model kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.errors import ModelCardError
from schemas.model_card import ModelCard
from workers.models.oracles import ThresholdOracle
from workers.predictor import Predictor, PredictorOptions
from workers.stitch import InstanceStitcher, SemanticStitcher, Stitcher, StitchWindow, stitcher_factory
from workers.tiles import BlendBuffers, blend_weights, plan_tiles


def _card(architecture="oracle_threshold", name="t") -> ModelCard:
    return ModelCard.model_validate({
        "name": name, "architecture": architecture, "in_channels": 1,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(3)],
        "bands": [{"name": "b0", "mean": 0.0, "std": 1.0}],
        "tile_size": 16, "halo": 0, "weights": "w.safetensors", "weights_sha256": "0" * 64,
    })


def test_whole_window_output_is_cropped_argmaxed_and_masked():
    scores = torch.zeros((1, 3, 2, 3, 4))
    scores[0, 2, 0] = 1.0  # class 2 on the first plane
    scores[0, 1, 1] = 1.0  # class 1 on the second
    valid = np.ones((2, 3, 4), dtype=bool)
    valid[1, 2, 3] = False
    window = StitchWindow((2, 3, 4), core=(slice(0, 2), slice(1, 3), slice(2, 4)), valid=valid,
                          with_probabilities=True)
    stitcher = SemanticStitcher(window, num_classes=3)
    stitcher.add([(0, 0, 0)], scores)
    result = stitcher.finalize()
    want = np.array([[[2, 2], [2, 2]], [[1, 1], [1, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(result.labels, want)
    assert result.probabilities.dtype == np.float16 and result.probabilities.shape == (3, 2, 2, 2)
    assert np.isnan(result.probabilities[:, 1, 1, 1]).all()
    assert result.probabilities[2, 0, 0, 0] == 1.0


def test_overlapping_tiles_are_blended_with_the_weights():
    # Two 1D tiles of length 4 over a window of 6: x = 0..5; tile A constant (1, 0),
    # tile B constant (0, 1); where both cover, p = w_A / (w_A + w_B).
    tile, offsets = plan_tiles((6,), 4, 0.5)
    assert offsets == [(0,), (2,)]
    w = blend_weights(tile)
    stitcher = SemanticStitcher(StitchWindow((6,), tile_weights=w, with_probabilities=True), num_classes=2)
    a = torch.tensor([[1.0] * 4, [0.0] * 4])
    stitcher.add(offsets, torch.stack([a, a.flip(0)]))
    scores = stitcher.finalize_scores()
    wa, wb = np.zeros(6), np.zeros(6)
    wa[0:4], wb[2:6] = w, w
    np.testing.assert_allclose(scores[0].numpy(), wa / (wa + wb), rtol=1e-6)
    np.testing.assert_allclose(scores.sum(0).numpy(), np.ones(6), rtol=1e-6)


def test_windows_of_one_shape_reuse_the_blend_buffers_and_get_the_same_results():
    """A pool hands the buffers of a finalized window to the next window of its shape; results are
    those of fresh buffers (the leftovers are zeroed), and scores handed out are never reused."""
    tile, offsets = plan_tiles((10, 12), 6, 0.5)
    w = blend_weights(tile)
    gen = torch.Generator().manual_seed(0)
    outputs = [torch.rand((len(offsets), 4, *tile), generator=gen) for _ in range(3)]
    pool = BlendBuffers()

    def run(out, buffers, *, probabilities=False):
        stitcher = SemanticStitcher(StitchWindow((10, 12), core=(slice(2, 8), slice(3, 9)), tile_weights=w,
                                                 with_probabilities=probabilities), num_classes=4, buffers=buffers)
        stitcher.add(offsets, out)
        return stitcher, stitcher.finalize()

    first, want = run(outputs[0], pool)
    (kept_sum, kept_weight), = pool._free
    for out in outputs[1:]:
        _, got = run(out, pool, probabilities=True)
        assert pool._free[0][0].data_ptr() == kept_sum.data_ptr()  # the same memory, again
        _, fresh = run(out, None, probabilities=True)
        np.testing.assert_array_equal(got.labels, fresh.labels)
        np.testing.assert_array_equal(got.probabilities, fresh.probabilities)
    _, again = run(outputs[0], pool)
    np.testing.assert_array_equal(again.labels, want.labels)

    taken = SemanticStitcher(StitchWindow((10, 12), core=(slice(2, 8), slice(3, 9)), tile_weights=w), num_classes=4,
                             buffers=pool)
    assert pool._free == []  # in use
    taken.add(offsets, outputs[0])
    scores = taken.finalize_scores()  # handed to the caller: not given back
    assert pool._free == [] and scores.data_ptr() == kept_sum.data_ptr()
    other = SemanticStitcher(StitchWindow((10, 12), core=(slice(2, 8), slice(3, 9)), tile_weights=w), num_classes=4,
                             buffers=pool)
    assert other._taken[0].data_ptr() != scores.data_ptr()
    assert tuple(other._taken[0].shape) == (4, 6, 6)  # the core's: the halo is not blended
    other_shape = SemanticStitcher(StitchWindow((8, 12), tile_weights=blend_weights((6, 6))), num_classes=4,
                                   buffers=pool)
    assert tuple(other_shape._taken[1].shape) == (8, 12)


def test_add_after_finalize_and_finalizing_twice_are_refused():
    for weights in (None, blend_weights((2, 2))):
        stitcher = SemanticStitcher(StitchWindow((2, 2), tile_weights=weights), num_classes=2)
        stitcher.add([(0, 0)], torch.rand(1, 2, 2, 2))
        assert not stitcher.finalized
        result = stitcher.finalize()
        assert result.labels.shape == (2, 2) and result.probabilities is None
        assert stitcher.finalized
        with pytest.raises(RuntimeError, match="already finalized"):
            stitcher.add([(0, 0)], torch.rand(1, 2, 2, 2))
        with pytest.raises(RuntimeError, match="already finalized"):
            stitcher.finalize()


def test_bad_outputs_and_windows_are_refused():
    whole = SemanticStitcher(StitchWindow((4, 4)), num_classes=2)
    with pytest.raises(ValueError, match="one output of shape"):
        whole.add([(0, 0)], torch.rand(1, 2, 3, 4))  # not the window's shape
    with pytest.raises(ValueError, match="one output of shape"):
        whole.add([(0, 1)], torch.rand(1, 2, 4, 4))  # not at the origin
    with pytest.raises(RuntimeError, match="no output"):
        whole.finalize()
    blended = SemanticStitcher(StitchWindow((4, 4), tile_weights=blend_weights((2, 2))), num_classes=2)
    blended.add([(0, 0)], torch.rand(1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="got no weight"):  # tiles must cover the window
        blended.finalize()
    with pytest.raises(ValueError, match="core"):
        StitchWindow((4, 4), core=(slice(0, 2),))
    with pytest.raises(ValueError, match="valid mask"):
        StitchWindow((4, 4), valid=np.ones((4, 5), dtype=bool))


def test_the_factory_builds_the_stitcher_of_the_model_kind():
    factory = stitcher_factory(_card())
    stitcher = factory(StitchWindow((3, 3)))
    assert isinstance(stitcher, SemanticStitcher) and isinstance(stitcher, Stitcher)
    assert stitcher.num_classes == 3
    assert isinstance(stitcher_factory(_card("some.module:factory"))(StitchWindow((3, 3))), SemanticStitcher)


def test_instance_models_get_the_instance_stitcher_and_kinds_do_not_mix_in_an_ensemble():
    assert isinstance(stitcher_factory(_card("maskrcnn", name="mrcnn"))(StitchWindow((3, 3))), InstanceStitcher)
    from workers.predictor import Member

    with pytest.raises(ModelCardError, match="'member'.*instance model"):  # an ensemble member of another kind
        Predictor(ThresholdOracle(1, 3), _card(), options=PredictorOptions(device="cpu"),
                  extra_members=(Member(ThresholdOracle(1, 3), _card("maskrcnn", name="member")),))
