"""The benchmark's result as files and tables: the JSON written beside the runs, rich tables for the CLI."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.tools.bench.maths import BREAKDOWN_STAGES


def write_results(result: Mapping[str, Any], out_dir: Path, *, prefix: str = "bench") -> Path:
    """Write out_dir/<prefix>-<UTC time>.json and a copy as <prefix>-latest.json; return the former."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{prefix}-{stamp}.json"
    text = json.dumps({**result, "json_path": str(path)}, indent=2, default=str)
    path.write_text(text)
    (out_dir / f"{prefix}-latest.json").write_text(text)
    return path


def _fmt(value: float | None, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value / scale:{spec}}{suffix}"


def render_tables(result: Mapping[str, Any]) -> list[Any]:
    """Rich tables of a result: throughput, memory, the MONAI peer, the peer at equal redundancy
    with the nodata skip apart, and the stage breakdown."""
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left")
        for col in columns:
            t.add_column(col, justify="right")
        return t

    rows = result["sizes"]
    resolved = result["resolved"]
    speed = table(
        f"throughput: {result['model']['name']} on {resolved['device']} "
        f"({result['machine'].get('device_name', '')}), tile {resolved['tile_size']}, halo {resolved['halo']}",
        "size", "wall s", "e2e Mpx/s", "raw Mpx/s", "e2e/raw", "ideal", "effic.", "redund.", "s/Mpx", "x smallest",
        "1st chunk s", "after it Mpx/s",
    )
    memory = table("peak memory, MiB", "size", "driver RSS", "largest worker RSS", "job PSS (driver+workers)",
                   "Ray daemons PSS", "all PSS (job+daemons)", "all RSS (upper bound)", "x smallest (job)", "GPU")
    peer = table("MONAI sliding_window_inference, whole scene in memory",
                 "size", "Mpx/s", "tessera / MONAI", "RSS MiB", "GPU MiB", "memory tessera / MONAI",
                 "memory incl. daemons / MONAI", "agreement")
    fair = table("tessera / MONAI at equal redundancy (model px per output px) and the nodata skip",
                 "size", "redund. tessera", "w/o skip", "redund. MONAI", "per model px", "plan gain",
                 "skip gain", "chunks skipped", "px skipped", "model s saved", "MONAI eq. overlap",
                 "MONAI eq. Mpx/s", "tessera / MONAI eq.", "eq. agreement")
    stages = table("where the job's busy seconds go (stitch runs inside predict)",
                   "size", *BREAKDOWN_STAGES, "predictor busy", "model share of predict", "GPU busy")
    skipped: list[str] = []
    for r in rows:
        size = f"{r['size']}²"
        speed.add_row(
            size, _fmt(r["wall_s"], ".1f"), _fmt(r["e2e_px_s"], ".3f", 1e6), _fmt(r["raw_px_s"], ".3f", 1e6),
            _fmt(r["ratio"], ".3g"), _fmt(r["ideal_ratio"]), _fmt(r["efficiency"], ".3g"), _fmt(r["redundancy"]),
            _fmt(r["time_per_mpx_s"], ".2f"), _fmt(r["time_per_mpx_vs_smallest"], ".2f"),
            _fmt(r.get("start_s"), ".1f"), _fmt(r.get("steady_px_s"), ".3f", 1e6),
        )
        memory.add_row(
            size, _fmt(r["tessera_driver_peak_mib"], ".0f"), _fmt(r["tessera_worker_peak_mib"], ".0f"),
            _fmt(r["tessera_job_pss_peak_mib"], ".0f"), _fmt(r["tessera_system_pss_peak_mib"], ".0f"),
            _fmt(r.get("tessera_all_pss_peak_mib"), ".0f"),
            _fmt(r["tessera_total_peak_mib"], ".0f"), _fmt(r["memory_vs_smallest"], ".2f"),
            _fmt(r["tessera_gpu_peak_mib"], ".0f"),
        )
        if r["monai_skipped"] is None:
            peer.add_row(
                size, _fmt(r["monai_px_s"], ".3f", 1e6), _fmt(r["tessera_vs_monai"], ".2f"),
                _fmt(r["monai_peak_rss_mib"], ".0f"), _fmt(r["monai_gpu_peak_mib"], ".0f"),
                _fmt(r["memory_vs_monai"], ".2f"), _fmt(r.get("memory_all_vs_monai"), ".2f"),
                _fmt(r["monai_agreement"], ".4f"),
            )
        else:
            peer.add_row(size, "skipped", *(["-"] * 6))
            skipped.append(f"{size}: {r['monai_skipped']}")
        fair.add_row(
            size, _fmt(r["redundancy"]), _fmt(r.get("redundancy_without_skip")), _fmt(r.get("monai_redundancy")),
            _fmt(r.get("tessera_vs_monai_per_model_px"), ".2f"), _fmt(r.get("plan_gain_vs_monai"), ".2f"),
            _fmt(r.get("skip_gain"), ".2f"), _fmt(r.get("skipped_chunk_share"), ".1%"),
            _fmt(r.get("skipped_px_share"), ".1%"), _fmt(r.get("skip_model_s_saved"), ".1f"),
            _fmt(r.get("monai_eq_overlap"), ".4f"), _fmt(r.get("monai_eq_px_s"), ".3f", 1e6),
            _fmt(r.get("tessera_vs_monai_eq"), ".2f"), _side(r, "tessera", "tessera_start_s", ".1f"),
            _side(r, "tessera", "tessera_steady_voxels_s", ".3f", 1e6), _fmt(r.get("tessera_steady_vs_monai_eq"), ".2f"),
            _fmt(r.get("monai_eq_agreement"), ".4f"),
        )
        stages.add_row(size, *(_fmt(r["breakdown"][s], ".1%") for s in BREAKDOWN_STAGES),
                       _fmt(r["predictor_busy"], ".1%"), _fmt(r["predict_model_share"], ".1%"),
                       _fmt(r.get("tessera_gpu_busy"), ".1%"))
    if skipped:
        peer.caption = "\n".join(skipped)
        peer.caption_justify = "left"
    fair.caption = ("tessera / MONAI = per model px x plan gain x skip gain; "
                    "MONAI eq.: the peer at the overlap giving tessera's redundancy without the skip")
    fair.caption_justify = "left"
    return [speed, memory, peer, fair, stages]


