"""Zarr v3 mask stores: create a scene's store, write one chunk, mark it complete.

The grid passed to `create_scene_store` chooses the layout (`schemas.store`):
- `GeoGrid` (2D): georeferenced the way xarray + rioxarray read it: `classes` has dimension
  names (y, x), 1-D `x`/`y` pixel-centre coordinates, and a CF `spatial_ref` grid-mapping
  variable holding `crs_wkt` and a GDAL `GeoTransform`.
- `VolumeGrid` (3D): OME-Zarr 0.5: the root is the image of the input volume (array `0`,
  `(c, z, y, x)` in the reader's dtype, `ome.multiscales` in millimetres) and the class mask is
  its label image `labels/classes` (level `labels/classes/0`, `(z, y, x)` uint8); the exact 4x4
  affine is in the tessera attributes.

Every function takes the store's location: a local ``Path`` (as before) or an
``S3Location`` (``s3://bucket/prefix/<scene>.zarr``, through zarr's ObjectStore; see
:mod:`pipelines.writers.outroot`). The completion protocol is the same on both
(:mod:`schemas.store`, "Completion").
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from pipelines.writers.outroot import Location, as_location, exists, remove_tree, zarr_store
from schemas import store as layout
from schemas.instances import INSTANCE_BACKGROUND, INSTANCES, instances_dtype

if TYPE_CHECKING:
    from pipelines.readers.base import SceneInfo


def read_store_state(path: Location | str) -> dict[str, Any] | None:
    """The tessera attributes of an existing store, or None when there is no store."""
    path = as_location(path)
    if not exists(path / "zarr.json"):
        return None
    group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    return dict(group.attrs.get(layout.TESSERA_ATTR, {}))


def remove_store(path: Location) -> None:
    """Delete a store (only ever called on a path under the output root)."""
    remove_tree(path)


def scene_grid(info: SceneInfo) -> layout.Grid:
    """The store grid of a scene: a VolumeGrid when the reader gave a 4x4 affine, else a GeoGrid.

    Raises:
        ValueError: the scene has neither (names the file), or its geometry is invalid.
    """
    if info.affine is not None:
        return layout.VolumeGrid(affine=info.affine, spacing_mm=info.spacing)
    if info.transform is not None:
        return layout.GeoGrid(transform=info.transform, crs_wkt=info.crs_wkt)
    raise ValueError(f"{info.path}: the reader gave neither a transform (2D) nor an affine (3D)")


def create_scene_store(
    path: Location,
    *,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    grid: layout.Grid,
    class_names: tuple[str, ...],
    provenance: dict[str, Any],
    with_probabilities: bool = False,
    instances_max_id: int | None = None,
    image: tuple[int, str] | None = None,
) -> None:
    """Create an empty scene store (status 'partial'); arrays are filled chunk by chunk.

    The grid decides the layout (see `schemas.store`): a `GeoGrid` writes the 2D GeoZarr/CF
    store (`classes (y, x)`, `x`, `y`, `spatial_ref`), a `VolumeGrid` the 3D OME-Zarr 0.5 store
    (`classes (z, y, x)`, root `ome` multiscales with scale/translation, the exact affine in
    attrs['tessera']; an oblique affine gets no OME translation, see
    `VolumeGrid.ome_attributes`).

    Args:
        path: the `<root>/<scene>.zarr` folder (must not hold a store yet).
        shape: scene size per array axis, (rows, cols) or (z, rows, cols), px / voxels.
        chunk_shape: Zarr chunk shape == the job's output chunk, one entry per axis.
        grid: the scene geometry, GeoGrid (2D) or VolumeGrid (3D).
        class_names: class names, index == class id.
        provenance: fingerprint, model, source... (stored under attrs['tessera']).
        with_probabilities: also create `probabilities` (class, *shape) float16, NaN fill.
        instances_max_id: for an instance model, the largest provisional instance id of the
            scene's chunk grid: creates `instances` (same dims and chunks as `classes`, fill 0 =
            no instance) of dtype `schemas.instances.instances_dtype(instances_max_id)`
            (uint32, or uint64 past 2**32 - 1). None: no `instances` array.
        image: ``(channels, dtype)`` of the input as the reader returns it (the job's bands,
            `SceneInfo.dtype`): required for a `VolumeGrid`, whose root array `0` holds it
            (chunks ``(channels, *chunk_shape)``, fill `schemas.store.image_fill_value`); must
            be None for a `GeoGrid` (2D stores hold no image).

    Raises:
        ValueError: a grid of another type, a shape or chunk shape that does not fit the grid,
            an image missing for a volume or given for a 2D scene.
    """
    if not isinstance(grid, (layout.GeoGrid, layout.VolumeGrid)):
        raise ValueError(f"{path}: grid must be a GeoGrid or a VolumeGrid, got {type(grid).__name__}")
    dims = grid.dimension_names
    for field, value in (("shape", shape), ("chunk_shape", chunk_shape)):
        if len(value) != len(dims) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in value):
            raise ValueError(f"{path}: {field} must be {len(dims)} positive integers {dims} for a "
                             f"{type(grid).__name__}, got {tuple(value)!r}")
    volume = isinstance(grid, layout.VolumeGrid)
    if volume and (image is None or int(image[0]) < 1):
        raise ValueError(f"{path}: a volume store needs its input image's (channels >= 1, dtype), got {image!r}")
    if not volume and image is not None:
        raise ValueError(f"{path}: a 2D store holds no input image (got image={image!r})")
    group = zarr.open_group(zarr_store(path), mode="w-", zarr_format=3)
    attrs = {
        **provenance,
        layout.KEY_STATUS: layout.STORE_STATUS_PARTIAL,
        layout.KEY_CLASS_NAMES: list(class_names),
        layout.KEY_CHUNK_SHAPE: list(chunk_shape),
        **grid.tessera_attributes(),
    }
    group.attrs[layout.TESSERA_ATTR] = attrs
    extra = grid.group_attributes()
    if extra:  # 2D has none: its zarr.json stays byte for byte as before
        group.attrs.update(extra)
    if volume:
        channels, dtype = int(image[0]), str(np.dtype(image[1]))
        group.create_array(
            layout.image_path(0),
            shape=(channels, *shape),
            chunks=(channels, *chunk_shape),
            dtype=dtype,
            fill_value=layout.image_fill_value(dtype),
            dimension_names=(layout.CHANNEL_DIM, *dims),
            attributes={"long_name": "input image", "description": "the input volume as read (the job's "
                        "channels, the reader's dtype); fill where a chunk was wholly nodata"},
        )
        group.create_group(layout.LABELS, attributes=grid.labels_group_attributes())
        group.create_group(layout.LABEL_IMAGE, attributes=grid.label_group_attributes())
    group.create_array(
        layout.classes_path(grid),
        shape=shape,
        chunks=chunk_shape,
        dtype=layout.CLASSES_DTYPE,
        fill_value=layout.NODATA_CLASS,
        dimension_names=dims,
        attributes=grid.variable_attributes({
            "long_name": "class id",
            "flag_values": list(range(len(class_names))),
            "flag_meanings": " ".join(n.replace(" ", "_") for n in class_names),
            "nodata": layout.NODATA_CLASS,
        }),
    )
    if with_probabilities:
        group.create_array(
            layout.PROBABILITIES,
            shape=(len(class_names), *shape),
            chunks=(len(class_names), *chunk_shape),
            dtype=layout.PROBABILITIES_DTYPE,
            fill_value=float("nan"),
            dimension_names=(layout.CLASS_DIM, *dims),
            attributes=grid.variable_attributes({"long_name": "class probability",
                                                 "class_names": list(class_names)}),
        )
    if instances_max_id is not None:
        group.create_array(
            INSTANCES,
            shape=shape,
            chunks=chunk_shape,
            dtype=instances_dtype(instances_max_id),
            fill_value=INSTANCE_BACKGROUND,
            dimension_names=dims,
            attributes=grid.variable_attributes({
                "long_name": "instance id",
                "description": "one id per object of the scene, 0 = no instance; the ids are those of "
                               "the `instances` table (not consecutive)",
                "nodata": INSTANCE_BACKGROUND,
            }),
        )
    write_grid_arrays(grid, group, tuple(shape))


@functools.singledispatch
def write_grid_arrays(grid: layout.Grid, group: zarr.Group, shape: tuple[int, ...]) -> None:
    """Arrays that describe the grid beside the data arrays (none unless registered below)."""


@write_grid_arrays.register
def _(grid: layout.GeoGrid, group: zarr.Group, shape: tuple[int, ...]) -> None:
    """x, y pixel-centre coordinates and the CF `spatial_ref` grid mapping (2D)."""
    a, b, c, d, e, f = grid.transform
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
    if grid.crs_wkt:
        ref_attrs.update(crs_wkt=grid.crs_wkt, spatial_ref=grid.crs_wkt)
    group.create_array(layout.SPATIAL_REF, data=np.array(0, dtype=np.int32), attributes=ref_attrs)


def read_store_grid(path: Location | str) -> layout.Grid:
    """The grid a store was created with, rebuilt from attrs['tessera'] (exact float64)."""
    attrs = zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs[layout.TESSERA_ATTR]
    if layout.KEY_AFFINE in attrs:
        return layout.VolumeGrid(affine=attrs[layout.KEY_AFFINE], spacing_mm=attrs[layout.KEY_SPACING_MM])
    return layout.GeoGrid(transform=attrs[layout.KEY_TRANSFORM], crs_wkt=attrs[layout.KEY_CRS_WKT])


def open_classes(path: Location | str, level: int = 0, *, mode: str = "r") -> zarr.Array:
    """The `classes` array of overview `level` of a store, 2D or 3D (`schemas.store.classes_path`
    of the grid in its attributes)."""
    return zarr.open_array(zarr_store(path, read_only=mode == "r"), mode=mode,
                           path=layout.classes_path(read_store_grid(path), level))


def write_chunk(path: Location, core: tuple[slice, ...], labels: np.ndarray, *,
                probabilities: np.ndarray | None = None, image: np.ndarray | None = None) -> None:
    """Write one output chunk of `classes` (and `probabilities` (K, *core shape) float16 if given,
    and a volume's input `image` (C, *core shape) to the root image `0`, cast to its dtype).

    `core` has one slice per array axis (2 in 2D, 3 in 3D) and is aligned with the Zarr chunks,
    so each chunk has exactly one writer: no races, and the same call twice writes the same bytes.
    The image goes first, then the classes, then the probabilities (all before the chunk's marker).

    Raises:
        ValueError: `core` has the wrong number of axes or does not start on a chunk boundary, or
            an image for a 2D store.
    """
    classes_path = layout.classes_path(len(core))
    try:
        classes = zarr.open_array(zarr_store(path), path=classes_path, mode="r+")
    except FileNotFoundError:
        raise ValueError(f"{path}: no `{classes_path}` for a core of {len(core)} axes {core!r}") from None
    for axis, (s, chunk) in enumerate(zip(core, classes.chunks)):
        if (s.start or 0) % chunk:
            raise ValueError(f"{path}: core {core!r} starts inside a chunk on axis {axis} "
                             f"(chunk {chunk}); chunk writes must be chunk-aligned")
    if image is not None:
        if len(core) != 3:
            raise ValueError(f"{path}: only a volume store holds its input image")
        target = zarr.open_array(zarr_store(path), path=layout.image_path(0), mode="r+")
        target[(slice(None), *core)] = np.asarray(image).astype(target.dtype, copy=False)
    classes[core] = labels
    if probabilities is not None:
        zarr.open_array(zarr_store(path), path=layout.PROBABILITIES, mode="r+")[(slice(None), *core)] = probabilities


def write_instance_chunk(path: Location, core: tuple[slice, ...], ids: np.ndarray) -> None:
    """Write one chunk core of `instances` (provisional or final ids; cast to the array's dtype,
    which holds every provisional id of the scene). Chunk-aligned like `write_chunk`: one writer
    per chunk, the same call twice writes the same bytes.

    Raises:
        ValueError: the store has no `instances` array (it was created for a semantic model),
            or ids beyond its dtype.
    """
    try:
        array = zarr.open_array(zarr_store(path), path=INSTANCES, mode="r+")
    except FileNotFoundError:
        raise ValueError(f"{path}: no `{INSTANCES}` array; the store was created for a semantic model") from None
    if ids.size and int(ids.max()) > np.iinfo(array.dtype).max:
        raise ValueError(f"{path}: instance id {int(ids.max())} does not fit `{INSTANCES}` ({array.dtype})")
    array[core] = ids.astype(array.dtype, copy=False)


def mark_complete(path: Location, extra: dict[str, Any] | None = None) -> None:
    """Set the store's status to 'complete' and consolidate metadata for fast opening.

    The commit point of a scene (see `schemas.store`, "Completion"): called after every chunk,
    table, overview and quicklook is written. The root ``zarr.json`` holding the status is
    replaced in one write (a rename locally, one PUT on S3), so a reader sees 'partial' or
    'complete', never a mix."""
    group = zarr.open_group(zarr_store(path), mode="r+")
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    attrs.update(extra or {})
    attrs[layout.KEY_STATUS] = layout.STORE_STATUS_COMPLETE
    group.attrs[layout.TESSERA_ATTR] = attrs
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet, but zarr-python and xarray use it to
        # open a store in one read; readers without it still read the per-array metadata.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(path))
