"""Zarr v3 volume reader (``.zarr``: an OME-Zarr 0.5 image group, or a plain 3D/4D array).

What is read:

- OME-Zarr 0.5 image (a group whose ``attrs["ome"]`` has ``multiscales``): the first multiscale's
  first dataset (the highest resolution). Its axes must be an optional ``c`` (type channel)
  followed by ``z``, ``y``, ``x`` (type space); a time axis is refused. The voxel -> scanner
  affine comes from the dataset's ``scale`` and ``translation`` (then the multiscale's own, if
  any), units converted to mm (no unit: mm). Physical axes follow tessera's store convention
  (``schemas.store.VolumeGrid.ome_attributes``): z runs along S, y along A, x along R, so the
  affine is ``R = sx * x + tx``, ``A = sy * y + ty``, ``S = sz * z + tz``. If the group carries
  an exact 4x4 affine in ``attrs["tessera"]["affine"]`` (array order, as tessera writes it), that
  one is used instead (OME-Zarr 0.5 cannot express rotations or flips).
- A plain array: ``(z, y, x)``, or ``(c, z, y, x)`` when its ``dimension_names`` say so. It has
  no geometry: spacing 1 mm and the affine an OME image without transformations would get (unit
  scale, origin 0, z along S, y along A, x along R). Segment statistics in mm are then voxel
  counts; give an OME-Zarr image for real geometry.

tessera's own output stores (``<root>/<scene>.zarr``, root ``attrs["tessera"]`` with a ``status``)
are OME-Zarr groups too; they are refused as inputs, as is an array inside one (overview levels
included).

Windows are plain Zarr slices of the array: only the chunks a window touches are read and
decoded. nodata is None (OME-Zarr has no nodata value; NaN voxels are invalid).

A store in object storage, ``s3://bucket/prefix/image.zarr``, is read the same way through zarr's
``ObjectStore`` over obstore's ``S3Store`` (endpoint, region and credentials from the environment:
:mod:`pipelines.readers.remote`); a window fetches only the chunk objects it touches. Zarr over
``http(s)://`` is not read (its identity would need a listing HTTP cannot give).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from obstore.exceptions import BaseError as ObjectStoreError
from obstore.exceptions import NotFoundError as ObjectNotFoundError

from pipelines.readers.base import InputPolicy, SceneInfo, check_dtype, finish_window
from schemas import store as layout
from schemas.errors import InputError
from schemas.uris import is_uri, uri_scheme
from schemas.window import ChunkWindow

#: OME-Zarr space units -> mm as ``value * num / den`` (a divisor keeps 250 um exactly 0.25 mm).
UNIT_TO_MM = {None: (1.0, 1.0), "millimeter": (1.0, 1.0), "micrometer": (1.0, 1e3), "nanometer": (1.0, 1e6),
              "centimeter": (10.0, 1.0), "meter": (1e3, 1.0)}
SPATIAL_AXES = (layout.Z, layout.Y, layout.X)
MAX_OPEN_ARRAYS = 4
_arrays: OrderedDict[str, zarr.Array] = OrderedDict()
log = logging.getLogger(__name__)


def _object_store(uri: str) -> Any:
    """A read-only zarr ObjectStore rooted at an ``s3://bucket/prefix`` URI."""
    from zarr.storage import ObjectStore

    from pipelines.readers.remote import s3_store, split_s3

    bucket, key = split_s3(uri)
    return ObjectStore(s3_store(bucket, key), read_only=True)


def _open_zarr_array(location: str) -> zarr.Array:
    """zarr.open_array of a local folder or an ``s3://`` URI, read-only."""
    if is_uri(location):
        return zarr.open_array(store=_object_store(location), mode="r", zarr_format=3)  # no v2 key probes
    return zarr.open_array(location, mode="r")


