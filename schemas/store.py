"""Zarr layout of one scene's output, `<root>/<scene>.zarr` (Zarr v3), and its grid geometry.

The caller chooses the layout by the grid it passes to the store writer: a `GeoGrid` (2D
georeferenced scene) or a `VolumeGrid` (3D volume in scanner millimetres).

Layout (2D, GeoGrid): GeoZarr-style CF metadata that xarray + rioxarray read.
  classes       (y, x) uint8, fill 255 = nodata / not predicted; chunks = job chunk_size.
  probabilities (class, y, x) float16, optional (output.write_probabilities); NaN fill.
  x, y          1-D float64 pixel-centre coordinates in the scene CRS.
  spatial_ref   0-d int32 CF grid-mapping variable: crs_wkt, spatial_ref, GeoTransform.
  `classes` carries `grid_mapping`, `flag_values`, `flag_meanings`; attrs[TESSERA_ATTR] holds
  `crs_wkt` and `transform`.
  overviews/<l>/ (l = 1, 2, ...; written when the scene is finished, before it is complete)
                one CF dataset per level: `classes` (mode of 2x2 blocks of level l-1, see
                `pipelines.plan.pyramid`), `x`, `y`, and a `spatial_ref` whose GeoTransform is
                the level's: pixel size x 2^l, same top-left corner (`GeoGrid.level`). Levels go
                on until one fits in one chunk; ``xr.open_zarr(store, group="overviews/2")``
                opens one georeferenced. Root attributes list them in the Zarr conventions
                GeoZarr builds on: `zarr_conventions` declares "multiscales" (v1) and "spatial"
                (v0.1); `multiscales.layout` has one item per level, level 0 first, with
                `asset` (the array path, `classes_path`), `derived_from` (the level before),
                `transform` {scale [2, 2] relative to it, translation [0, 0]: pixel corners
                coincide}, `resampling_method` "mode", and the level's absolute
                `spatial:transform` (a, b, c, d, e, f) and `spatial:shape`; the root has
                `spatial:dimensions` ["y", "x"], `spatial:transform` and `spatial:shape` of
                level 0. The CRS stays in each level's CF `spatial_ref` (no "proj" convention).
                (A written store validated against the two conventions' JSON schemas with
                jsonschema, by hand: the schemas are not vendored, so no test repeats it.)
  An odd size gives the last row/column of a level a block cut short; that pixel still has
  the level's pixel size, so a level's extent may reach past the scene's by less than one of
  its pixels.

Layout (3D, VolumeGrid): OME-Zarr 0.5 (https://ngff.openmicroscopy.org/0.5/), the spec's layout of
an image with a label image: the root is the image of the input volume, the class mask is its
label image `labels/classes`.
  0             (c, z, y, x) the input as the reader returns it: the job's channels (`bands`, else
                all), the reader's dtype (`SceneInfo.dtype`); chunks (channels, *chunk_shape), fill
                `image_fill_value` (NaN for floats, 0 otherwise; a chunk skipped as wholly nodata
                is never written, so it reads as the fill). Written by the write stage, the core
                of each window's input (`schemas.records.Prediction.image`) before the classes and
                the chunk's marker; a retry writes the same bytes. Extra storage: one copy of the
                input in its dtype (compressed like every array).
  1, 2, ...     image level l: the mean of each block of level l - 1 (`pipelines.plan.pyramid.
                mean_downsample`: float64 sums, NaN left out, integers rounded with rint), with the
                factors of the label level l; built with the label levels, chunk by chunk.
  labels/       group; attrs[OME_ATTR] = {"version": "0.5", "labels": ["classes"]}.
  labels/classes/        the label image (group).
    0           (z, y, x) uint8 class ids, fill 255; dimension_names == the OME axes names.
    1, 2, ...   level l (mode of 2x2x2 blocks, or 1x2x2 where an axis is already coarse: an axis
                is halved while its spacing is below twice the finest, see
                `pipelines.plan.pyramid.plan_pyramid`), until a level fits in one chunk.
    `classes_path(grid, l)` spells `labels/classes/<l>`: every reader and writer goes through it.
  probabilities (class, z, y, x) float16, optional; NaN fill; at the root but not part of the OME
                image (no multiscale lists it).
  labels/classes attrs[OME_ATTR] = {"version": "0.5", "multiscales": [one multiscale named
  `classes`, axes z/y/x of type space in millimeter, one dataset per level (paths "0", "1", ...
  relative to the group) whose `coordinateTransformations` are a `scale` (= spacing x the level's
  factor per axis) and a `translation` to the level's first voxel centre (origin + (factor - 1) / 2
  x spacing; the origin term only when the affine is axis-aligned, level 0 of an oblique volume has
  no translation), `type` "mode"], "image-label": {"version": "0.5", "colors": [{"label-value": k,
  "rgba": card colour, opaque}, ..., {255: transparent}], "properties": [{"label-value": k, "name":
  class name}, ...], "source": {"image": "../../"}}} (see `VolumeGrid.ome_label_attributes`,
  `ome_image_label`).
  Root attrs[OME_ATTR] = {"version": "0.5", "multiscales": [one multiscale named `image`, axes c
  (type channel) then z/y/x as above, datasets "0", "1", ... whose transformations are the label
  level's with a leading 1 (scale) and 0 (translation) for the channel axis, `type` "mean"]} (see
  `VolumeGrid.ome_image_multiscales`); no image-label at the root.
  Before the levels exist (a partial store) both multiscales list level 0 alone and
  `labels/classes` has no image-label yet (it comes with the levels and the card's colours).
  attrs[TESSERA_ATTR] holds the exact 4x4 `affine` (float64, row-major) and `spacing_mm`, and the
  level records (`path` = the classes level, `image_path` = the image level).
  No x/y/z coordinate arrays and no spatial_ref: an oblique affine has no 1-D coordinates.
  Volume jobs' fingerprints carry this layout (`pipelines.run.resolve.VOLUME_STORE_LAYOUT`), so a
  store of the earlier layout (the classes at the root, no image) is another job's output.
  OME-Zarr clauses: the root is a 0.5 image (multiscales: axes with one channel axis before the
  space axes, ordered datasets with exactly one scale and at most one translation after it), the
  `labels` group lists its label images, and `labels/classes` is a multiscale image with integer
  pixels and an `image-label` (`colors`, `properties`, `source`, `version`). Checked by hand, not
  by a test (the schemas are not vendored): the root and `labels/classes` of written stores (the
  volume demo's, and an axis-aligned anisotropic one with overview levels) validate with jsonschema
  against the OME-Zarr 0.5 JSON schemas `strict_image` (both) and `strict_label`
  (`labels/classes`) of the ngff repository; 0.5 has no schema for the `labels` group, whose
  `labels` list follows the spec's text. (ome-zarr-models, which accepted the earlier layout, pins
  pydantic < 2.13, older than tessera's, so it is not a test dependency either.)

Both layouts keep the tessera provenance under the TESSERA_ATTR key of the root group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSES = "classes"
LABELS = "labels"  # 3D: the OME-Zarr labels group; the class mask is its label image `labels/classes`
LABEL_IMAGE = f"{LABELS}/{CLASSES}"  # 3D: the label image group; its levels are `<LABEL_IMAGE>/<l>`
CHANNEL_DIM = "c"  # 3D: the channel axis of the root image (the input volume), OME axis type "channel"
PROBABILITIES = "probabilities"  # optional (class, *spatial) float16, NaN = nodata / not predicted
PROBABILITIES_DTYPE = "float16"
CLASS_DIM = "class"
X = "x"
Y = "y"
Z = "z"
SPATIAL_REF = "spatial_ref"
DIMENSIONS_2D = (Y, X)
DIMENSIONS_3D = (Z, Y, X)

CLASSES_DTYPE = "uint8"
NODATA_CLASS = 255

# Group attribute (a dict) with the provenance and completion state.
TESSERA_ATTR = "tessera"
# Keys inside it.
KEY_STATUS = "status"  # "partial" until every chunk is written and tables are in, then "complete"
KEY_FINGERPRINT = "fingerprint"
KEY_MODEL = "model"  # {"name", "architecture", "sha256"}
KEY_CLASS_NAMES = "class_names"
KEY_CHUNK_SHAPE = "chunk_shape"
KEY_HALO = "halo"
KEY_SOURCE = "source"
KEY_INPUT_SHA256 = "input_sha256"
KEY_CRS_WKT = "crs_wkt"  # 2D
KEY_TRANSFORM = "transform"  # 2D: affine (a, b, c, d, e, f) as rasterio/affine orders it
KEY_AFFINE = "affine"  # 3D: 4x4 voxel (i, j, k) -> scanner RAS mm, row-major, float64
KEY_SPACING_MM = "spacing_mm"  # 3D: voxel size per array axis (z, y, x), mm
KEY_OVERVIEWS = "overviews"  # list of level records (level, path, shape, factors, cumulative, grid keys)
KEY_CLASS_COLORS = "class_colors"  # '#rrggbb' per class id (the card's, or its default palette)

# 2D overview levels 1, 2, ... of `classes`: `overviews/<level>/classes` (see `classes_path`).
OVERVIEWS = "overviews"
RESAMPLING_MODE = "mode"  # most frequent class per block, ties to the lowest id (pipelines.plan.pyramid)
RESAMPLING_MEAN = "mean"  # 3D image levels: mean of each block (pipelines.plan.pyramid.mean_downsample)
# 2D: the Zarr conventions GeoZarr builds on (github.com/zarr-conventions): "multiscales" (v1) lists
# the levels in the root attribute `multiscales` = {"layout": [...], "resampling_method": "mode"},
# each layout item with the level's absolute `spatial:transform` and `spatial:shape` from the
# "spatial" convention (v0.1); both are declared in the root's `zarr_conventions` list.
MULTISCALES_ATTR = "multiscales"
ZARR_CONVENTIONS_ATTR = "zarr_conventions"
MULTISCALES_CONVENTION = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v1/README.md",
    "uuid": "d35379db-88df-4056-af3a-620245f8e347",
    "name": "multiscales",
    "description": "Multiscale layout of zarr datasets",
}
SPATIAL_CONVENTION = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v0.1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v0.1/README.md",
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
    "name": "spatial",
    "description": "Spatial coordinate information",
}

# Completion. attrs[TESSERA_ATTR][KEY_STATUS] in the root zarr.json is the scene's commit point:
# a store is created 'partial'; each chunk is written, then its partial statistics, then its
# marker `<root>/_work/<scene>/<fingerprint[:16]>/<chunk key>.json`; when every chunk has a marker
# the driver writes the tables, the overview levels and the quicklook, and only then sets the
# status to 'complete'. That last write replaces one file (a rename on local disk) or one object
# (one PUT on S3: all or nothing, there is no rename on object storage). So no reader can take a
# partial store for a complete one, on either: every reader checks the status (the results API,
# exports, a resumed job, which recomputes only chunks without a marker), and an interrupted
# job, on disk or in a bucket, resumes from the markers alone.
STORE_STATUS_PARTIAL = "partial"
STORE_STATUS_COMPLETE = "complete"

# OME-Zarr 0.5 (https://ngff.openmicroscopy.org/0.5/): root group attribute and field values.
OME_ATTR = "ome"
OME_VERSION = "0.5"
OME_SPACE_UNIT = "millimeter"

# Relative tolerance between a VolumeGrid's spacing and its affine's column norms: NIfTI keeps
# pixdim and the sform apart, both float32, so they agree only to a few float32 ulps.
SPACING_RTOL = 1e-4


def classes_path(grid: int | GeoGrid | VolumeGrid, level: int = 0) -> str:
    """Path of the `classes` array of overview `level` (0: full resolution) inside a store.

    `grid` is the store's grid or its number of spatial axes. 2D: `classes` (level 0),
    `overviews/<level>/classes`. 3D: the label image's level, `labels/classes/<level>`.
    The one place these paths are spelled: every reader and writer of a store goes through it.
    """
    ndim = grid if isinstance(grid, int) else len(grid.dimension_names)
    if ndim == 3:
        return f"{LABEL_IMAGE}/{int(level)}"
    if ndim != 2:
        raise ValueError(f"classes_path: a store has 2 or 3 spatial axes, not {ndim}")
    return CLASSES if level == 0 else f"{OVERVIEWS}/{level}/{CLASSES}"


def image_path(level: int = 0) -> str:
    """Path of level `level` of a volume store's OME image (the input volume) at its root: `0`, `1`, ..."""
    return str(int(level))


