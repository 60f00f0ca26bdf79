"""Job spec and model card validation: defaults work, errors name the file and the field."""

from __future__ import annotations

import json

import pytest

from pipelines.spec import load_job_spec
from schemas.errors import JobSpecError, ModelCardError
from schemas.job import JobSpec, parse_job_spec
from schemas.model_card import DEFAULT_PALETTE, default_class_colors, parse_model_card
from workers.checkpoints import load_checkpoint, resolve_card_path


def test_minimal_spec_gets_working_defaults():
    spec = parse_job_spec("inputs: [a.tif]\noutput: {root: out}\n", source="job.yaml")
    assert spec.model.card == "builtin:unet-demo"
    assert spec.tiling.chunk_size == 1024 and spec.tiling.halo is None and spec.tiling.blend == "gaussian"
    assert spec.resources.actors is None and spec.resources.num_gpus_per_actor is None  # auto


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("inputs: [a.tif]\noutput: {root: out}\ntiling: {chunk_size: 0}", "tiling.chunk_size"),
        ("inputs: [a.tif]\noutput: {root: out}\ntiling: {tile_overlap: 1.0}", "tiling.tile_overlap"),
        ("inputs: [a.tif]\noutput: {root: out}\ntiling: {chunksize: 512}", "tiling.chunksize"),
        ("inputs: []\noutput: {root: out}", "inputs"),
        ("inputs: [a.tif]", "output"),
        ("inputs: [a.tif]\noutput: {root: out}\nbands: [0, 1]", "bands"),
        ("inputs: [a.tif]\noutput: {root: out}\nresources: {actors: two}", "resources.actors"),
        ("inputs: [a.tif]\noutput: {root: out}\nversion: 9", "version"),
    ],
)
def test_bad_fields_are_named(text, field):
    with pytest.raises(JobSpecError, match=rf"job\.yaml: invalid job spec:\n(.|\n)*{field}"):
        parse_job_spec(text, source="job.yaml")


def test_yaml_is_parsed_safely():
    with pytest.raises(JobSpecError, match="job.yaml: not valid YAML"):
        parse_job_spec("inputs: !!python/object/apply:os.system ['echo hi']\n", source="job.yaml")
    with pytest.raises(JobSpecError, match="must be a YAML mapping"):
        parse_job_spec("- a\n- b\n", source="job.yaml")


def test_missing_spec_file(tmp_path):
    with pytest.raises(JobSpecError, match="nope.yaml: job spec not found"):
        load_job_spec(tmp_path / "nope.yaml")


def test_spec_is_frozen():
    spec = JobSpec.model_validate({"inputs": ["a.tif"], "output": {"root": "o"}})
    with pytest.raises(Exception, match="frozen"):
        spec.name = "x"


def _card(**overrides):
    card = {
        "name": "m", "architecture": "unet", "in_channels": 2,
        "classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
        "bands": [{"name": "x", "mean": 0, "std": 1}, {"name": "y", "mean": 0, "std": 1}],
        "tile_size": 64, "halo": 8, "stride": 16, "weights": "m.safetensors", "weights_sha256": "0" * 64,
    }
    return json.dumps(card | overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"in_channels": 3}, "in_channels is 3 but 2 bands"),
        ({"classes": [{"id": 1, "name": "a"}]}, "class ids must be 0..0"),
        ({"tile_size": 72}, "not a multiple of stride"),
        ({"weights": "../evil.safetensors"}, "weights must be a file name"),
        ({"weights_sha256": "abc"}, "weights_sha256"),
        ({"quicklook_bands": [3]}, r"quicklook_bands \[3\]: \[3\] not in 1..2"),
        ({"quicklook_bands": [1, 2]}, "1 \\(grey\\) or 3"),
        ({"classes": [{"id": 0, "name": "a", "color": "red"}]}, "classes.0.color"),
    ],
)
def test_bad_model_cards(overrides, message):
    with pytest.raises(ModelCardError, match=message):
        parse_model_card(_card(**overrides), source="card.json")