def _side(row: Mapping[str, Any], side: str, key: str, spec: str, scale: float = 1.0) -> str:
    """A side's figure, or "OOM" / "skipped" where it did not run."""
    status = row.get(f"{side}_status")
    if status == "oom":
        return "OOM"
    if status == "skipped":
        return "skipped"
    return _fmt(row.get(key), spec, scale)


def render_volume_tables(result: Mapping[str, Any]) -> list[Any]:
    """Rich tables of a volume result: one row per (volume, classes), tessera against MONAI, and
    the peer at equal redundancy; OOM and its reason where a side did not fit."""
    from rich.table import Table

    resolved, config = result["resolved"], result["config"]
    main = Table(title=(f"tessera vs MONAI sliding_window_inference: unet3d w{config['base_channels']} "
                        f"d{config['depth']} on {resolved['device']}, roi {config['tile_size']}^3, overlap "
                        f"{config['tile_overlap']}, gaussian, batch {resolved['batch_size']}, tessera chunk "
                        f"{config['chunk_size']} halo {config['halo']}"), title_justify="left")
    for col in ("size", "classes", "Mvox", "tessera s", "tessera Mvox/s", "tessera peak MiB", "x smallest",
                "MONAI s", "MONAI Mvox/s", "MONAI peak MiB", "x smallest", "speed tessera/MONAI",
                "memory tessera/MONAI", "agreement"):
        main.add_column(col, justify="right")
    fair = Table(title="at equal redundancy (model voxels per output voxel)", title_justify="left")
    for col in ("size", "classes", "redund. tessera", "redund. MONAI", "MONAI eq. overlap", "MONAI eq. Mvox/s",
                "tessera / MONAI eq.", "tessera 1st chunk s", "tessera after it Mvox/s", "after it / MONAI eq.",
                "eq. agreement"):
        fair.add_column(col, justify="right")
    notes: list[str] = []
    for r in result["rows"]:
        main.add_row(
            r["size"], str(r["classes"]), _fmt(r["voxels"], ".1f", 1e6),
            _side(r, "tessera", "tessera_wall_s", ".1f"), _side(r, "tessera", "tessera_voxels_s", ".3f", 1e6),
            _side(r, "tessera", "tessera_peak_mib", ".0f"), _side(r, "tessera", "tessera_memory_vs_smallest", ".2f"),
            _side(r, "monai", "monai_s", ".1f"), _side(r, "monai", "monai_voxels_s", ".3f", 1e6),
            _side(r, "monai", "monai_peak_mib", ".0f"), _side(r, "monai", "monai_memory_vs_smallest", ".2f"),
            _fmt(r.get("tessera_vs_monai"), ".2f"), _fmt(r.get("memory_tessera_vs_monai"), ".2f"),
            _fmt(r.get("monai_agreement"), ".4f"),
        )
        fair.add_row(
            r["size"], str(r["classes"]), _fmt(r["redundancy_tessera"]), _fmt(r["redundancy_monai"]),
            _fmt(r.get("monai_eq_overlap"), ".4f"), _side(r, "monai_eq", "monai_eq_voxels_s", ".3f", 1e6),
            _fmt(r.get("tessera_vs_monai_eq"), ".2f"), _side(r, "tessera", "tessera_start_s", ".1f"),
            _side(r, "tessera", "tessera_steady_voxels_s", ".3f", 1e6), _fmt(r.get("tessera_steady_vs_monai_eq"), ".2f"),
            _fmt(r.get("monai_eq_agreement"), ".4f"),
        )
        for side in ("tessera", "monai"):
            if r.get(f"{side}_status") == "oom":
                notes.append(f"{r['size']}, {r['classes']} classes, {side}: {r[f'{side}_error']}")
    if notes:
        main.caption = "\n".join(notes)
        main.caption_justify = "left"
    return [main, fair]
