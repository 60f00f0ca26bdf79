"""Exports of a finished output root, for tools that do not read Zarr v3: `tessera export`.

* ``cog``: each complete 2D store as ``<root>/exports/<scene>.tif``, a Cloud-Optimized GeoTIFF
  with the scene's CRS and transform and mode overviews (`pipelines.writers.cog_export`).
* ``geoparquet``: each complete 2D store's regions (the `regions` table's, 8-connected pixels of
  one class) as ``<root>/exports/<scene>.regions.parquet``, GeoParquet 1.1 polygons dissolved
  per region id with holes kept, in the scene's CRS (`pipelines.writers.region_polygons`).
* ``nifti``: each complete volume store as ``<root>/exports/<scene>.nii.gz`` with the input's
  exact affine (`pipelines.writers.nifti_export`; a job's ``output.export: [nifti]`` writes the
  same file as ``<root>/<scene>.nii.gz`` while it runs).

Only complete stores are exported: a partial one (a job running or interrupted) is listed as
skipped with its reason, never exported as if it were a result. Scenes whose kind the format
does not fit (a volume for ``cog``, an image for ``nifti``) are skipped with the reason too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.writers.cog_export import export_cog
from pipelines.writers.nifti_export import export_nifti
from pipelines.writers.outroot import is_s3
from pipelines.writers.region_polygons import export_region_polygons
from pipelines.writers.zarr_masks import read_store_grid, read_store_state
from schemas import store as layout
from schemas.errors import OutputError

FORMATS = ("cog", "geoparquet", "nifti")
EXPORTS_DIR = "exports"


@dataclass(frozen=True)
class Exported:
    """One scene's export: the file written, or why none was."""

    scene: str
    path: Path | None
    skipped: str = ""


def export_root(root: str | Path, fmt: str, *, scenes: list[str] | None = None) -> list[Exported]:
    """Export every complete store of `root` (or the named `scenes`) in `fmt`.

    Raises:
        OutputError: an unknown format, a root with no stores, a named scene with no store, or an
            ``s3://`` root (not supported yet).
    """
    if fmt not in FORMATS:
        raise OutputError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if is_s3(root):
        raise OutputError(f"{root}: exports of an s3:// output root are not written yet; export from a local copy "
                          "of the root (its stores and tables)")
    root = Path(root)
    stores = sorted(p for p in root.glob("*.zarr") if (p / "zarr.json").is_file())
    if scenes:
        wanted = {f"{s}.zarr" for s in scenes}
        missing = sorted(wanted - {p.name for p in stores})
        if missing:
            raise OutputError(f"{root}: no store for {', '.join(m[:-5] for m in missing)}")
        stores = [p for p in stores if p.name in wanted]
    if not stores:
        raise OutputError(f"{root}: no <scene>.zarr stores here; is this a tessera output root?")
    out_dir = root / EXPORTS_DIR
    results = []
    for store in stores:
        scene = store.name[: -len(".zarr")]
        state = read_store_state(store) or {}
        if state.get(layout.KEY_STATUS) != layout.STORE_STATUS_COMPLETE:
            results.append(Exported(scene, None, f"store is {state.get(layout.KEY_STATUS, 'partial')}, not complete"))
            continue
        grid = read_store_grid(store)
        out_dir.mkdir(exist_ok=True)
        if fmt == "cog":
            if not isinstance(grid, layout.GeoGrid):
                results.append(Exported(scene, None, "a volume: use --format nifti"))
                continue
            path = export_cog(store, out_dir / f"{scene}.tif", grid=grid,
                              class_names=tuple(state.get(layout.KEY_CLASS_NAMES, ())) or ("class_0",),
                              class_colors=state.get("class_colors"))
        elif fmt == "geoparquet":
            if not isinstance(grid, layout.GeoGrid):
                results.append(Exported(scene, None, "a volume: region polygons are 2D; use the volume_regions "
                                                     "table or --format nifti"))
                continue
            path = export_region_polygons(store, out_dir / f"{scene}.regions.parquet", scene=scene, grid=grid,
                                          class_names=tuple(state.get(layout.KEY_CLASS_NAMES, ())),
                                          regions_table=root / "tables" / "regions" / f"{scene}.parquet")
        else:
            if not isinstance(grid, layout.VolumeGrid):
                results.append(Exported(scene, None, "a 2D scene: use --format cog"))
                continue
            path = export_nifti(store, out_dir / f"{scene}.nii.gz", grid=grid)
        results.append(Exported(scene, path))
    return results
