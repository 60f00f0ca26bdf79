"""`tessera report OUT`: one self-contained HTML page about a job's outputs.

What a person sees after an overnight run, before reading any table: the job summary (scenes
complete / failed with their errors, wall time, Mpx/s), per scene the class areas (or volumes)
as a table and a bar chart, the region and instance counts, the scene's quicklook where one was
rendered (``<root>/quicklooks/<scene>.png``), the model card, and where the time went per chunk.

Self-contained: images are embedded as base64 data URIs and charts are inline SVG, with no
script, stylesheet or font fetched at view time (the page opens offline, from a mail
attachment, or on an air-gapped viewer). Everything printed comes from the root's tables and
files, escaped (scene names and errors are untrusted text).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.writers.atomic import atomic_write_text
from pipelines.writers.cog_export import parse_hex_colors
from pipelines.writers.outroot import Location, exists, read_bytes, read_text
from schemas.errors import OutputError

REPORT_FILE = "report.html"
QUICKLOOKS_DIR = "quicklooks"
_MAX_CHUNK_BARS = 400  # per scene: above this, chunks are summed into as many bins

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.failed{color:#b00020}.complete{color:#1b5e20}.num{text-align:right}
img.quicklook{max-width:100%;border:1px solid #ccc}pre{background:#f7f7f7;padding:8px;overflow:auto}
.kv td:first-child{font-weight:600}
"""


def write_report(root: str | Path, *, out: str | Path | None = None) -> Location:
    """Render `<root>/report.html` (or `out`) from the root's tables and quicklooks; the root may
    be local or ``s3://`` (the page is PUT as one object there).

    Raises:
        OutputError: `root` is not a tessera output root.
    """
    from pipelines.query import connect
    from pipelines.writers.outroot import as_location, upload_from

    root = as_location(root)
    con = connect(root)
    try:
        scenes = con.sql("SELECT * FROM scenes ORDER BY scene").to_arrow_table().to_pylist()
        chunks = con.sql("SELECT scene, read_s, predict_s, write_s, stats_s, status FROM chunks "
                         "ORDER BY scene, chunk_index").to_arrow_table().to_pylist()
    finally:
        con.close()
    resolved = _read_json(root / "job.resolved.json")
    page = render_report(root, scenes, chunks, resolved)
    if out is not None:
        atomic_write_text(Path(out), page)
        return Path(out)
    with upload_from(root / REPORT_FILE) as tmp:  # local: atomic rename; S3: one PUT
        tmp.write_text(page)
    return root / REPORT_FILE


