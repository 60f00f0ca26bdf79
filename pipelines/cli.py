"""The `tessera` command line: arguments -> JobSpec -> run. Nothing else lives here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from schemas.errors import TesseraError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Segment very large imagery on a Ray cluster.")
console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    if not verbose:  # Ray Data announces every dataset execution at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _human_area(m2: float) -> str:
    """An area in m² as km² from 1 km² up, in m² below."""
    return f"{m2 / 1e6:,.2f} km²" if m2 >= 1e6 else f"{m2:,.0f} m²"


def _class_area_text(area: dict, unit: str | None) -> str:
    """One class area of the scenes table for the summary: its ellipsoidal m², else its CRS area
    where the CRS unit is the metre, else its pixel count (a degree² figure would mislead)."""
    if area.get("area_m2") is not None:
        return _human_area(area["area_m2"])
    if unit in ("metre", "meter"):
        return _human_area(area["area_crs2"])
    return f"{area['pixel_count']:,} px"


def _print_result(result, *, extra_rows: list[tuple[str, str]] | None = None) -> None:
    table = Table(title=f"tessera: {len(result.scenes)} scene(s) in {result.wall_s:.1f} s, model {result.model_name}")
    for col in ("scene", "status", "chunks (computed/total)", "regions", "detail"):
        table.add_column(col)
    for s in result.scenes:
        row = s.row or {}
        detail = s.error or ""
        if not detail and row.get("class_areas"):
            unit = row.get("crs_linear_unit")
            detail = ", ".join(f"{c['class_name']} {_class_area_text(c, unit)}" for c in row["class_areas"])
        if s.already_complete:
            detail = "already complete for this fingerprint: nothing recomputed"
        table.add_row(s.name, s.status, f"{s.n_todo}/{s.n_chunks}", str(row.get("n_regions", "")), detail)
    console.print(table)
    for key, value in extra_rows or []:
        console.print(f"[bold]{key}:[/] {value}")
    console.print(f"[bold]outputs:[/] {result.root}  (<scene>.zarr, tables/regions|scenes|chunks)")


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or local).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a job spec: tile, predict, stitch and write every scene it names."""
    from pipelines.run.job import run_job
    from pipelines.spec import load_job_spec

    _setup_logging(verbose)
    try:
        spec = load_job_spec(job_file)
        with _progress_display() as on_progress:
            result = run_job(spec, base_dir=job_file.resolve().parent, ray_address=address, on_progress=on_progress)
    except TesseraError as exc:
        _fail(exc)
    _print_result(result)
    _write_report(result.root)
    if result.failed:
        err_console.print(f"[bold red]{len(result.failed)} of {len(result.scenes)} scene(s) failed[/] "
                          "(reasons above and in tables/scenes)")
        raise typer.Exit(code=1)


def _write_report(root: Path) -> None:
    """Write the job's HTML report (`tessera report`) and print its path; a report that cannot be
    written is a warning, never a failed job."""
    from pipelines.tools.report import write_report

    try:
        console.print(f"[bold]report:[/] {write_report(root)}")
    except (TesseraError, OSError) as exc:
        console.print(f"[yellow]report not written: {exc}[/]")


def _instance_demo(out: Path, *, seed: int, size: int, actors: int | None, address: str | None) -> None:
    from pipelines.tools.instance_demo import CHUNK_SIZE, run_instance_demo

    console.print(f"tessera demo --instances: {size}x{size} synthetic 0.5 m building scene, light Mask R-CNN "
                  f"(trained on first use, cached), {CHUNK_SIZE} px chunks, local Ray ...")
    try:
        report = run_instance_demo(out, seed=seed, size=size, actors=actors or 1, ray_address=address)
    except TesseraError as exc:
        _fail(exc)
    m = report.metrics
    table = Table(title="instances vs the generator's truth (IoU >= 0.5)")
    for name in ("true", "predicted", "matched", "precision", "recall", "mask AP@0.5", "split", "duplicated",
                 "count error / 1000"):
        table.add_column(name)
    table.add_row(str(m.n_true), str(m.n_pred), str(m.tp), f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.ap:.3f}",
                  str(m.split_objects), str(m.duplicated_objects), f"{m.count_error_per_1000:.1f}")
    console.print(table)
    console.print(f"[bold]model:[/] {report.card_path} ({'trained now' if report.trained else 'cached'}, "
                  f"training {report.train_s:.0f} s); job wall time {report.job_wall_s:.1f} s")
    console.print(f"[bold]outputs:[/] {report.root}  (<scene>.zarr: classes + instances, tables/instances: "
                  "GeoParquet polygons)")
    console.print("\n[bold]try:[/]")
    console.print(f'  tessera query --root {report.root} "SELECT count(*) AS buildings, round(avg(area_m2), 1) AS '
                  f'mean_m2, round(max(area_m2), 1) AS max_m2 FROM instances"')
    _write_report(report.root)


