"""NIfTI-1/-2 reader (``.nii``, ``.nii.gz``) through nibabel: one halo window at a time.

Axes. tessera's volume arrays are ``(z, y, x)``; a NIfTI stores voxel ``(i, j, k)`` with ``i``
fastest (Fortran order), so the array is NIfTI's ``(k, j, i)``: windows are read as
``dataobj[x, y, z]`` and transposed. ``SceneInfo.affine`` is nibabel's ``img.affine`` (the sform,
else the qform) with its first three columns in that order (column 0 = k, 1 = j, 2 = i), exact
float64: permuting the columns back gives the header's affine bit for bit. The data are never
reoriented or resampled: an LAS, LPS or RAS file stays as stored and the affine says where its
voxels are (``orientation``: ``nibabel.aff2axcodes`` of the array axes; ``spacing``: the
affine's column norms, mm).

Channels. A 3D file has one channel. A 4D file's 4th axis (``t``) holds the channels; since it may
as well be time points, a 4D file with more than one is refused unless the job chooses them
(``bands:``, ``InputPolicy.bands``). More than 4 axes (e.g. 5D vector/matrix intents) is refused.

Values. ``scl_slope``/``scl_inter`` are applied as nibabel applies them (an integer file with a
slope or intercept reads as float64); ``SceneInfo.dtype`` is the dtype the reads return,
``source_dtype`` the file's. NIfTI has no nodata value: ``nodata`` is None, and a voxel is invalid only if NaN in
every channel.

``.nii`` (uncompressed) is read in place: a window is a slice of nibabel's array proxy, which
seeks to and reads only the window's voxel runs; each process keeps its last few files open.

``.nii.gz`` cannot be read by window: gzip has no random access, and every window would
decompress the stream from its start. So the reader converts it once, at ``open``, into a Zarr
array ``(C, z, y, x)`` in ``InputPolicy.cache_dir`` (the job's ``<root>/_work/inputs``), and reads
windows from that. Conversion is at ``open`` rather than at the first read because ``open`` runs
once per scene before any chunk is planned: a truncated or corrupt file fails there, naming the
file, and the many read tasks never race to convert the same file. (A read that finds no cache
entry, e.g. on another node when the cache folder is node-local, converts it there.)

- Streaming: the gzip stream is opened once and read front to back, slab by slab along NIfTI's
  slowest axis (``dataobj[:, :, k0:k1]`` is one contiguous run of the file; a 4D file is read
  channel after channel). The stream refuses to seek backwards, so it is never decompressed
  twice. Each slab is one row of the cache's chunks along z, so every chunk is written once.
  Memory: one slab in the file's dtype and one in the read dtype (:data:`SLAB_BYTES` at most,
  at least one k-plane), never the volume.
- Integrity: the whole stream is read to its end, so gzip checks its CRC and length; a short or
  corrupt file raises ``InputError`` ("truncated or corrupt") and leaves no cache entry.
- Cache entries: ``<cache_dir>/<name>-<path hash>-<size+mtime hash>.zarr``. A replaced file (other
  size or mtime) gets a new entry, and the old entries of that path are removed once it is
  complete. Each entry is written under a temporary name and renamed when complete, so a crash
  never leaves an entry that looks complete (a crash leaves a ``*.partial-*`` folder to delete).
- Disk cost: one entry per input, the volume (every channel) in the *read* dtype, so that a
  window is a plain slice: an int16 file with a slope is stored as float64, four times its raw
  size before compression. Zarr's default codec (Zstandard) compresses it; noisy scaled values
  compress poorly, so plan for up to the uncompressed size in the read dtype. Delete
  ``<root>/_work/inputs`` after the job to reclaim it; a re-run converts again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr
from nibabel.filebasedimages import ImageFileError

from pipelines.readers.base import InputPolicy, SceneInfo, check_dtype, finish_window, input_cache_folder
from pipelines.readers.remote import download, remote_input_sha256
from schemas.errors import InputError
from schemas.uris import is_uri, redact_uri, uri_name
from schemas.window import ChunkWindow

#: Largest slab (bytes, in the read dtype) streamed from a ``.nii.gz`` at a time; a slab is
#: never thinner than one k-plane.
SLAB_BYTES = 64 * 2**20
#: Most k-planes per slab (= the cache's chunk depth along z).
SLAB_PLANES = 32
#: The cache's chunk size along y and x (voxels): with SLAB_PLANES, 1 MiB chunks of float64.
CACHE_CHUNK_YX = 64
MAX_OPEN_FILES = 4
_GZ = ".nii.gz"
#: A NIfTI given by URI: its header, saved in its cache entry (no voxels; nibabel reads it as an image).
HEADER_FILE = "source-header.nii"

_images: OrderedDict[tuple[str, int, int], nib.Nifti1Image] = OrderedDict()
_caches: OrderedDict[str, zarr.Array] = OrderedDict()


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _load(path: str, *, keep_open: bool = False) -> nib.Nifti1Image:
    """nibabel's image of `path` (header read, no voxels).

    Raises:
        InputError: not a NIfTI file nibabel can parse.
    """
    try:
        img = nib.load(path, mmap=False, keep_file_open=keep_open)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: cannot open as NIfTI: {exc}") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI-1/-2 image (nibabel reads it as {type(img).__name__})")
    return img


def _image(path: str) -> nib.Nifti1Image:
    """An open image of an uncompressed `path`, reused while the file is unchanged."""
    key = (path, *_stat_key(path))
    img = _images.get(key)
    if img is None:
        img = _load(path, keep_open=True)
        _images[key] = img
        while len(_images) > MAX_OPEN_FILES:
            _images.popitem(last=False)  # its proxy's file handle closes with it
    _images.move_to_end(key)
    return img


def close_files() -> None:
    """Forget every open image and cache array of this process (their handles close with them)."""
    _images.clear()
    _caches.clear()


def cache_entry(path: str, cache_dir: str | None) -> Path:
    """The cache folder of a ``.nii.gz``: keyed by its absolute path and its size and mtime."""
    folder = input_cache_folder(cache_dir)
    size, mtime_ns = _stat_key(path)
    path_hash = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    stat_hash = hashlib.sha256(f"{size}:{mtime_ns}".encode()).hexdigest()[:12]
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in Path(path).name[: -len(_GZ)])
    return folder / f"{stem or 'volume'}-{path_hash}-{stat_hash}.zarr"


class _ForwardStream(io.IOBase):
    """A decompressing stream that may only move forwards (an ``io.IOBase``, as nibabel's
    openers take file objects).

    GzipFile emulates a backwards seek by decompressing again from the start; a conversion
    that triggered one would cost a full decompression per slab, so it fails loudly instead.
    """

    def __init__(self, raw: gzip.GzipFile):
        super().__init__()
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._raw.read(size)

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._raw.tell():
            raise RuntimeError(f"backward seek to {offset} (at {self._raw.tell()}) in a gzip stream")
        return self._raw.seek(offset)


def _slab_planes(shape_xyz: tuple[int, ...], itemsize: int) -> int:
    plane = int(shape_xyz[0]) * int(shape_xyz[1]) * itemsize
    return max(1, min(SLAB_PLANES, int(shape_xyz[2]), SLAB_BYTES // max(plane, 1)))


def _read_stream(path: str, read):
    """``read()``, with a short or corrupt gzip stream reported as the file's InputError."""
    try:
        return read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: truncated or corrupt .nii.gz (the gzip stream fails its checks: {exc}); "
                         "replace the file") from None
    except ValueError as exc:  # nibabel: fewer bytes than the header's shape needs
        raise InputError(f"{path}: truncated or corrupt .nii.gz (the image data end early: {exc}); "
                         "replace the file") from None


