"""pipelines.tools.bench.maths: redundancies, ratios and shares, by hand (and against MONAI's own plan)."""

from __future__ import annotations

import math

import pytest

from pipelines.tools.bench.maths import (
    breakdown_shares,
    model_tile_shape,
    monai_memory_estimate,
    monai_overlap_for_redundancy,
    monai_redundancy,
    monai_skip_reason,
    nodata_skip_gain,
    peer_comparison,
    predict_model_share,
    redundancy_factor,
    scaling_summary,
    steady_state,
    stride_padded,
    throughput_ratios,
)

# ----------------------------------------------------------------------------- redundancy


def test_redundancy_whole_window_in_one_tile_is_the_halo_cost():
    # chunk 1024, halo 32, tile >= window: each 1088^2 window is one tile -> (1 + 2*32/1024)^2
    r = redundancy_factor((4096, 4096), 1024, 32, 2048, 0.25)
    assert r == (1 + 2 * 32 / 1024) ** 2 == 1.12890625


def test_redundancy_512_tiles_at_quarter_overlap():
    # 1088 window, 512 tiles, step 384: 3 per axis -> 9 * 512^2 / 1024^2
    assert redundancy_factor((2048, 2048), 1024, 32, 512, 0.25) == 9 * 512**2 / 1024**2 == 2.25


def test_redundancy_no_halo_no_overlap_tiles_dividing_the_chunk_is_one():
    assert redundancy_factor((512, 512), 128, 0, 64, 0.0) == 1.0


def test_redundancy_counts_edge_windows_and_stride_padding():
    # 100 x 100 scene, chunk 64, halo 4: cores 64 and 36 per axis -> windows 72 and 44 per axis.
    # Tile 80 covers every window in one tile: (72 + 44)^2 model px. Stride 16 pads 72 -> 80, 44 -> 48.
    assert redundancy_factor((100, 100), 64, 4, 80, 0.25) == (72 + 44) ** 2 / 100**2
    assert redundancy_factor((100, 100), 64, 4, 80, 0.25, stride=16) == (80 + 48) ** 2 / 100**2


def test_redundancy_skipped_chunks_compute_nothing_but_still_count_as_output():
    full = redundancy_factor((256, 256), 128, 16, 64, 0.25)
    assert full == 2.25
    assert redundancy_factor((256, 256), 128, 16, 64, 0.25, skipped=[(0, 0), [1, 1]]) == full / 2


def test_redundancy_is_n_dimensional():
    # 3D: chunk 32, halo 4 -> window 40^3 in one tile
    assert redundancy_factor((64, 64, 64), 32, 4, 64, 0.5) == pytest.approx((40 / 32) ** 3)


def test_model_tile_shape_and_stride_padding():
    assert model_tile_shape((1088, 1088), 512, 0.25) == (512, 512)
    assert model_tile_shape((1088, 1088), 4096, 0.25) == (1088, 1088)
    assert model_tile_shape((72, 72), 80, 0.25, stride=16) == (80, 80)
    assert stride_padded((1, 16, 17), 16) == (16, 16, 32)


# ----------------------------------------------------------------------------- the peer's redundancy


def test_monai_redundancy_of_the_default_peer():
    # roi 1088, overlap 0.25: interval 816; 16384 needs 20 windows per axis -> (20 * 1088 / 16384)^2
    assert monai_redundancy((16384, 16384), 1088, 0.25) == (20 * 1088 / 16384) ** 2 == 1.763916015625
    # overlap 0 on a multiple of 1024: 16 abutting 1088-px windows, the halo cost exactly
    assert monai_redundancy((16384, 16384), 1088, 0.0) == (1088 / 1024) ** 2
    # an axis smaller than the roi is padded up to it (one window); 300 px at interval 64: 4 windows
    assert monai_redundancy((100, 300), 128, 0.5) == 128 * (4 * 128) / (100 * 300)
    # stride padding of the roi
    assert monai_redundancy((64,), 60, 0.0, stride=16) == 2 * 64 / 64