def image_fill_value(dtype: str | np.dtype) -> float | int:
    """Fill value of a volume store's image array: NaN for a float dtype (a volume's nodata,
    `pipelines.readers.nifti`), 0 otherwise. A chunk that was never written (wholly nodata,
    skipped) reads as it."""
    return float("nan") if np.issubdtype(np.dtype(dtype), np.floating) else 0


def hex_to_rgba(color: str, alpha: int = 255) -> list[int]:
    """'#rrggbb' -> [r, g, b, alpha], integers 0..255 (OME-Zarr image-label `rgba`)."""
    return [int(color[i:i + 2], 16) for i in (1, 3, 5)] + [int(alpha)]


def ome_image_label(class_names: tuple[str, ...] | list[str], class_colors: tuple[str, ...] | list[str]
                    ) -> dict[str, Any]:
    """The OME-Zarr 0.5 `image-label` object of a class mask: one opaque colour per class id,
    nodata (255) transparent, and each class id's name under `properties`."""
    colors = [{"label-value": k, "rgba": hex_to_rgba(c)} for k, c in enumerate(class_colors)]
    colors.append({"label-value": NODATA_CLASS, "rgba": [0, 0, 0, 0]})
    return {
        "version": OME_VERSION,
        "colors": colors,
        "properties": [{"label-value": k, "name": name} for k, name in enumerate(class_names)]
        + [{"label-value": NODATA_CLASS, "name": "nodata"}],
    }


