"""Job resolution of instance models: what is refused before any actor starts, and the fingerprint."""

from __future__ import annotations

import pytest

from pipelines.run.resolve import resolve_job
from schemas.errors import ModelCardError
from schemas.job import JobSpec
from tests.helpers import oracle_checkpoint
from workers.checkpoints import save_checkpoint
from workers.registry import build_model


def _oracle_card(tmp_path):
    fields = {"architecture": "instance_oracle", "arch_args": {}, "in_channels": 2,
              "classes": [{"id": i, "name": f"c{i}"} for i in range(3)],
              "bands": [{"name": f"b{i}", "mean": 0.0, "std": 1.0} for i in range(2)], "tile_size": 256, "halo": 8}
    model = build_model("instance_oracle", in_channels=2, num_classes=3, arch_args={})
    return save_checkpoint(model, fields, tmp_path / "model", name="oracle")


def _spec(card, **sections) -> JobSpec:
    return JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(card)},
                                   "output": {"root": "o", **sections.pop("output", {})}, **sections})


@pytest.mark.parametrize(("sections", "named"), [
    ({"output": {"write_probabilities": True}}, "output.write_probabilities"),
    ({"inference": {"tta": ["flips"]}}, r"inference.tta \['flips'\]"),
    ({"inference": {"scales": [1.0, 1.5]}}, r"inference.scales \[1.0, 1.5\]"),
])
def test_instance_jobs_refuse_probability_options_naming_them(tmp_path, sections, named):
    card = _oracle_card(tmp_path)
    with pytest.raises(ModelCardError, match=f"oracle.json: model 'oracle' \\(instance_oracle\\) is an instance model.*{named}"):
        resolve_job(_spec(card, **sections), base_dir=tmp_path)


def test_instance_options_reach_the_predictor_and_the_fingerprint_of_instance_jobs_only(tmp_path):
    card = _oracle_card(tmp_path)
    job = resolve_job(_spec(card, inference={"instances": {"score_threshold": 0.7, "min_pixels": 5}}),
                      base_dir=tmp_path)
    options = job.predictor_options.instances
    assert (options.score_threshold, options.min_pixels, options.mask_threshold) == (0.7, 5, 0.5)
    assert job.parameters()["instances"] == {"score_threshold": 0.7, "mask_threshold": 0.5, "iou_threshold": 0.5,
                                             "min_pixels": 5}
    assert resolve_job(_spec(card), base_dir=tmp_path).parameters() != job.parameters()
    semantic = resolve_job(_spec(oracle_checkpoint(tmp_path)), base_dir=tmp_path)
    assert "instances" not in semantic.parameters()  # semantic fingerprints stay as they were