def _volume_demo(out: Path, *, seed: int, actors: int | None, torch_threads: int | None,
                 address: str | None) -> None:
    from pipelines.tools.volume_demo import run_volume_demo

    console.print("tessera demo --volume: 48x96x96 synthetic CT phantom (3.0 x 0.8 x 0.8 mm), 3D U-Net, local Ray ...")
    try:
        report = run_volume_demo(out, seed=seed, actors=actors or 1, torch_threads=torch_threads,
                                 ray_address=address)
    except TesseraError as exc:
        _fail(exc)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in report.dice.items())
    volumes = ", ".join(f"{c['class_name']} {c['volume_mm3'] / 1000:.1f} cm³" for c in report.class_volumes)
    root = report.result.root
    _print_result(report.result, extra_rows=[
        ("input", f"{report.image_path} (truth: {report.truth_path.name})"),
        ("model", f"{report.card_path} ({'trained now' if report.trained else 'cached'}, "
                  f"training {report.train_s:.1f} s)"),
        ("Dice vs ground truth", dice),
        ("volume per class", volumes),
        ("regions", f"{report.n_regions} (26-connected, tables/volume_regions)"),
        ("job wall time", f"{report.result.wall_s:.1f} s"),
        ("NIfTI export", str(report.export_path)),
    ])
    console.print("\n[bold]try:[/]")
    console.print(f'  tessera query --root {root} "SELECT class_name, count(*) AS regions, '
                  f'round(sum(volume_mm3)/1000, 2) AS cm3, round(avg(mean_intensity), 1) AS hu '
                  f'FROM volume_regions GROUP BY 1 ORDER BY cm3 DESC"')
    _write_report(root)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output root.")] = Path("tessera-demo"),
    size: Annotated[int, typer.Option(help="Scene side in px.")] = 4096,
    seed: Annotated[int, typer.Option(help="Scene generator seed.")] = 7,
    actors: Annotated[int | None, typer.Option(
        help="Predictor actors (default: the job's: one per CPU on CPU, one per GPU).")] = None,
    torch_threads: Annotated[int | None, typer.Option(
        help="torch threads per actor (default: all cores / actors when --actors is set, else 1).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: local).")] = None,
    volume: Annotated[bool, typer.Option(
        "--volume", help="A synthetic CT phantom and a small 3D U-Net (trained on first use, cached) instead "
        "(default --out tessera-demo-volume).")] = False,
    instances: Annotated[bool, typer.Option(
        "--instances", help="A synthetic building scene and a light Mask R-CNN (trained on first use, cached, "
        "about 10 CPU-minutes) instead; buildings merged across chunk borders, scored against the truth "
        "(default --out tessera-demo-instances, --size 1024).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a synthetic satellite scene (or, with --volume, a CT phantom) and segment it end to end
    on a local Ray."""
    from pipelines.tools.demo import run_demo

    _setup_logging(verbose)
    threads = torch_threads or (max(1, (os.cpu_count() or 1) // actors) if actors else None)
    if instances:
        _instance_demo(out if out != Path("tessera-demo") else Path("tessera-demo-instances"), seed=seed,
                       size=size if size != 4096 else 1024, actors=actors, address=address)
        return
    if volume:
        _volume_demo(out if out != Path("tessera-demo") else Path("tessera-demo-volume"),
                     seed=seed, actors=actors, torch_threads=threads, address=address)
        return
    console.print(f"tessera demo: {size}x{size} synthetic 4-band UTM scene, bundled U-Net, local Ray ...")
    try:
        report = run_demo(out, size=size, seed=seed, actors=actors, torch_threads=threads, ray_address=address)
    except TesseraError as exc:
        _fail(exc)
    mem = report.memory
    ious = ", ".join(f"{k} {v:.3f}" for k, v in report.iou.items())
    _print_result(report.result, extra_rows=[
        ("input", f"{report.scene_path} (truth: {report.truth_path.name}; generated in {report.generate_s:.1f} s)"),
        ("mIoU vs ground truth", f"{report.miou:.4f} ({ious})"),
        ("peak memory", f"driver {mem.driver_rss / 2**20:.0f} MiB, largest worker {mem.max_child_rss / 2**20:.0f} MiB, "
                        f"all processes (shared pages counted per process) {mem.total_rss / 2**20:.0f} MiB"),
    ])
    root = report.result.root
    console.print("\n[bold]try:[/]")
    console.print(f'  tessera query --root {root} "SELECT class_name, count(*) AS regions, '
                  f'round(sum(area_m2)/1e6, 3) AS km2 FROM regions GROUP BY 1 ORDER BY km2 DESC"')
    console.print(f'  tessera query --root {root} "SELECT scene, status, wall_s, predict_s FROM scenes"')
    console.print(f'  tessera query --root {root} --format csv "SELECT region_id, class_name, area_m2, '
                  f'centroid_lon, centroid_lat FROM regions ORDER BY area_m2 DESC LIMIT 5"')
    _write_report(root)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views regions, scenes, chunks.")],
    root: Annotated[str, typer.Option(help="Output root of a job (a folder or s3://bucket/prefix).")] = "tessera-demo",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
) -> None:
    """Query a job's result tables with DuckDB SQL."""
    import duckdb

    from pipelines.query import run_query

    if fmt not in ("table", "csv", "json"):
        _fail(ValueError(f"--format must be table, csv or json, got {fmt!r}"))
    try:
        result = run_query(root, sql)
    except (TesseraError, duckdb.Error) as exc:
        _fail(exc)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    elif fmt == "json":
        for row in result.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        table = Table(show_lines=False)
        for name in result.column_names:
            table.add_column(name)
        for row in result.slice(0, limit).to_pylist():
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)
        if result.num_rows > limit:
            console.print(f"... {result.num_rows - limit} more rows (use --limit or --format csv)")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@app.command()
def report(
    root: Annotated[str, typer.Argument(help="Output root of a job (s3:// roots: not yet).")],
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: ROOT/report.html).")] = None,
) -> None:
    """Write one self-contained HTML page: scenes done/failed with errors, class totals, quicklooks, model, timings."""
    from pipelines.tools.report import write_report

    try:
        console.print(f"[bold]report:[/] {write_report(root, out=out)}")
    except TesseraError as exc:
        _fail(exc)


