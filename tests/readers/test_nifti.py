"""NIfTI reader: axis order and affine against nibabel, windowed reads of .nii and .nii.gz equal the
whole volume, channels of 4D files, the .nii.gz Zarr cache (reuse, invalidation, truncation,
bounded memory)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.plan.chunks import plan_chunks
from pipelines.readers import READERS, InputPolicy, nifti, open_scene, read_window, reader_for
from pipelines.writers.zarr_masks import scene_grid
from schemas.errors import InputError

SHAPE_XYZ = (23, 19, 13)  # (i, j, k): anisotropic and odd
SPACING_XYZ = (0.7, 0.8, 3.0)
CHUNK, HALO = (5, 8, 8), 3  # (z, y, x)


def nifti_affine(orientation: str) -> np.ndarray:
    """A voxel (i, j, k) -> RAS affine with SPACING_XYZ and an off-centre origin, per case."""
    sx, sy, sz = SPACING_XYZ
    if orientation == "oblique":  # 20 degrees about S, plus a shear-free tilt of k
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        linear = np.array([[c * sx, -s * sy, 0.1], [s * sx, c * sy, 0.2], [0.0, 0.0, sz]])
    else:
        signs = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
        linear = np.diag([signs[0] * sx, signs[1] * sy, signs[2] * sz])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (-81.3, 42.25, -17.0)
    return affine


def volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth values with noise and a negative range (float64), shape as NIfTI orders it."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 3, n) for n in shape], indexing="ij")
    return 400 * np.sin(sum(grids)) + rng.normal(0, 20, size=shape)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: str) -> Path:
    """A NIfTI file (gzipped if the name ends .gz); an int dtype of float data gets a slope/intercept."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.dtype(dtype))
    nib.save(img, str(path))
    return path


def oracle(path: Path) -> np.ndarray:
    """The whole volume as nibabel reads it, in tessera's order: (C, z, y, x)."""
    data = np.asarray(nib.load(str(path)).dataobj)
    if data.ndim == 3:
        data = data[..., None]
    return data.transpose(3, 2, 1, 0)


def assert_windows_match(info, expected: np.ndarray, bands=None) -> None:
    """Every window of a plan equals the same window cut from the reflect-padded whole volume."""
    padded = np.pad(expected, ((0, 0),) + ((HALO, HALO),) * 3, mode="reflect")
    windows = plan_chunks(info.shape, CHUNK, HALO)
    assert len(windows) > 8
    for w in windows:
        pixels, valid = read_window(info, w, bands=bands)
        start = [s.start for s in w.core]
        cut = padded[(slice(None), *(slice(a, a + n) for a, n in zip(start, w.window_shape, strict=True)))]
        assert pixels.dtype == np.dtype(info.dtype) and pixels.shape == (expected.shape[0], *w.window_shape)
        np.testing.assert_array_equal(pixels, cut)
        np.testing.assert_array_equal(valid, ~np.isnan(cut).all(axis=0) if cut.dtype.kind == "f"
                                      else np.ones(w.window_shape, bool))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(nifti, "SLAB_PLANES", 4)  # several slabs through a small volume
    nifti.close_files()
    yield tmp_path / "cache"
    nifti.close_files()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["int16", "float32"])
@pytest.mark.parametrize(("orientation", "codes"),
                         [("RAS", "SAR"), ("LAS", "SAL"), ("LPS", "SPL"), ("oblique", "SAR")])
