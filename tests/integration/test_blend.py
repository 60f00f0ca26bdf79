"""The blend checked end to end: a position-dependent oracle through the real job, against numpy.

The pointwise oracles give the same label whatever the blend weights (every tile agrees on every
pixel). `RampOracle` scores a pixel by where it sits inside its tile, so neighbouring tiles
disagree in their overlap and the label there is decided by the weights. The reference below
re-implements, independently of `workers/`, the documented maths: chunk windows reflect-padded
at scene edges (`pipelines.plan.chunks`), the tile plan of `workers.tileplan.plan_tiles`, the Gaussian
map of `blend_weights`, the weighted average of softmax probabilities, the crop to each core and
the argmax.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.run.job import run_job
from tests.helpers import job_spec, ramp_oracle_checkpoint, read_classes, smooth_scene, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_local")

MEAN, STD = 10000.0, 3000.0
SLOPE, GAIN, NUM_CLASSES = 8.0, 1.0, 3
CHUNK, HALO, TILE, OVERLAP = 64, 8, 32, 0.25  # window 80 px: 3 x 3 tiles of 32 px, step 24


def _tile_offsets(size: int, tile: int, overlap: float) -> list[int]:
    """plan_tiles' documented formula along one axis (t = min(T, W), evenly spread, flush end)."""
    t = min(tile, size)
    step = max(1, int(np.floor(t * (1 - overlap))))
    n = -(-(size - t) // step) + 1
    if n == 1:
        return [0]
    return [int(np.floor(i * (size - t) / (n - 1) + 0.5)) for i in range(n)]


def _gaussian(shape: tuple[int, int], *, sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """blend_weights' documented Gaussian: separable, max 1 per axis, floored at 1e-3."""
    axes = []
    for n in shape:
        x = np.arange(n) - (n - 1) / 2
        g = np.exp(-(x**2) / (2 * (sigma_scale * n) ** 2))
        axes.append(g / g.max())
    return np.maximum(np.outer(*axes), floor)


def _ramp_probabilities(tile: np.ndarray) -> np.ndarray:
    """RampOracle's documented formula + softmax on one (C, h, w) normalised tile, float64."""
    h, w = tile.shape[1:]
    ramp = (np.arange(h)[:, None] / max(h - 1, 1) + np.arange(w)[None, :] / max(w - 1, 1)) / 2
    d = SLOPE * (ramp - 0.5) + GAIN * tile.mean(axis=0)
    taus = SLOPE * (np.arange(1, NUM_CLASSES) / NUM_CLASSES - 0.5)
    logits = np.stack([k * d - taus[:k].sum() for k in range(NUM_CLASSES)])
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def _reference_probabilities(data: np.ndarray, *, weights: str) -> np.ndarray:
    """(K, H, W) blended probabilities of every chunk core, the whole scene, in float64."""
    x = (data.astype(np.float64) - MEAN) / STD
    padded = np.pad(x, ((0, 0), (HALO, HALO), (HALO, HALO)), mode="reflect")
    H, W = data.shape[1:]
    out = np.full((NUM_CLASSES, H, W), np.nan)
    for r0 in range(0, H, CHUNK):
        for c0 in range(0, W, CHUNK):
            core_h, core_w = min(CHUNK, H - r0), min(CHUNK, W - c0)
            window = padded[:, r0 : r0 + core_h + 2 * HALO, c0 : c0 + core_w + 2 * HALO]
            wh, ww = window.shape[1:]
            th, tw = min(TILE, wh), min(TILE, ww)
            weight = _gaussian((th, tw)) if weights == "gaussian" else np.ones((th, tw))
            total, weight_sum = np.zeros((NUM_CLASSES, wh, ww)), np.zeros((wh, ww))
            for tr in _tile_offsets(wh, TILE, OVERLAP):
                for tc in _tile_offsets(ww, TILE, OVERLAP):
                    probs = _ramp_probabilities(window[:, tr : tr + th, tc : tc + tw])
                    total[:, tr : tr + th, tc : tc + tw] += probs * weight
                    weight_sum[tr : tr + th, tc : tc + tw] += weight
            blended = total / weight_sum
            out[:, r0 : r0 + core_h, c0 : c0 + core_w] = blended[:, HALO : HALO + core_h, HALO : HALO + core_w]
    return out


def test_reference_tile_plan_is_the_documented_one():
    # the window of a full chunk: 80 px in 32-px tiles at 25 % overlap -> step 24, flush at 48
    assert _tile_offsets(CHUNK + 2 * HALO, TILE, OVERLAP) == [0, 24, 48]
    assert _tile_offsets(22 + 2 * HALO, TILE, OVERLAP) == [0, 6]  # the last, narrower chunk
    w = _gaussian((TILE, TILE))
    assert w.max() == 1.0 and w.min() == 1e-3 and np.array_equal(w, w[::-1, ::-1])


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blended_job_equals_numpy_reference(tmp_path, blend):
    # 150 x 173: 3 x 3 chunks, the last row and column narrower (22 and 45 px), so edge windows
    # are reflect-padded and planned with fewer tiles. No nodata: every pixel is blended.
    data = smooth_scene((150, 173), seed=5)
    scene = write_geotiff(tmp_path / "ramp.tif", data, nodata=None)
    card = ramp_oracle_checkpoint(tmp_path / "model", slope=SLOPE, gain=GAIN, num_classes=NUM_CLASSES,
                                  mean=MEAN, std=STD, tile_size=TILE, halo=HALO)
    root = tmp_path / "out"
    spec = job_spec([scene], root, card, chunk_size=CHUNK, halo=HALO, tile_size=TILE, tile_overlap=OVERLAP,
                    blend=blend)
    result = run_job(spec, base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"]

    reference = _reference_probabilities(data, weights=blend)
    top2 = np.sort(reference, axis=0)[-2:]
    # float32 (pipeline) against float64 (reference): exact labels need no near-tie anywhere
    assert (top2[1] - top2[0]).min() > 1e-5
    expected = reference.argmax(axis=0).astype(np.uint8)
    np.testing.assert_array_equal(read_classes(root, "ramp"), expected)

    # the weights decide many labels: the other blend gives a visibly different mask
    other = _reference_probabilities(data, weights="constant" if blend == "gaussian" else "gaussian")
    assert (other.argmax(axis=0) != expected).sum() > 500
