"""`tessera bench --volume`: sizes and classes from the CLI, the plans' redundancies, the streamed
synthetic volume, the memory watchdog and MONAI's out-of-memory, the tables; and one small run of
both sides end to end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.tools.bench.children import ChildOutOfMemory, run_in_child
from pipelines.tools.bench.config import VolumeBenchConfig, parse_classes, parse_volume_sizes
from pipelines.tools.bench.maths import monai_overlap_for_redundancy, monai_redundancy, redundancy_factor
from pipelines.tools.bench.report import render_volume_tables
from pipelines.tools.bench.volume import ensure_bench_volume, memory_scaling, volume_label
from pipelines.tools.phantom import (
    PhantomSpec,
    phantom_affine,
    phantom_geometry,
    render_phantom,
    render_phantom_slab,
    write_phantom_image,
)

# ----------------------------------------------------------------------------- config


def test_volume_sizes_are_cubes_or_x_y_z_with_slices_last_returned_as_z_y_x():
    assert parse_volume_sizes(["256,512", "512x512x1024"]) == ((256,) * 3, (512,) * 3, (1024, 512, 512))
    assert parse_volume_sizes([" 64 , 96x80x48 "]) == ((64,) * 3, (48, 80, 96))
    for bad in ("", "4", "64x64", "64x64x4", "1k", "axbxc"):
        with pytest.raises(ValueError, match="volume size|no volume size"):
            parse_volume_sizes([bad])


def test_class_counts_parse_and_must_fit_the_uint8_classes():
    assert parse_classes(["8,117", "3"]) == (8, 117, 3)
    for bad in ("1", "256", "x", ""):
        with pytest.raises(ValueError, match="class count"):
            parse_classes([bad])


def test_volume_config_checks_its_fields():
    config = VolumeBenchConfig(volumes=[(16, 32, 48)], classes=[3, 117])
    assert config.volumes == ((16, 32, 48),) and config.classes == (3, 117)
    assert json.loads(json.dumps(config.to_json()))["volumes"] == [[16, 32, 48]]
    with pytest.raises(ValueError, match="not a multiple of the U-Net's stride"):
        VolumeBenchConfig(tile_size=66, depth=2)
    with pytest.raises(ValueError, match="classes"):
        VolumeBenchConfig(classes=(1,))
    with pytest.raises(ValueError, match="volumes"):
        VolumeBenchConfig(volumes=((64, 64),))
    with pytest.raises(ValueError, match="memory_budget_gib"):
        VolumeBenchConfig(memory_budget_gib=0)
    assert volume_label((1024, 512, 512)) == "512x512x1024" and volume_label((64, 64, 64)) == "64^3"


def test_3d_redundancies_of_both_plans():
    # a window the size of the tile (chunk 48 + 2 x halo 8 = 64): one tile per chunk, (64/48)^3
    assert redundancy_factor((96,) * 3, 48, 8, 64, 0.25, stride=4) == pytest.approx((64 / 48) ** 3)
    # MONAI, roi 64 at 25 % on 96: interval 48, two windows per axis: the same model voxels
    assert monai_redundancy((96,) * 3, 64, 0.25, stride=4) == pytest.approx((128 / 96) ** 3)
    # the default plan (chunk 128, halo 8, tile 64): 3 tiles of a 144 window per 128 chunk per axis
    assert redundancy_factor((256,) * 3, 128, 8, 64, 0.25, stride=4) == pytest.approx(1.5**3)
    eq = monai_overlap_for_redundancy((256,) * 3, 64, 1.5**3, stride=4)
    assert monai_redundancy((256,) * 3, 64, eq, stride=4) == pytest.approx(1.5**3, rel=0.05)


# ----------------------------------------------------------------------------- the streamed volume


def test_the_volume_is_written_slab_by_slab_with_the_phantoms_labels_and_affine(tmp_path):
    spec = PhantomSpec(shape=(20, 30, 40), spacing_mm=(1.0, 0.8, 0.8), seed=3, noise_hu=0.0)
    path = write_phantom_image(spec, tmp_path / "v.nii", slab_voxels=30 * 40 * 3)  # 3 planes per slab
    img = nib.load(str(path))
    assert img.shape == (40, 30, 20) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, phantom_affine(spec))
    hu, _ = render_phantom(spec)  # without noise the HU are the labels' HU: the same volume
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), hu)

    noisy = PhantomSpec(shape=(20, 30, 40), seed=3, noise_hu=12.0)
    geometry = phantom_geometry(noisy)
    a, labels_a = render_phantom_slab(noisy, geometry, 5, 9)
    b, labels_b = render_phantom_slab(noisy, geometry, 5, 9)
    np.testing.assert_array_equal(a, b)  # deterministic per seed and slab
    np.testing.assert_array_equal(labels_a, render_phantom(noisy)[1][5:9])
    clean, _ = render_phantom_slab(PhantomSpec(shape=(20, 30, 40), seed=3, noise_hu=0.0), geometry, 5, 9)
    inside = clean > -1000  # the noise, away from the clipping at -1024 HU
    assert float((a[inside].astype(np.float64) - clean[inside]).std()) == pytest.approx(12.0, rel=0.1)
    with pytest.raises(ValueError, match="uncompressed .nii"):
        write_phantom_image(spec, tmp_path / "v.nii.gz")


def test_bench_volumes_are_reused_while_shape_and_seed_match(tmp_path):
    path, seconds = ensure_bench_volume(tmp_path, shape=(16, 24, 32), seed=1)
    assert seconds > 0 and path.name == "bench-volume-32x24x16-seed1.nii"
    again, seconds_again = ensure_bench_volume(tmp_path, shape=(16, 24, 32), seed=1)
    assert again == path and seconds_again == 0.0
    _, other = ensure_bench_volume(tmp_path, shape=(16, 24, 32), seed=2)
    assert other > 0


# ----------------------------------------------------------------------------- memory safety


def test_a_child_over_its_memory_limit_is_stopped_and_reported():
    # importing torch alone takes far more than 64 MiB
    with pytest.raises(ChildOutOfMemory, match="over its limit of 0.06 GiB") as info:
        run_in_child("probe_device", memory_limit_bytes=64 * 2**20, device="cpu")
    assert info.value.peak_bytes > info.value.limit_bytes


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return run_in_child("make_volume_card", out_dir=str(out), num_classes=117, base_channels=2, depth=2,
                        tile_size=32, halo=4, seed=0)["card_path"]


@pytest.mark.slow  # two children importing torch and MONAI: about a minute on a busy 2-core machine
def test_monai_over_its_budget_fails_to_allocate_and_says_oom(tmp_path, tiny_card):
    scene, _ = ensure_bench_volume(tmp_path, shape=(48, 48, 48), seed=0)
    # 117 classes x 48^3 float32 = 52 MB of output: refused under a 24 MiB address-space budget
    got = run_in_child("run_monai_volume_peer", card_path=tiny_card, scene_path=str(scene), tile_size=32,
                       overlap=0.25, batch_size=1, device="cpu", precision="fp32", threads=1, zarr_path=None,
                       memory_budget_bytes=24 * 2**20)
    assert got["oom"] is True and "allocate" in got["error"].lower(), got
    # with room, the same run finishes
    ok = run_in_child("run_monai_volume_peer", card_path=tiny_card, scene_path=str(scene), tile_size=32,
                      overlap=0.25, batch_size=1, device="cpu", precision="fp32", threads=1, zarr_path=None,
                      memory_budget_bytes=2 * 2**30)
    assert ok["oom"] is False and ok["voxels_s"] > 0 and ok["agreement"] is None


# ----------------------------------------------------------------------------- tables


def _row(size: str, voxels: int, classes: int, *, tessera_mib: float | None, monai_mib: float | None) -> dict:
    def status(mib):
        return "ok" if mib is not None else "oom"

    return {
        "size": size, "voxels": voxels, "classes": classes, "redundancy_tessera": 3.375, "redundancy_monai": 1.95,
        "tessera_status": status(tessera_mib), "tessera_peak_mib": tessera_mib, "tessera_wall_s": 10.0,
        "tessera_voxels_s": voxels / 10.0, "tessera_error": None if tessera_mib else "over budget",
        "monai_status": status(monai_mib), "monai_peak_mib": monai_mib, "monai_s": 5.0,
        "monai_voxels_s": voxels / 5.0, "monai_error": None if monai_mib else "OOM (needs ~125.0 GiB, budget 17 GiB)",
        "monai_eq_status": status(monai_mib),
    }


def test_memory_scaling_and_the_tables_say_oom_where_a_side_did_not_fit():
    rows = [
        _row("256^3", 256**3, 8, tessera_mib=1000.0, monai_mib=2000.0),
        _row("256^3", 256**3, 117, tessera_mib=1100.0, monai_mib=9000.0),
        _row("512x512x1024", 512 * 512 * 1024, 117, tessera_mib=1200.0, monai_mib=None),
    ]
    memory_scaling(rows)
    assert [r["tessera_memory_vs_smallest"] for r in rows] == pytest.approx([1.0, 1.1, 1.2])
    assert rows[1]["monai_memory_vs_smallest"] == 4.5 and rows[2]["monai_memory_vs_smallest"] is None
    result = {"resolved": {"device": "cpu", "batch_size": 1},
              "config": {"base_channels": 8, "depth": 2, "tile_size": 64, "tile_overlap": 0.25, "chunk_size": 128,
                         "halo": 8},
              "rows": rows}
    from rich.console import Console

    console = Console(record=True, width=400)
    tables = render_volume_tables(result)
    assert len(tables) == 2
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert "OOM" in text and "needs ~125.0 GiB" in text and "512x512x1024" in text


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # 3 to 7 minutes on a busy 2-core machine: children importing torch, a local Ray, two jobs
@pytest.mark.parametrize(
    ("tiling", "n_chunks", "redundancy", "min_agreement"),
    [
        # one 48^3 chunk, no halo, one 48^3 tile: both sides run the model once on the whole volume;
        # measured 0.9997 (33 of 110592 voxels at near-ties: folded BatchNorm, channels-last, summation order)
        pytest.param({"chunk_size": 48, "halo": 0, "tile_size": 48}, 1, 1.0, 0.999, id="one-tile"),
        # 2^3 chunks of 32 with an 8-voxel halo, 2^3 tiles of 32 per 48^3 window: 8 model voxels per
        # output voxel. The tiles lie elsewhere than MONAI's and see reflected context at the volume's
        # faces where MONAI's see none; the random model's labels follow that context: measured 0.785
        pytest.param({"chunk_size": 32, "halo": 8, "tile_size": 32}, 8, 8.0, 0.7, id="chunks"),
    ],
)
def test_volume_bench_small_run_of_both_sides(tmp_path, tiling, n_chunks, redundancy, min_agreement):
    from pipelines.tools.bench.volume import run_volume_bench

    config = VolumeBenchConfig(
        volumes=((48, 48, 48),), classes=(3,), base_channels=4, depth=2, batch_size=2, actors=1, torch_threads=1,
        memory_budget_gib=8.0, out_dir=tmp_path / "bench", monai_equal_redundancy=n_chunks > 1, **tiling,
    )
    result = run_volume_bench(config)

    path = Path(result["json_path"])
    assert path.is_file() and path.name.startswith("bench-volume-")
    assert (tmp_path / "bench" / "bench-volume-latest.json").is_file()
    (row,) = json.loads(path.read_text())["rows"]
    assert row["size"] == "48^3" and row["voxels"] == 48**3 and row["classes"] == 3
    assert row["tessera_status"] == "ok" and row["monai_status"] == "ok"
    assert row["n_chunks"] == n_chunks and row["tessera_voxels_s"] > 0 and row["monai_voxels_s"] > 0
    assert row["tessera_wall_s"] > 0 and row["tessera_peak_mib"] > 0 and row["monai_peak_mib"] > 0
    # every process of the job (driver, workers, Ray's daemons) against the peer's own RSS
    assert row["tessera_peak_mib"] > row["tessera_job_pss_peak_mib"] > 0
    assert row["memory_tessera_vs_monai"] == pytest.approx(row["tessera_peak_mib"] / row["monai_peak_mib"])
    assert row["redundancy_tessera"] == pytest.approx(redundancy)
    assert math.isclose(sum(row["breakdown"].values()), 1.0)
    assert row["monai_agreement"] >= min_agreement
    if n_chunks > 1:  # the peer again at tessera's redundancy
        assert row["monai_eq_status"] == "ok" and row["monai_eq_redundancy"] == pytest.approx(redundancy)
        assert row["monai_eq_agreement"] >= min_agreement
    else:
        assert row["redundancy_monai"] == 1.0 and row["monai_eq_status"] == "skipped"
    assert len(render_volume_tables(result)) == 2
