"""Zarr v3 mask stores: create a scene's store, write one chunk, mark it complete.

The store is georeferenced the way xarray + rioxarray read it: `classes` has dimension names
(y, x), 1-D `x`/`y` pixel-centre coordinates, and a CF `spatial_ref` grid-mapping variable
holding `crs_wkt` and a GDAL `GeoTransform`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from schemas import store as layout


def read_store_state(path: Path) -> dict[str, Any] | None:
    """The tessera attributes of an existing store, or None when there is no store."""
    if not (path / "zarr.json").is_file():
        return None
    group = zarr.open_group(str(path), mode="r")
    return dict(group.attrs.get(layout.TESSERA_ATTR, {}))


def remove_store(path: Path) -> None:
    """Delete a store (only ever called on a path under the output root)."""
    if path.exists():
        shutil.rmtree(path)


def create_scene_store(
    path: Path,
    *,
    shape: tuple[int, int],
    chunk_shape: tuple[int, int],
    transform: tuple[float, float, float, float, float, float],
    crs_wkt: str | None,
    class_names: tuple[str, ...],
    provenance: dict[str, Any],
    with_probabilities: bool = False,
) -> None:
    """Create an empty 2D scene store (status 'partial'); arrays are filled chunk by chunk.

    Args:
        path: the `<root>/<scene>.zarr` folder (must not hold a store yet).
        shape: (rows, cols) of the scene.
        chunk_shape: Zarr chunk shape == the job's output chunk.
        transform: affine (a, b, c, d, e, f), pixel (col, row) -> CRS (x, y).
        crs_wkt: WKT of the CRS, or None.
        class_names: class names, index == class id.
        provenance: fingerprint, model, source... (stored under attrs['tessera']).
        with_probabilities: also create `probabilities` (class, y, x) float16, NaN fill.
    """
    a, b, c, d, e, f = transform
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    attrs = {
        **provenance,
        layout.KEY_STATUS: layout.STORE_STATUS_PARTIAL,
        layout.KEY_CLASS_NAMES: list(class_names),
        layout.KEY_CHUNK_SHAPE: list(chunk_shape),
        layout.KEY_CRS_WKT: crs_wkt,
        layout.KEY_TRANSFORM: [a, b, c, d, e, f],
    }
    group.attrs[layout.TESSERA_ATTR] = attrs
    group.create_array(
        layout.CLASSES,
        shape=shape,
        chunks=chunk_shape,
        dtype=layout.CLASSES_DTYPE,
        fill_value=layout.NODATA_CLASS,
        dimension_names=layout.DIMENSIONS_2D,
        attributes={
            "grid_mapping": layout.SPATIAL_REF,
            "long_name": "class id",
            "flag_values": list(range(len(class_names))),
            "flag_meanings": " ".join(n.replace(" ", "_") for n in class_names),
            "nodata": layout.NODATA_CLASS,
            "coordinates": layout.SPATIAL_REF,  # CF: makes spatial_ref a coordinate in xarray
        },
    )
    if with_probabilities:
        group.create_array(
            layout.PROBABILITIES,
            shape=(len(class_names), *shape),
            chunks=(len(class_names), *chunk_shape),
            dtype=layout.PROBABILITIES_DTYPE,
            fill_value=float("nan"),
            dimension_names=(layout.CLASS_DIM, *layout.DIMENSIONS_2D),
            attributes={"grid_mapping": layout.SPATIAL_REF, "long_name": "class probability",
                        "class_names": list(class_names), "coordinates": layout.SPATIAL_REF},
        )
    rows, cols = shape
    # Pixel-centre coordinates; exact for north-up grids (b == d == 0). Rotated grids keep the
    # GeoTransform below, which rioxarray prefers over the coordinate arrays.
    x = c + a * (np.arange(cols) + 0.5)
    y = f + e * (np.arange(rows) + 0.5)
    group.create_array(layout.X, data=x, chunks=(max(1, cols),), dimension_names=(layout.X,),
                       attributes={"standard_name": "projection_x_coordinate", "axis": "X"})
    group.create_array(layout.Y, data=y, chunks=(max(1, rows),), dimension_names=(layout.Y,),
                       attributes={"standard_name": "projection_y_coordinate", "axis": "Y"})
    ref_attrs: dict[str, Any] = {"GeoTransform": f"{c!r} {a!r} {b!r} {f!r} {d!r} {e!r}"}
    if crs_wkt:
        ref_attrs.update(crs_wkt=crs_wkt, spatial_ref=crs_wkt)
    group.create_array(layout.SPATIAL_REF, data=np.array(0, dtype=np.int32), attributes=ref_attrs)


def write_chunk(path: Path, core: tuple[slice, ...], labels: np.ndarray, *,
                probabilities: np.ndarray | None = None) -> None:
    """Write one output chunk of `classes` (and `probabilities` (K, h, w) float16 if given).

    `core` is aligned with the Zarr chunks, so each chunk has exactly one writer: no races.
    """
    zarr.open_array(str(path), path=layout.CLASSES, mode="r+")[core] = labels
    if probabilities is not None:
        zarr.open_array(str(path), path=layout.PROBABILITIES, mode="r+")[(slice(None), *core)] = probabilities


def mark_complete(path: Path, extra: dict[str, Any] | None = None) -> None:
    """Set the store's status to 'complete' and consolidate metadata for fast opening."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    attrs.update(extra or {})
    attrs[layout.KEY_STATUS] = layout.STORE_STATUS_COMPLETE
    group.attrs[layout.TESSERA_ATTR] = attrs
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet, but zarr-python and xarray use it to
        # open a store in one read; readers without it still read the per-array metadata.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))
