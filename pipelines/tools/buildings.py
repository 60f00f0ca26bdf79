"""Deterministic synthetic scenes of buildings with instance truth, rendered window by window.

A town on a grid of square city blocks (:data:`CELL_PX` px, 128 m at the default 0.5 m per px)
separated by roads. Each block is, from a hash of ``(seed, block)``:

* **dense**: rows of terraced houses at one random orientation per block; the units of a row
  share side walls and rows often stand back to back, so neighbouring buildings TOUCH (no gap
  at all) and are still distinct instances;
* **detached**: houses (rectangles and L-shapes, each at its own orientation) on a jittered
  grid with gardens and trees between them;
* **park**: trees, sometimes one mid-sized building.

Every 3 x 3 group of blocks may hold a **large site** (a strip of 3 x 1, 1 x 3, 3 x 2 or 2 x 3
blocks with no roads inside) holding one very large building, a rectangle or an L, whose long
side exceeds 512 px: larger than a typical chunk of 256-512 px, so it is always cut by chunk
borders.

Buildings are rotated rectangles, or unions of two (L-shapes), in a frame ``(u, v)`` rotated
about an origin; a pixel centre belongs to a part iff ``u0 <= u < u1`` and ``v0 <= v < v1``
(half-open). Terraced units of a row share the row's frame and consecutive intervals, so they
partition the row exactly: each pixel belongs to exactly one of two touching houses.

Roofs have varied colours (concrete, red tiles, dark, metal, green, blue), a darker one-pixel
outline (parapet walls: the only cue separating touching houses of the same colour), gable
shading on some, and cast shadows along the scene's sun direction. Background is grass, bare
soil, trees and asphalt roads. Bands are "reflectance x 10000" uint16 in the order of
:data:`BAND_NAMES` (blue, green, red, nir), with per-pixel noise; no pixel is nodata.

Truth is an instance label image: uint32, 0 background, every building one id, the same id in
every window. Ids are ``block_index * IDS_PER_BLOCK + k + 1`` (not consecutive). There is one
class, :data:`CLASS_NAMES` ``("building",)``.

Everything is a pure function of ``(spec, global row, global col)``: a window gathers the
blocks around it, so any window renders alone, with memory bounded by the window, and equals
the slice of any larger window. :func:`write_building_scene` writes big scenes block by block.
Coordinates are ``(row, col)`` px, pixel ``(r, c)`` has its centre at ``(r + 0.5, c + 0.5)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from pipelines.tools.synthetic import BAND_NAMES, _fbm_grid, _pixel_noise

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("building",)
"""Instance classes; every truth instance is class 1 (``CLASS_NAMES[0]``), 0 is background."""
CELL_PX = 256
"""City block side (px), roads centred on block edges."""
SITE_CELLS = 3
"""Large sites are drawn per group of SITE_CELLS x SITE_CELLS blocks."""
IDS_PER_BLOCK = 4096
"""Id range of one block: ids ``block_index * IDS_PER_BLOCK + 1 .. + IDS_PER_BLOCK - 1``."""
TILE_BLOCK_PX = 512
"""Internal GeoTIFF tile side written by :func:`write_building_scene`."""
LARGE_MIN_SIDE_PX = 513
"""Every large-site building has a longer side (its bounding box) of at least this many px."""

_ROAD_HALF_PX = 6.0
_SETBACK_PX = 4.0  # pavement between road and buildable land
_MAX_SHADOW_PX = 14.0
_TREE_MAX_RADIUS_PX = 7.0
_GATHER_PX = int(_MAX_SHADOW_PX + _TREE_MAX_RADIUS_PX) + 2  # reach of a block's content beyond it

_GRASS = np.array([450.0, 700.0, 620.0, 3000.0], np.float32)
_DRY_GRASS = np.array([700.0, 950.0, 1150.0, 2500.0], np.float32)
_SOIL = np.array([1000.0, 1300.0, 1700.0, 2300.0], np.float32)
_TREE = np.array([300.0, 520.0, 380.0, 3600.0], np.float32)
_ASPHALT = np.array([950.0, 1030.0, 1120.0, 1300.0], np.float32)
_PAVEMENT = np.array([1500.0, 1580.0, 1650.0, 1800.0], np.float32)
_ROOFS = np.array(
    [
        [1950.0, 2050.0, 2150.0, 2350.0],  # light concrete
        [900.0, 1050.0, 1750.0, 2050.0],  # red tiles
        [720.0, 780.0, 840.0, 930.0],  # dark roofing (close to asphalt)
        [1500.0, 1540.0, 1460.0, 1520.0],  # metal
        [800.0, 1150.0, 900.0, 1900.0],  # green roof (moss, sedum)
        [1300.0, 1150.0, 1000.0, 1200.0],  # blue-grey slate
    ],
    np.float32,
)
_ROOF_PROBS = np.array([0.3, 0.3, 0.15, 0.12, 0.05, 0.08])
_SHADOW_FACTOR = np.float32(0.55)
_OUTLINE_FACTOR = np.float32(0.8)
_GABLE_FACTOR = np.float32(0.86)
_NOISE_AMPLITUDE = np.float32(0.05)
_DENSE, _DETACHED, _PARK = 0, 1, 2
_BLOCK_PROBS = np.array([0.45, 0.4, 0.15])


@dataclass(frozen=True)
class BuildingSceneSpec:
    """A synthetic building scene: size, seed, map grid and how many large sites.

    Args:
        height: scene rows (px).
        width: scene columns (px).
        seed: selects the town; any non-negative int.
        pixel_size_m: ground sampling distance (m per px), square pixels.
        crs: coordinate reference system, as rasterio understands it.
        origin_x: map x of the upper-left corner of the upper-left pixel (CRS units).
        origin_y: map y of the upper-left corner of the upper-left pixel (CRS units).
        large_site_probability: chance that a 3 x 3 group of blocks holds a large site with one
            building longer than 512 px (in [0, 1]; 1 gives one in every group that fits).
    """

    height: int
    width: int
    seed: int
    pixel_size_m: float = 0.5
    crs: str = "EPSG:32633"
    origin_x: float = 500000.0
    origin_y: float = 5000000.0
    large_site_probability: float = 0.35

    def __post_init__(self) -> None:
        for name in ("height", "width", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"BuildingSceneSpec.{name} must be an int, got {value!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"BuildingSceneSpec size must be positive, got height={self.height}, width={self.width}")
        if self.seed < 0:
            raise ValueError(f"BuildingSceneSpec.seed must be >= 0, got {self.seed}")
        if not self.pixel_size_m > 0:
            raise ValueError(f"BuildingSceneSpec.pixel_size_m must be > 0 (m per px), got {self.pixel_size_m}")
        if not 0.0 <= self.large_site_probability <= 1.0:
            raise ValueError(
                f"BuildingSceneSpec.large_site_probability must be in [0, 1], got {self.large_site_probability}"
            )
        blocks = math.ceil(self.height / CELL_PX) * math.ceil(self.width / CELL_PX)
        if blocks * IDS_PER_BLOCK >= 2**32:
            raise ValueError(f"BuildingSceneSpec {self.height} x {self.width} px has too many blocks for uint32 ids")

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in px."""
        return (self.height, self.width)

    @property
    def transform(self) -> Affine:
        """Affine from ``(col, row)`` pixel coordinates to map ``(x, y)``; north up."""
        return Affine(self.pixel_size_m, 0.0, self.origin_x, 0.0, -self.pixel_size_m, self.origin_y)

    @property
    def blocks_shape(self) -> tuple[int, int]:
        """City blocks ``(rows, cols)`` covering the scene (the last ones may be cut)."""
        return (math.ceil(self.height / CELL_PX), math.ceil(self.width / CELL_PX))