@pytest.mark.parametrize(("shape", "roi", "overlap"), [
    ((16384, 16384), 1088, 0.25), ((4096, 8192), 1088, 0.25), ((1000, 999), 64, 0.5), ((300, 77), 100, 0.1),
    ((256, 256), 64, 1 - 47.5 / 64), ((50, 60), 64, 0.25),
])
def test_monai_redundancy_equals_monais_own_plan(shape, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = tuple(max(n, roi) for n in shape)
    interval = _get_scan_interval(padded, (roi,) * len(shape), len(shape), (overlap,) * len(shape))
    windows = dense_patch_slices(padded, (roi,) * len(shape), interval)
    assert monai_redundancy(shape, roi, overlap) == pytest.approx(len(windows) * roi ** len(shape) / math.prod(shape))


def test_monai_overlap_for_redundancy_matches_the_target():
    # 16k scene, 1088 roi: overlap 0 gives exactly tessera's (1 + 2 * 32 / 1024)^2
    assert monai_overlap_for_redundancy((16384, 16384), 1088, 1.12890625) == 0.0
    # 256 scene, roi 64, target 2.25 = (6 * 64 / 256)^2: intervals 39..47 give 6 windows; the
    # largest (least overlap) wins, and MONAI turns the overlap back into that interval
    overlap = monai_overlap_for_redundancy((256, 256), 64, 2.25)
    assert int(64 * (1 - overlap)) == 47
    assert monai_redundancy((256, 256), 64, overlap) == 2.25
    with pytest.raises(ValueError, match="> 0"):
        monai_overlap_for_redundancy((256, 256), 64, 0.0)


def test_nodata_skip_gain():
    # 256^2, chunk 128, halo 16, tile 64 (3 x 3 tiles per 160-px window): redundancy 2.25 unskipped
    got = nodata_skip_gain((256, 256), 128, 16, 64, 0.25, skipped=[(0, 0)], raw_px_s=1e6)
    assert got == {
        "skipped_chunk_share": 0.25, "skipped_px_share": 0.25, "redundancy_without_skip": 2.25,
        "skip_model_px_saved_share": 0.25, "skip_gain": pytest.approx(4 / 3),
        # 0.5625 model px per output px saved over 65536 px at 1 Mpx/s
        "skip_model_s_saved": pytest.approx(0.5625 * 256**2 / 1e6),
    }
    # an edge chunk is smaller: 100 x 100 in 64-px chunks, skipping (1, 1) skips its 36 x 36 core
    edge = nodata_skip_gain((100, 100), 64, 0, 64, 0.0, skipped=[(1, 1)])
    assert edge["skipped_px_share"] == 36 * 36 / 100**2 and edge["skipped_chunk_share"] == 0.25
    assert edge["skip_model_s_saved"] is None
    assert nodata_skip_gain((100, 100), 64, 0, 64, 0.0)["skip_gain"] == 1.0


def test_peer_comparison_factors_the_output_ratio():
    # tessera 6 Mpx/s at redundancy 0.9 (1.129 without the skip); the peer 2 Mpx/s at 1.764
    got = peer_comparison(e2e_px_s=6e6, redundancy=0.9, redundancy_without_skip=1.129, monai_px_s=2e6,
                          monai_redundancy=1.764)
    assert got["tessera_model_px_s"] == pytest.approx(5.4e6)
    assert got["monai_model_px_s"] == pytest.approx(3.528e6)
    assert got["tessera_vs_monai_per_model_px"] == pytest.approx(5.4 / 3.528)
    assert got["plan_gain_vs_monai"] == pytest.approx(1.764 / 1.129)
    skip_gain = 1.129 / 0.9
    assert got["tessera_vs_monai_per_model_px"] * got["plan_gain_vs_monai"] * skip_gain == pytest.approx(6 / 2)
    none = peer_comparison(e2e_px_s=6e6, redundancy=0.9, redundancy_without_skip=1.129, monai_px_s=None,
                           monai_redundancy=1.764)
    assert none["monai_model_px_s"] is None and none["tessera_vs_monai_per_model_px"] is None
    with pytest.raises(ValueError, match="> 0"):
        peer_comparison(e2e_px_s=1.0, redundancy=0.0, redundancy_without_skip=1.0, monai_px_s=1.0, monai_redundancy=1.0)


# ----------------------------------------------------------------------------- ratios and shares


def test_throughput_ratios():
    got = throughput_ratios(raw_px_s=4e6, e2e_px_s=1e6, redundancy=2.0)
    assert got == {"ratio": 0.25, "ideal_ratio": 0.5, "efficiency": 0.5}
    # a pipeline with no overhead reaches the ideal ratio: efficiency 1
    assert throughput_ratios(3e6, 3e6 / 1.12890625, 1.12890625)["efficiency"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        throughput_ratios(0.0, 1.0, 1.0)


def test_predict_model_share():
    # 2.25 x 1 Mpx of model work at 4.5 Mpx/s is 0.5 s of forward passes in 2 s of predict
    assert predict_model_share(model_px=2.25e6, raw_px_s=4.5e6, predict_s=2.0) == 0.25
    assert predict_model_share(model_px=1e6, raw_px_s=1e6, predict_s=0.0) is None


def test_steady_state_excludes_the_first_chunk():
    # 5 chunks of a 5 Mpx scene: the first after 4 s, all after 6 s -> 4 Mpx in 2 s
    got = steady_state({"first_chunk_s": 4.0, "chunks_s": 6.0}, 5_000_000, 5, raw_px_s=4e6)
    assert got == {"start_s": 4.0, "start_share": pytest.approx(4 / 6), "steady_px_s": 2e6, "steady_vs_raw": 0.5}
    assert steady_state({"first_chunk_s": 1.0, "chunks_s": 1.0}, 100, 1, raw_px_s=1.0)["steady_px_s"] is None
    assert steady_state({}, 100, 3, raw_px_s=1.0) == {"start_s": 0.0, "start_share": None, "steady_px_s": None,
                                                      "steady_vs_raw": None}


def test_breakdown_shares():
    shares = breakdown_shares({"read": 1.0, "predict": 6.0, "write": 2.0, "stats": 0.5, "merge": 0.5})
    assert shares == {"read": 0.1, "predict": 0.6, "write": 0.2, "stats": 0.05, "merge": 0.05}
    assert list(shares) == ["read", "predict", "write", "stats", "merge"]
    assert math.isclose(sum(shares.values()), 1.0)
    assert breakdown_shares({"read": 0.0, "predict": 0.0}) == {"read": 0.0, "predict": 0.0}
    with pytest.raises(ValueError, match="'write'"):
        breakdown_shares({"read": 1.0, "write": -1.0})


def test_scaling_summary_relative_to_the_smallest_size():
    rows = [
        {"size": 8192, "time_per_mpx_s": 2.2, "tessera_job_pss_peak_mib": 1100.0},
        {"size": 4096, "time_per_mpx_s": 2.0, "tessera_job_pss_peak_mib": 1000.0},
    ]
    got = scaling_summary(rows)
    assert got[0] == {"time_per_mpx_vs_smallest": pytest.approx(1.1), "memory_vs_smallest": pytest.approx(1.1)}
    assert got[1] == {"time_per_mpx_vs_smallest": 1.0, "memory_vs_smallest": 1.0}
    assert scaling_summary([]) == []


def test_monai_memory_estimate_grows_with_the_scene():
    small = monai_memory_estimate((4096, 4096), channels=4, classes=5, input_itemsize=2)
    big = monai_memory_estimate((16384, 16384), channels=4, classes=5, input_itemsize=2)
    # 16k^2 * (4*4 + 5*4 + 4) bytes = 10 GiB (+ 1 GiB fixed)
    assert big == 16384**2 * 40 + 2**30
    assert big - 2**30 == 16 * (small - 2**30)


def test_monai_skip_reason():
    ok = dict(enabled=True, max_side=16384, estimate_bytes=2**30, available_bytes=8 * 2**30)
    assert monai_skip_reason(4096, **ok) is None
    assert "disabled" in monai_skip_reason(4096, **(ok | {"enabled": False}))
    assert "32768 > monai_max_side 16384" in monai_skip_reason(32768, **ok)
    assert "only 1.0 GiB available" in monai_skip_reason(4096, **(ok | {"available_bytes": 2**30}))
