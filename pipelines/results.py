"""The results API: one object over a job's output root, for notebooks and scripts.

    >>> import tessera                                   # doctest: +SKIP
    >>> r = tessera.open("tessera-demo")
    >>> r.scenes                                         # pandas: one row per scene, status, error, class areas
    >>> r.status("scene")                                # "complete" | "failed" | "partial" | ...
    >>> r.masks("scene")                                 # xarray.DataArray (y, x) with CRS, lazily (dask)
    >>> r.sql("SELECT class_name, sum(area_m2) FROM regions GROUP BY 1").df()

Masks open lazily through xarray + dask (a 32k² mask costs nothing until it is computed); 2D
masks carry x/y coordinates in the scene CRS and the CRS itself (rioxarray's ``.rio.crs``),
volumes carry the voxel spacing and the exact 4x4 affine in their attributes (an oblique affine
has no 1-D coordinates) and, where the affine is axis-aligned, z/y/x coordinates in scanner mm.
Only complete stores are opened unless asked: a partial store (a job still running, or
interrupted) is refused by default so it is never taken for a result.

Tables go through :func:`pipelines.query.connect` (a sandboxed DuckDB over the Parquet files),
so the API reads exactly what ``tessera query`` reads.

The root may be ``s3://bucket/prefix`` (``tessera.open("s3://bucket/out")``): tables are read
through pyarrow's S3 filesystem, masks through zarr's ObjectStore over obstore, configured from
the AWS environment (:mod:`pipelines.writers.outroot`). A store is complete only once its root
``zarr.json`` says so (written last, in one PUT), so the partial-store refusal holds there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.writers.outroot import Location, S3Location, as_location, exists, list_prefixes, zarr_store
from pipelines.writers.zarr_masks import read_store_grid, read_store_state
from schemas import store as layout
from schemas.errors import OutputError


class Results:
    """A job's output root: masks as xarray, tables as DuckDB relations or pandas frames.

    Args:
        root: the output root (``output.root`` of the job; it holds ``tables/`` and ``<scene>.zarr``).

    Raises:
        OutputError: `root` is not a tessera output root.
    """

    def __init__(self, root: str | Path | S3Location):
        from pipelines.query import connect

        self.root = as_location(root)
        self._con = connect(self.root)

    def close(self) -> None:
        """Close the DuckDB connection (masks already opened stay readable)."""
        self._con.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Results({str(self.root)!r}: {len(self.scene_names())} scenes)"

    # tables -------------------------------------------------------------------------------
    def sql(self, query: str) -> Any:
        """A DuckDB relation of `query` over the views ``regions``, ``scenes``, ``chunks``, ...;
        ``.df()`` gives pandas, ``.arrow()`` Arrow."""
        return self._con.sql(query)

    def table(self, name: str) -> Any:
        """The DuckDB relation of one table (``regions``, ``scenes``, ``chunks``, ``volume_regions``...)."""
        from schemas.tables import SCHEMAS

        if name not in SCHEMAS:
            raise OutputError(f"{self.root}: no table {name!r}; tables: {', '.join(sorted(SCHEMAS))}")
        return self._con.table(name)

    @property
    def scenes(self) -> Any:
        """The scenes table as a pandas DataFrame (one row per scene of every job in this root)."""
        return self.table("scenes").df()

    @property
    def regions(self) -> Any:
        """The regions table (2D) as a pandas DataFrame."""
        return self.table("regions").df()

    def scene_names(self) -> list[str]:
        """Scenes with a row in the scenes table, or a store in the root, sorted."""
        names = {row[0] for row in self._con.sql("SELECT scene FROM scenes").fetchall()}
        names |= {name[: -len(".zarr")] for name in list_prefixes(self.root)
                  if name.endswith(".zarr") and exists(self.root / name / "zarr.json")}
        return sorted(names)

    def status(self, scene: str) -> str:
        """The scene's status: the scenes table's (``complete``, ``failed``), else its store's
        (``partial`` while chunks are still being written), else ``"unknown"``."""
        rows = self._con.execute("SELECT status FROM scenes WHERE scene = ? ORDER BY finished_at DESC LIMIT 1",
                                 [scene]).fetchall()
        if rows:
            return str(rows[0][0])
        state = read_store_state(self._store(scene))
        return str(state.get(layout.KEY_STATUS, "unknown")) if state else "unknown"

    def error(self, scene: str) -> str | None:
        """Why the scene failed (the scenes table's error), None if it did not."""
        rows = self._con.execute("SELECT error FROM scenes WHERE scene = ? ORDER BY finished_at DESC LIMIT 1",
                                 [scene]).fetchall()
        return rows[0][0] if rows else None

    # masks --------------------------------------------------------------------------------
    def _store(self, scene: str) -> Location:
        if not scene or "/" in scene or "\\" in scene or scene in (".", ".."):
            raise OutputError(f"{scene!r} is not a scene name")
        return self.root / f"{scene}.zarr"

    def masks(self, scene: str, *, variable: str = layout.CLASSES, allow_partial: bool = False) -> Any:
        """The scene's `variable` (``classes``, ``probabilities``, ``instances`` where written) as a
        lazy xarray.DataArray.

        2D: dims (y, x) with coordinates in the CRS and ``.rio.crs`` / ``.rio.transform()`` set.
        3D: dims (z, y, x); ``attrs`` hold ``affine`` (4x4 voxel -> RAS mm) and ``spacing_mm``;
        coordinates in mm where the affine is axis-aligned.

        Raises:
            OutputError: no such store, the variable is not in it, or the store is partial
                (unless `allow_partial`).
        """
        import xarray as xr

        path = self._store(scene)
        state = read_store_state(path)
        if state is None:
            raise OutputError(f"{path}: no store for scene {scene!r}")
        if state.get(layout.KEY_STATUS) != layout.STORE_STATUS_COMPLETE and not allow_partial:
            raise OutputError(f"{path}: the store is {state.get(layout.KEY_STATUS, 'partial')} (a job is running "
                              "or was interrupted); pass allow_partial=True to read it anyway")
        grid = read_store_grid(path)
        if isinstance(grid, layout.GeoGrid):
            ds = xr.open_zarr(zarr_store(path, read_only=True), consolidated=None, decode_coords="all")
            if variable not in ds:
                raise OutputError(f"{path}: no variable {variable!r}; it holds {', '.join(ds.data_vars)}")
            da = ds[variable]
            if grid.crs_wkt:
                import rioxarray  # noqa: F401  (registers .rio)

                da = da.rio.write_crs(grid.crs_wkt).rio.write_transform(_affine(grid.transform))
            return da
        return _volume_array(path, variable, grid)

    def class_names(self, scene: str) -> list[str]:
        """Class names of the scene's model, index == class id."""
        state = read_store_state(self._store(scene)) or {}
        return list(state.get(layout.KEY_CLASS_NAMES, []))


def _affine(transform: tuple[float, ...]) -> Any:
    from affine import Affine

    return Affine(*transform)


def _volume_array(path: Location, variable: str, grid: layout.VolumeGrid) -> Any:
    import dask.array as da
    import numpy as np
    import xarray as xr
    import zarr

    group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    name = layout.classes_path(grid) if variable == layout.CLASSES else variable  # labels/classes/0
    if name not in group:
        raise OutputError(f"{path}: no array {variable!r}")
    array = group[name]
    data = da.from_zarr(array)
    dims = ("class", *layout.DIMENSIONS_3D) if array.ndim == 4 else layout.DIMENSIONS_3D
    affine = np.asarray(grid.affine, dtype=np.float64)
    coords: dict[str, Any] = {}
    linear = affine[:3, :3]
    if all(np.count_nonzero(linear[:, j]) == 1 for j in range(3)) and \
            len({int(np.flatnonzero(linear[:, j])[0]) for j in range(3)}) == 3:
        # axis-aligned (a scaled permutation): each array axis runs along one scanner axis, in mm
        for j, name in enumerate(layout.DIMENSIONS_3D):
            i = int(np.flatnonzero(linear[:, j])[0])
            n = array.shape[array.ndim - 3 + j]
            coords[name] = xr.Variable(name, affine[i, 3] + linear[i, j] * np.arange(n),
                                       attrs={"units": "mm", "scanner_axis": "RAS"[i]})
    attrs = {"affine": affine.tolist(), "spacing_mm": list(grid.spacing_mm), "units": "mm"}
    return xr.DataArray(data, dims=dims, coords=coords, name=variable, attrs=attrs)


def open(root: str | Path | S3Location) -> Results:  # noqa: A001  (the API's name: tessera.open)
    """Open a job's output root (see :class:`Results`)."""
    return Results(root)
