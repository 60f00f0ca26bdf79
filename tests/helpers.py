"""Test helpers: small georeferenced scenes and oracle checkpoints made on the fly."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from schemas.job import JobSpec
from workers.checkpoints import save_checkpoint
from workers.models.oracles import RampOracle, ThresholdOracle

UTM33N = "EPSG:32633"


def write_geotiff(path: Path, data: np.ndarray, *, nodata: float | None = 0, crs: str = UTM33N,
                  transform=None, tiled: bool = True) -> Path:
    """Write (C, H, W) data as a GeoTIFF with a real CRS (UTM 33N, 10 m pixels by default)."""
    count, height, width = data.shape
    transform = transform or from_origin(500000.0, 5000000.0, 10.0, 10.0)
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                   crs=crs, transform=transform, nodata=nodata)
    if tiled and height >= 16 and width >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(width, 256) // 16),
                       blockysize=16 * max(1, min(height, 256) // 16))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def smooth_scene(shape: tuple[int, int], *, bands: int = 4, seed: int = 0, nodata_border: int = 0) -> np.ndarray:
    """(bands, H, W) uint16 smooth random field in 1..20000; 0 (nodata) in a border if asked."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(bands, *shape))
    field = np.stack([gaussian_filter(b, sigma=4) for b in noise])
    field = (field - field.min()) / (field.max() - field.min() + 1e-9)
    data = (1 + field * 19999).astype(np.uint16)
    if nodata_border:
        b = nodata_border
        data[:, :b, :] = 0
        data[:, :, -b:] = 0
    return data


def oracle_checkpoint(out_dir: Path, *, bands: int = 4, num_classes: int = 4, radius: int = 0,
                      mean: float = 10000.0, std: float = 3000.0, tile_size: int = 64, halo: int = 8,
                      name: str = "oracle") -> Path:
    """A ThresholdOracle saved with a valid card; returns the card path."""
    return _save_oracle(ThresholdOracle(bands, num_classes, radius=radius), "oracle_threshold", {"radius": radius},
                        bands=bands, num_classes=num_classes, mean=mean, std=std, tile_size=tile_size, halo=halo,
                        out_dir=out_dir, name=name)


def ramp_oracle_checkpoint(out_dir: Path, *, bands: int = 4, num_classes: int = 3, slope: float = 8.0,
                           gain: float = 1.0, mean: float = 10000.0, std: float = 3000.0, tile_size: int = 32,
                           halo: int = 8, name: str = "ramp-oracle") -> Path:
    """A RampOracle (position-dependent scores, see workers.models.oracles) saved with a valid
    card; returns the card path."""
    return _save_oracle(RampOracle(bands, num_classes, slope=slope, gain=gain), "oracle_ramp",
                        {"slope": slope, "gain": gain}, bands=bands, num_classes=num_classes, mean=mean, std=std,
                        tile_size=tile_size, halo=halo, out_dir=out_dir, name=name)


def _save_oracle(model, architecture: str, arch_args: dict, *, bands: int, num_classes: int, mean: float,
                 std: float, tile_size: int, halo: int, out_dir: Path, name: str) -> Path:
    fields = {
        "architecture": architecture,
        "arch_args": arch_args,
        "in_channels": bands,
        "classes": [{"id": i, "name": f"class{i}"} for i in range(num_classes)],
        "bands": [{"name": f"b{i + 1}", "mean": mean, "std": std} for i in range(bands)],
        "tile_size": tile_size,
        "halo": halo,
        "stride": 1,
    }
    return save_checkpoint(model, fields, out_dir, name=name)


def job_spec(inputs, root, card, **tiling) -> JobSpec:
    """A job spec for small test scenes: 64 px chunks, halo 8, 32 px tiles, one actor."""
    return JobSpec.model_validate({
        "inputs": [str(p) for p in inputs],
        "model": {"card": str(card)},
        "tiling": {"chunk_size": 64, "halo": 8, "tile_size": 32, "tile_overlap": 0.25} | tiling,
        "resources": {"actors": 1, "batch_size": 3, "torch_threads": 1},
        "output": {"root": str(root)},
    })