@app.command()
def export(
    root: Annotated[str, typer.Argument(help="Output root of a job (s3:// roots: not yet).")],
    fmt: Annotated[str, typer.Option(
        "--format", help="cog (2D scenes), geoparquet (2D region polygons) or nifti (volumes).")] = "cog",
    scene: Annotated[list[str] | None, typer.Option("--scene", help="Only this scene; repeatable.")] = None,
) -> None:
    """Export complete scenes for GIS and medical viewers: COG with overviews, region polygons as GeoParquet, or NIfTI
    on the input's affine."""
    from pipelines.writers.exports import export_root

    try:
        done = export_root(root, fmt, scenes=scene)
    except TesseraError as exc:
        _fail(exc)
    for item in done:
        console.print(f"{item.scene}: {item.path}" if item.path else f"{item.scene}: skipped ({item.skipped})")
    if not any(item.path for item in done):
        raise typer.Exit(code=1)


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Folder for the weights + model card.")] = Path("models"),
    preset: Annotated[str, typer.Option(help="Training preset: 'demo' (U-Net on the synthetic generator).")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default: the preset's).")] = None,
) -> None:
    """Train a model preset and write safetensors weights + a model card."""
    from pipelines.tools.train import train_demo_model

    if preset != "demo":
        _fail(ValueError(f"unknown preset {preset!r}; presets: demo"))
    kwargs = {"seed": seed} | ({"steps": steps} if steps else {})
    card = train_demo_model(out, **kwargs)
    console.print(f"wrote {card}")