def test_windows_and_geometry_match_nibabel(tmp_path, cache_dir, suffix, dtype, orientation, codes):
    path = write_nifti(tmp_path / f"v{suffix}", volume(SHAPE_XYZ), nifti_affine(orientation), dtype)
    img = nib.load(str(path))
    info = open_scene(path, policy=InputPolicy(cache_dir=str(cache_dir)))
    expected = oracle(path)

    assert info.format == "nifti" and info.shape == SHAPE_XYZ[::-1] and info.count == 1
    assert info.nodata is None and info.source_dtype == dtype and info.dtype == expected.dtype.name
    if dtype == "int16":  # nibabel fitted int16 with a slope and intercept: reads are float (its choice of width)
        slope, inter = img.dataobj.slope, img.dataobj.inter  # the loaded header's are reset to NaN
        assert slope != 1.0 and inter != 0.0 and info.dtype in ("float32", "float64")
    assert (info.data_path is not None) == (suffix == ".nii.gz")

    affine = np.array(info.affine).reshape(4, 4)
    np.testing.assert_array_equal(affine[:, [2, 1, 0, 3]], img.affine)  # bit for bit back to NIfTI order
    assert info.orientation == codes == "".join(nib.aff2axcodes(img.affine))[::-1]
    np.testing.assert_allclose(info.spacing, np.linalg.norm(img.affine[:3, :3], axis=0)[::-1], rtol=1e-12)
    if orientation != "oblique":
        np.testing.assert_allclose(info.spacing, SPACING_XYZ[::-1], rtol=1e-6)
    rng = np.random.default_rng(1)
    zyx = rng.integers(0, SHAPE_XYZ[::-1], size=(20, 3))
    ras_ours = affine @ np.c_[zyx, np.ones(20)].T
    ras_nibabel = img.affine @ np.c_[zyx[:, ::-1], np.ones(20)].T
    np.testing.assert_allclose(ras_ours, ras_nibabel, rtol=0, atol=1e-9)
    grid = scene_grid(info)  # the store writer accepts the geometry as it is
    assert grid.affine == tuple(tuple(row) for row in affine.tolist())

    assert_windows_match(info, expected)
    assert pickle.loads(pickle.dumps(info)) == info


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_4d_files_need_a_channel_choice(tmp_path, cache_dir, suffix):
    data = np.stack([volume(SHAPE_XYZ, seed=s) for s in range(3)], axis=-1).astype(np.float32)
    path = write_nifti(tmp_path / f"v4{suffix}", data, nifti_affine("LAS"), "float32")
    with pytest.raises(InputError, match=r"v4.*4D NIfTI of shape \[23, 19, 13, 3\].*set bands: "):
        open_scene(path, policy=InputPolicy(cache_dir=str(cache_dir)))
    with pytest.raises(InputError, match=r"v4.*has 3 channel.*bands \[5\]"):
        open_scene(path, policy=InputPolicy(bands=(1, 5), cache_dir=str(cache_dir)))

    info = open_scene(path, policy=InputPolicy(bands=(3, 1), cache_dir=str(cache_dir)))
    assert info.count == 3 and info.shape == SHAPE_XYZ[::-1] and info.dtype == "float32"
    expected = oracle(path)
    np.testing.assert_array_equal(expected[0], data[..., 0].T)
    assert_windows_match(info, expected[[2, 0]], bands=(3, 1))
    assert_windows_match(info, expected)  # bands=None: every channel