def read_classes(root: Path, scene: str) -> np.ndarray:
    """The classes array a job wrote for a scene (2D `classes`, 3D `labels/classes/0`)."""
    from pipelines.writers.zarr_masks import open_classes

    return open_classes(root / f"{scene}.zarr")[:]


class CrashOnceOracle(ThresholdOracle):
    """A ThresholdOracle whose first forward pass kills its process (as an OOM kill or a lost
    node would): it creates `marker` and exits; once the marker exists it predicts normally.

    With `times` n it dies on its first n passes, creating `marker`, `marker.1`, ... `marker.<n-1>`
    (one file per death); with `crash_above` only on passes whose first input channel exceeds it
    (a sentinel pixel in one chunk)."""

    def __init__(self, in_channels: int, num_classes: int, *, marker: str, times: int = 1,
                 crash_above: float | None = None):
        super().__init__(in_channels, num_classes)
        self.marker, self.times, self.crash_above = marker, times, crash_above

    def forward(self, x):
        import os

        if self.crash_above is None or float(x[:, 0].max()) > self.crash_above:
            deaths = crash_count(self.marker)
            if deaths < self.times:
                Path(self.marker if deaths == 0 else f"{self.marker}.{deaths}").touch()
                os._exit(1)
        return super().forward(x)


def crash_count(marker: Path | str) -> int:
    """How many times a CrashOnceOracle with this marker killed its process."""
    n = 0
    while Path(str(marker) if n == 0 else f"{marker}.{n}").exists():
        n += 1
    return n


def crash_once_oracle(*, in_channels: int, num_classes: int, marker: str, times: int = 1,
                      crash_above: float | None = None) -> CrashOnceOracle:
    """Plugin factory of CrashOnceOracle (architecture "tests.helpers:crash_once_oracle")."""
    return CrashOnceOracle(in_channels, num_classes, marker=marker, times=times, crash_above=crash_above)


def crash_once_checkpoint(out_dir: Path, marker: Path, *, bands: int = 4, num_classes: int = 4, times: int = 1,
                          crash_above: float | None = None) -> Path:
    """A checkpoint of CrashOnceOracle with the same card as oracle_checkpoint's defaults."""
    args = {"marker": str(marker)} | ({"times": times} if times != 1 else {}) | (
        {"crash_above": crash_above} if crash_above is not None else {})
    return _save_oracle(CrashOnceOracle(bands, num_classes, **args), "tests.helpers:crash_once_oracle", args,
                        bands=bands, num_classes=num_classes, mean=10000.0, std=3000.0, tile_size=64, halo=8,
                        out_dir=out_dir, name="crash-once")


class HangOracle(ThresholdOracle):
    """A ThresholdOracle whose forward pass hangs (sleeps an hour, as a stalled read or a wedged
    driver call would): on its first pass while `marker` does not exist (it creates it), and on
    every pass whose first input channel exceeds `hang_above` (a sentinel pixel in one chunk)."""

    def __init__(self, in_channels: int, num_classes: int, *, marker: str, hang_above: float = 1e30):
        super().__init__(in_channels, num_classes)
        self.marker, self.hang_above = marker, hang_above

    def forward(self, x):
        import os
        import time

        first = not os.path.exists(self.marker)
        if first:
            Path(self.marker).touch()
        if first or float(x[:, 0].max()) > self.hang_above:
            time.sleep(3600)
        return super().forward(x)


def hang_oracle(*, in_channels: int, num_classes: int, marker: str, hang_above: float = 1e30) -> HangOracle:
    """Plugin factory of HangOracle (architecture "tests.helpers:hang_oracle")."""
    return HangOracle(in_channels, num_classes, marker=marker, hang_above=hang_above)


