"""workers.stitch.InstanceStitcher: detections of a window's tiles -> one id per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.instances import InstanceWindow
from workers.options import InstanceOptions
from workers.stitch import InstanceResult, InstanceStitcher, LabelImage, StitchWindow


def _disc(shape, centre, radius, value=1.0) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return np.where((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2, value, 0.0).astype(np.float32)


def _detections(masks, scores, labels) -> dict:
    """A torchvision-shaped detection dict: masks (M, 1, h, w) float32 tensors."""
    masks = np.asarray(masks, dtype=np.float32)
    return {"boxes": torch.zeros((len(masks), 4)), "masks": torch.from_numpy(masks[:, None]),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def _stitch(window, offsets, outputs, **options) -> InstanceResult:
    stitcher = InstanceStitcher(window, num_classes=4, options=InstanceOptions(**options))
    stitcher.add(offsets, outputs)
    return stitcher.finalize()


def test_score_and_mask_thresholds():
    # three soft masks on a 12 x 12 tile: a disc at 0.9, the same disc's ring at 0.4, and a
    # low-scoring square; score 0.3 < 0.5 is dropped, mask values 0.4 <= 0.5 are background.
    a = _disc((12, 12), (3, 3), 2, 0.9) + (_disc((12, 12), (3, 3), 3, 0.4) * (_disc((12, 12), (3, 3), 2) == 0))
    b = np.zeros((12, 12), np.float32)
    b[6:10, 6:10] = 0.8
    c = np.zeros((12, 12), np.float32)
    c[0:2, 8:12] = 1.0
    result = _stitch(StitchWindow((12, 12)), [(0, 0)], [_detections([a, b, c], [0.9, 0.6, 0.3], [1, 2, 3])])
    inst = result.instances
    assert isinstance(inst, InstanceWindow) and inst.count == 2
    np.testing.assert_array_equal(inst.ids == 1, a > 0.5)
    np.testing.assert_array_equal(inst.ids == 2, b > 0.5)
    np.testing.assert_array_equal(inst.class_id, [1, 2])
    np.testing.assert_allclose(inst.score, [0.9, 0.6])
    assert inst.ids.dtype == np.uint32 and result.probabilities is None
    # the class map is the objects' classes, 0 elsewhere
    np.testing.assert_array_equal(result.labels, np.where(a > 0.5, 1, np.where(b > 0.5, 2, 0)))
    lower = _stitch(StitchWindow((12, 12)), [(0, 0)], [_detections([a, b, c], [0.9, 0.6, 0.3], [1, 2, 3])],
                    score_threshold=0.2, mask_threshold=0.3)
    assert lower.instances.count == 3
    np.testing.assert_array_equal(lower.instances.ids == 1, a > 0.3)  # the ring joins the disc


def test_duplicates_of_overlapping_tiles_are_suppressed_by_mask_iou_in_window_coordinates():
    # Window 10 x 20, tiles 10 x 12 at columns 0 and 8. One object (a disc at window (5, 10))
    # is seen by both tiles, shifted into each tile's frame; the right tile scores it higher.
    # A second object only the right tile sees overlaps the first a little (IoU < 0.5): kept.
    window = StitchWindow((10, 20))
    obj = _disc((10, 20), (5, 10), 2)
    other = np.zeros((10, 20), np.float32)
    other[1:9, 12:15] = 1.0
    left = _detections([obj[:, 0:12]], [0.7], [1])
    right = _detections([obj[:, 8:20], other[:, 8:20]], [0.8, 0.75], [2, 3])
    result = _stitch(window, [(0, 0), (0, 8)], [left, right])
    inst = result.instances
    assert inst.count == 2  # ids in raster order of first pixels: `other` (row 1) is 1, the disc (row 3) 2
    np.testing.assert_allclose(inst.score, [0.75, 0.8])
    np.testing.assert_array_equal(inst.class_id, [3, 2])  # the disc has the higher-scoring duplicate's class
    np.testing.assert_array_equal(inst.ids == 2, obj > 0)
    np.testing.assert_array_equal(inst.ids == 1, (other > 0) & ~(obj > 0))  # the disc keeps the shared pixels
    # a lower IoU threshold also suppresses the overlapping second object
    assert _stitch(window, [(0, 0), (0, 8)], [left, right], iou_threshold=0.02).instances.count == 1  # IoU 1 / 36
    # with IoU threshold 1 nothing is a duplicate: the lower-scoring copy keeps no pixel of its own
    kept = _stitch(window, [(0, 0), (0, 8)], [left, right], iou_threshold=1.0).instances
    assert kept.count == 2 and 0.7 not in kept.score.tolist()


def test_pixel_ownership_by_score_min_pixels_and_nodata():
    # Two overlapping squares: the higher score keeps the overlap. A third object lies wholly
    # inside the first: nothing is left for it, so it is dropped and its id not used.
    # min_pixels=10 also drops the second square when only 8 of its pixels are left.
    a = np.zeros((8, 8), np.float32)
    a[0:4, 0:4] = 1
    b = np.zeros((8, 8), np.float32)
    b[2:6, 2:6] = 1
    inner = np.zeros((8, 8), np.float32)
    inner[1:3, 1:3] = 1
    valid = np.ones((8, 8), bool)
    valid[0, :] = False  # nodata row: no object takes it
    dets = _detections([b, a, inner], [0.6, 0.9, 0.5], [2, 1, 3])
    result = _stitch(StitchWindow((8, 8), valid=valid), [(0, 0)], [dets])
    want = np.zeros((8, 8), np.uint32)
    want[2:6, 2:6] = 2
    want[0:4, 0:4] = 1
    want[0, :] = 0
    np.testing.assert_array_equal(result.instances.ids, want)
    np.testing.assert_array_equal(result.instances.class_id, [1, 2])
    labels = np.where(want == 1, 1, np.where(want == 2, 2, 0)).astype(np.uint8)
    labels[0, :] = 255
    np.testing.assert_array_equal(result.labels, labels)
    assert _stitch(StitchWindow((8, 8), valid=valid), [(0, 0)], [dets], min_pixels=13).instances.count == 1
    assert _stitch(StitchWindow((8, 8), valid=valid), [(0, 0)], [dets], min_pixels=12).instances.count == 2


def test_core_pixels_and_band_sums_equal_numpy_over_the_core():
    rng = np.random.default_rng(1)
    shape = (20, 24)
    ids = np.zeros(shape, np.int32)
    ids[1:7, 2:9] = 4  # crosses the core border
    ids[10:18, 3:12] = 9
    ids[0:3, 18:24] = 2  # wholly in the halo: core_pixels 0
    ids[12:16, 15:22] = 7
    pixels = rng.integers(0, 5000, size=(3, *shape)).astype(np.uint16)
    valid = rng.random(shape) > 0.1
    core = (slice(4, 16), slice(4, 20))
    window = StitchWindow(shape, core=core, valid=valid, pixels=pixels)
    result = _stitch(window, [(0, 0)], [LabelImage(ids, classes=np.array([0, 3, 0, 1, 0, 0, 2, 0, 1]))])
    inst = result.instances
    assert inst.count == 4
    got = inst.ids
    assert ((got > 0) == ((ids > 0) & valid)).all()  # nodata pixels belong to no object
    for local in range(1, inst.count + 1):
        source = int(np.unique(ids[got == local])[0])  # the plugin's id this local id came from
        in_core = np.zeros(shape, bool)
        in_core[core] = True
        mask = (got == local) & in_core
        assert inst.core_pixels[local - 1] == mask.sum()
        np.testing.assert_array_equal(inst.band_sums[local - 1], pixels[:, mask].astype(np.float64).sum(axis=1))
        assert inst.class_id[local - 1] == {4: 1, 9: 1, 2: 3, 7: 2}[source]
    assert inst.band_sums.dtype == np.float64 and inst.core_pixels.dtype == np.int64
    assert 0 in inst.core_pixels.tolist()  # the halo-only object
    assert result.labels.shape == (12, 16)
    np.testing.assert_array_equal(result.labels == 255, ~valid[core])


def test_ids_are_numbered_in_raster_order_whatever_the_plugin_ids_and_scores():
    ids = np.array([[0, 5, 5, 0], [0, 0, 0, 0], [300, 0, 0, 2]])
    inst = _stitch(StitchWindow((3, 4)), [(0, 0)], [LabelImage(ids)]).instances
    np.testing.assert_array_equal(inst.ids, [[0, 1, 1, 0], [0, 0, 0, 0], [2, 0, 0, 3]])
    np.testing.assert_array_equal(inst.score, [1, 1, 1])
    np.testing.assert_array_equal(inst.class_id, [1, 1, 1])
    scores = np.zeros(300)
    scores[[1, 4, 299]] = [0.9, 0.6, 0.7]  # ids 2, 5, 300
    inst = _stitch(StitchWindow((3, 4)), [(0, 0)], [LabelImage(ids, scores=scores)]).instances
    np.testing.assert_array_equal(inst.ids, [[0, 1, 1, 0], [0, 0, 0, 0], [2, 0, 0, 3]])
    np.testing.assert_allclose(inst.score, [0.6, 0.7, 0.9])
    huge = _stitch(StitchWindow((3, 4)), [(0, 0)], [LabelImage(ids * 10**15)]).instances  # no per-id arrays
    np.testing.assert_array_equal(huge.ids, inst.ids)


def test_a_tile_seeing_an_object_whole_beats_one_seeing_it_cut_at_equal_scores():
    # Window 6 x 10, tiles 6 x 6 at columns 0 and 4. An object at columns 4..7: the first tile
    # sees columns 4..5 of it (cut), the second the whole object. Equal scores: the larger
    # mask is pasted first, the cut copy has no pixel left and is dropped.
    obj = np.zeros((6, 10), np.int32)
    obj[2:4, 4:8] = 1
    inst = _stitch(StitchWindow((6, 10)), [(0, 0), (0, 4)], [LabelImage(obj[:, 0:6]), LabelImage(obj[:, 4:10])],
                   iou_threshold=1.0).instances
    assert inst.count == 1
    np.testing.assert_array_equal(inst.ids, obj)


def test_three_dimensional_windows():
    ids = np.zeros((4, 5, 6), np.int32)
    ids[0:2, 0:2, 0:2] = 1
    ids[2:4, 3:5, 3:6] = 2
    result = _stitch(StitchWindow((4, 5, 6), core=(slice(1, 3), slice(0, 5), slice(0, 6))), [(0, 0, 0)],
                     [LabelImage(ids)])
    np.testing.assert_array_equal(result.instances.ids, ids)
    np.testing.assert_array_equal(result.instances.core_pixels, [4, 6])


def test_bad_outputs_are_refused():
    stitcher = InstanceStitcher(StitchWindow((4, 4)), num_classes=3)
    with pytest.raises(ValueError, match="does not fit the window"):
        stitcher.add([(0, 2)], [LabelImage(np.ones((4, 4), np.int32))])
    with pytest.raises(ValueError, match="class 3 is outside 1..2"):
        stitcher.add([(0, 0)], [_detections([np.ones((4, 4))], [0.9], [3])])
    with pytest.raises(ValueError, match="score 1.5 is outside"):
        stitcher.add([(0, 0)], [LabelImage(np.ones((4, 4), np.int32), scores=np.array([1.5]))])
    with pytest.raises(ValueError, match="ids up to 2 need 2 classes, got 1"):
        stitcher.add([(0, 0)], [LabelImage(np.full((4, 4), 2), classes=np.array([1]))])
    with pytest.raises(ValueError, match="detection dict"):
        stitcher.add([(0, 0)], [torch.zeros(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="missing"):
        stitcher.add([(0, 0)], [{"masks": torch.zeros(0, 1, 4, 4)}])
    with pytest.raises(RuntimeError, match="no output"):
        stitcher.finalize()
    stitcher.add([(0, 0)], [_detections(np.zeros((0, 4, 4)), [], [])])  # no detections: an empty window
    result = stitcher.finalize()
    assert result.instances.count == 0 and not result.instances.ids.any() and not result.labels.any()
    with pytest.raises(RuntimeError, match="already finalized"):
        stitcher.add([(0, 0)], [LabelImage(np.ones((4, 4), np.int32))])
    with pytest.raises(ValueError, match="min_pixels"):
        InstanceOptions(min_pixels=0)
    with pytest.raises(ValueError, match="score_threshold"):
        InstanceOptions(score_threshold=1.5)