def test_more_than_four_axes_and_2d_files_are_refused(tmp_path):
    vec = nib.Nifti1Image(np.zeros((4, 5, 6, 1, 3), np.float32), np.eye(4))
    vec.header.set_intent("vector")
    nib.save(vec, str(tmp_path / "vec.nii"))
    with pytest.raises(InputError, match=r"vec.nii: NIfTI with 5 axes \[4, 5, 6, 1, 3\] \(intent 'vector'\)"):
        open_scene(tmp_path / "vec.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(InputError, match="flat.nii: NIfTI with 2 axes"):
        open_scene(tmp_path / "flat.nii")
    rgb = nib.Nifti1Image(np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4))
    nib.save(rgb, str(tmp_path / "rgb.nii"))
    with pytest.raises(InputError, match="rgb.nii: bands of type .* are not supported"):
        open_scene(tmp_path / "rgb.nii")
    with pytest.raises(InputError, match="nope.nii.gz: file not found"):
        open_scene(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_complex_volumes_follow_the_complex_policy(tmp_path, cache_dir, suffix):
    z = (volume(SHAPE_XYZ) + 1j * volume(SHAPE_XYZ, seed=4)).astype(np.complex64)
    path = write_nifti(tmp_path / f"c{suffix}", z, nifti_affine("RAS"), "complex64")
    with pytest.raises(InputError, match="complex_bands: magnitude"):
        open_scene(path, policy=InputPolicy(cache_dir=str(cache_dir)))
    info = open_scene(path, policy=InputPolicy(complex_bands="magnitude", cache_dir=str(cache_dir)))
    assert info.dtype == "float32" and info.source_dtype == "complex64" and info.derive == "magnitude"
    expected = np.abs(oracle(path).astype(np.complex128)).astype(np.float32)
    assert_windows_match(info, expected)


def test_gz_cache_is_reused_and_a_changed_file_converted_again(tmp_path, cache_dir, monkeypatch):
    conversions = []
    convert = nifti.convert_gz
    monkeypatch.setattr(nifti, "convert_gz", lambda *a: conversions.append(a[0]) or convert(*a))
    path = write_nifti(tmp_path / "v.nii.gz", volume(SHAPE_XYZ), nifti_affine("RAS"), "float32")
    policy = InputPolicy(cache_dir=str(cache_dir))

    first = open_scene(path, policy=policy)
    stamp = os.stat(first.data_path).st_mtime_ns
    second = open_scene(path, policy=policy)
    assert len(conversions) == 1 and second.data_path == first.data_path
    assert os.stat(first.data_path).st_mtime_ns == stamp
    assert sorted(p.name for p in cache_dir.iterdir()) == [Path(first.data_path).name]  # no partials

    write_nifti(path, volume(SHAPE_XYZ, seed=9), nifti_affine("RAS"), "float32")
    os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns + 10**9))  # a different mtime, surely
    third = open_scene(path, policy=policy)
    assert len(conversions) == 2 and third.data_path != first.data_path
    assert [p.name for p in cache_dir.iterdir()] == [Path(third.data_path).name]  # the stale entry is gone
    assert_windows_match(third, oracle(path))

    nifti.close_files()  # a worker still holding the first open's info refuses the changed file
    with pytest.raises(InputError, match="v.nii.gz: the file changed after it was opened"):
        read_window(first, plan_chunks(first.shape, CHUNK, HALO)[0])
    assert len(conversions) == 2


def test_a_missing_cache_entry_is_converted_again_at_read(tmp_path, cache_dir):
    path = write_nifti(tmp_path / "v.nii.gz", volume(SHAPE_XYZ), nifti_affine("LPS"), "int16")
    info = open_scene(path, policy=InputPolicy(cache_dir=str(cache_dir)))
    shutil.rmtree(info.data_path)
    nifti.close_files()
    assert_windows_match(info, oracle(path))
    assert Path(info.data_path).is_dir()


def test_truncated_files_are_refused_and_leave_no_cache(tmp_path, cache_dir):
    path = write_nifti(tmp_path / "v.nii.gz", volume((40, 40, 30)), nifti_affine("RAS"), "float32")
    blob = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) * 6 // 10])
    with pytest.raises(InputError, match=r"cut.nii.gz: truncated or corrupt"):
        open_scene(cut, policy=InputPolicy(cache_dir=str(cache_dir)))
    assert not cache_dir.exists() or not any(cache_dir.iterdir())

    flipped = bytearray(blob)  # a corrupt byte in the trailer: the CRC check catches it
    flipped[-6] ^= 0xFF
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match=r"crc.nii.gz: truncated or corrupt"):
        open_scene(bad, policy=InputPolicy(cache_dir=str(cache_dir)))
    assert not any(cache_dir.iterdir())

    raw = write_nifti(tmp_path / "v.nii", volume((40, 40, 30)), nifti_affine("RAS"), "float32")
    raw.write_bytes(raw.read_bytes()[:100_000])
    with pytest.raises(InputError, match=r"v.nii: truncated NIfTI \(100000 bytes, the header needs 192352\)"):
        open_scene(raw)


def test_the_gzip_stream_is_never_rewound():
    stream = nifti._ForwardStream(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(bytes(range(200))))))
    stream.seek(10)
    assert stream.read(5) == bytes(range(10, 15)) and stream.seek(20) == 20
    with pytest.raises(RuntimeError, match="backward seek to 3"):
        stream.seek(3)


