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


def render_phantom(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Render the phantom.

    Returns:
        ``(hu, labels)``: (z, y, x) int16 HU and (z, y, x) uint8 class ids (:data:`CLASS_NAMES`).
    """
    rng = np.random.default_rng(spec.seed)
    nz, ny, nx = spec.shape
    sz, sy, sx = spec.spacing_mm
    # voxel centres in mm from the volume centre, broadcastable (z, 1, 1), (1, y, 1), (1, 1, x)
    coords = (
        ((np.arange(nz) - (nz - 1) / 2) * sz)[:, None, None],
        ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None],
        ((np.arange(nx) - (nx - 1) / 2) * sx)[None, None, :],
    )
    half = np.array([nz * sz, ny * sy, nx * sx]) / 2

    def jitter(lo: float, hi: float, n: int = 3) -> np.ndarray:
        return rng.uniform(lo, hi, size=n)

    # body: in-plane semi-axes ~ 80 % / 90 % of the half field of view, long in z
    body_semi = np.array([1.5 * half[0], 0.80 * half[1], 0.92 * half[2]]) * jitter(0.93, 1.03)
    body = _ellipsoid(coords, np.zeros(3), body_semi) <= 1.0
    # organ layouts as fractions of the body's semi-axes (z, y, x): y > 0 posterior, x > 0 left
    frac = body_semi / np.array([1.5, 1.0, 1.0])
    layouts: list[tuple[int, np.ndarray, np.ndarray]] = [
        (1, np.array([0.15, -0.05, -0.35]), np.array([0.50, 0.48, 0.42])),  # liver
        (2, np.array([0.25, 0.25, 0.55]), np.array([0.30, 0.30, 0.24])),  # spleen
        (3, np.array([-0.40, 0.52, -0.42]), np.array([0.30, 0.22, 0.18])),  # right kidney
        (3, np.array([-0.38, 0.52, 0.42]), np.array([0.30, 0.22, 0.18])),  # left kidney
    ]
    labels = np.zeros(spec.shape, dtype=np.uint8)
    liver_centre = liver_semi = None
    for class_id, centre_frac, semi_frac in layouts:
        centre = (centre_frac + jitter(-0.04, 0.04)) * frac
        semi = semi_frac * frac * jitter(0.88, 1.12)
        labels[(_ellipsoid(coords, centre, semi) <= 1.0) & body] = class_id
        if class_id == 1:
            liver_centre, liver_semi = centre, semi
    n_lesions = int(rng.integers(2, 5))
    for _ in range(n_lesions):
        radius = float(rng.uniform(3.5, 6.0))
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = liver_centre + direction * rng.uniform(0.0, 0.55) * liver_semi
        labels[(_ellipsoid(coords, centre, np.full(3, radius)) <= 1.0) & body] = len(CLASS_NAMES) - 1

    hu = np.where(body, np.asarray(CLASS_HU, dtype=np.float32)[labels], np.float32(AIR_HU))
    if spec.noise_hu > 0:
        hu = hu + rng.normal(0.0, spec.noise_hu, size=spec.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


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


def read_labels(path: Path) -> np.ndarray:
    """A label NIfTI written by :func:`write_phantom` (or a tessera export) as (z, y, x) uint8."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.uint8).transpose(2, 1, 0)