def render_report(root: Location, scenes: Sequence[dict[str, Any]], chunks: Sequence[dict[str, Any]],
                  resolved: dict[str, Any] | None) -> str:
    """The report's HTML (see the module docstring); pure apart from reading the quicklook PNGs."""
    e = html.escape
    done = [s for s in scenes if s["status"] == "complete"]
    failed = [s for s in scenes if s["status"] == "failed"]
    pixels = sum(_prod(s.get("shape") or []) for s in done)
    starts = [s["started_at"] for s in scenes if s.get("started_at")]
    ends = [s["finished_at"] for s in scenes if s.get("finished_at")]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>tessera report: {e(root.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>tessera report: {e(str(root))}</h1>",
             "<table class=kv>",
             _kv("scenes", f"{len(scenes)}: <span class=complete>{len(done)} complete</span>, "
                           f"<span class=failed>{len(failed)} failed</span>", raw=True),
             _kv("wall time", f"{wall:.1f} s (first scene start to last scene end)"),
             _kv("throughput", f"{pixels / wall / 1e6:.2f} Mpx/s over complete scenes" if wall > 0 else "n/a"),
             _kv("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
             "</table>"]
    parts.append("<h2>Scenes</h2><table><tr><th>scene</th><th>status</th><th>shape</th><th>chunks</th>"
                 "<th>regions</th><th>wall s</th><th>error</th></tr>")
    for s in scenes:
        parts.append(
            f"<tr><td><a href='#scene-{e(s['scene'])}'>{e(s['scene'])}</a></td>"
            f"<td class={e(s['status'])}>{e(s['status'])}</td>"
            f"<td>{e(' x '.join(str(n) for n in s.get('shape') or []))}</td>"
            f"<td class=num>{_text(s.get('n_chunks'))}</td><td class=num>{_text(s.get('n_regions'))}</td>"
            f"<td class=num>{_text(s.get('wall_s'), '.1f')}</td><td class=failed>{e(s.get('error') or '')}</td></tr>")
    parts.append("</table>")
    colors = _class_colors(resolved)
    by_scene: dict[str, list[dict[str, Any]]] = {}
    for c in chunks:
        by_scene.setdefault(c["scene"], []).append(c)
    for s in scenes:
        parts.append(_scene_section(root, s, by_scene.get(s["scene"], []), colors))
    parts.append("<h2>Model</h2>")
    if resolved:
        parts.append(f"<pre>{e(json.dumps(resolved.get('model', {}), indent=2, sort_keys=True))}</pre>")
        parts.append("<details><summary>resolved job spec</summary>"
                     f"<pre>{e(json.dumps(resolved, indent=2, sort_keys=True))}</pre></details>")
    else:
        parts.append("<p>no job.resolved.json in this root</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _scene_section(root: Location, s: dict[str, Any], chunks: list[dict[str, Any]],
                   colors: list[tuple[int, int, int]] | None) -> str:
    e = html.escape
    name = s["scene"]
    out = [f"<h2 id='scene-{e(name)}'>{e(name)} <span class={e(s['status'])}>({e(s['status'])})</span></h2>",
           f"<p>source: {e(str(s.get('source') or ''))}</p>"]
    if s.get("error"):
        out.append(f"<p class=failed>{e(s['error'])}</p>")
    quicklook = root / QUICKLOOKS_DIR / f"{name}.png"
    if exists(quicklook):
        data = base64.b64encode(read_bytes(quicklook)).decode("ascii")
        out.append(f"<img class=quicklook alt='quicklook of {e(name)}' src='data:image/png;base64,{data}'>")
    rows = s.get("class_areas") or s.get("class_volumes") or []
    if rows:
        volume = bool(s.get("class_volumes"))
        unit, key = ("cm³", "volume_mm3") if volume else ("km²", "area_m2")
        scale = 1e-3 if volume else 1e-6
        values = [(r["class_name"], (r.get(key) if r.get(key) is not None else
                                     r.get("area_crs2", 0.0)) * scale, r.get("voxel_count", r.get("pixel_count")))
                  for r in rows]
        out.append(f"<table><tr><th>class</th><th>{unit}</th><th>{'voxels' if volume else 'pixels'}</th></tr>")
        out += [f"<tr><td>{e(n)}</td><td class=num>{v:.4g}</td><td class=num>{c}</td></tr>" for n, v, c in values]
        out.append("</table>")
        out.append(_bar_chart([(n, v) for n, v, _ in values], unit, colors))
    if chunks:
        out.append(_chunk_chart(chunks))
    return "\n".join(out)


def _bar_chart(values: list[tuple[str, float]], unit: str, colors: list[tuple[int, int, int]] | None) -> str:
    """Horizontal bars, one per class, as inline SVG."""
    e = html.escape
    top = max((v for _, v in values), default=0.0) or 1.0
    palette = colors or parse_hex_colors(None, len(values))
    height = 22 * len(values) + 10
    bars = []
    for i, (name, v) in enumerate(values):
        r, g, b = palette[i % len(palette)]
        w = 500 * v / top
        bars.append(f"<text x=0 y={22 * i + 16} font-size=12>{e(name)}</text>"
                    f"<rect x=140 y={22 * i + 4} width={w:.1f} height=16 fill='rgb({r},{g},{b})'/>"
                    f"<text x={145 + w:.1f} y={22 * i + 16} font-size=12>{v:.4g} {unit}</text>")
    return f"<svg role=img aria-label='class totals' width=760 height={height}>{''.join(bars)}</svg>"


def _chunk_chart(chunks: list[dict[str, Any]]) -> str:
    """Seconds per chunk by stage (read, predict, write, statistics), stacked, in the plan's order;
    above _MAX_CHUNK_BARS chunks, consecutive chunks are summed into bins."""
    stages = (("read_s", "#4e79a7"), ("predict_s", "#f28e2b"), ("write_s", "#59a14f"), ("stats_s", "#b07aa1"))
    per = max(1, -(-len(chunks) // _MAX_CHUNK_BARS))
    bins = [chunks[i:i + per] for i in range(0, len(chunks), per)]
    totals = [[sum(c[k] for c in b) for k, _ in stages] for b in bins]
    top = max((sum(t) for t in totals), default=0.0) or 1.0
    width = max(2.0, 700 / len(bins))
    rects = []
    for i, t in enumerate(totals):
        y = 160.0
        for (_, color), v in zip(stages, t):
            h = 150 * v / top
            y -= h
            rects.append(f"<rect x={i * width:.1f} y={y:.1f} width={width:.1f} height={h:.1f} fill='{color}'/>")
    legend = " ".join(f"<span style='color:{c}'>&#9632;</span> {k[:-2]}" for k, c in stages)
    total = sum(sum(t) for t in totals)
    return (f"<p>Where the time went, per chunk in plan order ({len(chunks)} chunks"
            f"{f', {per} per bar' if per > 1 else ''}; tallest bar {top:.2f} s; {total:.1f} s summed): {legend}</p>"
            f"<svg role=img aria-label='seconds per chunk' width=710 height=165>{''.join(rects)}</svg>")


def _class_colors(resolved: dict[str, Any] | None) -> list[tuple[int, int, int]] | None:
    card = (resolved or {}).get("resolved", {}).get("card") or {}
    colors = card.get("class_colors") if isinstance(card, dict) else None
    names = card.get("class_names") if isinstance(card, dict) else None
    return parse_hex_colors(colors, len(names)) if colors and names else None


def _kv(key: str, value: str, *, raw: bool = False) -> str:
    return f"<tr><td>{html.escape(key)}</td><td>{value if raw else html.escape(value)}</td></tr>"


def _text(value: Any, fmt: str = "") -> str:
    return "" if value is None else html.escape(format(value, fmt))


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out if values else 0


def _read_json(path: Location) -> dict[str, Any] | None:
    try:
        return json.loads(read_text(path)) if exists(path) else None
    except (OSError, ValueError, OutputError):
        return None
