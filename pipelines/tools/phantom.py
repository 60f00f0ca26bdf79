"""A deterministic synthetic CT phantom: an anisotropic abdomen-like volume and its truth labels.

The volume is (z, y, x) = (slice, row, column), ``spacing_mm`` per axis (default 3.0 x 0.8 x 0.8
mm), values in Hounsfield units (int16):

* air, -1000 HU, outside a body ellipsoid (elongated along z, so every slice holds an ellipse);
* soft tissue, 40 HU, inside the body;
* three organs, ellipsoids inside the body with HU of a portal-venous contrast CT:
  liver 100 HU, spleen 130 HU and the two kidneys 190 HU;
* 2 to 4 lesions, spheres of 3.5 to 6 mm radius inside the liver, hypodense at 10 HU;
* Gaussian noise of ``noise_hu`` (default 12 HU) on every voxel, air included.

Positions and sizes are jittered per ``seed`` (a :class:`numpy.random.Generator`), so two
seeds give two different patients and one seed always the same volume, bit for bit.

Truth classes (:data:`CLASS_NAMES`): 0 background (air and soft tissue), 1 liver, 2 spleen,
3 kidney, 4 lesion (drawn last: a lesion voxel is a lesion, not liver).

:func:`write_phantom` writes the HU volume and the labels as NIfTI ``.nii.gz``: data in NIfTI
(i, j, k) = (x, y, z) order, an LPS-like affine (``diag(-sx, -sy, sz)``: i towards the
patient's right, j towards posterior, k towards superior) with the volume centred on the
scanner origin, the same affine for both files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("background", "liver", "spleen", "kidney", "lesion")
CLASS_COLORS: tuple[str, ...] = ("#000000", "#b5651d", "#8e44ad", "#e67e22", "#f1c40f")
AIR_HU = -1000
TISSUE_HU = 40
ORGAN_HU: dict[str, int] = {"liver": 100, "spleen": 130, "kidney": 190}
LESION_HU = 10
CLASS_HU: tuple[int, ...] = (TISSUE_HU, ORGAN_HU["liver"], ORGAN_HU["spleen"], ORGAN_HU["kidney"], LESION_HU)
"""Noise-free HU of each class inside the body (background: soft tissue; air is also background)."""


@dataclass(frozen=True)
class PhantomSpec:
    """What to render.

    Attributes:
        shape: (z, y, x) voxels.
        spacing_mm: (z, y, x) voxel spacing in mm.
        seed: the generator seed (geometry jitter, lesions, noise).
        noise_hu: standard deviation of the Gaussian noise, HU.
    """

    shape: tuple[int, int, int] = (48, 96, 96)
    spacing_mm: tuple[float, float, float] = (3.0, 0.8, 0.8)
    seed: int = 0
    noise_hu: float = 12.0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8 voxels, got {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be 3 positive mm, got {self.spacing_mm}")
        if self.noise_hu < 0:
            raise ValueError(f"noise_hu must be >= 0, got {self.noise_hu}")


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    z, y, x = coords
    return ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((x - centre[2]) / semi[2]) ** 2


@dataclass(frozen=True)
class PhantomGeometry:
    """Where the body, organs and lesions of one phantom lie (mm from the volume centre, (z, y, x)).

    Drawn once per spec by :func:`phantom_geometry`, so that a volume can be rendered whole
    (:func:`render_phantom`) or slab by slab (:func:`render_phantom_slab`, :func:`write_phantom_image`)
    with the same labels.

    Attributes:
        body_semi: semi-axes of the body ellipsoid.
        shapes: ``(class_id, centre, semi_axes)`` ellipsoids in drawing order (organs, then
            lesions as spheres); a later one overwrites an earlier one inside the body.
    """

    body_semi: tuple[float, float, float]
    shapes: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float]], ...]


def _coords(spec: PhantomSpec, z0: int = 0, z1: int | None = None) -> tuple[np.ndarray, ...]:
    """Voxel centres in mm from the volume centre for planes z0:z1, broadcastable (z, 1, 1), (1, y, 1), (1, 1, x)."""
    nz, ny, nx = spec.shape
    sz, sy, sx = spec.spacing_mm
    z1 = nz if z1 is None else z1
    return (
        ((np.arange(z0, z1) - (nz - 1) / 2) * sz)[:, None, None],
        ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None],
        ((np.arange(nx) - (nx - 1) / 2) * sx)[None, None, :],
    )


def phantom_geometry(spec: PhantomSpec, rng: np.random.Generator | None = None) -> PhantomGeometry:
    """Draw the body, organ and lesion ellipsoids of ``spec`` (from ``rng``, default seeded by spec.seed).

    :func:`render_phantom` draws its noise from the same generator after this, so the order of
    draws here is part of every seed's volume.
    """
    rng = np.random.default_rng(spec.seed) if rng is None else rng
    nz, ny, nx = spec.shape
    sz, sy, sx = spec.spacing_mm
    half = np.array([nz * sz, ny * sy, nx * sx]) / 2

    def jitter(lo: float, hi: float, n: int = 3) -> np.ndarray:
        return rng.uniform(lo, hi, size=n)

    # body: in-plane semi-axes ~ 80 % / 90 % of the half field of view, long in z
    body_semi = np.array([1.5 * half[0], 0.80 * half[1], 0.92 * half[2]]) * jitter(0.93, 1.03)
    # organ layouts as fractions of the body's semi-axes (z, y, x): y > 0 posterior, x > 0 left
    frac = body_semi / np.array([1.5, 1.0, 1.0])
    layouts: list[tuple[int, np.ndarray, np.ndarray]] = [
        (1, np.array([0.15, -0.05, -0.35]), np.array([0.50, 0.48, 0.42])),  # liver
        (2, np.array([0.25, 0.25, 0.55]), np.array([0.30, 0.30, 0.24])),  # spleen
        (3, np.array([-0.40, 0.52, -0.42]), np.array([0.30, 0.22, 0.18])),  # right kidney
        (3, np.array([-0.38, 0.52, 0.42]), np.array([0.30, 0.22, 0.18])),  # left kidney
    ]
    shapes = []
    liver_centre = liver_semi = None
    for class_id, centre_frac, semi_frac in layouts:
        centre = (centre_frac + jitter(-0.04, 0.04)) * frac
        semi = semi_frac * frac * jitter(0.88, 1.12)
        shapes.append((class_id, centre, semi))
        if class_id == 1:
            liver_centre, liver_semi = centre, semi
    n_lesions = int(rng.integers(2, 5))
    for _ in range(n_lesions):
        radius = float(rng.uniform(3.5, 6.0))
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = liver_centre + direction * rng.uniform(0.0, 0.55) * liver_semi
        shapes.append((len(CLASS_NAMES) - 1, centre, np.full(3, radius)))
    as_tuple = lambda a: tuple(float(v) for v in a)  # noqa: E731
    return PhantomGeometry(body_semi=as_tuple(body_semi),
                           shapes=tuple((c, as_tuple(centre), as_tuple(semi)) for c, centre, semi in shapes))


def _render_clean(spec: PhantomSpec, geometry: PhantomGeometry, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free float32 HU and uint8 labels of planes z0:z1."""
    coords = _coords(spec, z0, z1)
    body = _ellipsoid(coords, np.zeros(3), np.asarray(geometry.body_semi)) <= 1.0
    labels = np.zeros((z1 - z0, *spec.shape[1:]), dtype=np.uint8)
    for class_id, centre, semi in geometry.shapes:
        labels[(_ellipsoid(coords, np.asarray(centre), np.asarray(semi)) <= 1.0) & body] = class_id
    hu = np.where(body, np.asarray(CLASS_HU, dtype=np.float32)[labels], np.float32(AIR_HU))
    return hu, labels


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def render_phantom(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Render the phantom.

    Returns:
        ``(hu, labels)``: (z, y, x) int16 HU and (z, y, x) uint8 class ids (:data:`CLASS_NAMES`).
    """
    rng = np.random.default_rng(spec.seed)
    geometry = phantom_geometry(spec, rng)
    hu, labels = _render_clean(spec, geometry, 0, spec.shape[0])
    if spec.noise_hu > 0:
        hu = hu + rng.normal(0.0, spec.noise_hu, size=spec.shape).astype(np.float32)
    return _to_int16(hu), labels


def render_phantom_slab(spec: PhantomSpec, geometry: PhantomGeometry, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Planes z0:z1 of the phantom, its memory that of the slab only.

    Labels (and the noise-free HU) equal those planes of :func:`render_phantom`; the noise is
    drawn per slab from a generator seeded by ``(spec.seed, z0, z1)``, so a volume written slab
    by slab is deterministic for a seed and slab size but its noise is not :func:`render_phantom`'s.

    Returns:
        ``(hu, labels)``: (z1 - z0, y, x) int16 HU and uint8 class ids.
    """
    if not 0 <= z0 < z1 <= spec.shape[0]:
        raise ValueError(f"slab {z0}:{z1} is not inside 0:{spec.shape[0]}")
    hu, labels = _render_clean(spec, geometry, z0, z1)
    if spec.noise_hu > 0:
        noise = np.random.default_rng([spec.seed, z0, z1]).normal(0.0, spec.noise_hu, size=hu.shape)
        hu += noise.astype(np.float32)
    return _to_int16(hu), labels


def phantom_affine(spec: PhantomSpec) -> np.ndarray:
    """The NIfTI (i, j, k) = (x, y, z) voxel -> scanner (RAS, mm) affine: LPS-like, centred on 0."""
    nz, ny, nx = spec.shape
    sz, sy, sx = spec.spacing_mm
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    return affine


def write_phantom(spec: PhantomSpec, image_path: Path, truth_path: Path) -> tuple[Path, Path]:
    """Write the HU volume (int16) and its labels (uint8) as NIfTI files on one affine."""
    import nibabel as nib

    hu, labels = render_phantom(spec)
    affine = phantom_affine(spec)
    for array, path in ((hu, image_path), (labels, truth_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(path))
    return Path(image_path), Path(truth_path)


#: Most voxels rendered at a time by :func:`write_phantom_image` (~16 M: a few hundred MB of temporaries).
SLAB_VOXELS = 16 * 2**20


def write_phantom_image(spec: PhantomSpec, path: Path, *, slab_voxels: int = SLAB_VOXELS) -> Path:
    """Write the HU volume as an uncompressed NIfTI ``.nii`` (int16), slab by slab along z.

    For volumes too large to render at once (512 x 512 x 1024 is 268 M voxels: about 6 GB of
    float temporaries whole): the header is written first, then each slab of
    :func:`render_phantom_slab` is appended. NIfTI stores voxel (i, j, k) = (x, y, z) with i
    fastest, so a C-ordered (z, y, x) slab is already a contiguous run of the file. Memory: one
    slab (at most ``slab_voxels``, at least one plane), never the volume. Same affine as
    :func:`write_phantom`; no truth file (the labels are those of :func:`render_phantom`).
    """
    import nibabel as nib

    path = Path(path)
    if path.suffix != ".nii":
        raise ValueError(f"{path}: write_phantom_image writes an uncompressed .nii")
    nz, ny, nx = spec.shape
    affine = phantom_affine(spec)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((nx, ny, nz))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header.set_slope_inter(1.0, 0.0)
    offset = 352  # 348-byte header + the 4-byte extension flag of a single-file NIfTI-1
    header.set_data_offset(offset)
    geometry = phantom_geometry(spec)
    planes = max(1, int(slab_voxels) // (ny * nx))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(header.binaryblock)
        fh.write(b"\0" * (offset - fh.tell()))
        for z0 in range(0, nz, planes):
            hu, _ = render_phantom_slab(spec, geometry, z0, min(nz, z0 + planes))
            fh.write(np.ascontiguousarray(hu, dtype="<i2").tobytes())
    tmp.replace(path)
    return path


def read_labels(path: Path) -> np.ndarray:
    """A label NIfTI written by :func:`write_phantom` (or a tessera export) as (z, y, x) uint8."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.uint8).transpose(2, 1, 0)