@dataclass(frozen=True)
class Building:
    """One building: up to two half-open rectangles in a rotated frame.

    Attributes:
        id: its truth instance id (> 0).
        origin: frame origin ``(y, x)`` (px, continuous).
        angle: frame rotation (rad): ``u = dx cos a + dy sin a``, ``v = -dx sin a + dy cos a``
            with ``(dy, dx)`` the offset of a pixel centre from the origin.
        parts: ``((u0, u1, v0, v1), ...)`` px; the building is the union of the parts.
        roof: ``(4,)`` float32 roof reflectance (x 10000).
        gable: shade the half ``v >= (v0 + v1) / 2`` of the first part (a pitched roof).
        shadow_px: length of the cast shadow (px).
    """

    id: int
    origin: tuple[float, float]
    angle: float
    parts: tuple[tuple[float, float, float, float], ...]
    roof: np.ndarray
    gable: bool
    shadow_px: float

    def corners(self) -> np.ndarray:
        """``(4 * len(parts), 2)`` float64 ``(y, x)`` corners of the parts (px)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        out = []
        for u0, u1, v0, v1 in self.parts:
            for u, v in ((u0, v0), (u0, v1), (u1, v0), (u1, v1)):
                out.append((self.origin[0] + u * s + v * c, self.origin[1] + u * c - v * s))
        return np.asarray(out)


@dataclass(frozen=True)
class _Tree:
    y: float
    x: float
    radius: float


def render_building_window(
    spec: BuildingSceneSpec, row0: int, col0: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one window of the scene and its instance truth.

    Args:
        spec: the scene.
        row0: first row of the window (px, 0 <= row0).
        col0: first column of the window (px, 0 <= col0).
        height: window rows (px, >= 1, row0 + height <= spec.height).
        width: window columns (px, >= 1, col0 + width <= spec.width).

    Returns:
        ``(bands, instances)``: bands ``(4, height, width)`` uint16 in :data:`BAND_NAMES` order
        (reflectance x 10000, never 0), instances ``(height, width)`` uint32 ids, 0 background.

    Raises:
        ValueError: the window is empty or leaves the scene (the message names it).
    """
    row0, col0, height, width = int(row0), int(col0), int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"window size must be positive, got height={height}, width={width}")
    if row0 < 0 or col0 < 0 or row0 + height > spec.height or col0 + width > spec.width:
        raise ValueError(
            f"window rows {row0}:{row0 + height}, cols {col0}:{col0 + width} leaves the "
            f"{spec.height} x {spec.width} scene (seed {spec.seed})"
        )
    rows = np.arange(row0, row0 + height, dtype=np.int64)
    cols = np.arange(col0, col0 + width, dtype=np.int64)
    buildings, trees = gather_objects(spec, row0 - _GATHER_PX, col0 - _GATHER_PX,
                                      row0 + height + _GATHER_PX, col0 + width + _GATHER_PX)
    sun = _sun_direction(spec.seed)

    # ---- background: grass / dry grass / soil fields, roads, trees ------------------------
    field = _fbm_grid(spec.seed, "bldg-field", rows, cols, 300.0, 3)
    dryness = np.clip(field * np.float32(2.0) + np.float32(0.5), 0.0, 1.0)[None]
    soil = (_fbm_grid(spec.seed, "bldg-soil", rows, cols, 140.0, 2) > 0.35)[None]
    value = _GRASS[:, None, None] + (_DRY_GRASS - _GRASS)[:, None, None] * dryness
    value = np.where(soil, _SOIL[:, None, None], value)
    road, pavement = _road_masks(spec, rows, cols)
    value = np.where(pavement[None], _PAVEMENT[:, None, None], value)
    value = np.where(road[None], _ASPHALT[:, None, None], value)
    yy = rows[:, None] + 0.5
    xx = cols[None, :] + 0.5
    for tree in trees:
        r0, r1, c0, c1 = _bbox_in_window(tree.y - tree.radius, tree.y + tree.radius, tree.x - tree.radius,
                                         tree.x + tree.radius, row0, col0, height, width)
        if r0 >= r1 or c0 >= c1:
            continue
        d2 = (yy[r0:r1] - tree.y) ** 2 + (xx[:, c0:c1] - tree.x) ** 2
        inside = d2 < tree.radius**2
        shade = np.float32(1.0) - np.float32(0.25) * (d2 / tree.radius**2).astype(np.float32)
        sub = value[:, r0:r1, c0:c1]
        sub[:] = np.where(inside[None], _TREE[:, None, None] * shade[None], sub)

    # ---- buildings: masks, roofs, outlines; then shadows outside them ------------------------
    instances = np.zeros((height, width), np.uint32)
    gain = np.ones((height, width), np.float32)
    shadow = np.zeros((height, width), bool)
    for b in buildings:
        corners = b.corners()
        reach = b.shadow_px
        ys, xs = corners[:, 0], corners[:, 1]
        r0, r1, c0, c1 = _bbox_in_window(ys.min() - reach - 1, ys.max() + reach + 1, xs.min() - reach - 1,
                                         xs.max() + reach + 1, row0, col0, height, width)
        if r0 >= r1 or c0 >= c1:
            continue
        y = yy[r0:r1]
        x = xx[:, c0:c1]
        inside, deep, upper_half = _building_masks(b, y, x)
        cast, _, _ = _building_masks(b, y - sun[0] * b.shadow_px, x - sun[1] * b.shadow_px)
        shadow[r0:r1, c0:c1] |= cast
        if not inside.any():
            continue
        instances[r0:r1, c0:c1][inside] = b.id
        sub = value[:, r0:r1, c0:c1]
        sub[:] = np.where(inside[None], b.roof[:, None, None], sub)
        g = gain[r0:r1, c0:c1]
        g[inside & ~deep] = _OUTLINE_FACTOR
        if b.gable:
            g[inside & deep & upper_half] = _GABLE_FACTOR
    shadow &= instances == 0
    gain[shadow] *= _SHADOW_FACTOR

    texture = _fbm_grid(spec.seed, "bldg-texture", rows, cols, 3.0, 2)
    gain *= np.float32(1.0) + np.float32(0.06) * texture
    noise = _pixel_noise(spec.seed, rows, cols)
    bands = np.empty((len(BAND_NAMES), height, width), np.uint16)
    for k in range(len(BAND_NAMES)):
        v = value[k] * gain * (np.float32(1.0) + _NOISE_AMPLITUDE * noise[k])
        np.clip(v, 1.0, 65535.0, out=v)
        bands[k] = v.astype(np.uint16)
    return bands, instances