def _finite_float(value: Any, field: str) -> float:
    """`value` as a Python float; ValueError naming `field` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    return number


def _as_tuple(value: Any) -> tuple[Any, ...] | None:
    """A sequence or 1-D array as a tuple; None for anything else (a string, a scalar)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return tuple(np.asarray(value, dtype=object).reshape(-1)) if np.ndim(value) == 1 else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class GeoGrid:
    """A 2D georeferenced grid: pixel (col, row) corner -> CRS (x, y), array axes (y, x).

    Attributes:
        transform: affine ``(a, b, c, d, e, f)`` in rasterio order, ``x = a*col + b*row + c``,
            ``y = d*col + e*row + f``; six finite numbers with ``a*e - b*d != 0``. Stored as
            Python floats (an int such as 1 becomes 1.0).
        crs_wkt: WKT of the CRS, or None (an empty string is kept as given and means no CRS).
    """

    transform: tuple[float, float, float, float, float, float]
    crs_wkt: str | None = None

    def __post_init__(self) -> None:
        values = _as_tuple(self.transform)
        if values is None or len(values) != 6:
            raise ValueError(f"GeoGrid.transform: expected 6 numbers (a, b, c, d, e, f), got {self.transform!r}")
        numbers = tuple(_finite_float(v, f"GeoGrid.transform[{i}]") for i, v in enumerate(values))
        a, b, _, d, e, _ = numbers
        if a * e - b * d == 0:
            raise ValueError(f"GeoGrid.transform: singular affine (a*e - b*d == 0) in {numbers!r}")
        if self.crs_wkt is not None and not isinstance(self.crs_wkt, str):
            raise ValueError(f"GeoGrid.crs_wkt: expected WKT text or None, got {type(self.crs_wkt).__name__}")
        object.__setattr__(self, "transform", numbers)

    @property
    def dimension_names(self) -> tuple[str, ...]:
        """Names of the array axes, ``(y, x)``."""
        return DIMENSIONS_2D

    @property
    def pixel_area_crs2(self) -> float:
        """Area of one pixel in squared CRS units, ``|a*e - b*d|`` of the affine."""
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)

    def tessera_attributes(self) -> dict[str, Any]:
        """The grid's keys inside attrs[TESSERA_ATTR], in their stored order."""
        return {KEY_CRS_WKT: self.crs_wkt, KEY_TRANSFORM: list(self.transform)}

    def level(self, cumulative: tuple[int, ...]) -> GeoGrid:
        """The grid of an overview level whose pixel covers ``cumulative = (fy, fx)`` pixels of
        this one: the affine's columns scaled, ``(a*fx, b*fy, c, d*fx, e*fy, f)``; the top-left
        corner stays where it is (exact for rotated grids too)."""
        a, b, c, d, e, f = self.transform
        fy, fx = cumulative
        return GeoGrid(transform=(a * fx, b * fy, c, d * fx, e * fy, f), crs_wkt=self.crs_wkt)

    def group_attributes(self) -> dict[str, Any]:
        """Root group attributes beside TESSERA_ATTR: none in 2D."""
        return {}

    def variable_attributes(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """CF attributes of a data array: `attributes` between `grid_mapping` and `coordinates`
        (the key order the 2D stores have always had)."""
        # CF: `coordinates` makes spatial_ref a coordinate in xarray.
        return {"grid_mapping": SPATIAL_REF, **attributes, "coordinates": SPATIAL_REF}


@dataclass(frozen=True)
class VolumeGrid:
    """A 3D voxel grid in scanner space: array axes ``(z, y, x)``, millimetres, RAS.

    Attributes:
        affine: 4x4 matrix, voxel index ``(i, j, k)`` in the array's axis order (z, y, x) ->
            scanner ``(R, A, S, 1)`` in mm; finite, last row exactly ``0 0 0 1``, invertible.
            Any (4, 4) array-like (or 16 numbers, row-major); stored as a tuple of 4 row tuples
            of Python floats (float64, exact).
        spacing_mm: voxel size per array axis (z, y, x), each > 0 and equal to the norm of the
            affine's matching column within SPACING_RTOL; None derives it from those norms.
    """

    affine: tuple[tuple[float, float, float, float], ...]
    spacing_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        try:
            matrix = np.array(self.affine, dtype=object)
        except ValueError:
            matrix = None
        if matrix is None or matrix.size != 16 or matrix.ndim not in (1, 2) or (
                matrix.ndim == 2 and matrix.shape != (4, 4)):
            raise ValueError(f"VolumeGrid.affine: expected a 4x4 matrix, got {self.affine!r}")
        matrix = matrix.reshape(4, 4)
        rows = tuple(tuple(_finite_float(matrix[r, c], f"VolumeGrid.affine[{r}][{c}]") for c in range(4))
                     for r in range(4))
        if rows[3] != (0.0, 0.0, 0.0, 1.0):
            raise ValueError(f"VolumeGrid.affine: last row must be [0, 0, 0, 1], got {list(rows[3])}")
        linear = np.array(rows, dtype=np.float64)[:3, :3]
        if np.linalg.matrix_rank(linear) < 3:
            raise ValueError(f"VolumeGrid.affine: singular 3x3 part {linear.tolist()} "
                             "(the voxel axes must be independent)")
        norms = np.linalg.norm(linear, axis=0)
        if self.spacing_mm is None:
            spacing = tuple(float(n) for n in norms)
        else:
            values = _as_tuple(self.spacing_mm)
            if values is None or len(values) != 3:
                raise ValueError(f"VolumeGrid.spacing_mm: expected 3 numbers (z, y, x) in mm, got {self.spacing_mm!r}")
            spacing = tuple(_finite_float(v, f"VolumeGrid.spacing_mm[{i}]") for i, v in enumerate(values))
            for axis, (given, norm) in enumerate(zip(spacing, norms)):
                if given <= 0:
                    raise ValueError(f"VolumeGrid.spacing_mm[{axis}]: must be > 0 mm, got {given!r}")
                if not math.isclose(given, float(norm), rel_tol=SPACING_RTOL):
                    raise ValueError(
                        f"VolumeGrid.spacing_mm[{axis}]: {given!r} mm does not match the norm of the "
                        f"affine's column {axis} ({float(norm)!r} mm, rel. tolerance {SPACING_RTOL}); "
                        "fix the affine or pass spacing_mm=None to derive it")
        object.__setattr__(self, "affine", rows)
        object.__setattr__(self, "spacing_mm", spacing)

    @property
    def dimension_names(self) -> tuple[str, ...]:
        """Names of the array axes, ``(z, y, x)``."""
        return DIMENSIONS_3D

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel, mm³: ``|det|`` of the affine's 3x3 part."""
        return abs(float(np.linalg.det(np.asarray(self.affine, dtype=np.float64)[:3, :3])))

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """Scanner (R, A, S) position of the centre of voxel (0, 0, 0), mm."""
        return tuple(row[3] for row in self.affine[:3])

    @property
    def is_axis_aligned(self) -> bool:
        """Whether each array axis runs along the scanner axis of its name, in the + direction.

        Array axis z (0) along S (affine row 2), y (1) along A (row 1), x (2) along R (row 0):
        column ``a`` of the affine's 3x3 part is zero except a positive entry in row ``2 - a``.
        Exactly zero, so the OME scale + translation is the affine itself (the scale being the
        spacing, equal to the column norms within SPACING_RTOL). A diagonal affine is *not*
        axis-aligned in this sense: its array axis "z" runs along R.
        """
        for axis in range(3):
            for row in range(3):
                value = self.affine[row][axis]
                if (value <= 0) if row == 2 - axis else (value != 0):
                    return False
        return True

    def level(self, cumulative: tuple[int, ...]) -> VolumeGrid:
        """The grid of an overview level whose voxel covers ``cumulative = (fz, fy, fx)`` voxels
        of this one: ``A_l = A @ [[diag(f), (f - 1) / 2], [0, 1]]``, so level voxel ``i`` has its
        centre at level-0 index ``f*i + (f - 1)/2``, the centre of the block it summarises."""
        f = np.asarray(cumulative, dtype=np.float64)
        step = np.eye(4)
        step[:3, :3] = np.diag(f)
        step[:3, 3] = (f - 1) / 2
        affine = np.asarray(self.affine, dtype=np.float64) @ step
        return VolumeGrid(affine=affine, spacing_mm=tuple(s * k for s, k in zip(self.spacing_mm, cumulative)))

    def _ome_datasets(self, levels: list[tuple[str, tuple[int, ...]]], *, channel: bool) -> list[dict[str, Any]]:
        """The `datasets` of an OME multiscale over `levels` (see `ome_multiscales`); with `channel`
        each transformation has a leading channel entry (scale 1, translation 0)."""
        if self.is_axis_aligned:
            r, a, s = self.origin_mm
            origin = (s, a, r)
        else:
            origin = None
        lead_scale, lead_shift = ([1.0], [0.0]) if channel else ([], [])
        datasets = []
        for path, factors in levels:
            transforms: list[dict[str, Any]] = [
                {"type": "scale", "scale": lead_scale + [sp * f for sp, f in zip(self.spacing_mm, factors)]}]
            if origin is not None or any(f != 1 for f in factors):
                base = origin or (0.0, 0.0, 0.0)
                transforms.append({"type": "translation", "translation": lead_shift + [
                    t + (f - 1) / 2 * sp for t, f, sp in zip(base, factors, self.spacing_mm)]})
            datasets.append({"path": path, "coordinateTransformations": transforms})
        return datasets

    def ome_multiscales(self, levels: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
        """The OME-Zarr 0.5 `ome` object (multiscales only) of the label image `labels/classes`
        whose levels are `levels`, each ``(dataset path relative to it, cumulative factor per
        axis)``, level 0 (factors 1) first.

        Per level: `scale` = spacing_mm x factor; a `translation` to the level's first voxel
        centre, ``t0 + (factor - 1) / 2 x spacing_mm`` per axis, where ``t0`` is the origin as
        (S, A, R) for an axis-aligned affine and 0 otherwise (level 0 of an oblique or flipped
        volume keeps the scale alone, see `ome_attributes`). `type` "mode" names the
        downsampling (pipelines.plan.pyramid).
        """
        return self._ome_multiscale(
            CLASSES, levels, channel=False, resampling=RESAMPLING_MODE,
            description="most frequent class of each 2x2x2 (or 1x2x2 on an already coarse axis) block, "
                        "nodata (255) only where the whole block is nodata, ties to the lowest class id")

    def ome_image_multiscales(self, levels: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
        """The OME-Zarr 0.5 `ome` object of the root image (the input volume, arrays `0`, `1`,
        ...): axes c (type channel) then z, y, x as in `ome_multiscales`; each level's `scale`
        and `translation` are the label level's with a leading 1 and 0 for the channel axis.
        `type` "mean": each level is the mean of the blocks of the level before."""
        return self._ome_multiscale(
            "image", levels, channel=True, resampling=RESAMPLING_MEAN,
            description="mean of each 2x2x2 (or 1x2x2 on an already coarse axis) block per channel, "
                        "accumulated in float64, NaN ignored; integer inputs rounded to the nearest")

    def _ome_multiscale(self, name: str, levels: list[tuple[str, tuple[int, ...]]], *, channel: bool,
                        resampling: str, description: str) -> dict[str, Any]:
        """The `ome` object of one multiscale image: axes (a leading channel axis when `channel`)
        z, y, x in millimeter, `_ome_datasets`, and the downsampling `type` and its description
        when there is more than one level."""
        axes = [{"name": CHANNEL_DIM, "type": "channel"}] if channel else []
        axes += [{"name": n, "type": "space", "unit": OME_SPACE_UNIT} for n in DIMENSIONS_3D]
        multiscale: dict[str, Any] = {"name": name, "axes": axes, "datasets": self._ome_datasets(levels, channel=channel)}
        if len(levels) > 1:
            multiscale.update(type=resampling, metadata={"description": description})
        return {"version": OME_VERSION, "multiscales": [multiscale]}

    def ome_label_attributes(self, levels: list[tuple[str, tuple[int, ...]]],
                             image_label: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `ome` object of the label image `labels/classes`: `ome_multiscales(levels)`, and
        when given `image_label` (`ome_image_label`) with ``source: {"image": "../../"}`` (the
        root image it annotates) added."""
        ome = self.ome_multiscales(levels)
        if image_label is not None:
            ome["image-label"] = {**image_label, "source": {"image": "../../"}}
        return ome

    def ome_attributes(self, dataset_path: str) -> dict[str, Any]:
        """The OME-Zarr 0.5 `ome` object of the label image whose one level is `dataset_path`.

        Axes z, y, x, type space, unit millimeter; physical axis z is scanner S, y is A, x is R.
        The dataset's `coordinateTransformations` are a `scale` (= spacing_mm) and, only when
        the affine is axis-aligned (see `is_axis_aligned`), a `translation` (= the origin as
        (S, A, R)). OME-Zarr 0.5 has no rotation or flip, so an oblique or flipped affine gets
        the scale alone: OME readers then place the volume in index * spacing space, and the
        exact 4x4 affine is only in attrs[TESSERA_ATTR][KEY_AFFINE].
        """
        return self.ome_multiscales([(dataset_path, (1, 1, 1))])

    def tessera_attributes(self) -> dict[str, Any]:
        """The grid's keys inside attrs[TESSERA_ATTR]: the exact affine and the spacing."""
        return {KEY_AFFINE: [list(row) for row in self.affine], KEY_SPACING_MM: list(self.spacing_mm)}

    def group_attributes(self) -> dict[str, Any]:
        """Root group attributes beside TESSERA_ATTR: the OME-Zarr image (the input volume) with
        its level 0 alone (the levels are listed when they are built)."""
        return {OME_ATTR: self.ome_image_multiscales([(image_path(0), (1, 1, 1))])}

    def labels_group_attributes(self) -> dict[str, Any]:
        """Attributes of the `labels` group: the OME-Zarr list of its label images."""
        return {OME_ATTR: {"version": OME_VERSION, "labels": [CLASSES]}}

    def label_group_attributes(self) -> dict[str, Any]:
        """Attributes of `labels/classes` when the store is created: its level 0 alone, no
        `image-label` yet (written with the levels and the card's colours)."""
        return {OME_ATTR: self.ome_label_attributes([("0", (1, 1, 1))])}

    def variable_attributes(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """Attributes of a data array: as given (no CF grid mapping in scanner space)."""
        return dict(attributes)


Grid = GeoGrid | VolumeGrid
