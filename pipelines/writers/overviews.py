"""Overview levels of a store's `classes` (and of a volume store's image), built chunk by chunk
after every chunk is written.

`build_overviews` plans the levels (:func:`pipelines.plan.pyramid.plan_pyramid`), computes each
from the previous one with mode downsampling, one output chunk at a time (`build_level`: it reads
only the ``2**ndim`` input chunks under that output chunk, so memory is bounded by the chunk size,
never by the scene), and writes the metadata readers use to find them (`schemas.store`):

- 2D: each level is a CF dataset of its own, group `overviews/<l>` with `classes`, `x`, `y` and
  a `spatial_ref` whose GeoTransform is the level's (pixel size x 2^l), so
  ``xr.open_zarr(store, group="overviews/2")`` + rioxarray georeference it; the root lists the
  levels in the Zarr `multiscales` convention (v0.1.0, the one GeoZarr adopts).
- 3D: the class levels are `labels/classes/<l>`, listed with their scale and translation in the
  `ome.multiscales` of `labels/classes` beside its OME-Zarr `image-label` (colours and names from
  the model card, `source.image` "../../"); the root image (the input volume, `0`) gets the same
  levels at `<l>`, each the mean of the blocks of the level before (`mean_downsample`, the same
  factors, chunk by chunk), listed in the root's `ome.multiscales`.

Where: on a Ray cluster of two or more nodes, a level of at least :data:`DISTRIBUTED_MIN_BLOCKS`
chunks is built as Dask tasks on the cluster (Dask-on-Ray), each a band of the level's chunk rows
that opens the store itself; a smaller level, one machine or no Ray: in this process. Either way each output chunk is the same
function of the same input chunks, so the bytes do not depend on where it ran (tested).

Re-running rebuilds the same levels (they are removed and written again: deterministic, so a
re-run writes the same bytes). `add_overviews` gives an older, complete store its levels.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from pipelines.plan.pyramid import PyramidLevel, mean_downsample, mode_downsample, plan_pyramid
from pipelines.writers.outroot import as_location, remove_tree, zarr_store
from pipelines.writers.zarr_masks import read_store_grid, write_grid_arrays
from schemas import store as layout
from schemas.errors import OutputError
from schemas.model_card import default_class_colors

#: Levels with at least this many chunks are built as Ray tasks when Ray is connected (a 32768²
#: scene's first level in 1024-px chunks has 256); smaller ones in this process.
DISTRIBUTED_MIN_BLOCKS = 64
#: Most Ray tasks (bands of chunk rows) per level.
MAX_LEVEL_TASKS = 16
#: Alive Ray nodes needed to build levels as Ray tasks (a cluster, not one machine's local Ray).
DISTRIBUTED_MIN_NODES = 2


@dataclass(frozen=True)
class LevelReport:
    """What building one level read: the evidence that memory follows the chunk, not the scene.

    Attributes:
        level: the level built.
        shape: its size per axis.
        n_blocks: output chunks computed (== input blocks read).
        max_block_elements: the largest input block read, pixels / voxels (at most
            ``prod(factors x chunk)``).
    """

    level: int
    shape: tuple[int, ...]
    n_blocks: int
    max_block_elements: int
    tasks: int = 0  # Ray tasks the level was split into (0: built in this process)
    image_max_block_elements: int = 0  # 3D: the largest block of the image level read (values, all channels)


def build_level(source: zarr.Array, target: zarr.Array, factors: Sequence[int], *,
                rows: tuple[int, int] | None = None, resampling: str = layout.RESAMPLING_MODE,
                band_axis: int = 0) -> LevelReport:
    """Fill `target` with the mode (or mean) of each `factors` block of `source`, one target chunk
    at a time.

    Args:
        source: the previous level (uint8 classes, or a volume's image for the mean).
        target: the new level, ``ceil(source.shape / factors)`` per axis.
        factors: 1 or 2 per axis.
        rows: only the target chunks whose index along `band_axis` is in ``[rows[0], rows[1])``
            (one task's band); None: all.
        band_axis: the axis `rows` counts chunks along (1 for an image: its axis 0 is the
            channels, one chunk).
        resampling: `layout.RESAMPLING_MODE` (`mode_downsample`, class masks) or
            `layout.RESAMPLING_MEAN` (`mean_downsample`, images).

    Returns:
        A `LevelReport` (blocks read and the largest block's size).
    """
    factors = tuple(int(f) for f in factors)
    n_blocks = max_elements = 0
    ranges = [range(0, n, c) for n, c in zip(target.shape, target.chunks)]
    if rows is not None:
        ranges[band_axis] = ranges[band_axis][rows[0]:rows[1]]
    for starts in itertools.product(*ranges):
        out = tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, target.chunks, target.shape))
        read = tuple(slice(o.start * f, min(o.stop * f, n)) for o, f, n in zip(out, factors, source.shape))
        block = source[read]
        n_blocks += 1
        max_elements = max(max_elements, block.size)
        if resampling == layout.RESAMPLING_MEAN:
            target[out] = mean_downsample(block, factors)
        else:
            target[out] = mode_downsample(block, factors, nodata=layout.NODATA_CLASS)
    return LevelReport(level=-1, shape=tuple(target.shape), n_blocks=n_blocks, max_block_elements=max_elements)


def _level_band(store: str, source_path: str, target_path: str, factors: tuple[int, ...],
                rows: tuple[int, int], resampling: str = layout.RESAMPLING_MODE, band_axis: int = 0
                ) -> tuple[int, int]:
    """One Ray task of a distributed level: the band `rows` of the target's chunk rows, the store
    opened here (a local path on a shared filesystem, or ``s3://`` with this node's credentials).
    Returns (blocks, largest block's elements)."""
    group = zarr.open_group(zarr_store(as_location(store)), mode="r+")
    report = build_level(group[source_path], group[target_path], factors, rows=rows, resampling=resampling,
                         band_axis=band_axis)
    return report.n_blocks, report.max_block_elements


def _build_level_on_ray(zarr_path: Path, source_path: str, target: zarr.Array, factors: tuple[int, ...],
                        resampling: str = layout.RESAMPLING_MODE, band_axis: int = 0) -> LevelReport | None:
    """Build a level as Dask tasks on the connected Ray cluster (Dask-on-Ray), one band of target
    chunk rows each, when Ray is up with at least :data:`DISTRIBUTED_MIN_NODES` alive nodes and
    the level has at least :data:`DISTRIBUTED_MIN_BLOCKS` chunks; None otherwise (the caller
    builds it here: on one machine, new task processes would only add memory). The tasks ask for no CPU: the predictor
    actors hold the cluster's CPUs while other scenes run, and a level must not wait for them."""
    import ray

    n_blocks = math.prod(-(-n // c) for n, c in zip(target.shape, target.chunks))
    if not ray.is_initialized() or n_blocks < DISTRIBUTED_MIN_BLOCKS:
        return None
    if sum(1 for node in ray.nodes() if node.get("Alive")) < DISTRIBUTED_MIN_NODES:
        return None
    import dask
    from ray.util.dask import ray_dask_get

    n_rows = -(-target.shape[band_axis] // target.chunks[band_axis])
    n_tasks = max(1, min(n_rows, MAX_LEVEL_TASKS, 2 * int(ray.cluster_resources().get("CPU", 1))))
    edges = [round(i * n_rows / n_tasks) for i in range(n_tasks + 1)]
    target_path = target.path
    with dask.annotate(ray_remote_args={"num_cpus": 0}):
        parts = [dask.delayed(_level_band, pure=False)(str(zarr_path), source_path, target_path, factors, (a, b),
                                                       resampling, band_axis)
                 for a, b in zip(edges, edges[1:]) if b > a]
    done = dask.compute(*parts, scheduler=ray_dask_get)
    return LevelReport(level=-1, shape=tuple(target.shape), n_blocks=sum(n for n, _ in done),
                       max_block_elements=max(m for _, m in done), tasks=len(parts))


def plan_store_levels(zarr_path: Path) -> tuple[PyramidLevel, ...]:
    """The levels `build_overviews` makes for a store (its `classes` shape and chunks, a volume's
    spacing)."""
    grid = read_store_grid(zarr_path)
    classes = zarr.open_array(zarr_store(zarr_path, read_only=True), path=layout.classes_path(grid), mode="r")
    spacing = grid.spacing_mm if isinstance(grid, layout.VolumeGrid) else None
    return plan_pyramid(classes.shape, classes.chunks, spacing=spacing)


def build_overviews(zarr_path: Path, *, class_colors: Sequence[str] | None = None) -> tuple[LevelReport, ...]:
    """Build every overview level of a store's `classes` and write their metadata.

    Call it once all chunks are written (the job does, in `finish_scene`, before the store is
    marked complete). Existing levels are removed first, so a re-run after an interruption
    rebuilds them identically.

    Args:
        zarr_path: a scene store (`pipelines.writers.zarr_masks`) whose chunks are all written.
        class_colors: '#rrggbb' per class id (the model card's `class_colors`); None: the colours
            already stored under attrs['tessera']['class_colors'], else the default palette.

    Returns:
        One `LevelReport` per level built (none when `classes` fits in one chunk).

    Raises:
        OutputError: the store has no `classes`, or the colours do not match its classes.
    """
    try:
        group = zarr.open_group(zarr_store(zarr_path), mode="r+")
        grid = read_store_grid(zarr_path)
        classes = group[layout.classes_path(grid)]
    except (FileNotFoundError, KeyError):
        raise OutputError(f"{zarr_path}: not a tessera store with `{layout.CLASSES}`") from None
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    names = tuple(attrs[layout.KEY_CLASS_NAMES])
    colors = tuple(class_colors or attrs.get(layout.KEY_CLASS_COLORS) or default_class_colors(len(names)))
    if len(colors) != len(names):
        raise OutputError(f"{zarr_path}: {len(colors)} class colours for {len(names)} classes {list(names)}")
    volume = isinstance(grid, layout.VolumeGrid)
    levels = plan_store_levels(zarr_path)
    if _remove_levels(zarr_path, group, grid):
        group = zarr.open_group(zarr_store(zarr_path), mode="r+")
    image = group[layout.image_path(0)] if volume else None
    reports = []
    source = classes
    for level in levels[1:]:
        chunks = tuple(min(c, n) for c, n in zip(classes.chunks, level.shape))
        extra = {"factors_from_level_0": list(level.cumulative)}
        if volume:
            level_group = group
            name = layout.classes_path(grid, level.level)
        else:
            level_group = group.require_group(f"{layout.OVERVIEWS}/{level.level}")
            name = layout.CLASSES
        target = level_group.create_array(
            name, shape=level.shape, chunks=chunks,
            dtype=layout.CLASSES_DTYPE, fill_value=layout.NODATA_CLASS, dimension_names=grid.dimension_names,
            attributes=dict(classes.attrs) | {"resampling": layout.RESAMPLING_MODE, **extra})
        if isinstance(grid, layout.GeoGrid):
            write_grid_arrays(grid.level(level.cumulative), level_group, level.shape)
        report = (_build_level_on_ray(zarr_path, source.path, target, tuple(level.factors))
                  or build_level(source, target, level.factors))
        if image is not None:  # the input image's level: the mean of the same blocks of its level before
            image_target = group.create_array(
                layout.image_path(level.level), shape=(image.shape[0], *level.shape),
                chunks=(image.chunks[0], *chunks), dtype=image.dtype, fill_value=image.fill_value,
                dimension_names=tuple(image.metadata.dimension_names),
                attributes=dict(image.attrs) | {"resampling": layout.RESAMPLING_MEAN, **extra})
            image_factors = (1, *level.factors)
            image_source = group[layout.image_path(level.level - 1)]
            image_report = (_build_level_on_ray(zarr_path, image_source.path, image_target, image_factors,
                                                layout.RESAMPLING_MEAN, band_axis=1)
                            or build_level(image_source, image_target, image_factors,
                                           resampling=layout.RESAMPLING_MEAN))
            report = LevelReport(-1, report.shape, report.n_blocks, report.max_block_elements,
                                 report.tasks + image_report.tasks, image_report.max_block_elements)
        reports.append(LevelReport(level.level, report.shape, report.n_blocks, report.max_block_elements,
                                   report.tasks, report.image_max_block_elements))
        source = target
    _write_level_metadata(zarr_path, grid, levels, names, colors, attrs)
    return tuple(reports)


def _remove_levels(zarr_path: Path, group: zarr.Group, grid: layout.Grid) -> bool:
    """Remove a store's overview levels (2D: `overviews`; 3D: `labels/classes/<l>` and the root
    image's `<l>`, l >= 1); whether anything was removed."""
    location = as_location(zarr_path)
    if isinstance(grid, layout.GeoGrid):
        if layout.OVERVIEWS not in group:
            return False
        remove_tree(location / layout.OVERVIEWS)
        return True
    labels = layout.LABEL_IMAGE
    stale = [name for name in group.array_keys() if name.isdigit() and int(name) > 0]
    stale += [f"{labels}/{name}" for name in group[labels].array_keys() if name.isdigit() and int(name) > 0]
    for name in stale:
        remove_tree(location / name)
    return bool(stale)


def _write_level_metadata(zarr_path: Path, grid: layout.Grid, levels: Sequence[PyramidLevel],
                          names: tuple[str, ...], colors: tuple[str, ...], attrs: dict[str, Any]) -> None:
    """Root attributes listing the levels: tessera's own records, and the 2D Zarr multiscales
    convention or the 3D OME multiscales of the root image and of `labels/classes` (with its
    image-label)."""
    group = zarr.open_group(zarr_store(zarr_path), mode="r+")
    volume = isinstance(grid, layout.VolumeGrid)
    records = []
    for level in levels:
        record = {"level": level.level, "path": layout.classes_path(grid, level.level)}
        if volume:
            record["image_path"] = layout.image_path(level.level)
        records.append({**record, "shape": list(level.shape),
                        "factors": list(level.factors), "cumulative": list(level.cumulative),
                        **grid.level(level.cumulative).tessera_attributes()})
    attrs.update({layout.KEY_OVERVIEWS: records, layout.KEY_CLASS_COLORS: list(colors)})
    if volume:
        # the label image first, the root (image levels, provenance) last: one write each
        label_levels = [(str(lv.level), lv.cumulative) for lv in levels]
        label_group = group[layout.LABEL_IMAGE]
        label_group.attrs[layout.OME_ATTR] = grid.ome_label_attributes(
            label_levels, layout.ome_image_label(names, colors))
        group.attrs.update({
            layout.TESSERA_ATTR: attrs,
            layout.OME_ATTR: grid.ome_image_multiscales([(layout.image_path(lv.level), lv.cumulative)
                                                         for lv in levels]),
        })
        return
    group.attrs[layout.TESSERA_ATTR] = attrs
    layout_entries = []
    for level, record in zip(levels, records):
        entry: dict[str, Any] = {"asset": layout.classes_path(grid, level.level)}
        if level.level:
            entry["derived_from"] = layout.classes_path(grid, level.level - 1)
            entry["resampling_method"] = layout.RESAMPLING_MODE
        entry["transform"] = {"scale": [float(f) for f in level.factors], "translation": [0.0] * len(level.factors)}
        entry["spatial:transform"] = record[layout.KEY_TRANSFORM]
        entry["spatial:shape"] = record["shape"]
        layout_entries.append(entry)
    declared = {layout.MULTISCALES_CONVENTION["uuid"], layout.SPATIAL_CONVENTION["uuid"]}
    conventions = [c for c in group.attrs.get(layout.ZARR_CONVENTIONS_ATTR, []) if c.get("uuid") not in declared]
    group.attrs.update({
        layout.ZARR_CONVENTIONS_ATTR: [*conventions, layout.MULTISCALES_CONVENTION, layout.SPATIAL_CONVENTION],
        layout.MULTISCALES_ATTR: {"layout": layout_entries, "resampling_method": layout.RESAMPLING_MODE},
        "spatial:dimensions": list(layout.DIMENSIONS_2D),
        "spatial:transform": records[0][layout.KEY_TRANSFORM],
        "spatial:shape": records[0]["shape"],
    })


def add_overviews(zarr_path: Path, *, class_colors: Sequence[str] | None = None) -> tuple[LevelReport, ...]:
    """Give a finished store (complete, written before overviews existed) its levels, keeping it
    complete: `build_overviews`, then the consolidated metadata refreshed.

    Raises:
        OutputError: the store is not complete (a partial store gets its levels from the job).
    """
    group = zarr.open_group(zarr_store(zarr_path, read_only=True), mode="r")
    status = dict(group.attrs.get(layout.TESSERA_ATTR, {})).get(layout.KEY_STATUS)
    if status != layout.STORE_STATUS_COMPLETE:
        raise OutputError(f"{zarr_path}: status {status!r}; only a complete store is given overviews here "
                          "(re-run the job to finish a partial one)")
    reports = build_overviews(zarr_path, class_colors=class_colors)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(zarr_path))
    return reports
