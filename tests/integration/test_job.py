"""End-to-end runs through a real local Ray: oracle exactness, georeferencing, tables, faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import zarr
from skimage.measure import label, regionprops

from pipelines.query import run_query
from pipelines.run.job import run_job, windows_per_call
from pipelines.run.resolve import resolve_job
from pipelines.writers.zarr_masks import read_store_state
from schemas import store as layout
from schemas.errors import JobSpecError, ModelCardError
from schemas.job import JobSpec
from schemas.tables import SCHEMAS
from tests.helpers import crash_once_checkpoint, job_spec, oracle_checkpoint, read_classes, smooth_scene, write_geotiff
from workers.models.oracles import ThresholdOracle

pytestmark = pytest.mark.usefixtures("ray_local")


def _whole_image_oracle(data: np.ndarray, *, radius: int, num_classes: int = 4,
                        mean: float = 10000.0, std: float = 3000.0) -> np.ndarray:
    """The oracle applied to the whole image in one forward pass (nodata -> 0 input, 255 output)."""
    valid = ~(data == 0).all(axis=0)
    # Same float32 arithmetic as the predictor: (x - mean) * (1 / std), nodata -> 0.
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32)
    x = (torch.from_numpy(data.astype(np.float32)) - mean) * inv_std * torch.from_numpy(valid)
    model = ThresholdOracle(data.shape[0], num_classes, radius=radius).eval()
    with torch.inference_mode():
        labels = model(x[None]).argmax(dim=1)[0].numpy().astype(np.uint8)
    return np.where(valid, labels, 255).astype(np.uint8)


def test_tiled_oracle_equals_whole_image(oracle_run):
    data, _, root, result = oracle_run
    assert [s.status for s in result.scenes] == ["complete"]
    assert result.scenes[0].name == "scene_one"
    np.testing.assert_array_equal(read_classes(root, "scene_one"), _whole_image_oracle(data, radius=0))


def test_halo_gives_exact_chunks_for_a_spatial_oracle(tmp_path):
    # radius-3 box filter: chunks are exact when halo >= 3 and one tile covers the window.
    data = smooth_scene((130, 97), seed=2)
    scene = write_geotiff(tmp_path / "s.tif", data, nodata=None)
    card = oracle_checkpoint(tmp_path / "model", radius=3)
    root = tmp_path / "out"
    run_job(job_spec([scene], root, card, halo=3, tile_size=256), base_dir=tmp_path)
    expected = _whole_image_oracle(data, radius=3)
    np.testing.assert_array_equal(read_classes(root, "s"), expected)


def test_georeferencing_round_trip(oracle_run):
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    _, scene, root, _ = oracle_run
    ds = xr.open_zarr(root / "scene_one.zarr", zarr_format=3, mask_and_scale=False)
    classes = ds[layout.CLASSES]
    with rasterio.open(scene) as src:
        assert classes.rio.crs == src.crs
        assert classes.rio.transform().almost_equals(src.transform)
        assert classes.shape == (src.height, src.width)
        assert classes.dtype == np.uint8
        np.testing.assert_allclose(ds.x.values[:3], [src.xy(0, c)[0] for c in range(3)])
        np.testing.assert_allclose(ds.y.values[:3], [src.xy(r, 0)[1] for r in range(3)])
    attrs = zarr.open_group(str(root / "scene_one.zarr"), mode="r").attrs[layout.TESSERA_ATTR]
    assert attrs[layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE
    assert attrs[layout.KEY_CLASS_NAMES] == ["class0", "class1", "class2", "class3"]
    assert len(attrs[layout.KEY_MODEL]["sha256"]) == 64


def test_region_stats_equal_skimage_on_stitched_mask(oracle_run):
    _, scene, root, _ = oracle_run
    classes = read_classes(root, "scene_one")
    table = pq.read_table(root / "tables" / "regions" / "scene_one.parquet")
    assert table.schema.equals(SCHEMAS["regions"], check_metadata=False)
    labels = label(classes, background=255, connectivity=2)
    expected = sorted(
        (int(classes[tuple(p.coords[0])]), int(p.area), tuple(int(v) for v in p.bbox))
        for p in regionprops(labels)
    )
    rows = table.to_pylist()
    got = sorted((r["class_id"], r["pixel_count"], (r["min_row"], r["min_col"], r["max_row"] + 1, r["max_col"] + 1))
                 for r in rows)
    assert got == expected
    with rasterio.open(scene) as src:
        pixel_area = abs(src.transform.a * src.transform.e)
        for r in rows[:20]:
            assert r["area_crs2"] == pytest.approx(r["pixel_count"] * pixel_area)
            x, y = src.xy(r["centroid_row"], r["centroid_col"])
            assert (r["centroid_x_crs"], r["centroid_y_crs"]) == pytest.approx((x, y))
            assert 14.0 < r["centroid_lon"] < 16.0 and 44.0 < r["centroid_lat"] < 46.0  # UTM 33N, 5000 km N


def test_tables_and_manifest(oracle_run):
    _, _, root, _ = oracle_run
    scenes = run_query(root, "SELECT * FROM scenes").to_pylist()
    assert len(scenes) == 1 and scenes[0]["status"] == "complete" and scenes[0]["error"] is None
    assert len(scenes[0]["input_sha256"]) == 64 and scenes[0]["shape"] == [150, 173]
    chunks = run_query(root, "SELECT status, count(*) AS n FROM chunks GROUP BY status ORDER BY status").to_pylist()
    # 150x173 in 64-px chunks: 3 x 3 grid; the nodata border (20 rows on top, 20 cols on the
    # right) leaves no chunk wholly nodata.
    assert sum(c["n"] for c in chunks) == 9
    n_regions = run_query(root, "SELECT count(*) AS n FROM regions").column("n")[0].as_py()
    assert n_regions == scenes[0]["n_regions"] > 0
    areas = {c["class_name"]: c["pixel_count"] for c in scenes[0]["class_areas"]}
    classes = read_classes(root, "scene_one")
    assert areas == {f"class{k}": int((classes == k).sum()) for k in range(4)}
    assert scenes[0]["valid_pixels"] == int((classes != 255).sum())


def test_nodata_chunks_are_skipped_and_recorded(tmp_path):
    data = smooth_scene((128, 128), seed=3)
    data[:, :64, :64] = 0  # one whole chunk of nodata
    scene = write_geotiff(tmp_path / "holes.tif", data)
    root = tmp_path / "out"
    run_job(job_spec([scene], root, oracle_checkpoint(tmp_path / "m")), base_dir=tmp_path)
    rows = run_query(root, "SELECT chunk_index, status, valid_pixels FROM chunks ORDER BY chunk_index").to_pylist()
    assert rows[0] == {"chunk_index": [0, 0], "status": "skipped_nodata", "valid_pixels": 0}
    assert all(r["status"] == "written" for r in rows[1:])
    assert (read_classes(root, "holes")[:64, :64] == 255).all()


def test_bad_scene_fails_alone_with_a_clear_error(tmp_path):
    good = write_geotiff(tmp_path / "good.tif", smooth_scene((70, 70), seed=4))
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00 this is not a tiff")
    three_bands = write_geotiff(tmp_path / "rgb.tif", smooth_scene((70, 70), bands=3, seed=5))
    root = tmp_path / "out"
    spec = job_spec([good, tmp_path / "corrupt.tif", three_bands, tmp_path / "missing.tif"], root,
                 oracle_checkpoint(tmp_path / "m"))
    result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["good"] == ("complete", None)
    assert status["corrupt"][0] == "failed" and "corrupt.tif" in status["corrupt"][1]
    assert status["rgb"][0] == "failed" and "3 bands" in status["rgb"][1] and "expects 4" in status["rgb"][1]
    assert status["missing"][0] == "failed" and "missing.tif" in status["missing"][1]
    table = {r["scene"]: r for r in run_query(root, "SELECT scene, status, error FROM scenes").to_pylist()}
    assert {k: v["status"] for k, v in table.items()} == {
        "good": "complete", "corrupt": "failed", "rgb": "failed", "missing": "failed"}
    assert not (root / "corrupt.zarr").exists()


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_a_damaged_block_fails_its_scene_not_the_job(tmp_path, stages):
    # The header is fine (the scene opens and hashes), one compressed block of its pixels is
    # not: the chunks reading it fail, their scene fails naming the file and the rows, and
    # the other scene of the job completes. Its store is never marked complete.
    good = write_geotiff(tmp_path / "good.tif", smooth_scene((128, 128), seed=4))
    damaged = tmp_path / "damaged.tif"
    profile = dict(driver="GTiff", width=128, height=128, count=4, dtype="uint16", nodata=0, tiled=True,
                   blockxsize=64, blockysize=64, compress="deflate", crs="EPSG:32633",
                   transform=rasterio.transform.from_origin(500000.0, 5000000.0, 10.0, 10.0))
    with rasterio.open(damaged, "w", **profile) as ds:
        ds.write(smooth_scene((128, 128), seed=5))
    with rasterio.open(damaged) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    with open(damaged, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    root = tmp_path / "out"
    spec = job_spec([good, damaged], root, oracle_checkpoint(tmp_path / "m"))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"stages": stages})})
    status = {s.name: (s.status, s.error) for s in run_job(spec, base_dir=tmp_path).scenes}
    assert status["good"] == ("complete", None)
    assert status["damaged"][0] == "failed"
    assert str(damaged) in status["damaged"][1] and "read failed for rows" in status["damaged"][1]
    state = read_store_state(root / "damaged.zarr")
    assert state is not None and state[layout.KEY_STATUS] != layout.STORE_STATUS_COMPLETE


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_a_predictor_process_killed_once_is_restarted_and_changes_no_output(oracle_run, tmp_path, stages,
                                                                          monkeypatch):
    # The model's first forward pass kills its actor's process. Ray restarts the actor and
    # retries its call once; the job completes with exactly the outputs of an undisturbed run.
    monkeypatch.setenv("TESSERA_ALLOW_PLUGINS", "tests.helpers")  # the crashing model is a plugin
    _, scene, root0, _ = oracle_run
    marker = tmp_path / "crashed"
    root = tmp_path / "out"
    spec = job_spec([scene], root, crash_once_checkpoint(tmp_path / "m", marker))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"stages": stages})})
    result = run_job(spec, base_dir=tmp_path)
    assert marker.exists()  # the process did die once
    assert [s.status for s in result.scenes] == ["complete"]
    np.testing.assert_array_equal(read_classes(root, "scene_one"), read_classes(root0, "scene_one"))


def test_rerun_recomputes_nothing_and_resume_computes_only_missing(tmp_path):
    scene = write_geotiff(tmp_path / "r.tif", smooth_scene((128, 192), seed=6))
    card = oracle_checkpoint(tmp_path / "m")
    root = tmp_path / "out"
    first = run_job(job_spec([scene], root, card), base_dir=tmp_path)
    assert first.scenes[0].n_todo == 6
    before = read_classes(root, "r")
    again = run_job(job_spec([scene], root, card), base_dir=tmp_path)
    assert again.scenes[0].already_complete and again.scenes[0].n_todo == 0

    # Simulate an interrupted run: scene not complete, two chunks without markers, their
    # pixels lost. Resuming computes exactly those two and restores identical bytes.
    group = zarr.open_group(str(root / "r.zarr"), mode="r+")
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    attrs[layout.KEY_STATUS] = layout.STORE_STATUS_PARTIAL
    group.attrs[layout.TESSERA_ATTR] = attrs
    work = next((root / "_work" / "r").iterdir())
    for key in ("c0_1", "c1_2"):
        (work / f"{key}.json").unlink()
    arr = zarr.open_array(str(root / "r.zarr"), path=layout.CLASSES, mode="r+")
    arr[0:64, 64:128] = 255
    arr[64:128, 128:192] = 255
    resumed = run_job(job_spec([scene], root, card), base_dir=tmp_path)
    assert resumed.scenes[0].n_todo == 2 and resumed.scenes[0].status == "complete"
    np.testing.assert_array_equal(read_classes(root, "r"), before)


def test_different_fingerprint_is_never_mixed_in(tmp_path):
    scene = write_geotiff(tmp_path / "f.tif", smooth_scene((64, 64), seed=7))
    card = oracle_checkpoint(tmp_path / "m")
    root = tmp_path / "out"
    run_job(job_spec([scene], root, card), base_dir=tmp_path)
    other = run_job(job_spec([scene], root, card, tile_overlap=0.5), base_dir=tmp_path)
    assert other.scenes[0].status == "failed"
    assert "another job fingerprint" in other.scenes[0].error and "overwrite" in other.scenes[0].error


def test_missing_model_fails_before_any_work(tmp_path):
    scene = write_geotiff(tmp_path / "x.tif", smooth_scene((32, 32), seed=8))
    with pytest.raises(ModelCardError, match="not found"):
        run_job(job_spec([scene], tmp_path / "out", tmp_path / "nope.json"), base_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_resolved_spec_saved_beside_outputs(oracle_run):
    _, _, root, _ = oracle_run
    saved = json.loads((root / "job.resolved.json").read_text())
    assert saved["resolved"]["halo"] == 8 and saved["resolved"]["chunk_size"] == 64


def test_probabilities_ensemble_and_tta_through_the_job(tmp_path):
    data = smooth_scene((100, 90), seed=9, nodata_border=10)
    scene = write_geotiff(tmp_path / "p.tif", data)
    card = oracle_checkpoint(tmp_path / "m")
    twin = oracle_checkpoint(tmp_path / "m2", name="oracle-twin")
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": [str(scene)],
        "model": {"card": str(card), "ensemble": [{"card": str(twin), "weight": 2.0}]},
        "tiling": {"chunk_size": 64, "halo": 8, "tile_size": 32},
        "inference": {"tta": ["flips"]},
        "resources": {"torch_threads": 1},
        "output": {"root": str(root), "write_probabilities": True},
    })
    result = run_job(spec, base_dir=tmp_path)
    assert result.scenes[0].status == "complete", result.scenes[0].error
    classes = read_classes(root, "p")
    # An ensemble of two identical pointwise oracles with flip TTA is still the oracle.
    np.testing.assert_array_equal(classes, _whole_image_oracle(data, radius=0))
    probs = zarr.open_array(str(root / "p.zarr"), path=layout.PROBABILITIES, mode="r")[:]
    assert probs.shape == (4, 100, 90) and probs.dtype == np.float16
    valid = classes != 255
    np.testing.assert_array_equal(probs[:, valid].astype(np.float32).argmax(axis=0), classes[valid])
    assert np.isnan(probs[:, ~valid]).all()
    attrs = zarr.open_group(str(root / "p.zarr"), mode="r").attrs[layout.TESSERA_ATTR]
    assert attrs[layout.KEY_MODEL]["ensemble"][0]["name"] == "oracle-twin"


def _ensemble_spec(scene: Path, card: Path, member: Path, root: Path) -> JobSpec:
    """A job of one scene whose model is `card` with `member` as its ensemble partner."""
    return JobSpec.model_validate({
        "inputs": [str(scene)],
        "model": {"card": str(card), "ensemble": [{"card": str(member)}]},
        "output": {"root": str(root)},
    })


def test_mismatched_ensemble_fails_before_any_work(tmp_path):
    scene = write_geotiff(tmp_path / "e.tif", smooth_scene((32, 32), seed=10))
    other = oracle_checkpoint(tmp_path / "m3", num_classes=3, name="three")
    spec = _ensemble_spec(scene, oracle_checkpoint(tmp_path / "m"), other, tmp_path / "out")
    with pytest.raises(ModelCardError, match="ensemble members must agree"):
        run_job(spec, base_dir=tmp_path)


def test_split_stages_write_the_same_outputs_as_fused(oracle_run, tmp_path):
    # oracle_run used the CPU default (stages auto -> fused); the split pipeline (read tasks ->
    # actors -> write tasks) must write identical classes and region rows.
    _, scene, root, _ = oracle_run
    card = oracle_checkpoint(tmp_path / "model")
    spec = job_spec([scene], tmp_path / "split", card)
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"stages": "split"})})
    result = run_job(spec, base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"]
    np.testing.assert_array_equal(read_classes(tmp_path / "split", "scene_one"), read_classes(root, "scene_one"))
    # the scheduler reports how busy it kept each stage (read tasks, actor calls, write tasks)
    assert all(result.phases[f"split_{k}_in_flight"] > 0 for k in ("reads", "calls", "writes"))

    def regions(r: Path):
        return pq.read_table(r / "tables" / "regions" / "scene_one.parquet").sort_by("region_id").drop(["scene"])

    assert regions(tmp_path / "split").equals(regions(root))


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_whole_windows_batched_across_chunks_equal_one_window_per_pass(oracle_run, tmp_path, stages):
    # tile 80 = the whole 64 + 2 * 8 window: batch 3 runs three windows per forward pass
    # (Predictor.predict_cores); classes and regions must equal batch 1, window by window.
    _, scene, _, _ = oracle_run
    card = oracle_checkpoint(tmp_path / "model")
    roots = {}
    for batch in (1, 3):
        spec = job_spec([scene], tmp_path / f"b{batch}", card, tile_size=80)
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(
            update={"stages": stages, "batch_size": batch})})
        assert windows_per_call(resolve_job(spec, base_dir=tmp_path)) == batch
        assert [s.status for s in run_job(spec, base_dir=tmp_path).scenes] == ["complete"]
        roots[batch] = tmp_path / f"b{batch}"
    np.testing.assert_array_equal(read_classes(roots[3], "scene_one"), read_classes(roots[1], "scene_one"))
    regions = [pq.read_table(r / "tables" / "regions" / "scene_one.parquet").sort_by("region_id") for r in roots.values()]
    assert regions[0].equals(regions[1])


def test_more_actors_than_cpus_fails_before_any_work(tmp_path):
    # the local test Ray has 2 CPUs: 3 actors x 1 CPU could never all start (Ray would wait forever)
    scene = write_geotiff(tmp_path / "s.tif", smooth_scene((40, 40), seed=3))
    card = oracle_checkpoint(tmp_path / "model")
    spec = job_spec([scene], tmp_path / "out", card)
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"actors": 3})})
    with pytest.raises(JobSpecError, match=r"3 actor\(s\) x 1.0 CPU need 3 CPUs, the Ray cluster has 2"):
        run_job(spec, base_dir=tmp_path)
    assert not (tmp_path / "out" / "s.zarr").exists()


def test_fp16_on_cpu_fails_before_any_work(tmp_path):
    scene = write_geotiff(tmp_path / "s.tif", smooth_scene((40, 40), seed=3))
    card = oracle_checkpoint(tmp_path / "model")
    spec = job_spec([scene], tmp_path / "out", card)
    spec = spec.model_copy(update={"inference": spec.inference.model_copy(update={"precision": "fp16"})})
    with pytest.raises(JobSpecError, match="fp16 needs GPU actors"):
        run_job(spec, base_dir=tmp_path)
    assert not (tmp_path / "out" / "s.zarr").exists()



def test_a_plugin_model_runs_only_where_the_environment_allows_its_module(oracle_run, tmp_path, monkeypatch):
    # A card naming "module:callable" makes every actor import and run that module: a job spec
    # (and the card it names) cannot allow it, only the environment of the process running the
    # job; the refusal comes before any actor starts and names the variable to set.
    _, scene, _, _ = oracle_run
    card = crash_once_checkpoint(tmp_path / "m", tmp_path / "never")
    spec = job_spec([scene], tmp_path / "out", card)
    for allowed in (None, "", "tests.help", "other,tests.helpersx"):
        if allowed is None:
            monkeypatch.delenv("TESSERA_ALLOW_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("TESSERA_ALLOW_PLUGINS", allowed)
        with pytest.raises(ModelCardError, match="TESSERA_ALLOW_PLUGINS=tests.helpers") as err:
            run_job(spec, base_dir=tmp_path)
        assert str(card) in str(err.value)
    assert not (tmp_path / "out" / "tables").exists() and not (tmp_path / "never").exists()
    # an ensemble member is checked too
    ensemble = _ensemble_spec(scene, oracle_checkpoint(tmp_path / "o"), card, tmp_path / "out")
    with pytest.raises(ModelCardError, match="is a plugin"):
        run_job(ensemble, base_dir=tmp_path)
    assert not (tmp_path / "out" / "tables").exists()
