"""pipelines.tools.bench.run: one fast smoke run through real Ray and MONAI, rendered as tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.tools.bench.config import BenchConfig
from pipelines.tools.bench.maths import monai_redundancy
from pipelines.tools.bench.report import render_tables
from pipelines.tools.bench.run import run_bench
from workers.checkpoints import BUILTIN_DIR

# ----------------------------------------------------------------------------- smoke run


def _card(kind: str, tmp_path: Path) -> str:
    if kind == "oracle":
        from tests.helpers import oracle_checkpoint

        # mean/std near the synthetic scene's reflectances, so the oracle finds several classes
        return str(oracle_checkpoint(tmp_path / "models", mean=1500.0, std=800.0, tile_size=64, halo=16))
    if not (BUILTIN_DIR / "unet-demo.json").is_file():
        pytest.skip("bundled weights workers/weights/unet-demo.json not present yet")
    return "builtin:unet-demo"


@pytest.mark.parametrize("card", ["oracle", "bundled"])
def test_bench_smoke_run(card, tmp_path, ray_local):
    config = BenchConfig(
        sizes=(256,), model=_card(card, tmp_path), chunk_size=128, halo=16, tile_size=64, batch_size=2,
        torch_threads=1, monai=True, out_dir=tmp_path / "bench", raw_batches=2, raw_warmup=1, raw_iterations=3,
    )
    result = run_bench(config)

    path = Path(result["json_path"])
    assert path.is_file() and (tmp_path / "bench" / "bench-latest.json").is_file()
    on_disk = json.loads(path.read_text())
    assert on_disk["sizes"] == json.loads(json.dumps(result["sizes"]))
    (row,) = on_disk["sizes"]
    assert row["size"] == 256 and row["scene_px"] == 256**2
    assert row["raw_px_s"] > 0 and row["e2e_px_s"] > 0 and row["monai_px_s"] > 0
    assert row["redundancy"] > 1
    assert 0 < row["ratio"]
    assert row["ideal_ratio"] == pytest.approx(1 / row["redundancy"])
    assert row["monai_skipped"] is None
    assert row["monai_agreement"] > 0.9
    assert row["tessera_total_peak_mib"] > 0 and row["monai_peak_rss_mib"] > 0
    assert 0 < row["tessera_job_pss_peak_mib"] <= row["tessera_total_peak_mib"]
    assert math.isclose(sum(row["breakdown"].values()), 1.0)
    assert row["breakdown"]["predict"] > 0
    assert row["predict_model_share"] > 0 and 0 < row["predictor_busy"] < 1
    assert on_disk["machine"]["cpu_count"] >= 1 and on_disk["machine"]["torch"]
    assert 0 < row["start_s"] < row["wall_s"] and 0 < row["start_share"] < 1 and row["steady_px_s"] > 0
    startup = on_disk["raw"][0]["startup_s"]
    assert startup["import_torch"] > 0 and startup["model"] > 0 and startup["first_pass"] > 0
    if card == "oracle":
        # pointwise oracle, one-hot probabilities: tiling and blending cannot change a label
        assert row["monai_agreement"] == 1.0
    # the peer at equal redundancy: tessera's plan (3 x 3 tiles of 64 per 160-px window) costs 2.25
    assert row["redundancy_without_skip"] == 2.25 and row["monai_redundancy"] == monai_redundancy((256, 256), 64, 0.25)
    assert row["monai_eq_redundancy"] == 2.25 and row["monai_eq_px_s"] > 0 and row["monai_eq_agreement"] > 0.9
    assert row["tessera_vs_monai_eq"] == pytest.approx(row["e2e_px_s"] / row["monai_eq_px_s"])
    assert row["tessera_vs_monai_per_model_px"] * row["plan_gain_vs_monai"] * row["skip_gain"] == pytest.approx(
        row["tessera_vs_monai"])
    assert row["skipped_chunk_share"] == row["n_chunks_skipped"] / row["n_chunks"]
    # memory over every process, Ray's daemons included, sampled together
    assert row["tessera_job_pss_peak_mib"] < row["tessera_all_pss_peak_mib"] <= (
        row["tessera_job_pss_peak_mib"] + row["tessera_system_pss_peak_mib"] + 1e-6)
    assert row["memory_all_vs_monai"] == pytest.approx(row["tessera_all_pss_peak_mib"] / row["monai_peak_rss_mib"])
    assert len(render_tables(result)) == 5
