"""Export a volume's label array as NIfTI-1, with the input's exact voxel-to-scanner affine, so
3D Slicer, ITK-SNAP and nibabel overlay it on the input voxel for voxel.

The store's ``classes`` array is ``(z, y, x)`` in C order; a NIfTI file holds ``(i, j, k)`` in
Fortran order, ``i`` fastest. With ``(i, j, k) = (x, y, z)`` the two byte orders are the same, so
the labels are streamed slab by slab along ``z`` (one Zarr chunk row of planes at a time) straight
into the (gzip) file: memory holds one slab, never the volume. The affine's first three columns
are put back in NIfTI's axis order, so the file's sform is the input's affine (``sform_code`` 1,
scanner coordinates; the qform, a rotation and zooms, as close as it can be). NIfTI-1 stores the
sform as float32: an affine that came from a NIfTI input (float32 already) is kept bit for bit,
one from elsewhere (DICOM) to float32 precision (about 1e-5 mm at 100 mm). Labels are uint8, 255 = nodata / not
predicted (as in the store).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipelines.writers.atomic import atomic_path
from pipelines.writers.zarr_masks import open_classes
from schemas.store import VolumeGrid


def nifti_affine(grid: VolumeGrid) -> np.ndarray:
    """The 4x4 NIfTI affine ``(i, j, k) -> RAS mm`` of a grid whose affine takes ``(z, y, x)``."""
    affine = np.asarray(grid.affine, dtype=np.float64)
    out = affine.copy()
    out[:, :3] = affine[:, [2, 1, 0]]
    return out


def export_nifti(zarr_path: Path, out_path: Path, *, grid: VolumeGrid, gzipped: bool | None = None) -> Path:
    """Write the store's ``classes`` as `out_path` (``.nii`` or ``.nii.gz``), atomically.

    Args:
        zarr_path: a complete volume store (`pipelines.writers.zarr_masks`).
        out_path: the NIfTI file to write (replaced atomically: never half a file).
        grid: the store's geometry (its affine becomes the file's sform and qform).
        gzipped: gzip the file; None: where `out_path` ends with ``.gz`` (pass it when writing
            to a temporary name).

    Returns:
        `out_path`.

    Raises:
        ValueError: the store's classes array is not 3D.
    """
    import nibabel as nib

    classes = open_classes(zarr_path)
    if classes.ndim != 3:
        raise ValueError(f"{zarr_path}: classes has {classes.ndim} axes; a NIfTI export needs a (z, y, x) volume")
    nz, ny, nx = classes.shape
    header = nib.Nifti1Header()
    header.set_data_shape((nx, ny, nz))
    header.set_data_dtype(np.uint8)
    affine = nifti_affine(grid)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header["vox_offset"] = 352
    slab = int(classes.chunks[0])
    if gzipped is None:
        gzipped = out_path.name.endswith(".gz")
    opener = gzip.open if gzipped else open
    with atomic_path(out_path) as tmp:
        with opener(tmp, "wb") as fh:
            fh.write(header.binaryblock)
            fh.write(b"\x00" * (352 - len(header.binaryblock)))  # no extensions
            for z0 in range(0, nz, slab):
                fh.write(np.ascontiguousarray(classes[z0:z0 + slab], dtype=np.uint8).tobytes(order="C"))
    return out_path