def test_class_colours_default_to_the_palette_and_quicklook_bands_to_the_first_three():
    card = parse_model_card(_card(classes=[{"id": 0, "name": "a", "color": "#00ff00"}, {"id": 1, "name": "b"}]),
                            source="card.json")
    assert card.class_colors == ("#00ff00", DEFAULT_PALETTE[1])
    more = default_class_colors(40)  # the palette, then a golden-angle hue walk: distinct, deterministic
    assert more[:10] == DEFAULT_PALETTE and len(set(more)) == 40 and more == default_class_colors(40)
    assert card.quicklook_model_bands == (0,)  # two bands: grey from the first
    assert parse_model_card(_card(quicklook_bands=[2]), source="c").quicklook_model_bands == (1,)


def test_checkpoint_checksum_and_missing_weights(tmp_path):
    (tmp_path / "card.json").write_text(_card())
    with pytest.raises(ModelCardError, match="weights file .* not found"):
        load_checkpoint(tmp_path / "card.json")
    (tmp_path / "m.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ModelCardError, match="does not match the card"):
        load_checkpoint(tmp_path / "card.json")


def test_unknown_builtin_model():
    with pytest.raises(ModelCardError, match="no builtin model 'nope'"):
        resolve_card_path("builtin:nope")
    with pytest.raises(ModelCardError, match="no builtin model"):
        resolve_card_path("builtin:../../etc/passwd")


def test_cluster_yaml_passes_rays_own_schema():
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] >= 1 and config["head_node_type"] == "head"


def test_documented_example_spec_is_valid():
    from pathlib import Path

    spec = load_job_spec(Path(__file__).resolve().parents[1] / "docs" / "jobspec.example.yaml")
    assert spec.tiling.chunk_size == 1024 and spec.output.root == "out/landcover-2026"


def test_gpu_default_follows_the_cluster(tmp_path):
    from pipelines.run.resolve import place_on_cluster, resolve_job
    from tests.helpers import oracle_checkpoint

    card = oracle_checkpoint(tmp_path)
    auto = resolve_job(JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(card)},
                                               "output": {"root": "o"}}), base_dir=tmp_path)
    assert auto.predictor_options.device == "cpu" and auto.num_gpus_per_actor == 0
    on_gpus = place_on_cluster(auto, {"CPU": 16, "GPU": 4})
    assert on_gpus.predictor_options.device == "cuda" and on_gpus.num_gpus_per_actor == 1
    assert on_gpus.parameters()["device_type"] == "cuda" != auto.parameters()["device_type"]
    assert on_gpus.actors == 4  # one per GPU
    on_cpus = place_on_cluster(auto, {"CPU": 2})
    # the volume store layout is in volumes' fingerprints only (an earlier-layout volume store is
    # another job's output; 2D fingerprints stay as they were)
    assert auto.parameters(3)["volume_store_layout"] == "ome-labels"
    assert "volume_store_layout" not in auto.parameters(2)
    assert on_cpus.predictor_options == auto.predictor_options and on_cpus.num_gpus_per_actor == 0
    pinned = resolve_job(JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(card)},
                                                 "resources": {"num_gpus_per_actor": 0},
                                                 "output": {"root": "o"}}), base_dir=tmp_path)
    assert place_on_cluster(pinned, {"CPU": 8, "GPU": 4}).predictor_options.device == "cpu"


def test_batch_default_follows_the_device(tmp_path):
    from pipelines.run.resolve import place_on_cluster, resolve_job
    from tests.helpers import oracle_checkpoint

    spec = JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(oracle_checkpoint(tmp_path))},
                                   "output": {"root": "o"}})
    cpu = resolve_job(spec, base_dir=tmp_path)
    assert cpu.predictor_options.batch_size == 1
    assert place_on_cluster(cpu, {"CPU": 2, "GPU": 1}).predictor_options.batch_size == 8


