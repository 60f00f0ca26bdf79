"""Deterministic synthetic multispectral scenes, rendered window by window.

Every pixel is a pure function of ``(spec, global row, global col)``: smooth fields come from
hashed coarse lattices interpolated at the window's coordinates, roads and buildings from
hashed per-cell objects that each window looks up around itself. So any window renders on
its own, with memory bounded by the window, and two windows agree exactly with the slice of
their union. A 32768 x 32768 scene is written block by block by :func:`write_scene`.

The landscape has five classes (:data:`CLASS_NAMES`): lakes and rivers, vegetation parcels,
bare soil (brown to grey), a road network (a jittered major grid plus denser streets in urban
areas, 3-8 px wide) and buildings (rotated rectangles, 6-30 px, mostly beside roads and
aligned with them, with varied roofs and cast shadows). Spectra are "reflectance x 10000"
uint16 values in four bands (:data:`BAND_NAMES`) with per-pixel noise, texture, illumination
and haze, so that classes overlap in every single band and some pairs (asphalt and grey soil,
concrete roads and light roofs, dark roofs and asphalt) need spatial context to separate.

The valid footprint is a rotated rectangle inset from the scene edges, like a satellite scene
in its map grid; outside it every band is 0 (:data:`NODATA_VALUE`) and the label is
:data:`NODATA_CLASS`. Inside it no band is ever 0.

Coordinates are ``(row, col)`` in pixels, row 0 at the top; pixel ``(r, c)`` has its centre at
``(r + 0.5, c + 0.5)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from schemas.store import NODATA_CLASS

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("water", "vegetation", "road", "building", "bare")
"""Class names; the class id is the index (0..4)."""
WATER, VEGETATION, ROAD, BUILDING, BARE = range(5)
# labels outside the valid footprint are NODATA_CLASS (schemas.store), as in every output
BAND_NAMES: tuple[str, ...] = ("blue", "green", "red", "nir")
"""Band names in file order; values are reflectance x 10000 (uint16)."""
NODATA_VALUE = 0
"""Band value outside the valid footprint (never used inside it)."""
TILE_BLOCK_PX = 512
"""Internal GeoTIFF tile side written by :func:`write_scene`."""

# ---- landscape parameters (pixels) -------------------------------------------------------
_LAKE_SCALE, _LAKE_THRESHOLD = 700.0, 0.33
_RIVER_SCALE, _RIVER_HALF_WIDTH = 900.0, 0.011
_RIVER_PRESENCE_SCALE = 2600.0
_POND_SCALE, _POND_THRESHOLD = 160.0, 0.62
_COVER_SCALE, _COVER_THRESHOLD = 320.0, -0.02
_URBAN_SCALE, _URBAN_THRESHOLD = 1000.0, -0.05
_SOIL_SCALE = 420.0
_SEDIMENT_SCALE = 350.0
_ILLUM_SCALE = 1800.0
_HAZE_SCALE = 2600.0
_PARCEL_PX = 96
_MAJOR_CELL_PX = 384
_STREET_CELL_PX = 112
_BUILDING_CELL_PX = 32
_BUILDING_REACH_PX = 24  # > half-diagonal of the largest building (30 x 30 -> 21.2)
_ROAD_CLEARANCE_CAP_PX = 64.0  # clearances above this are only "far"; keeps windows consistent
_ROAD_GATHER_MARGIN_PX = 128  # > building reach + clearance cap + road half width
_SHADOW_OFFSET_PX = 2

# ---- spectra: reflectance x 10000, bands (blue, green, red, nir) -------------------------
_WATER_CLEAR = np.array([700.0, 620.0, 380.0, 160.0], np.float32)
_WATER_SEDIMENT = np.array([260.0, 330.0, 300.0, 110.0], np.float32)  # x sediment in [0, 1]
_VEG_BASE = np.array([480.0, 760.0, 1000.0, 350.0], np.float32)  # + vigour * _VEG_VIGOUR
_VEG_VIGOUR = np.array([-150.0, 0.0, -650.0, 3300.0], np.float32)  # vigour in [0.5, 1.15]
_SOIL_BROWN = np.array([1000.0, 1320.0, 1750.0, 2350.0], np.float32)
_SOIL_GREY = np.array([1180.0, 1280.0, 1380.0, 1600.0], np.float32)
_ROAD_ASPHALT = np.array([980.0, 1060.0, 1150.0, 1330.0], np.float32)
_ROAD_CONCRETE = np.array([1500.0, 1600.0, 1700.0, 1880.0], np.float32)
_ROOFS = np.array(
    [
        [1950.0, 2050.0, 2150.0, 2350.0],  # light concrete (close to concrete roads)
        [900.0, 1050.0, 1750.0, 2050.0],  # red tiles (close to brown soil in red/nir)
        [720.0, 780.0, 840.0, 930.0],  # dark roofing (close to asphalt)
        [1500.0, 1540.0, 1460.0, 1520.0],  # metal
    ],
    np.float32,
)
_ROOF_PROBS = np.array([0.35, 0.3, 0.2, 0.15])
_HAZE = np.array([180.0, 120.0, 60.0, 0.0], np.float32)  # x haze in [0, 1]
_TEXTURE_AMPLITUDE = np.array([0.03, 0.14, 0.03, 0.05, 0.11], np.float32)  # per class id
_NOISE_AMPLITUDE = np.float32(0.07)  # triangular per-band multiplicative noise, std ~2.9 %
_SHADOW_FACTOR = np.float32(0.62)


@dataclass(frozen=True)
class SceneSpec:
    """A synthetic scene: its size, seed and map grid.

    Args:
        height: scene rows (px).
        width: scene columns (px).
        seed: selects the landscape; any non-negative int.
        pixel_size_m: ground sampling distance (m per px), square pixels.
        crs: coordinate reference system, as rasterio understands it.
        origin_x: map x of the upper-left corner of the upper-left pixel (CRS units).
        origin_y: map y of the upper-left corner of the upper-left pixel (CRS units).
        footprint: if True, pixels outside a rotated, inset rectangle are nodata; if False the
            whole scene is valid.
        footprint_inset: margin between the footprint's bounding box and the scene edges, as
            a fraction of each side (0 <= inset < 0.45).
        footprint_angle_deg: footprint tilt (degrees, counter-clockwise as seen on the map);
            None picks +-8..12 degrees from the seed. Reduced for very elongated scenes where
            the tilted rectangle would not fit (see :meth:`footprint_geometry`).
    """

    height: int
    width: int
    seed: int
    pixel_size_m: float = 10.0
    crs: str = "EPSG:32633"
    origin_x: float = 500000.0
    origin_y: float = 5000000.0
    footprint: bool = True
    footprint_inset: float = 0.03
    footprint_angle_deg: float | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"SceneSpec.{name} must be an int, got {value!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"SceneSpec size must be positive, got height={self.height}, width={self.width}")
        if self.seed < 0:
            raise ValueError(f"SceneSpec.seed must be >= 0, got {self.seed}")
        if not self.pixel_size_m > 0:
            raise ValueError(f"SceneSpec.pixel_size_m must be > 0 (m per px), got {self.pixel_size_m}")
        if not 0.0 <= self.footprint_inset < 0.45:
            raise ValueError(f"SceneSpec.footprint_inset must be in [0, 0.45), got {self.footprint_inset}")
        if self.footprint_angle_deg is not None and not -45.0 < self.footprint_angle_deg < 45.0:
            raise ValueError(
                f"SceneSpec.footprint_angle_deg must be in (-45, 45) degrees, got {self.footprint_angle_deg}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in px."""
        return (self.height, self.width)

    @property
    def transform(self) -> Affine:
        """Affine from ``(col, row)`` pixel coordinates to map ``(x, y)``; north up."""
        return scene_transform(self)

    def footprint_geometry(self) -> tuple[float, float, float, float, float]:
        """The valid footprint as a rotated rectangle.

        Returns:
            ``(center_row, center_col, half_height, half_width, angle_rad)`` in px and radians.
            A pixel centre ``(y, x)`` is valid iff, with ``dy, dx`` its offset from the centre,
            ``|dx cos a - dy sin a| <= half_width`` and ``|dx sin a + dy cos a| <= half_height``.
        """
        cy, cx = self.height / 2.0, self.width / 2.0
        box_h = self.height * (1.0 - 2.0 * self.footprint_inset)
        box_w = self.width * (1.0 - 2.0 * self.footprint_inset)
        if self.footprint_angle_deg is None:
            u_angle, u_sign = _hash_floats(self.seed, "footprint", 2)
            angle_deg = (8.0 + 4.0 * u_angle) * (1.0 if u_sign < 0.5 else -1.0)
        else:
            angle_deg = float(self.footprint_angle_deg)
        # Largest tilt <= the requested one for which the rectangle keeps >= half its box.
        magnitude = abs(angle_deg)
        while True:
            a = math.radians(magnitude)
            c, s = math.cos(a), math.sin(a)
            det = c * c - s * s
            rect_w = (c * box_w - s * box_h) / det
            rect_h = (c * box_h - s * box_w) / det
            if magnitude <= 0.0 or (rect_w >= 0.5 * box_w and rect_h >= 0.5 * box_h):
                break
            magnitude = max(0.0, magnitude - 0.5)
        angle = math.copysign(math.radians(magnitude), angle_deg)
        return cy, cx, rect_h / 2.0, rect_w / 2.0, angle