def convert_gz(path: str, img: nib.Nifti1Image, entry: Path, *, source: str | None = None) -> None:
    """Stream a ``.nii.gz`` (or a downloaded ``.nii``) into a Zarr array ``(C, z, y, x)`` at
    `entry` (see module docstring).

    Args:
        path: the local file to stream.
        source: what the cache entry and the errors name (a remote input's URI); default `path`.

    Raises:
        InputError: the gzip stream or the image data are truncated or corrupt.
    """
    shown = source or path
    source = source or os.path.abspath(path)
    opener = gzip.open if path.lower().endswith((_GZ, ".gz")) else open
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shape = tuple(int(n) for n in img.shape)
    count = shape[3] if len(shape) == 4 else 1
    # a float64 plane bounds the slab whatever the read dtype (scaling may promote ints)
    planes = _slab_planes(shape, 8)
    array = None
    try:
        with opener(path, "rb") as raw:
            stream = _ForwardStream(raw)
            # the image's own proxy, over our stream (a loaded header has its scaling reset to NaN:
            # the proxy keeps the file's slope and intercept)
            dataobj = img.dataobj
            proxy = type(dataobj)(stream, (dataobj.shape, dataobj.dtype, dataobj.offset, dataobj.slope,
                                           dataobj.inter), mmap=False, order=dataobj.order)
            for c in range(count):
                for k0 in range(0, shape[2], planes):
                    k1 = min(k0 + planes, shape[2])
                    key = (slice(None), slice(None), slice(k0, k1), *((c,) if len(shape) == 4 else ()))
                    slab = _read_stream(shown, lambda: np.asarray(proxy[key]))  # (x, y, k), F order
                    slab = slab.astype(slab.dtype.newbyteorder("="), copy=False)
                    if array is None:
                        array = zarr.create_array(
                            store=str(partial), shape=(count, shape[2], shape[1], shape[0]),
                            chunks=(1, planes, min(shape[1], CACHE_CHUNK_YX), min(shape[0], CACHE_CHUNK_YX)),
                            dtype=slab.dtype, fill_value=0, dimension_names=("c", "z", "y", "x"),
                            attributes={"tessera_input_cache": {"source": redact_uri(source)}},
                        )
                    slab = slab.T  # (k, y, x), C-contiguous
                    step_y, step_x = array.chunks[2:]
                    for y0 in range(0, shape[1], step_y):  # one chunk at a time: zarr encodes one buffer
                        for x0 in range(0, shape[0], step_x):
                            array[c, k0:k1, y0:y0 + step_y, x0:x0 + step_x] = slab[:, y0:y0 + step_y, x0:x0 + step_x]
                    del slab
            while _read_stream(shown, lambda: raw.read(1 << 20)):  # to the end: gzip checks CRC and length
                pass
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, entry)
    except OSError:  # another process completed the same entry first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not entry.is_dir():
            raise
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for stale in entry.parent.glob(f"{prefix}*.zarr"):  # earlier versions of the same file
        if stale.name != entry.name:
            shutil.rmtree(stale, ignore_errors=True)


