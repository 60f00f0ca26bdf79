"""Exports of a finished output root, for tools that do not read Zarr v3: `tessera export`.

* ``cog``: each complete 2D store as ``<root>/exports/<scene>.tif``, a Cloud-Optimized GeoTIFF
  with the scene's CRS and transform and mode overviews (`pipelines.writers.cog_export`).
* ``geoparquet``: each complete 2D store's regions (the `regions` table's, 8-connected pixels of
  one class) as ``<root>/exports/<scene>.regions.parquet``, GeoParquet 1.1 polygons dissolved
  per region id with holes kept, in the scene's CRS (`pipelines.writers.region_polygons`).
* ``nifti``: each complete volume store as ``<root>/exports/<scene>.nii.gz`` with the input's
  exact affine (`pipelines.writers.nifti_export`; a job's ``output.export: [nifti]`` writes the
  same file as ``<root>/<scene>.nii.gz`` while it runs).

The root may be local or ``s3://`` (each file is written to local scratch, then PUT as one
object). Only complete stores are exported: a partial one (a job running or interrupted) is listed as
skipped with its reason, never exported as if it were a result. Scenes whose kind the format
does not fit (a volume for ``cog``, an image for ``nifti``) are skipped with the reason too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.writers.cog_export import export_cog
from pipelines.writers.nifti_export import export_nifti
from pipelines.writers.outroot import Location, as_location, exists, list_prefixes, upload_from
from pipelines.writers.region_polygons import export_region_polygons
from pipelines.writers.zarr_masks import read_store_grid, read_store_state
from schemas import store as layout
from schemas.errors import OutputError

FORMATS = ("cog", "geoparquet", "nifti")
EXPORTS_DIR = "exports"


@dataclass(frozen=True)
class Exported:
    """One scene's export: the file written (a local path or an ``s3://`` URI), or why none was."""

    scene: str
    path: str | None
    skipped: str = ""


def _stores(root: Location) -> list[str]:
    """Names of the ``<scene>.zarr`` stores directly under `root` (local or S3)."""
    if isinstance(root, Path):
        return sorted(p.name for p in root.glob("*.zarr") if (p / "zarr.json").is_file())
    return sorted(name for name in list_prefixes(root) if name.endswith(".zarr") and exists(root / name / "zarr.json"))


def export_root(root: str | Path, fmt: str, *, scenes: list[str] | None = None) -> list[Exported]:
    """Export every complete store of `root` (or the named `scenes`) in `fmt`, to
    ``<root>/exports/`` (on S3: each file written locally, then PUT as one object).

    Raises:
        OutputError: an unknown format, a root with no stores, or a named scene with no store.
    """
    if fmt not in FORMATS:
        raise OutputError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    root = as_location(root)
    stores = _stores(root)
    if scenes:
        wanted = {f"{s}.zarr" for s in scenes}
        missing = sorted(wanted - set(stores))
        if missing:
            raise OutputError(f"{root}: no store for {', '.join(m[:-5] for m in missing)}")
        stores = [name for name in stores if name in wanted]
    if not stores:
        raise OutputError(f"{root}: no <scene>.zarr stores here; is this a tessera output root?")
    out_dir = root / EXPORTS_DIR
    results = []
    for name in stores:
        store = root / name
        scene = name[: -len(".zarr")]
        state = read_store_state(store) or {}
        if state.get(layout.KEY_STATUS) != layout.STORE_STATUS_COMPLETE:
            results.append(Exported(scene, None, f"store is {state.get(layout.KEY_STATUS, 'partial')}, not complete"))
            continue
        grid = read_store_grid(store)
        class_names = tuple(state.get(layout.KEY_CLASS_NAMES, ()))
        if fmt == "cog" and isinstance(grid, layout.GeoGrid):
            target = out_dir / f"{scene}.tif"
            with upload_from(target) as tmp:
                export_cog(store, tmp, grid=grid, class_names=class_names or ("class_0",),
                           class_colors=state.get("class_colors"))
        elif fmt == "geoparquet" and isinstance(grid, layout.GeoGrid):
            target = out_dir / f"{scene}.regions.parquet"
            with upload_from(target) as tmp:
                export_region_polygons(store, tmp, scene=scene, grid=grid, class_names=class_names,
                                       regions_table=root / "tables" / "regions" / f"{scene}.parquet")
        elif fmt == "nifti" and isinstance(grid, layout.VolumeGrid):
            target = out_dir / f"{scene}.nii.gz"
            with upload_from(target) as tmp:
                export_nifti(store, tmp, grid=grid, gzipped=True)
        else:
            results.append(Exported(scene, None, _SKIPPED[fmt]))
            continue
        results.append(Exported(scene, str(target)))
    return results


_SKIPPED = {
    "cog": "a volume: use --format nifti",
    "geoparquet": "a volume: region polygons are 2D; use the volume_regions table or --format nifti",
    "nifti": "a 2D scene: use --format cog",
}