def _child(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_uri(location) else str(Path(location) / name)


def _parent(location: str) -> str:
    if is_uri(location):
        head, _, _ = location.rstrip("/").rpartition("/")
        return head if "://" in head and not head.endswith("://") else location
    return str(Path(location).parent)


def _array(data_path: str) -> zarr.Array:
    array = _arrays.get(data_path)
    if array is None:
        array = _open_zarr_array(data_path)
        _arrays[data_path] = array
        while len(_arrays) > MAX_OPEN_ARRAYS:
            _arrays.popitem(last=False)
    _arrays.move_to_end(data_path)
    return array


def _read_metadata(location: str) -> bytes | None:
    """The bytes of ``<location>/zarr.json`` (a local folder or an ``s3://`` prefix), or None."""
    if not is_uri(location):
        meta = Path(location) / "zarr.json"
        return meta.read_bytes() if meta.is_file() else None
    import obstore

    from pipelines.readers.remote import first_line, s3_store, split_s3

    bucket, key = split_s3(_child(location, "zarr.json"))
    try:
        return bytes(obstore.get(s3_store(bucket), key).bytes())
    except (FileNotFoundError, ObjectNotFoundError):  # obstore raises either, by version
        return None
    except ObjectStoreError as exc:  # permission, authentication, connection
        raise InputError(f"{location}: cannot read zarr.json from S3: {type(exc).__name__}: {first_line(exc)}") from None


def _node_attributes(folder: Path | str) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 node at `folder` (a local folder or an ``s3://`` prefix), or
    None if it is not one."""
    try:
        raw = _read_metadata(str(folder))
        return None if raw is None else json.loads(raw).get("attributes", {}) or {}
    except (OSError, ValueError):
        return None


def _refuse_output_store(path: str, folder: str) -> None:
    # the store itself, an array in it, or a level in it (`overviews/<l>/classes`, `labels/classes/<l>`)
    nodes = [folder]
    for _ in range(3):
        nodes.append(_parent(nodes[-1]))
    for node in dict.fromkeys(nodes):
        attrs = _node_attributes(node)
        tessera = attrs.get(layout.TESSERA_ATTR) if attrs else None
        if isinstance(tessera, dict) and layout.KEY_STATUS in tessera:
            raise InputError(
                f"{path}: is a tessera output store ({node}, status {tessera[layout.KEY_STATUS]!r}), not an "
                "input volume; give the image the job should segment")


def _ome_affine(path: str, multiscale: dict[str, Any], axes: list[dict[str, Any]]) -> np.ndarray:
    """The (z, y, x) -> RAS mm affine of an OME-Zarr image's first dataset (see module docstring)."""
    n = len(axes)
    scale, translation = np.ones(n), np.zeros(n)
    dataset = multiscale["datasets"][0]
    for transforms in (dataset.get("coordinateTransformations", []),
                       multiscale.get("coordinateTransformations", [])):
        for t in transforms:
            kind = t.get("type")
            if kind == "identity":
                continue
            values = t.get(kind)
            if kind not in ("scale", "translation") or values is None or len(values) != n:
                raise InputError(f"{path}: OME coordinateTransformation {t!r} is not supported "
                                 f"(inline scale / translation with {n} values are)")
            if kind == "scale":  # applied after any translation before it: x' = s * x + t
                scale, translation = scale * np.asarray(values, float), translation * np.asarray(values, float)
            else:
                translation = translation + np.asarray(values, float)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for axis, name in enumerate(SPATIAL_AXES):
        a = n - 3 + axis
        unit = axes[a].get("unit")
        if unit not in UNIT_TO_MM:
            raise InputError(f"{path}: axis {name!r} has unit {unit!r}; supported: "
                             f"{sorted(u for u in UNIT_TO_MM if u)}")
        num, den = UNIT_TO_MM[unit]
        row = 2 - axis  # z -> S (row 2), y -> A (row 1), x -> R (row 0)
        affine[row, axis] = scale[a] * num / den
        affine[row, 3] = translation[a] * num / den
    return affine


def _exact_affine(path: str, attrs: dict[str, Any]) -> np.ndarray | None:
    tessera = attrs.get(layout.TESSERA_ATTR)
    if not isinstance(tessera, dict) or layout.KEY_AFFINE not in tessera:
        return None
    try:
        return np.array(layout.VolumeGrid(affine=tessera[layout.KEY_AFFINE]).affine, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: attrs['tessera']['affine'] is not a valid 4x4 affine: {exc}") from None


def _locate(path: str) -> tuple[str, tuple[str, ...], np.ndarray]:
    """(array path, axis names, affine) of the image at `path`.

    Raises:
        InputError: not a Zarr v3 node, a tessera output store, or a layout this reader does not take.
    """
    folder = path.rstrip("/") if is_uri(path) else str(Path(path))
    attrs = _node_attributes(folder)
    if attrs is None:
        raise InputError(f"{path}: not a Zarr v3 array or group (no zarr.json)")
    _refuse_output_store(path, folder)
    try:
        node = (zarr.open(store=_object_store(folder), mode="r", zarr_format=3) if is_uri(folder)
                else zarr.open(folder, mode="r"))
    except (OSError, ValueError, KeyError, ObjectStoreError) as exc:
        raise InputError(f"{path}: cannot open as Zarr: {exc}") from None
    if isinstance(node, zarr.Array):
        names = node.metadata.dimension_names if hasattr(node.metadata, "dimension_names") else None
        if names is None and node.ndim == 3:
            names = SPATIAL_AXES
        if names is None or tuple(names)[-3:] != SPATIAL_AXES or node.ndim not in (3, 4) or (
                node.ndim == 4 and names[0] != "c"):
            raise InputError(f"{path}: a plain Zarr array of shape {list(node.shape)} with dimension names "
                             f"{names}; tessera reads (z, y, x) or (c, z, y, x) (set dimension_names), or an "
                             "OME-Zarr image")
        unit = np.zeros((4, 4))
        unit[0, 2] = unit[1, 1] = unit[2, 0] = unit[3, 3] = 1.0
        affine = _exact_affine(path, attrs)
        if affine is None:
            log.warning("%s: a plain Zarr array without geometry: read with 1 mm voxels, origin 0, "
                        "z along S, y along A, x along R (give an OME-Zarr image for real geometry)", path)
            affine = unit
        return folder, tuple(names), affine
    ome = attrs.get(layout.OME_ATTR)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: a Zarr group without OME-Zarr multiscales; give an OME-Zarr 0.5 image "
                         "or the path of a (z, y, x) array inside the group")
    multiscale = multiscales[0]
    axes = multiscale.get("axes", [])
    names = tuple(a.get("name") for a in axes)
    if names[-3:] != SPATIAL_AXES or len(names) not in (3, 4) or (len(names) == 4 and names[0] != "c"):
        raise InputError(f"{path}: OME axes {list(names)}; tessera reads (z, y, x) or (c, z, y, x) images "
                         "(no time axis)")
    datasets = multiscale.get("datasets") or []
    if not datasets or "path" not in datasets[0]:
        raise InputError(f"{path}: OME multiscales[0] lists no datasets")
    affine = _exact_affine(path, attrs)
    if affine is None:
        affine = _ome_affine(path, multiscale, axes)
    return _child(folder, datasets[0]["path"]), names, affine


class ZarrVolumeReader:
    """Zarr v3 volumes: OME-Zarr 0.5 images and plain arrays (see the module docstring)."""

    name = "zarr"
    suffixes = (".zarr",)

    def open(self, path: str, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
        """A volume's metadata.

        Raises:
            InputError: missing, not Zarr v3, a tessera output store, a layout other than
                ``(c?, z, y, x)``, or a dtype the policy refuses.
        """
        path = str(path)
        if is_uri(path):
            from pipelines.readers.remote import check_remote

            check_remote(path)
            if uri_scheme(path) != "s3":
                raise InputError(f"{path}: Zarr inputs are read from local folders or s3:// prefixes, "
                                 f"not {uri_scheme(path)}://")
        elif not Path(path).is_dir():
            raise InputError(f"{path}: not found (a .zarr input is a folder)")
        data_path, names, affine = _locate(path)
        try:
            array = _open_zarr_array(data_path)
        except (OSError, ValueError, KeyError, ObjectStoreError) as exc:
            raise InputError(f"{path}: cannot open the image array {data_path}: {exc}") from None
        if array.ndim != len(names):
            raise InputError(f"{path}: array {data_path} has {array.ndim} axes, the OME axes {list(names)}")
        count = int(array.shape[0]) if array.ndim == 4 else 1
        if policy.bands is not None and max(policy.bands) > count:
            raise InputError(f"{path}: has {count} channel(s), job asks for bands "
                             f"{[b for b in policy.bands if b > count]}")
        dtype, derive = check_dtype(path, (np.dtype(array.dtype).name,), policy)
        return SceneInfo.of_volume(path, fmt=self.name, shape=array.shape[-3:], count=count, dtype=dtype,
                                   source_dtype=np.dtype(array.dtype).name, derive=derive,
                                   block_shape=array.chunks[-3:], affine=affine, data_path=data_path)

    def read(
        self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One halo window, reflect-padded: pixels ``(C, *window_shape)`` of ``info.dtype``, valid
        ``window_shape`` bool (False where every channel is NaN).

        Raises:
            InputError: naming the file and the window when the read fails.
        """
        indexes = list(bands) if bands is not None else list(range(1, info.count + 1))
        if not indexes or min(indexes) < 1 or max(indexes) > info.count:
            raise InputError(f"{info.path}: has {info.count} channel(s), asked for bands {indexes}")
        try:
            array = _array(info.data_path or info.path)
            if array.ndim == 4:
                pixels = np.stack([np.asarray(array[(b - 1, *window.read)]) for b in indexes])
            else:
                pixels = np.asarray(array[window.read])[None]
        except (OSError, ValueError, KeyError, ObjectStoreError) as exc:
            _arrays.clear()
            z, y, x = window.read
            raise InputError(f"{info.path}: read failed for z {z.start}:{z.stop}, y {y.start}:{y.stop}, "
                             f"x {x.start}:{x.stop}: {exc}") from None
        return finish_window(pixels, window, info)

    def close(self) -> None:
        _arrays.clear()