def hang_checkpoint(out_dir: Path, marker: Path, *, hang_above: float = 1e30, bands: int = 4,
                    num_classes: int = 4) -> Path:
    """A checkpoint of HangOracle with the same card as oracle_checkpoint's defaults."""
    return _save_oracle(HangOracle(bands, num_classes, marker=str(marker), hang_above=hang_above), "tests.helpers:hang_oracle", {"marker": str(marker), "hang_above": hang_above}, bands=bands,
                        num_classes=num_classes, mean=10000.0, std=3000.0, tile_size=64, halo=8, out_dir=out_dir,
                        name="hang")


def chunk_markers(root: Path, scene: str) -> dict[str, int]:
    """A scene's chunk markers (`c*.json` in its work folders) by file name, with their mtimes (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (root / "_work" / scene).glob("*/c*.json")}


def settled_chunk_markers(root: Path, scene: str, *, quiet_s: float = 1.0, timeout_s: float = 60.0) -> dict[str, int]:
    """`chunk_markers` once they have not changed for `quiet_s`: after a driver is killed, workers
    it started may finish the chunks they hold before they notice and exit."""
    deadline = time.monotonic() + timeout_s
    seen = chunk_markers(root, scene)
    while True:
        time.sleep(quiet_s)
        now = chunk_markers(root, scene)
        if now == seen:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{root}: chunk markers of {scene!r} still changing after {timeout_s} s")
        seen = now


def store_digest(root: Path) -> dict[str, str]:
    """sha256 of every chunk file of the Zarr stores of an output root (the zarr.json metadata,
    status and provenance, left out; tables are compared apart): what a resumed run must write
    byte for byte."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0].endswith(".zarr") and not rel.endswith("zarr.json"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


CHUNK_TIMINGS = ("read_s", "predict_s", "write_s", "stats_s")  # columns of tables/chunks that vary run to run


def assert_same_tables(root: Path, other: Path, scene: str) -> None:
    """A scene's regions and chunks tables are equal in two output roots (the chunks table's
    timings left out)."""
    import pyarrow.parquet as pq

    for table in ("regions", "chunks"):
        a, b = (pq.read_table(r / "tables" / table / f"{scene}.parquet") for r in (root, other))
        if table == "chunks":
            a, b = a.drop_columns(list(CHUNK_TIMINGS)), b.drop_columns(list(CHUNK_TIMINGS))
        assert a.equals(b), f"tables/{table}/{scene}.parquet differs"


def assert_batched_equals_one_by_one(pred, windows, *, with_probabilities: bool) -> None:
    """`Predictor.predict_cores` of `windows` (pixels, valid, core) equals `predict_core` of each."""
    batched = pred.predict_cores(windows, with_probabilities=with_probabilities)
    assert len(batched) == len(windows)
    for (pixels, valid, core), (labels, probs) in zip(windows, batched, strict=True):
        one_labels, one_probs = pred.predict_core(pixels, valid, core=core, with_probabilities=with_probabilities)
        np.testing.assert_array_equal(labels, one_labels)
        if with_probabilities:
            np.testing.assert_allclose(probs.astype(np.float32), one_probs.astype(np.float32), atol=1e-3)
        else:
            assert probs is None and one_probs is None


def classes_store(path: Path, labels: np.ndarray, *, chunk: int, transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 4649776.0),
                  crs_wkt: str | None = None, class_names=("water", "land", "urban")):
    """A 2D scene store at `path` holding `labels` as its classes, written chunk by chunk;
    returns (path, grid). Default grid: UTM 33N, 10 m pixels."""
    from rasterio.crs import CRS

    from pipelines.writers.zarr_masks import create_scene_store, write_chunk
    from schemas.store import GeoGrid

    grid = GeoGrid(transform=transform, crs_wkt=crs_wkt or CRS.from_epsg(32633).to_wkt())
    create_scene_store(path, shape=labels.shape, chunk_shape=(chunk, chunk), grid=grid, class_names=class_names,
                       provenance={})
    for y in range(0, labels.shape[0], chunk):
        for x in range(0, labels.shape[1], chunk):
            core = (slice(y, min(y + chunk, labels.shape[0])), slice(x, min(x + chunk, labels.shape[1])))
            write_chunk(path, core, labels[core])
    return path, grid
