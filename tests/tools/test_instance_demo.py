"""`tessera demo --instances` end to end with a few training steps (the wiring, not the model's quality:
the demo's own recipe is measured in README)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.tools.instance_demo import run_instance_demo
from pipelines.tools.train_instances import InstanceTrainSettings


@pytest.mark.slow
def test_the_instance_demo_trains_runs_the_job_and_scores_the_stored_instances(tmp_path, ray_local):
    settings = InstanceTrainSettings(steps=3, batch_size=1, patch_px=64, warmup_steps=1, scene_px=512,
                                     pool_windows=1, pool_window_px=128)
    report = run_instance_demo(tmp_path / "demo", size=256, settings=settings)
    assert report.trained and report.card_path.is_file()
    m = report.metrics
    assert m.n_true > 0 and 0 <= m.tp <= min(m.n_true, m.n_pred)
    assert np.isnan(m.precision) if m.n_pred == 0 else 0.0 <= m.precision <= 1.0
    assert (tmp_path / "demo" / "tables" / "instances").is_dir()
    again = run_instance_demo(tmp_path / "demo", size=256, settings=settings)
    assert not again.trained  # the cached model is reused for the same recipe