@app.command()
def bench(
    size: Annotated[list[str] | None, typer.Option(
        "--size", help="Scene side in px; repeat or comma-separate (4096,8192; 16k = 16384).")] = None,
    model: Annotated[str, typer.Option(help="Model card path or builtin:<name>.")] = "builtin:unet-demo",
    chunk_size: Annotated[int, typer.Option(help="Output chunk side in px.")] = 1024,
    halo: Annotated[int | None, typer.Option(help="Halo in px (default: the model card's).")] = None,
    tile_size: Annotated[int | None, typer.Option(help="Model tile side in px (default: the card's).")] = None,
    overlap: Annotated[float, typer.Option(help="Tile overlap fraction in [0, 1).")] = 0.25,
    batch_size: Annotated[int | None, typer.Option(help="Model tiles per forward pass (default: 1 on CPU, 8 on GPU).")] = None,
    actors: Annotated[int | None, typer.Option(
        help="Predictor actors (default: one per CPU core on CPU, one per GPU).")] = None,
    torch_threads: Annotated[int | None, typer.Option(
        help="torch threads per actor (default: all cores / actors).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (autocast on GPU).")] = "auto",
    monai: Annotated[bool, typer.Option("--monai/--no-monai", help="Run the MONAI whole-scene peer.")] = True,
    monai_max_side: Annotated[int, typer.Option(help="Skip the MONAI peer above this scene side.")] = 16384,
    monai_equal_redundancy: Annotated[bool, typer.Option(
        "--monai-equal-redundancy/--no-monai-equal-redundancy",
        help="Also run the peer at the overlap that gives tessera's model px per output px.")] = True,
    malloc_tuning: Annotated[bool, typer.Option(
        "--malloc-tuning/--no-malloc-tuning",
        help="Job, bare model and peer with the malloc tunables of workers.runtime (the job default).")] = True,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last",
        help="Job, bare model and peer run the model on NHWC tensors (the job default).")] = True,
    fold_batchnorm: Annotated[bool, typer.Option(
        "--fold-batchnorm/--no-fold-batchnorm",
        help="Job, bare model and peer with BatchNorm folded into the convolutions (the job default).")] = True,
    seed: Annotated[int, typer.Option(help="Synthetic scene seed.")] = 7,
    out: Annotated[Path, typer.Option(help="Folder for scenes, job outputs and bench-*.json.")] = Path("tessera-bench"),
    instances: Annotated[bool, typer.Option(
        "--instances", help="Instead: tessera's instance merge vs SAHI-style box NMS/NMM on oracle windows.")] = False,
    instance_sizes: Annotated[str, typer.Option(help="Scene sides for --instances, comma-separated.")] = "1024,2048",
    instance_chunk: Annotated[int, typer.Option(help="Chunk side for --instances (not a multiple of 256).")] = 300,
    instance_halo: Annotated[int, typer.Option(help="Halo for --instances (tile overlap: twice it).")] = 32,
    volume: Annotated[bool, typer.Option(
        "--volume", help="Benchmark 3D volumes against MONAI sliding_window_inference instead (a unet3d with "
        "random seeded weights; --size, --model, --chunk-size and the bare-model options do not apply).")] = False,
    volume_sizes: Annotated[list[str] | None, typer.Option(
        "--volume-sizes", help="With --volume: volumes, N for N^3 or XxYxZ with slices last; repeat or "
        "comma-separate (256,512,512x512x1024).")] = None,
    classes: Annotated[list[str] | None, typer.Option(
        "--classes", help="With --volume: the model's class counts; repeat or comma-separate (8,117).")] = None,
    volume_chunk_size: Annotated[int, typer.Option(help="With --volume: tessera's chunk side in voxels.")] = 128,
    model_width: Annotated[int, typer.Option(help="With --volume: the unet3d's base_channels.")] = 8,
    model_depth: Annotated[int, typer.Option(help="With --volume: the unet3d's depth (stride 2**depth).")] = 2,
    memory_budget_gib: Annotated[float | None, typer.Option(
        help="With --volume: memory either side may hold, GiB (default 80% of what is available); over it, "
        "the side is stopped and reported OOM.")] = None,
    remote_latency: Annotated[str | None, typer.Option(
        "--remote-latency", help="Instead: the job on the scene (first --size) from local disk vs over loopback "
        "HTTP with this added latency per request, ms, comma-separated (20,50); writes bench-remote-*.json.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Benchmark the bare model vs the whole job vs MONAI on synthetic scenes; write a JSON report.

    With --volume: tessera vs MONAI sliding_window_inference on synthetic CT-like volumes, per
    volume size and class count (wall time, voxels/s, peak memory of all processes, OOM where a
    side does not fit); writes bench-volume-*.json.
    """
    if instances:
        from pipelines.tools.bench.config import parse_sizes
        from pipelines.tools.bench.instances import markdown_table, run_instance_bench

        try:
            result = run_instance_bench(parse_sizes([instance_sizes]), chunk=instance_chunk,
                                        halo=instance_halo, seed=seed, out_dir=out,
                                        on_progress=lambda line: console.print(line))
        except ValueError as exc:
            _fail(exc)
        console.print(markdown_table(result))
        console.print(f"[bold]results:[/] {result['json_path']}")
        return
    from pipelines.tools.bench.config import BenchConfig, parse_sizes
    from pipelines.tools.bench.report import render_tables
    from pipelines.tools.bench.run import run_bench

    _setup_logging(verbose)
    if volume:
        from pipelines.tools.bench.config import VolumeBenchConfig, parse_classes, parse_volume_sizes
        from pipelines.tools.bench.report import render_volume_tables
        from pipelines.tools.bench.volume import run_volume_bench

        try:
            vconfig = VolumeBenchConfig(
                volumes=parse_volume_sizes(volume_sizes or ["256"]), classes=parse_classes(classes or ["8"]),
                base_channels=model_width, depth=model_depth, chunk_size=volume_chunk_size,
                halo=8 if halo is None else halo, tile_size=tile_size or 64, tile_overlap=overlap,
                batch_size=batch_size, actors=actors, torch_threads=torch_threads, device=device,
                precision=precision, monai=monai, monai_equal_redundancy=monai_equal_redundancy,
                memory_budget_gib=memory_budget_gib, seed=seed, out_dir=out, malloc_tuning=malloc_tuning,
                channels_last=channels_last, fold_batchnorm=fold_batchnorm,
            )
            result = run_volume_bench(vconfig, on_progress=lambda line: console.print(f"[dim]{line}[/]"))
        except (TesseraError, ValueError) as exc:
            _fail(exc)
        for table in render_volume_tables(result):
            console.print(table)
        console.print(f"[bold]results:[/] {result['json_path']} (and bench-volume-latest.json beside it)")
        return
    try:
        config = BenchConfig(
            sizes=parse_sizes(size or ["4096"]), model=model, chunk_size=chunk_size, halo=halo,
            tile_size=tile_size, tile_overlap=overlap, batch_size=batch_size, actors=actors,
            torch_threads=torch_threads, device=device, precision=precision, monai=monai,
            monai_max_side=monai_max_side, monai_equal_redundancy=monai_equal_redundancy, seed=seed, out_dir=out, malloc_tuning=malloc_tuning,
            channels_last=channels_last, fold_batchnorm=fold_batchnorm,
        )
        if remote_latency is not None:
            from pipelines.tools.bench.remote import format_rows, run_remote_bench

            latencies = [float(v) for v in remote_latency.split(",") if v.strip()]
            result = run_remote_bench(config, latencies_ms=latencies,
                                      on_progress=lambda line: console.print(f"[dim]{line}[/]"))
            for line in format_rows(result):
                console.print(line)
            console.print(f"[bold]results:[/] {result['json_path']} (and bench-remote-latest.json beside it)")
            return
        result = run_bench(config, on_progress=lambda line: console.print(f"[dim]{line}[/]"))
    except (TesseraError, ValueError) as exc:
        _fail(exc)
    for table in render_tables(result):
        console.print(table)
    console.print(f"[bold]results:[/] {result['json_path']} (and bench-latest.json beside it)")


@app.command()
def seams(
    out: Annotated[Path, typer.Option(help="Folder for cached checkpoints, label maps and seams.json.")] = Path(
        "out/seams"),
    scene_size: Annotated[int, typer.Option(help="Side of the measured synthetic scene in px.")] = 1024,
    chunk_size: Annotated[int, typer.Option(help="Chunk (core) side of the tiled path in px.")] = 256,
    halo: Annotated[int, typer.Option(help="Halo of the tiled path, px per side.")] = 32,
    tile_size: Annotated[int | None, typer.Option(
        help="Model tile side of the tiled path (default: the card's).")] = None,
    steps: Annotated[int, typer.Option(help="Most optimiser steps per trained architecture.")] = 3000,
    train_budget: Annotated[float, typer.Option(help="Training seconds aimed at per architecture.")] = 110.0,
    time_budget: Annotated[float | None, typer.Option(
        help="Skip the remaining architectures after this many seconds (default: no limit).")] = None,
    arch: Annotated[list[str] | None, typer.Option(
        "--arch", help="Architecture to measure, repeatable: 'name' or 'name,key=value,...' "
        "(registry name, plugin, builtin:<name> or card path). Default: the standard set.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure the seam effect: tiled vs whole-scene agreement and mIoU per architecture."""
    from pipelines.tools.seams import DEFAULT_ARCHITECTURES, measure_seams, parse_arch, render_table, write_report

    _setup_logging(verbose)
    try:
        architectures = [parse_arch(a) for a in arch] if arch else list(DEFAULT_ARCHITECTURES)
        rows = measure_seams(architectures, out_dir=out, scene_size=scene_size, chunk_size=chunk_size, halo=halo,
                             tile_size=tile_size, steps=steps, train_budget_s=train_budget,
                             time_budget_s=time_budget, on_progress=lambda line: console.print(f"[dim]{line}[/]"))
    except (TesseraError, ValueError) as exc:
        _fail(exc)
    settings = {"scene_size": scene_size, "chunk_size": chunk_size, "halo": halo, "tile_size": tile_size,
                "steps": steps, "train_budget_s": train_budget, "time_budget_s": time_budget}
    path = write_report(rows, out, settings=settings)
    console.print(render_table(rows, title=f"seams: {scene_size}² scene, chunk {chunk_size}, halo {halo}, "
                                           f"tile {tile_size or 'card'}; agreement = tiled == whole"))
    console.print(f"[bold]results:[/] {path}")


@contextlib.contextmanager
def _progress_display():
    """A `run_job` progress callback: a live bar on a terminal; otherwise (a pipe, a submitted
    job's log) a `tessera progress: ...` line every 10 s and as scenes finish, which
    `tessera status JOB_ID` reads back."""
    from pipelines.run.progress import ProgressLines, format_duration

    if not err_console.is_terminal:
        yield ProgressLines(lambda line: err_console.print(line, soft_wrap=True, markup=False, highlight=False))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("chunks"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err_console) as bar:
        task = bar.add_task("chunks", total=None, info="")

        def update(p) -> None:
            bar.update(task, completed=p.chunks_done, total=p.chunks_total or None,
                       info=f"scenes {p.scenes_complete} complete, {p.scenes_failed} failed, {p.scenes_running} "
                            f"running of {p.scenes_total}, {p.mpx_per_s:.2f} Mpx/s, ETA {format_duration(p.eta_s)}")

        yield update


def _jobs_client(address: str | None):
    """A Ray Jobs client for `address`, with the token found as Ray finds it (never shown)."""
    from pipelines.run.submit import connect, find_auth_token

    return connect(address, find_auth_token(os.environ, Path.home()))


_ADDRESS_HELP = "Ray dashboard address, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)."


@app.command()
def submit(
    job_file: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
    python: Annotated[str, typer.Option(help="Python command on the cluster (with tessera's dependencies).")] = "python",
    upload_models: Annotated[bool, typer.Option(
        "--upload-models/--no-upload-models",
        help="Upload the model cards and weights the spec names (default), or pass their paths as they are "
        "(a shared path the cluster's nodes read).")] = True,
    submission_id: Annotated[str | None, typer.Option(help="Job id to use (default: Ray's).")] = None,
) -> None:
    """Submit a job spec to a Ray cluster (Ray Jobs); prints the job id."""
    import tempfile

    from pipelines.run.submit import package_limit_bytes, stage_job_package, submit_package

    try:
        with tempfile.TemporaryDirectory(prefix="tessera-submit-") as tmp:
            package = stage_job_package(job_file, Path(tmp), upload_models=upload_models,
                                        limit_bytes=package_limit_bytes(os.environ))
            jobs = _jobs_client(address)
            job_id = submit_package(jobs, package, python=python, submission_id=submission_id)
    except TesseraError as exc:
        _fail(exc)
    sys.stdout.write(job_id + "\n")
    hint = f" --address {address}" if address else ""
    err_console.print(f"submitted {package.job_name!r} to {jobs.address} ({package.size_bytes / 2**20:.1f} MiB "
                      f"uploaded with tessera's code); outputs go to {package.output_root}")
    err_console.print(f"  tessera status {job_id}{hint}\n  tessera logs {job_id}{hint} --follow\n"
                      f"  tessera stop {job_id}{hint}", markup=False, highlight=False)


def _print_root_status(root: Path) -> None:
    from pipelines.run.status import read_root_status

    scenes = read_root_status(root)
    table = Table(title=f"{root}: {len(scenes)} scene(s)")
    for col in ("scene", "status", "chunks done/total", "error"):
        table.add_column(col)
    for s in scenes:
        table.add_row(s.name, s.status, f"{s.chunks_done}/{s.chunks_total if s.chunks_total is not None else '?'}",
                      s.error)
    console.print(table)
    counts = {k: sum(s.status == k for s in scenes) for k in ("complete", "failed", "partial")}
    done = sum(s.chunks_done for s in scenes)
    total = sum(s.chunks_total or 0 for s in scenes)
    console.print(f"scenes: {counts['complete']} complete, {counts['failed']} failed, {counts['partial']} partial "
                  f"(running or interrupted); chunks {done}/{total}", markup=False, highlight=False)


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A submitted job's id (Ray Jobs).")] = None,
    root: Annotated[Path | None, typer.Option(help="An output root to read instead (or as well).")] = None,
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
) -> None:
    """Show a submitted job's state and progress, and its scenes: complete, failed, partial, chunks."""
    if job_id is None and root is None:
        _fail(ValueError("name a job id (tessera status JOB_ID) or an output root (tessera status --root OUT)"))
    try:
        if job_id is not None:
            from pipelines.run.submit import job_status

            info = job_status(_jobs_client(address), job_id)
            console.print(f"job {info.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""),
                          markup=False, highlight=False)
            if info.progress:
                p = info.progress
                console.print(f"chunks {p['chunks_done']}/{p['chunks_total']}, scenes {p['scenes_complete']} complete, "
                              f"{p['scenes_failed']} failed, {p['scenes_running']} running of {p['scenes_total']}, "
                              f"{p['mpx_per_s']:.2f} Mpx/s, ETA {p['eta']} (last progress line of its log)",
                              markup=False, highlight=False)
            if info.output_root:
                console.print(f"outputs: {info.output_root}", markup=False, highlight=False)
                if root is None and Path(info.output_root).is_dir():
                    root = Path(info.output_root)
        if root is not None:
            _print_root_status(root)
    except TesseraError as exc:
        _fail(exc)


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="A submitted job's id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the log until the job ends.")] = False,
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
) -> None:
    """Print a submitted job's log (its `tessera run` output)."""
    from pipelines.run.submit import follow_job_logs, job_logs

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        jobs = _jobs_client(address)
        if follow:
            follow_job_logs(jobs, job_id, emit)
        else:
            emit(job_logs(jobs, job_id))
    except TesseraError as exc:
        _fail(exc)


@app.command()
def stop(
    job_id: Annotated[str, typer.Argument(help="A submitted job's id.")],
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
) -> None:
    """Stop a submitted job (its outputs so far stay; re-submitting the spec resumes it)."""
    from pipelines.run.submit import stop_job

    try:
        stopped = stop_job(_jobs_client(address), job_id)
    except TesseraError as exc:
        _fail(exc)
    console.print(f"{job_id}: stop requested" if stopped else f"{job_id}: was not running", markup=False,
                  highlight=False)


if __name__ == "__main__":
    app()