def write_building_scene(
    spec: BuildingSceneSpec, image_path: str | Path, truth_path: str | Path | None = None, *, block: int = 1024
) -> None:
    """Render the scene block by block into a tiled GeoTIFF (and optionally its instance truth).

    Memory is bounded by one block (about ``80 * block**2`` bytes), whatever the scene size.

    Args:
        spec: the scene.
        image_path: output GeoTIFF: 4 bands uint16 (:data:`BAND_NAMES` as descriptions), no
            nodata, 512 x 512 deflate tiles, BigTIFF when needed, spec's CRS and transform.
        truth_path: optional output GeoTIFF of the instance ids: 1 band uint32, 0 background,
            same grid; tagged with the class names (every instance is class 1, "building").
        block: rows and columns rendered at a time (px); a positive multiple of 512.

    Raises:
        ValueError: ``block`` is not a positive multiple of 512.
    """
    import rasterio
    from rasterio.windows import Window

    if block < TILE_BLOCK_PX or block % TILE_BLOCK_PX:
        raise ValueError(f"block must be a positive multiple of {TILE_BLOCK_PX} px, got {block}")
    common = dict(
        driver="GTiff", height=spec.height, width=spec.width, crs=spec.crs, transform=spec.transform, tiled=True,
        blockxsize=TILE_BLOCK_PX, blockysize=TILE_BLOCK_PX, compress="deflate", zlevel=1, predictor=2,
        bigtiff="IF_SAFER",
    )
    tags = dict(generator="pipelines.tools.buildings", seed=str(spec.seed), classes=",".join(CLASS_NAMES),
                large_site_probability=str(spec.large_site_probability))
    image = rasterio.open(image_path, "w", count=len(BAND_NAMES), dtype="uint16", interleave="pixel", **common)
    truth = None
    try:
        image.descriptions = BAND_NAMES
        image.update_tags(**tags)
        if truth_path is not None:
            truth = rasterio.open(truth_path, "w", count=1, dtype="uint32", **common)
            truth.descriptions = ("instance",)
            truth.update_tags(**tags)
        for row0 in range(0, spec.height, block):
            for col0 in range(0, spec.width, block):
                h = min(block, spec.height - row0)
                w = min(block, spec.width - col0)
                bands, ids = render_building_window(spec, row0, col0, h, w)
                window = Window(col0, row0, w, h)
                image.write(bands, window=window)
                if truth is not None:
                    truth.write(ids, 1, window=window)
    finally:
        image.close()
        if truth is not None:
            truth.close()
    logger.info("wrote %d x %d building scene (seed %d) to %s", spec.height, spec.width, spec.seed, image_path)