def test_gz_conversion_and_reads_hold_a_slab_not_the_volume(tmp_path, monkeypatch):
    """A 200^3 int16 volume with a slope (16 MB in the file, 64 MB as the float64 reads)."""
    nifti.close_files()
    shape = (200, 200, 200)
    rng = np.random.default_rng(0)
    raw = (np.add.outer(np.add.outer(np.arange(200), np.arange(200)), np.arange(200)) % 1000
           + rng.integers(0, 50, size=shape)).astype(np.int16)
    img = nib.Nifti1Image(raw, nifti_affine("LAS"))
    img.header.set_slope_inter(0.25, -12.0)
    path = tmp_path / "big.nii.gz"
    img.to_filename(str(path))  # raw int16 data: nibabel keeps the slope and intercept we set
    proxy = nib.load(str(path)).dataobj
    assert (proxy.slope, proxy.inter) == (0.25, -12.0)

    tracemalloc.start()
    t0 = time.perf_counter()
    info = open_scene(path, policy=InputPolicy(cache_dir=str(tmp_path / "cache")))
    convert_s = time.perf_counter() - t0
    _, convert_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    window = next(w for w in plan_chunks(info.shape, 64, 16) if w.index == (1, 1, 1))  # inside: no padding
    pixels, _ = read_window(info, window)
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    itemsize = np.dtype(info.dtype).itemsize
    volume_bytes = 200**3 * itemsize
    slab_bytes = nifti.SLAB_PLANES * 200 * 200 * itemsize
    window_bytes = pixels.nbytes
    print(f"200^3 int16 -> {info.dtype} .nii.gz: converted in {convert_s:.2f} s, peak {convert_peak / 2**20:.1f} MiB "
          f"(slab {slab_bytes / 2**20:.1f} MiB, volume {volume_bytes / 2**20:.1f} MiB); window read peak "
          f"{read_peak / 2**20:.1f} MiB")
    assert info.dtype == "float64" and info.orientation == "SAL"  # nibabel scales ints in float64
    assert convert_peak < 3 * slab_bytes + window_bytes and convert_peak < volume_bytes / 2
    # a read holds the window and the cache chunks it touches (at most), never the volume
    chunk_bytes = int(np.prod(nifti.zarr.open_array(info.data_path, mode="r").chunks)) * itemsize
    touched = np.prod([len(range(s.start // c, (s.stop - 1) // c + 1))
                       for s, c in zip(window.read, info.block_shape, strict=True)])
    assert read_peak < window_bytes + touched * chunk_bytes and read_peak < volume_bytes / 2
    z, y, x = window.read
    np.testing.assert_array_equal(pixels[0], raw[x, y, z].T * 0.25 - 12.0)


def test_nii_gz_wins_over_any_gz_reader(monkeypatch):
    class GzReader:
        name, suffixes = "gzdummy", (".gz",)

    monkeypatch.setitem(READERS, "gzdummy", GzReader())
    assert reader_for("a/T1w.nii.gz").name == reader_for("b/T1W.NII.GZ").name == "nifti"
    assert reader_for("a/T1w.nii").name == "nifti" and reader_for("x.tar.gz").name == "gzdummy"
    assert reader_for("a/ct.zarr").name == "zarr" and reader_for("s.tif").name == "geotiff"


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux /proc/self/io")
def test_an_uncompressed_window_reads_its_rows_not_the_file(tmp_path):
    def bytes_read() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

    path = write_nifti(tmp_path / "v.nii", volume((120, 110, 100)), nifti_affine("RAS"), "float32")
    info = open_scene(path)
    window = next(w for w in plan_chunks(info.shape, 24, 4) if w.index == (2, 2, 2))
    read_window(info, window)  # opens the file: header bytes not counted below
    before = bytes_read()
    pixels, _ = read_window(info, window)
    read = bytes_read() - before
    # nibabel reads whole x-rows of the window's (y, z) rows (small gaps are cheaper read than skipped)
    assert pixels.nbytes <= read <= 32 * 32 * 120 * 4 + 65536 < os.path.getsize(path) / 5