def scene_transform(spec: SceneSpec) -> Affine:
    """The scene's affine: ``(x, y) = transform * (col, row)``, north up, square pixels."""
    return Affine(spec.pixel_size_m, 0.0, spec.origin_x, 0.0, -spec.pixel_size_m, spec.origin_y)


def render_window(spec: SceneSpec, row0: int, col0: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one window of the scene.

    Args:
        spec: the scene.
        row0: first row of the window (px, 0 <= row0).
        col0: first column of the window (px, 0 <= col0).
        height: window rows (px, >= 1, row0 + height <= spec.height).
        width: window columns (px, >= 1, col0 + width <= spec.width).

    Returns:
        ``(bands, labels)``: bands ``(4, height, width)`` uint16 in :data:`BAND_NAMES` order
        (reflectance x 10000; 0 exactly where nodata), labels ``(height, width)`` uint8 class
        ids 0..4, :data:`NODATA_CLASS` outside the footprint.

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
    seed = spec.seed

    # ---- smooth fields -> water, vegetation, soil --------------------------------------
    water = _fbm_grid(seed, "lake", rows, cols, _LAKE_SCALE, 4) > _LAKE_THRESHOLD
    river = np.abs(_fbm_grid(seed, "river", rows, cols, _RIVER_SCALE, 3))
    presence = _fbm_grid(seed, "river_presence", rows, cols, _RIVER_PRESENCE_SCALE, 2)
    presence = np.clip(presence * np.float32(4.0) + np.float32(0.8), 0.0, 1.0)
    water |= river < presence * np.float32(_RIVER_HALF_WIDTH)
    del river, presence
    water |= _fbm_grid(seed, "pond", rows, cols, _POND_SCALE, 2) > _POND_THRESHOLD
    vegetation = _fbm_grid(seed, "cover", rows, cols, _COVER_SCALE, 5) > _COVER_THRESHOLD

    # ---- roads and buildings -------------------------------------------------------------
    segments = _road_segments(
        seed,
        row0 - _ROAD_GATHER_MARGIN_PX,
        row0 + height + _ROAD_GATHER_MARGIN_PX,
        col0 - _ROAD_GATHER_MARGIN_PX,
        col0 + width + _ROAD_GATHER_MARGIN_PX,
    )
    road, road_colour = _rasterize_roads(segments, row0, col0, height, width)
    pad = _SHADOW_OFFSET_PX
    buildings = _buildings(seed, segments, row0, col0, height, width)
    building_padded, roof_padded = _rasterize_buildings(buildings, row0 - pad, col0 - pad, height + pad, width + pad)
    # Roads stay continuous where a building corner touches one. Shadows come from the
    # unclipped mask: the margin rows and columns know nothing of roads outside the window.
    building = building_padded[pad:, pad:] & ~road
    roof_colour = roof_padded[:, pad:, pad:]
    shadow = building_padded[:-pad, :-pad] & ~building

    # ---- labels --------------------------------------------------------------------------
    labels = np.where(vegetation, np.uint8(VEGETATION), np.uint8(BARE))
    labels[water] = WATER
    labels[road] = ROAD
    labels[building] = BUILDING
    valid = _footprint_mask(spec, rows, cols)
    labels[~valid] = NODATA_CLASS

    # ---- spectra ---------------------------------------------------------------------------
    soil = _fbm_grid(seed, "soil", rows, cols, _SOIL_SCALE, 2)
    grey = np.clip(soil * np.float32(2.5) + np.float32(0.35), 0.0, 1.0)
    del soil
    vigour = _parcel_values(seed, "vigour", rows, cols, _PARCEL_PX, 0.5, 1.15)
    sediment = _fbm_grid(seed, "sediment", rows, cols, _SEDIMENT_SCALE, 2)
    sediment = np.clip(sediment * np.float32(1.5) + np.float32(0.45), 0.0, 1.0)

    illumination = _fbm_grid(seed, "illumination", rows, cols, _ILLUM_SCALE, 2)
    texture = _fbm_grid(seed, "texture", rows, cols, 2.5, 2)
    class_for_texture = np.where(valid, labels, np.uint8(BARE))
    gain = np.float32(1.0) + _TEXTURE_AMPLITUDE[class_for_texture] * texture
    gain *= np.float32(1.0) + np.float32(0.3) * illumination
    gain[shadow] *= _SHADOW_FACTOR
    del texture, illumination, class_for_texture
    haze = _fbm_grid(seed, "haze", rows, cols, _HAZE_SCALE, 2)
    haze = np.clip(haze * np.float32(1.5) + np.float32(0.5), 0.0, 1.0)
    noise = _pixel_noise(seed, rows, cols)

    bands = np.empty((len(BAND_NAMES), height, width), np.uint16)
    for b in range(len(BAND_NAMES)):
        bare_b = _SOIL_BROWN[b] + (_SOIL_GREY[b] - _SOIL_BROWN[b]) * grey
        veg_b = _VEG_BASE[b] + _VEG_VIGOUR[b] * vigour
        water_b = _WATER_CLEAR[b] + _WATER_SEDIMENT[b] * sediment
        value = np.where(vegetation, veg_b, bare_b)
        del bare_b, veg_b
        value = np.where(water, water_b, value)
        value = np.where(road, road_colour[b], value)
        value = np.where(building, roof_colour[b], value)
        value *= gain
        value *= np.float32(1.0) + _NOISE_AMPLITUDE * noise[b]
        value += _HAZE[b] * haze
        np.clip(value, 1.0, 65535.0, out=value)
        bands[b] = value.astype(np.uint16)
    bands[:, ~valid] = NODATA_VALUE
    return bands, labels


def write_scene(
    spec: SceneSpec,
    image_path: str | Path,
    truth_path: str | Path | None = None,
    *,
    block: int = 1024,
) -> None:
    """Render the scene block by block into a tiled GeoTIFF (and optionally its truth).

    Memory is bounded by one block (about ``110 * block**2`` bytes), whatever the scene size.

    Args:
        spec: the scene.
        image_path: output GeoTIFF: 4 bands uint16 (:data:`BAND_NAMES` as descriptions),
            nodata 0, 512 x 512 deflate tiles, BigTIFF when needed, spec's CRS and transform.
        truth_path: optional output GeoTIFF of the labels: 1 band uint8, nodata 255, same grid.
        block: rows and columns rendered at a time (px); a positive multiple of 512.

    Raises:
        ValueError: ``block`` is not a positive multiple of 512.
    """

    if block < TILE_BLOCK_PX or block % TILE_BLOCK_PX:
        raise ValueError(f"block must be a positive multiple of {TILE_BLOCK_PX} px, got {block}")
    tags = dict(generator="pipelines.tools.synthetic", seed=str(spec.seed), classes=",".join(CLASS_NAMES))
    write_scene_blocks(spec, image_path, truth_path, render=render_window, band_names=BAND_NAMES, tags=tags,
                       image_nodata=NODATA_VALUE, truth_dtype="uint8", truth_nodata=NODATA_CLASS,
                       truth_description="class", block=block)
    logger.info("wrote %d x %d synthetic scene (seed %d) to %s", spec.height, spec.width, spec.seed, image_path)


# =========================================================================================
# hashing and noise
# =========================================================================================


def _layer_key(seed: int, layer: str) -> np.uint32:
    """A 32-bit key for one named random layer of one seed."""
    digest = hashlib.blake2b(f"tessera-synthetic:{seed}:{layer}".encode(), digest_size=4).digest()
    return np.uint32(int.from_bytes(digest, "little"))


def _hash_floats(seed: int, layer: str, count: int) -> tuple[float, ...]:
    """``count`` uniform floats in [0, 1) for one (seed, layer): scene-level choices."""
    digest = hashlib.blake2b(f"tessera-synthetic:{seed}:{layer}".encode(), digest_size=4 * count).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") / 2**32 for i in range(count))


def _u32(values: np.ndarray) -> np.ndarray:
    """Wrap int64 coordinates (possibly negative) to uint32."""
    return (np.asarray(values, np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _hash32(x: np.ndarray) -> np.ndarray:
    """Avalanching 32-bit integer hash ("lowbias32"), elementwise on uint32 arrays."""
    x = x ^ (x >> np.uint32(16))
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _hash_cells(key: np.uint32, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """uint32 hash of integer cell coordinates (broadcast) under one key."""
    h = _hash32(_u32(ix) * np.uint32(0x9E3779B1) ^ key)
    return _hash32(h ^ (_u32(iy) * np.uint32(0x85EBCA77)))


def _uniform_cells(key: np.uint32, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) per integer cell (broadcast)."""
    return (_hash_cells(key, iy, ix) >> np.uint32(8)).astype(np.float64) * (1.0 / 2**24)


def _lattice(key: np.uint32, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Lattice values uniform in [-1, 1), float32."""
    h = _hash_cells(key, iy, ix) >> np.uint32(8)
    return h.astype(np.float32) * np.float32(2.0 / 2**24) - np.float32(1.0)


def _axis_weights(coords: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index (int64) and smoothstep weight (float32) of pixel-centre coordinates."""
    f = (coords + 0.5) / scale
    i = np.floor(f).astype(np.int64)
    t = f - i
    return i, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _noise_grid(key: np.uint32, rows: np.ndarray, cols: np.ndarray, scale: float) -> np.ndarray:
    """Value noise on the window grid, in [-1, 1), float32 ``(len(rows), len(cols))``.

    Interpolation is separable (columns first, then rows) with a fixed order of float32
    operations per pixel, so the value of a pixel depends only on its global coordinates.
    """
    iy, ty = _axis_weights(rows, scale)
    ix, tx = _axis_weights(cols, scale)
    lat_y = np.arange(iy[0], iy[-1] + 2)
    lat_x = np.arange(ix[0], ix[-1] + 2)
    grid = _lattice(key, lat_y[:, None], lat_x[None, :])
    jx = ix - lat_x[0]
    left = grid[:, jx]
    across = left + (grid[:, jx + 1] - left) * tx  # (lattice rows, window cols)
    jy = iy - lat_y[0]
    top = across[jy]
    return top + (across[jy + 1] - top) * ty[:, None]


def _fbm_grid(seed: int, layer: str, rows: np.ndarray, cols: np.ndarray, scale: float, octaves: int) -> np.ndarray:
    """Fractal sum of value noise (octave o: scale / 2**o, amplitude 2**-o), ~[-1, 1] float32."""
    total = None
    norm = 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        layer_noise = _noise_grid(_layer_key(seed, f"{layer}/{octave}"), rows, cols, scale / 2**octave)
        if total is None:
            total = layer_noise
        else:
            total += np.float32(amplitude) * layer_noise
        norm += amplitude
    return total * np.float32(1.0 / norm)


def _fbm_points(seed: int, layer: str, y: np.ndarray, x: np.ndarray, scale: float, octaves: int) -> np.ndarray:
    """:func:`_fbm_grid` at arbitrary points ``(y, x)`` (px, continuous; float64 1-D arrays)."""
    total = np.zeros(np.shape(y), np.float32)
    norm = 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        key = _layer_key(seed, f"{layer}/{octave}")
        s = scale / 2**octave
        iy, ty = _axis_weights(np.asarray(y, np.float64) - 0.5, s)
        ix, tx = _axis_weights(np.asarray(x, np.float64) - 0.5, s)
        g00, g01 = _lattice(key, iy, ix), _lattice(key, iy, ix + 1)
        g10, g11 = _lattice(key, iy + 1, ix), _lattice(key, iy + 1, ix + 1)
        top = g00 + (g01 - g00) * tx
        bottom = g10 + (g11 - g10) * tx
        total += np.float32(amplitude) * (top + (bottom - top) * ty)
        norm += amplitude
    return total * np.float32(1.0 / norm)


def _parcel_values(
    seed: int, layer: str, rows: np.ndarray, cols: np.ndarray, cell: int, low: float, high: float
) -> np.ndarray:
    """Piecewise-constant field on ``cell``-px square parcels, uniform in [low, high), float32."""
    py, px = rows // cell, cols // cell
    lat_y = np.arange(py[0], py[-1] + 1)
    lat_x = np.arange(px[0], px[-1] + 1)
    values = low + (high - low) * _uniform_cells(_layer_key(seed, layer), lat_y[:, None], lat_x[None, :])
    return values.astype(np.float32)[np.ix_(py - lat_y[0], px - lat_x[0])]


def _pixel_noise(seed: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per-pixel, per-band triangular noise in (-1, 1), float32 ``(4, h, w)``.

    Two 32-bit hashes per pixel give four pairs of bytes; each band sums a pair.
    """
    key = _layer_key(seed, "pixel-noise")
    row_part = _hash32(_u32(rows) * np.uint32(0x85EBCA77) ^ key)
    h1 = _hash32(row_part[:, None] ^ (_u32(cols) * np.uint32(0x9E3779B1))[None, :])
    h2 = _hash32(h1 ^ np.uint32(0x5BD1E995))
    out = np.empty((len(BAND_NAMES), len(rows), len(cols)), np.float32)
    mask = np.uint32(0xFF)
    for b in range(len(BAND_NAMES)):
        shift = np.uint32(8 * b)
        pair = ((h1 >> shift) & mask).astype(np.int16) + ((h2 >> shift) & mask).astype(np.int16)
        np.multiply(pair, np.float32(1.0 / 255.0), out=out[b], casting="unsafe")
        out[b] -= np.float32(1.0)
    return out


def _footprint_mask(spec: SceneSpec, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """True where pixel centres lie inside the valid footprint, bool ``(h, w)``."""
    if not spec.footprint:
        return np.ones((len(rows), len(cols)), bool)
    cy, cx, half_h, half_w, angle = spec.footprint_geometry()
    c, s = math.cos(angle), math.sin(angle)
    dy = rows + 0.5 - cy
    dx = cols + 0.5 - cx
    along = dx[None, :] * c - dy[:, None] * s
    across = dx[None, :] * s + dy[:, None] * c
    return (np.abs(along) <= half_w) & (np.abs(across) <= half_h)


# =========================================================================================
# roads
# =========================================================================================


@dataclass(frozen=True)
class _Segments:
    """Road segments, ordered by (level, kind, cell row, cell col) so ties break the same way.

    All arrays are 1-D of one length; coordinates in px (continuous), ``half_width`` in px.
    """

    y0: np.ndarray
    x0: np.ndarray
    y1: np.ndarray
    x1: np.ndarray
    half_width: np.ndarray
    colour: np.ndarray  # (n, 4) float32 spectrum


def _grid_nodes(
    seed: int, level: str, iy: np.ndarray, ix: np.ndarray, cell: int, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Node position (y, x) in px of each cell of a jittered grid."""
    lo = 0.5 - jitter / 2.0
    y = (iy + lo + jitter * _uniform_cells(_layer_key(seed, f"{level}/node-y"), iy, ix)) * cell
    x = (ix + lo + jitter * _uniform_cells(_layer_key(seed, f"{level}/node-x"), iy, ix)) * cell
    return y, x


def _road_segments(seed: int, r_lo: int, r_hi: int, c_lo: int, c_hi: int) -> _Segments:
    """All road segments whose (width-expanded) bounding box meets rows r_lo:r_hi, cols c_lo:c_hi.

    Two jittered grid graphs: a major grid (cells of 384 px, 5-8 px wide roads, edges to the
    right, down and sometimes diagonal) and a street grid (112 px, 3-4 px) whose edges exist
    with a probability rising with the urban field. Edges whose midpoint lies in a lake are
    dropped. Segment ``k`` of cell ``(i, j)`` goes from node ``(i, j)`` to a neighbour node.
    """
    parts: list[tuple[np.ndarray, ...]] = []
    levels = (
        ("major", _MAJOR_CELL_PX, 0.7, ((0, 1, 0.55), (1, 0, 0.55), (1, 1, 0.08), (1, -1, 0.08)), (5.0, 8.0)),
        ("street", _STREET_CELL_PX, 0.25, ((0, 1, 1.0), (1, 0, 1.0)), (3.0, 4.0)),
    )
    for level, cell, jitter, kinds, (w_lo, w_hi) in levels:
        iy = np.arange(math.floor(r_lo / cell) - 1, math.floor(r_hi / cell) + 1)
        ix = np.arange(math.floor(c_lo / cell) - 1, math.floor(c_hi / cell) + 2)
        gy, gx = np.meshgrid(iy, ix, indexing="ij")
        gy, gx = gy.ravel(), gx.ravel()
        ny, nx = _grid_nodes(seed, level, gy, gx, cell, jitter)
        for k, (dy, dx, probability) in enumerate(kinds):
            ey, ex = _grid_nodes(seed, level, gy + dy, gx + dx, cell, jitter)
            u = _uniform_cells(_layer_key(seed, f"{level}/edge{k}"), gy, gx)
            my, mx = (ny + ey) / 2.0, (nx + ex) / 2.0
            if level == "street":
                urban = _fbm_points(seed, "urban", my, mx, _URBAN_SCALE, 3)
                probability = np.clip((urban - _URBAN_THRESHOLD) * 5.0, 0.0, 0.9)
            keep = u < probability
            keep &= _fbm_points(seed, "lake", my, mx, _LAKE_SCALE, 4) <= _LAKE_THRESHOLD
            u_width = _uniform_cells(_layer_key(seed, f"{level}/width{k}"), gy, gx)
            half_width = (w_lo + (w_hi - w_lo) * u_width) / 2.0
            pad = half_width + 1.0
            keep &= np.minimum(ny, ey) - pad < r_hi
            keep &= np.maximum(ny, ey) + pad > r_lo
            keep &= np.minimum(nx, ex) - pad < c_hi
            keep &= np.maximum(nx, ex) + pad > c_lo
            u_colour = _uniform_cells(_layer_key(seed, f"{level}/colour{k}"), gy, gx)[keep]
            u_bright = _uniform_cells(_layer_key(seed, f"{level}/bright{k}"), gy, gx)[keep]
            concrete = (u_colour < (0.3 if level == "major" else 0.12))[:, None]
            colour = np.where(concrete, _ROAD_CONCRETE, _ROAD_ASPHALT) * (0.92 + 0.16 * u_bright)[:, None]
            parts.append((ny[keep], nx[keep], ey[keep], ex[keep], half_width[keep], colour.astype(np.float32)))
    return _Segments(*(np.concatenate([p[i] for p in parts]) for i in range(6)))


def _rasterize_roads(
    segments: _Segments, row0: int, col0: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Road mask ``(h, w)`` bool and road spectrum ``(4, h, w)`` float32 (0 off roads)."""
    mask = np.zeros((height, width), bool)
    colour = np.zeros((len(BAND_NAMES), height, width), np.float32)
    for k in range(len(segments.y0)):
        y0, x0, y1, x1 = segments.y0[k], segments.x0[k], segments.y1[k], segments.x1[k]
        hw = segments.half_width[k]
        r_a = max(row0, math.floor(min(y0, y1) - hw))
        r_b = min(row0 + height, math.ceil(max(y0, y1) + hw) + 1)
        c_a = max(col0, math.floor(min(x0, x1) - hw))
        c_b = min(col0 + width, math.ceil(max(x0, x1) + hw) + 1)
        if r_a >= r_b or c_a >= c_b:
            continue
        inside = _segment_distance_sq(
            np.arange(r_a, r_b) + 0.5, np.arange(c_a, c_b) + 0.5, y0, x0, y1, x1
        ) <= hw * hw
        sub = (slice(r_a - row0, r_b - row0), slice(c_a - col0, c_b - col0))
        mask[sub] |= inside
        colour[(slice(None),) + sub][:, inside] = segments.colour[k][:, None]
    return mask, colour


def _segment_distance_sq(ys: np.ndarray, xs: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
    """Squared distance (px^2) from the grid ``ys x xs`` to the segment, float64 ``(len(ys), len(xs))``."""
    vy, vx = y1 - y0, x1 - x0
    length_sq = max(vy * vy + vx * vx, 1e-12)
    py = (ys - y0)[:, None]
    px = (xs - x0)[None, :]
    t = np.clip((py * vy + px * vx) / length_sq, 0.0, 1.0)
    ry = py - t * vy
    rx = px - t * vx
    return ry * ry + rx * rx


# =========================================================================================
# buildings
# =========================================================================================


@dataclass(frozen=True)
class _Buildings:
    """Accepted buildings: centre (px), half length/width (px), angle (rad), roof spectrum."""

    cy: np.ndarray
    cx: np.ndarray
    half_length: np.ndarray
    half_width: np.ndarray
    angle: np.ndarray
    roof: np.ndarray  # (n, 4) float32


def _buildings(seed: int, segments: _Segments, row0: int, col0: int, height: int, width: int) -> _Buildings:
    """Buildings that may touch the window (or its shadow margin), one candidate per 32-px cell.

    A candidate is kept with a probability that is high beside a road in urban areas, lower
    beside a road elsewhere and small far from roads; its centre is never on water and it never sits on a road.
    Beside a road it is aligned with it. Clearances above 64 px count only as "far", so the
    decision never depends on which window asked.
    """
    cell = _BUILDING_CELL_PX
    reach = _BUILDING_REACH_PX + _SHADOW_OFFSET_PX
    iy = np.arange(math.floor((row0 - reach) / cell), math.floor((row0 + height + reach) / cell) + 1)
    ix = np.arange(math.floor((col0 - reach) / cell), math.floor((col0 + width + reach) / cell) + 1)
    gy, gx = np.meshgrid(iy, ix, indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()

    def u(name: str) -> np.ndarray:
        return _uniform_cells(_layer_key(seed, f"building/{name}"), gy, gx)

    cy = (gy + 0.2 + 0.6 * u("y")) * cell
    cx = (gx + 0.2 + 0.6 * u("x")) * cell
    length = 8.0 + 22.0 * u("length") ** 2
    breadth = np.maximum(6.0, length * (0.45 + 0.55 * u("breadth")))
    half_l, half_w = length / 2.0, breadth / 2.0
    half_diag = np.hypot(half_l, half_w)

    # Clearance to the nearest road edge (px), capped; its direction for alignment.
    if len(segments.y0):
        vy = (segments.y1 - segments.y0)[None, :]
        vx = (segments.x1 - segments.x0)[None, :]
        py = cy[:, None] - segments.y0[None, :]
        px = cx[:, None] - segments.x0[None, :]
        t = np.clip((py * vy + px * vx) / np.maximum(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
        clearance = np.hypot(py - t * vy, px - t * vx) - segments.half_width[None, :]
        nearest = np.argmin(clearance, axis=1)
        clearance = clearance[np.arange(len(cy)), nearest]
        road_angle = np.arctan2(vy[0, nearest], vx[0, nearest])
    else:
        clearance = np.full(len(cy), np.inf)
        road_angle = np.zeros(len(cy))
    far = clearance > _ROAD_CLEARANCE_CAP_PX
    near = ~far & (clearance <= half_w + 22.0)
    angle = np.where(near, road_angle, u("angle") * np.pi)

    urban = np.clip((_fbm_points(seed, "urban", cy, cx, _URBAN_SCALE, 3) - _URBAN_THRESHOLD) * 5.0, 0.0, 1.0)
    probability = np.where(near, 0.3 + 0.65 * urban, 0.015 + 0.05 * urban)
    keep = u("exists") < probability
    keep &= np.where(near, clearance >= half_w + 1.5, clearance >= half_diag + 1.0)
    keep &= _fbm_points(seed, "lake", cy, cx, _LAKE_SCALE, 4) <= _LAKE_THRESHOLD - 0.03
    river = np.abs(_fbm_points(seed, "river", cy, cx, _RIVER_SCALE, 3))
    keep &= river > 2.5 * _RIVER_HALF_WIDTH
    keep &= _fbm_points(seed, "pond", cy, cx, _POND_SCALE, 2) <= _POND_THRESHOLD - 0.05

    roof_type = np.searchsorted(np.cumsum(_ROOF_PROBS), u("roof"), side="right").clip(0, len(_ROOFS) - 1)
    roof = _ROOFS[roof_type] * (0.85 + 0.3 * u("roof-bright"))[:, None]
    return _Buildings(
        cy[keep], cx[keep], half_l[keep], half_w[keep], angle[keep], roof[keep].astype(np.float32)
    )


def _rasterize_buildings(
    buildings: _Buildings, row0: int, col0: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Building mask ``(h, w)`` bool and roof spectrum ``(4, h, w)`` float32 (0 elsewhere).

    Roofs are gabled: the half on one side of the ridge is 15 % darker.
    """
    mask = np.zeros((height, width), bool)
    colour = np.zeros((len(BAND_NAMES), height, width), np.float32)
    for k in range(len(buildings.cy)):
        cy, cx = buildings.cy[k], buildings.cx[k]
        hl, hw, a = buildings.half_length[k], buildings.half_width[k], buildings.angle[k]
        reach = math.hypot(hl, hw)
        r_a = max(row0, math.floor(cy - reach))
        r_b = min(row0 + height, math.ceil(cy + reach) + 1)
        c_a = max(col0, math.floor(cx - reach))
        c_b = min(col0 + width, math.ceil(cx + reach) + 1)
        if r_a >= r_b or c_a >= c_b:
            continue
        dy = (np.arange(r_a, r_b) + 0.5 - cy)[:, None]
        dx = (np.arange(c_a, c_b) + 0.5 - cx)[None, :]
        c, s = math.cos(a), math.sin(a)
        along = dx * c + dy * s
        across = dy * c - dx * s
        inside = (np.abs(along) <= hl) & (np.abs(across) <= hw)
        if not inside.any():
            continue
        sub = (slice(r_a - row0, r_b - row0), slice(c_a - col0, c_b - col0))
        mask[sub] |= inside
        shade = np.where(across[inside] > 0.0, np.float32(0.85), np.float32(1.0))
        colour[(slice(None),) + sub][:, inside] = buildings.roof[k][:, None] * shade[None, :]
    return mask, colour


def write_scene_blocks(spec, image_path: Path, truth_path: Path | None, *, render, band_names, tags: dict[str, str],
                       image_nodata: float | None, truth_dtype: str, truth_nodata: float | None,
                       truth_description: str, block: int) -> None:
    """Render a synthetic scene `block` x `block` px at a time into a uint16 GeoTIFF of
    `band_names` (pixel-interleaved, 512 px deflate tiles, BigTIFF when needed, the spec's CRS and
    transform) and, with `truth_path`, its one-band truth of `truth_dtype`: memory holds one block.

    `render(spec, row0, col0, h, w)` returns ``(bands (C, h, w) uint16, truth (h, w))`` of a
    window; the generators of this package render any window alone (`render_window`,
    `pipelines.tools.buildings.render_building_window`).
    """
    import rasterio
    from rasterio.windows import Window

    common = dict(driver="GTiff", height=spec.height, width=spec.width, crs=spec.crs, transform=spec.transform,
                  tiled=True, blockxsize=TILE_BLOCK_PX, blockysize=TILE_BLOCK_PX, compress="deflate", zlevel=1,
                  predictor=2, num_threads="ALL_CPUS", bigtiff="IF_SAFER")
    image = rasterio.open(image_path, "w", count=len(band_names), dtype="uint16", nodata=image_nodata,
                          interleave="pixel", **common)
    truth = None
    try:
        image.descriptions = tuple(band_names)
        image.update_tags(**tags)
        if truth_path is not None:
            truth = rasterio.open(truth_path, "w", count=1, dtype=truth_dtype, nodata=truth_nodata, **common)
            truth.descriptions = (truth_description,)
            truth.update_tags(**tags)
        for row0 in range(0, spec.height, block):
            for col0 in range(0, spec.width, block):
                h = min(block, spec.height - row0)
                w = min(block, spec.width - col0)
                bands, labels = render(spec, row0, col0, h, w)
                window = Window(col0, row0, w, h)
                image.write(bands, window=window)
                if truth is not None:
                    truth.write(labels, 1, window=window)
    finally:
        image.close()
        if truth is not None:
            truth.close()