def test_actor_default_follows_the_cluster(tmp_path):
    from pipelines.run.resolve import ACTOR_MEMORY_BYTES, place_on_cluster, resolve_job
    from tests.helpers import oracle_checkpoint

    def job(**resources):
        spec = JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(oracle_checkpoint(tmp_path))},
                                       "resources": resources, "output": {"root": "o"}})
        return resolve_job(spec, base_dir=tmp_path)

    # CPU, fused stages: one single-threaded actor per CPU
    assert place_on_cluster(job(), {"CPU": 8}).actors == 8
    assert job().predictor_options.torch_threads == 1
    # split stages leave half a CPU to the read and write tasks
    assert place_on_cluster(job(stages="split"), {"CPU": 8}).actors == 7
    assert place_on_cluster(job(cpus_per_actor=2), {"CPU": 8}).actors == 4
    # memory caps the count, and there is always one
    assert place_on_cluster(job(), {"CPU": 64, "memory": 4 * ACTOR_MEMORY_BYTES}).actors == 4
    assert place_on_cluster(job(), {"CPU": 0.5}).actors == 1
    # explicit wins
    assert place_on_cluster(job(actors=3), {"CPU": 8, "GPU": 2}).actors == 3


def test_split_read_tasks_follow_the_free_cpus_on_gpu(tmp_path):
    from pipelines.run.job import read_concurrency
    from pipelines.run.resolve import place_on_cluster, resolve_job
    from tests.helpers import oracle_checkpoint

    def job(**resources):
        spec = JobSpec.model_validate({"inputs": ["a.tif"], "model": {"card": str(oracle_checkpoint(tmp_path))},
                                       "resources": {"stages": "split"} | resources, "output": {"root": "o"}})
        return resolve_job(spec, base_dir=tmp_path)

    gpu = place_on_cluster(job(), {"CPU": 16, "GPU": 1})
    assert (gpu.actors, gpu.num_gpus_per_actor) == (1, 1.0)
    assert read_concurrency(gpu, cluster_cpus=16) == 7  # (16 - 1 actor CPU) // 2
    assert read_concurrency(gpu, cluster_cpus=2) == 2  # at least 2 per GPU actor
    cpu = place_on_cluster(job(), {"CPU": 8})
    assert read_concurrency(cpu, cluster_cpus=8) == cpu.actors  # one reader per CPU actor
    assert read_concurrency(place_on_cluster(job(read_tasks=3), {"CPU": 16, "GPU": 1}), cluster_cpus=16) == 3


def test_a_directory_input_has_a_checksum_of_its_files(tmp_path):
    from workers.hashing import file_sha256, input_sha256

    series = tmp_path / "series"
    series.mkdir()
    for name, data in (("a.dcm", b"one"), ("b.dcm", b"two")):
        (series / name).write_bytes(data)
    first = input_sha256(series)
    assert input_sha256(series / "a.dcm") == file_sha256(series / "a.dcm")
    (series / "b.dcm").write_bytes(b"changed")
    assert input_sha256(series) != first
    (series / "b.dcm").write_bytes(b"two")
    assert input_sha256(series) == first
    (series / "b.dcm").rename(series / "c.dcm")
    assert input_sha256(series) != first


def test_a_scene_whose_dimensions_the_model_does_not_take_is_refused_before_planning():
    from pipelines.readers import SceneInfo
    from pipelines.run.resolve import check_scene_fits_model
    from schemas.errors import InputError
    from workers.checkpoints import load_checkpoint, resolve_card_path

    card = load_checkpoint(resolve_card_path("builtin:unet-demo")).card
    volume = SceneInfo(path="ct.nii.gz", shape=(40, 64, 64), count=4, dtype="float32", crs_wkt=None, crs=None,
                       transform=None, nodata=None, block_shape=(40, 64, 64), format="nifti")
    with pytest.raises(InputError, match=r"ct.nii.gz: a volume of shape \(40, 64, 64\), but model 'unet-demo' "
                                         r"\(unet\) takes 2-D inputs"):
        check_scene_fits_model(volume, bands=None, card=card)
    image = SceneInfo(path="s.tif", shape=(64, 64), count=4, dtype="uint16", crs_wkt=None, crs=None,
                      transform=(10.0, 0.0, 0.0, 0.0, -10.0, 0.0), nodata=0, block_shape=(64, 64))
    check_scene_fits_model(image, bands=None, card=card)  # fits
    three_d = card.model_copy(update={"architecture": "unet3d", "arch_args": {}})
    with pytest.raises(InputError, match=r"s.tif: an image of shape \(64, 64\), but model 'unet-demo' \(unet3d\) takes 3-D"):
        check_scene_fits_model(image, bands=None, card=three_d)