def remote_cache_entry(uri: str, identity: str, cache_dir: str | None) -> Path:
    """The cache folder of a NIfTI given by URI: keyed by the URI and the object's identity
    (``remote_input_sha256``), so every node that converts it names it alike."""
    folder = input_cache_folder(cache_dir)
    name = uri_name(uri)
    stem = name[: -len(_GZ)] if name.lower().endswith(_GZ) else name[: -len(".nii")]
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in stem)
    uri_hash = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return folder / f"{stem or 'volume'}-{uri_hash}-{identity[:12]}.zarr"


def _convert_remote(uri: str, entry: Path) -> nib.Nifti1Image:
    """Download the object at `uri` beside `entry` (streamed), convert it into `entry`, delete the
    download; returns its image (header)."""
    suffix = _GZ if uri_name(uri).lower().endswith(_GZ) else ".nii"
    local = entry.with_name(f".{entry.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        download(uri, local)
        img = _load(str(local))
        if not entry.is_dir():
            convert_gz(str(local), img, entry, source=uri)
        header = entry / HEADER_FILE
        if not header.is_file():  # the header alone (affine, shape, scaling) for later opens
            tmp = header.with_name(f".{HEADER_FILE}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(img.header.binaryblock + b"\0" * 4)
            os.replace(tmp, header)
        return img
    finally:
        local.unlink(missing_ok=True)


def _load_remote_header(uri: str, entry: Path) -> nib.Nifti1Image:
    """The image (header only) of a NIfTI given by URI whose cache entry exists: from the header
    saved in the entry at conversion (:data:`HEADER_FILE`); downloaded again if it is missing."""
    saved = entry / HEADER_FILE
    return _load(str(saved)) if saved.is_file() else _convert_remote(uri, entry)


def _cache_array(path: str, data_path: str) -> zarr.Array:
    """The cache array of a ``.nii.gz`` (or a NIfTI given by URI) opened earlier; converted again
    here if it is missing (e.g. on another node, when the cache folder is node-local)."""
    array = _caches.get(data_path)
    if array is not None:
        _caches.move_to_end(data_path)
        return array
    entry = Path(data_path)
    if not entry.is_dir() and is_uri(path):
        if remote_cache_entry(path, remote_input_sha256(path), str(entry.parent)) != entry:
            raise InputError(f"{redact_uri(path)}: the object changed after it was opened (ETag, Last-Modified "
                             "or size); run the job again")
        _convert_remote(path, entry)
    elif not entry.is_dir():
        if not Path(path).is_file():
            raise InputError(f"{path}: file not found")
        expected = cache_entry(path, str(entry.parent))
        if expected != entry:
            raise InputError(f"{path}: the file changed after it was opened (size or mtime); run the job again")
        convert_gz(path, _load(path), entry)
    array = zarr.open_array(str(entry), mode="r")
    _caches[data_path] = array
    while len(_caches) > MAX_OPEN_FILES:
        _caches.popitem(last=False)
    return array


def _check_shape(path: str, img: nib.Nifti1Image, policy: InputPolicy) -> int:
    """The number of channels of a NIfTI image, or InputError for a shape tessera cannot take."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 4:
        intent = img.header.get_intent()[0]
        raise InputError(f"{path}: NIfTI with {len(shape)} axes {list(shape)} (intent {intent!r}); tessera "
                         "reads 3D volumes and 4D volumes whose 4th axis holds the channels")
    if len(shape) < 3:
        raise InputError(f"{path}: NIfTI with {len(shape)} axes {list(shape)}; tessera reads 3D volumes "
                         "(4D: channels on the 4th axis)")
    if min(shape) < 1:
        raise InputError(f"{path}: NIfTI of shape {list(shape)} holds no voxels")
    count = shape[3] if len(shape) == 4 else 1
    if count > 1 and policy.bands is None:
        raise InputError(
            f"{path}: 4D NIfTI of shape {list(shape)}: its 4th axis ({count} volumes) may be channels or "
            f"time points; set bands: [1, ...] in the job spec to choose the channels (1-based, up to "
            f"{count}) to feed the model")
    if policy.bands is not None and max(policy.bands) > count:
        raise InputError(f"{path}: has {count} channel(s) (shape {list(shape)}), job asks for bands "
                         f"{[b for b in policy.bands if b > count]}")
    return count


def array_affine(nifti_affine: np.ndarray) -> np.ndarray:
    """NIfTI's voxel ``(i, j, k)`` -> RAS affine with its columns in array order ``(z, y, x)``."""
    return np.asarray(nifti_affine, dtype=np.float64)[:, [2, 1, 0, 3]]


class NiftiReader:
    """NIfTI-1/-2 volumes through nibabel (see the module docstring)."""

    name = "nifti"
    suffixes = (".nii", _GZ)

    def open(self, path: str, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
        """A volume's metadata; a ``.nii.gz`` is converted to its Zarr cache here.

        Raises:
            InputError: missing, not NIfTI, truncated, a shape or dtype tessera cannot take, or a
                4D file without a channel choice; the message names the file and what to set.
        """
        path = str(path)
        if is_uri(path):
            return self._open_remote(path, policy)
        if not Path(path).is_file():
            raise InputError(f"{path}: file not found")
        gz = path.lower().endswith(_GZ)
        img = _load(path)
        count = _check_shape(path, img, policy)
        source = img.header.get_data_dtype()
        if source.fields:  # RGB24 / RGBA32: one record per voxel, not a numeric channel
            raise InputError(f"{path}: bands of type {source.descr} (NIfTI RGB) are not supported; "
                             "store the colours as a 4D file, one channel each")
        check_dtype(path, (source.name,), policy)
        shape_xyz = tuple(int(n) for n in img.shape[:3])
        data_path = None
        if gz:
            entry = cache_entry(path, policy.cache_dir)
            if not entry.is_dir():
                convert_gz(path, img, entry)
            data_path = str(entry)
            array = zarr.open_array(data_path, mode="r")
            read_dtype = np.dtype(array.dtype)
            block = tuple(int(n) for n in array.chunks[1:])
        else:
            # the proxy keeps the file's data offset (the loaded header's is reset)
            needed = int(img.dataobj.offset) + int(np.prod(img.shape)) * source.itemsize
            if os.path.getsize(path) < needed:
                raise InputError(f"{path}: truncated NIfTI ({os.path.getsize(path)} bytes, the header "
                                 f"needs {needed}); replace the file")
            probe = np.asarray(img.dataobj[(slice(0, 1),) * len(img.shape)])
            read_dtype = probe.dtype.newbyteorder("=")
            block = (1, shape_xyz[1], shape_xyz[0])  # one k-plane is the file's contiguous unit
        dtype, derive = check_dtype(path, (read_dtype.name,), policy)
        affine = array_affine(img.affine)
        return SceneInfo.of_volume(path, fmt=self.name, shape=shape_xyz[::-1], count=count, dtype=dtype,
                                   source_dtype=source.newbyteorder("=").name, derive=derive, block_shape=block,
                                   affine=affine, data_path=data_path)

    def _open_remote(self, uri: str, policy: InputPolicy) -> SceneInfo:
        """A NIfTI at an ``http(s)://`` or ``s3://`` URI: downloaded once (streamed to a local
        temporary file beside the cache) and converted into the same Zarr cache as a ``.nii.gz``,
        keyed by the URI and the object's identity; the download is deleted after. A read on a
        node without the entry downloads and converts it there."""
        entry = remote_cache_entry(uri, remote_input_sha256(uri), policy.cache_dir)
        img = _load_remote_header(uri, entry) if entry.is_dir() else _convert_remote(uri, entry)
        count = _check_shape(uri, img, policy)
        source = img.header.get_data_dtype()
        if source.fields:
            raise InputError(f"{redact_uri(uri)}: bands of type {source.descr} (NIfTI RGB) are not supported")
        check_dtype(uri, (source.name,), policy)
        array = zarr.open_array(str(entry), mode="r")
        dtype, derive = check_dtype(uri, (np.dtype(array.dtype).name,), policy)
        shape_xyz = tuple(int(n) for n in img.shape[:3])
        return SceneInfo.of_volume(uri, fmt=self.name, shape=shape_xyz[::-1], count=count, dtype=dtype,
                                   source_dtype=source.newbyteorder("=").name, derive=derive,
                                   block_shape=tuple(int(n) for n in array.chunks[1:]),
                                   affine=array_affine(img.affine), data_path=str(entry))

    def read(
        self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One halo window of a volume, reflect-padded to the full window.

        Args:
            info: from `open`.
            window: the chunk window, axes ``(z, y, x)``; its `read` slices are in bounds.
            bands: 1-based channels (the 4th NIfTI axis) in model order (default: all).

        Returns:
            (pixels, valid): pixels ``(C, *window_shape)`` of ``info.dtype``; valid
            ``window_shape`` bool, False where every channel is NaN.

        Raises:
            InputError: naming the file and the window when the read fails.
        """
        indexes = list(bands) if bands is not None else list(range(1, info.count + 1))
        if not indexes or min(indexes) < 1 or max(indexes) > info.count:
            raise InputError(f"{info.path}: has {info.count} channel(s), asked for bands {indexes}")
        z, y, x = window.read
        try:
            if info.data_path is not None:
                array = _cache_array(info.path, info.data_path)
                pixels = np.stack([np.asarray(array[(b - 1, z, y, x)]) for b in indexes])
            else:
                proxy = _image(info.path).dataobj
                four_d = len(proxy.shape) == 4
                pixels = np.stack([np.asarray(proxy[(x, y, z, *((b - 1,) if four_d else ()))]).T
                                   for b in indexes])
                pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            close_files()  # a failed read may leave a handle in a bad state
            raise InputError(f"{info.path}: read failed for z {z.start}:{z.stop}, y {y.start}:{y.stop}, "
                             f"x {x.start}:{x.stop}: {exc}") from None
        return finish_window(pixels, window, info)

    def close(self) -> None:
        close_files()