def ensure_building_scene(folder: str | Path, spec: BuildingSceneSpec, *, name: str = "buildings") -> tuple[Path, Path]:
    """Write ``<name>.tif`` and its truth ``<name>.truth.tif`` into ``folder`` once; reused while
    the stamp ``<name>.json`` records the same spec (a demo's inputs, generated on first use).

    Returns:
        ``(image_path, truth_path)``.
    """
    import json
    from dataclasses import asdict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image, truth, stamp = folder / f"{name}.tif", folder / f"{name}.truth.tif", folder / f"{name}.json"
    wanted = json.loads(json.dumps(asdict(spec)))
    if not (image.is_file() and truth.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        write_building_scene(spec, image, truth)
        stamp.write_text(json.dumps(wanted))
    return image, truth


# =========================================================================================
# layout: blocks, large sites, buildings, trees
# =========================================================================================


def gather_objects(
    spec: BuildingSceneSpec, r_lo: float, c_lo: float, r_hi: float, c_hi: float
) -> tuple[list[Building], list[_Tree]]:
    """Buildings and trees of every block (and large site) touching rows ``[r_lo, r_hi)`` and
    columns ``[c_lo, c_hi)`` (px), in a fixed order (block by block, row-major)."""
    n_rows, n_cols = spec.blocks_shape
    b_r0, b_r1 = max(0, int(r_lo // CELL_PX)), min(n_rows, int(math.ceil(r_hi / CELL_PX)))
    b_c0, b_c1 = max(0, int(c_lo // CELL_PX)), min(n_cols, int(math.ceil(c_hi / CELL_PX)))
    buildings: list[Building] = []
    trees: list[_Tree] = []
    done_sites: set[tuple[int, int]] = set()
    for by in range(b_r0, b_r1):
        for bx in range(b_c0, b_c1):
            site = large_site(spec, by // SITE_CELLS, bx // SITE_CELLS)
            if site is not None and site[0] <= by < site[1] and site[2] <= bx < site[3]:
                if (site[0], site[2]) not in done_sites:
                    done_sites.add((site[0], site[2]))
                    buildings.extend(_large_building(spec, site))
                continue
            block_buildings, block_trees = _block_objects(spec, by, bx)
            buildings.extend(block_buildings)
            trees.extend(block_trees)
    return buildings, trees


def large_site(spec: BuildingSceneSpec, gy: int, gx: int) -> tuple[int, int, int, int] | None:
    """The large site of block group ``(gy, gx)`` as block ranges ``(by0, by1, bx0, bx1)``
    (half-open), or None. Sites lie wholly inside the scene's blocks."""
    rng = _rng(spec.seed, "site", gy, gx)
    if rng.random() >= spec.large_site_probability:
        return None
    n_rows, n_cols = spec.blocks_shape
    shapes = [(1, 3), (3, 1), (2, 3), (3, 2)]
    order = rng.permutation(len(shapes))
    for i in order:
        h, w = shapes[i]
        oy = int(rng.integers(0, SITE_CELLS - h + 1))
        ox = int(rng.integers(0, SITE_CELLS - w + 1))
        by0, bx0 = gy * SITE_CELLS + oy, gx * SITE_CELLS + ox
        if by0 + h <= n_rows and bx0 + w <= n_cols:
            return (by0, by0 + h, bx0, bx0 + w)
    return None


def _rng(seed: int, layer: str, *cell: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"tessera-buildings:{seed}:{layer}".encode(), digest_size=8).digest()
    return np.random.default_rng([int.from_bytes(digest, "little"), *[int(c) for c in cell]])


def _sun_direction(seed: int) -> tuple[float, float]:
    """Unit ``(dy, dx)`` in which shadows fall (away from the sun), per scene."""
    angle = math.radians(20.0 + 50.0 * _rng(seed, "sun").random())  # towards the lower right
    return (math.sin(angle), math.cos(angle))


def _roof(rng: np.random.Generator) -> np.ndarray:
    base = _ROOFS[int(rng.choice(len(_ROOFS), p=_ROOF_PROBS))]
    return (base * np.float32(rng.uniform(0.85, 1.15)) * rng.uniform(0.95, 1.05, 4)).astype(np.float32)


def _fits(b: Building, lo_y: float, hi_y: float, lo_x: float, hi_x: float) -> bool:
    corners = b.corners()
    return bool((corners[:, 0] >= lo_y).all() and (corners[:, 0] <= hi_y).all()
                and (corners[:, 1] >= lo_x).all() and (corners[:, 1] <= hi_x).all())


def _block_objects(spec: BuildingSceneSpec, by: int, bx: int) -> tuple[list[Building], list[_Tree]]:
    """The buildings (ids of this block) and trees of one ordinary city block."""
    rng = _rng(spec.seed, "block", by, bx)
    kind = int(rng.choice(3, p=_BLOCK_PROBS))
    margin = _ROAD_HALF_PX + _SETBACK_PX
    lo_y, hi_y = by * CELL_PX + margin, (by + 1) * CELL_PX - margin
    lo_x, hi_x = bx * CELL_PX + margin, (bx + 1) * CELL_PX - margin
    centre = ((lo_y + hi_y) / 2.0, (lo_x + hi_x) / 2.0)
    first_id = (by * spec.blocks_shape[1] + bx) * IDS_PER_BLOCK + 1
    buildings: list[Building] = []
    trees: list[_Tree] = []

    def add(origin, angle, parts, roof, gable, shadow_px) -> bool:
        if len(buildings) >= IDS_PER_BLOCK - 1:
            return False
        b = Building(first_id + len(buildings), origin, angle, tuple(parts), roof, gable, shadow_px)
        if _fits(b, lo_y, hi_y, lo_x, hi_x):
            buildings.append(b)
            return True
        return False

    reach = CELL_PX * 0.75
    if kind == _DENSE:
        aligned = rng.random() < 0.5
        angle = (rng.integers(0, 2) * math.pi / 2 + rng.normal(0.0, 0.03)) if aligned else rng.uniform(0, math.pi)
        v = -reach
        while v < reach:
            row_groups = 2 if rng.random() < 0.6 else 1  # back to back: rows share their rear wall
            for _ in range(row_groups):
                depth = float(rng.uniform(16.0, 26.0))
                gable = rng.random() < 0.6
                shadow_px = float(rng.uniform(3.0, 6.0))
                u = -reach + float(rng.uniform(0.0, 20.0))
                roof = _roof(rng)
                while u < reach:
                    w = float(rng.uniform(9.0, 20.0))
                    if rng.random() < 0.5:
                        roof = _roof(rng)  # otherwise the neighbour has the same roof colour
                    add(centre, angle, [(u, u + w, v, v + depth)], roof, gable, shadow_px)
                    u += w
                    if rng.random() < 0.12:
                        u += float(rng.uniform(4.0, 12.0))  # a passage between terraces
                v += depth
            v += float(rng.uniform(8.0, 18.0))
        for _ in range(int(rng.integers(0, 6))):
            trees.append(_Tree(float(rng.uniform(lo_y, hi_y)), float(rng.uniform(lo_x, hi_x)),
                               float(rng.uniform(3.0, 5.0))))
    elif kind == _DETACHED:
        angle = rng.uniform(0, math.pi)
        spacing = float(rng.uniform(42.0, 56.0))
        c, s = math.cos(angle), math.sin(angle)
        steps = np.arange(-reach, reach, spacing)
        for gv in steps:
            for gu in steps:
                oy = centre[0] + gu * s + gv * c
                ox = centre[1] + gu * c - gv * s
                if not (lo_y <= oy <= hi_y and lo_x <= ox <= hi_x):
                    continue
                if rng.random() < 0.8:
                    half = spacing / 2.0 - 3.0
                    a = float(rng.uniform(12.0, 30.0))
                    b_ = float(rng.uniform(12.0, 22.0))
                    parts = [(-a / 2, a / 2, -b_ / 2, b_ / 2)]
                    if rng.random() < 0.35:  # L: a wing at one end
                        wing_w = float(rng.uniform(6.0, max(6.0, a / 2)))
                        wing_len = float(rng.uniform(6.0, 14.0))
                        parts.append((a / 2 - wing_w, a / 2, b_ / 2 - 3.0, b_ / 2 + wing_len))  # overlap: no seam
                    # shrink until the half-diagonal fits the slot: houses never overlap
                    extent = max(math.hypot(max(abs(p[0]), abs(p[1])), max(abs(p[2]), abs(p[3]))) for p in parts)
                    scale = min(1.0, half / extent)
                    parts = [tuple(q * scale for q in p) for p in parts]
                    slack = max(0.0, half - extent * scale)
                    jy, jx = rng.uniform(-slack, slack, 2) / math.sqrt(2.0)
                    own = angle + float(rng.choice([0.0, math.pi / 2])) + float(rng.normal(0.0, 0.15))
                    add((oy + jy, ox + jx), own, parts, _roof(rng), bool(rng.random() < 0.5),
                        float(rng.uniform(3.0, 6.0)))
                else:
                    trees.append(_Tree(oy, ox, float(rng.uniform(4.0, _TREE_MAX_RADIUS_PX))))
        for _ in range(int(rng.integers(5, 20))):
            trees.append(_Tree(float(rng.uniform(lo_y, hi_y)), float(rng.uniform(lo_x, hi_x)),
                               float(rng.uniform(3.0, 6.0))))
    else:  # park
        for _ in range(int(rng.integers(20, 60))):
            trees.append(_Tree(float(rng.uniform(lo_y, hi_y)), float(rng.uniform(lo_x, hi_x)),
                               float(rng.uniform(3.0, _TREE_MAX_RADIUS_PX))))
        if rng.random() < 0.4:
            a, b_ = float(rng.uniform(40.0, 110.0)), float(rng.uniform(30.0, 70.0))
            add(centre, float(rng.uniform(0, math.pi)), [(-a / 2, a / 2, -b_ / 2, b_ / 2)], _roof(rng),
                False, float(rng.uniform(6.0, 10.0)))
    # trees never stand on buildings: drop those whose centre a building covers
    if buildings and trees:
        keep = []
        for t in trees:
            ty, tx = np.array([[t.y]]), np.array([[t.x]])
            if not any(_building_masks(b, ty, tx)[0][0, 0] for b in buildings):
                keep.append(t)
        trees = keep
    return buildings, trees


def _large_building(spec: BuildingSceneSpec, site: tuple[int, int, int, int]) -> list[Building]:
    """The one large building of a site: a slightly rotated rectangle or L, long side > 512 px."""
    by0, by1, bx0, bx1 = site
    rng = _rng(spec.seed, "large", by0, bx0)
    margin = _ROAD_HALF_PX + _SETBACK_PX
    lo_y, hi_y = by0 * CELL_PX + margin, by1 * CELL_PX - margin
    lo_x, hi_x = bx0 * CELL_PX + margin, bx1 * CELL_PX - margin
    centre = ((lo_y + hi_y) / 2.0, (lo_x + hi_x) / 2.0)
    horizontal = (hi_x - lo_x) >= (hi_y - lo_y)
    long_side, short_side = (hi_x - lo_x, hi_y - lo_y) if horizontal else (hi_y - lo_y, hi_x - lo_x)
    angle = float(rng.uniform(-0.05, 0.05)) + (0.0 if horizontal else math.pi / 2)
    length = float(rng.uniform(0.78, 0.92)) * long_side
    depth = float(rng.uniform(0.35, 0.7)) * short_side
    parts = [(-length / 2, length / 2, -depth / 2, depth / 2)]
    wing_len = min(float(rng.uniform(0.15, 0.25)) * short_side, (short_side - depth) / 2 - 8.0)
    if rng.random() < 0.5 and wing_len >= 8.0:  # L: a wing along the short side at one end
        wing_w = float(rng.uniform(0.15, 0.3)) * length
        parts.append((length / 2 - wing_w, length / 2, depth / 2 - 3.0, depth / 2 + wing_len))
    first_id = (by0 * spec.blocks_shape[1] + bx0) * IDS_PER_BLOCK + 1
    roof, shadow_px = _roof(rng), float(rng.uniform(8.0, _MAX_SHADOW_PX))
    for _ in range(60):  # make it shallower (never shorter) until the rotated shape stays on the site
        b = Building(first_id, centre, angle, tuple(parts), roof, False, shadow_px)
        if _fits(b, lo_y, hi_y, lo_x, hi_x):
            return [b]
        parts = [(u0, u1, v0 * 0.97, v1 * 0.97) for u0, u1, v0, v1 in parts]
    raise RuntimeError(f"large building of site {site} (seed {spec.seed}) does not fit")  # pragma: no cover


# =========================================================================================
# rasterising
# =========================================================================================


def _building_masks(b: Building, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixel centres ``(y, x)`` (broadcast): inside the building; deep inside (>= 1 px from
    every edge of some part: not on the outline); in the gable's shaded half of part 0."""
    c, s = math.cos(b.angle), math.sin(b.angle)
    dy, dx = y - b.origin[0], x - b.origin[1]
    u = dx * c + dy * s
    v = -dx * s + dy * c
    inside = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)), bool)
    deep = np.zeros_like(inside)
    for u0, u1, v0, v1 in b.parts:
        inside |= (u >= u0) & (u < u1) & (v >= v0) & (v < v1)
        deep |= (u >= u0 + 1.0) & (u < u1 - 1.0) & (v >= v0 + 1.0) & (v < v1 - 1.0)
    u0, u1, v0, v1 = b.parts[0]
    upper = v >= (v0 + v1) / 2.0
    return inside, deep, upper


def _bbox_in_window(y_lo: float, y_hi: float, x_lo: float, x_hi: float, row0: int, col0: int,
                    height: int, width: int) -> tuple[int, int, int, int]:
    """Window-relative row and column ranges covering a bounding box (px), clipped."""
    r0 = max(0, int(math.floor(y_lo)) - row0)
    r1 = min(height, int(math.ceil(y_hi)) + 1 - row0)
    c0 = max(0, int(math.floor(x_lo)) - col0)
    c1 = min(width, int(math.ceil(x_hi)) + 1 - col0)
    return r0, r1, c0, c1


def _road_masks(spec: BuildingSceneSpec, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Asphalt and pavement masks ``(h, w)`` bool: roads along block edges, none inside sites."""
    def edge_distance(coords: np.ndarray) -> np.ndarray:
        centre = (coords + 0.5) % CELL_PX
        return np.minimum(centre, CELL_PX - centre)

    dist = np.minimum(edge_distance(rows)[:, None], edge_distance(cols)[None, :])
    road = dist < _ROAD_HALF_PX
    pavement = (dist < _ROAD_HALF_PX + _SETBACK_PX * 0.5) & ~road
    # inside a large site the block edges are no roads
    g_r0, g_r1 = int(rows[0]) // (CELL_PX * SITE_CELLS), int(rows[-1]) // (CELL_PX * SITE_CELLS) + 1
    g_c0, g_c1 = int(cols[0]) // (CELL_PX * SITE_CELLS), int(cols[-1]) // (CELL_PX * SITE_CELLS) + 1
    for gy in range(g_r0, g_r1):
        for gx in range(g_c0, g_c1):
            site = large_site(spec, gy, gx)
            if site is None:
                continue
            by0, by1, bx0, bx1 = site
            yc, xc = rows + 0.5, cols + 0.5
            m = _ROAD_HALF_PX + _SETBACK_PX * 0.5
            in_rows = (yc >= by0 * CELL_PX + m) & (yc < by1 * CELL_PX - m)
            in_cols = (xc >= bx0 * CELL_PX + m) & (xc < bx1 * CELL_PX - m)
            inner = in_rows[:, None] & in_cols[None, :]
            road &= ~inner
            pavement &= ~inner
    return road, pavement
