"""The split (GPU) stages on a real GPU: the same outputs as the CPU job. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.run.job import run_job, windows_per_call
from pipelines.run.resolve import resolve_job
from schemas.job import JobSpec
from tests.helpers import job_spec, oracle_checkpoint, read_classes

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("ray_local")]


def _on_gpu(spec: JobSpec, **inference) -> JobSpec:
    return spec.model_copy(update={
        "resources": spec.resources.model_copy(update={"num_gpus_per_actor": 1.0, "stages": "split"}),
        "inference": spec.inference.model_copy(update=inference)})


@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_split_job_equals_the_cpu_job(oracle_run, tmp_path, batch):
    # The pointwise oracle in fp32 on the GPU (split stages: read tasks -> GPU actor -> write
    # tasks), one window or three per forward pass: the same classes as the CPU run, pixel for pixel.
    _, scene, root, _ = oracle_run
    card = oracle_checkpoint(tmp_path / "model")
    spec = _on_gpu(job_spec([scene], tmp_path / "gpu", card, tile_size=80), precision="fp32")
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"batch_size": batch})})
    job = resolve_job(spec, base_dir=tmp_path)
    assert job.predictor_options.device.startswith("cuda") and windows_per_call(job) == batch
    assert [s.status for s in run_job(spec, base_dir=tmp_path).scenes] == ["complete"]
    np.testing.assert_array_equal(read_classes(tmp_path / "gpu", "scene_one"), read_classes(root, "scene_one"))


def test_gpu_bundled_unet_in_bf16_agrees_with_cpu_fp32(tmp_path):
    # The bundled U-Net on a synthetic 2048^2 scene (4 chunks of 1024, whole-window tiles):
    # GPU autocast (precision auto: bf16 where supported) against the CPU's fp32.
    from pipelines.tools.synthetic import SceneSpec, write_scene

    scene = tmp_path / "synthetic.tif"
    write_scene(SceneSpec(height=2048, width=2048, seed=5), scene)
    spec = JobSpec.model_validate({
        "inputs": [str(scene)], "model": {"card": "builtin:unet-demo"},
        "resources": {"actors": 1, "torch_threads": 1}, "output": {"root": str(tmp_path / "cpu")}})
    assert [s.status for s in run_job(spec, base_dir=tmp_path).scenes] == ["complete"]
    gpu = _on_gpu(spec).model_copy(update={"output": spec.output.model_copy(update={"root": str(tmp_path / "gpu")})})
    assert [s.status for s in run_job(gpu, base_dir=tmp_path).scenes] == ["complete"]
    cpu_classes, gpu_classes = read_classes(tmp_path / "cpu", "synthetic"), read_classes(tmp_path / "gpu", "synthetic")
    np.testing.assert_array_equal(cpu_classes == 255, gpu_classes == 255)  # nodata is read, not predicted
    agreement = float((cpu_classes == gpu_classes).mean())
    assert agreement >= 0.999, agreement
