"""DICOM series reader: slice order by position, geometry (LPS -> RAS affine), rescale per slice,
windowed reads with reflect padding, and the series it refuses (gaps, duplicates, several series,
transfer syntaxes without a decoder, multi-frame objects).

Every series is written with pydicom in tmp_path, in shuffled file order with shuffled
InstanceNumbers, so that only the positions can give the right order."""

from __future__ import annotations

import logging
import pickle
import re
import shutil

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipelines.plan.chunks import plan_chunks
from pipelines.readers import dicom as dicom_reader
from pipelines.readers import open_scene, read_window, reader_for
from schemas.errors import InputError
from schemas.store import VolumeGrid
from tests.helpers import smooth_scene, write_geotiff

SHAPE = (20, 40, 48)  # slices, rows, columns
PIXEL_SPACING = (0.7, 0.8)  # mm between rows, between columns
SLICE_MM = 2.5
IPP0 = (-120.5, 30.25, 200.0)  # LPS mm of the first slice in position order
# (row cosines, column cosines): exact short decimals (3-4-5 triangles), orthonormal.
ORIENTATIONS = {
    "oblique": ((0.6, 0.8, 0.0), (-0.48, 0.36, -0.8)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "axial_flipped": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def _stored_volume(shape=SHAPE, seed=0) -> np.ndarray:
    """(z, y, x) int16 stored values, CT-like (-1000..3000 before the -1024 intercept)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape, dtype=np.int16)


def _slice_dataset(stored: np.ndarray, *, ipp, iop, series_uid: str, study_uid: str, instance: int,
                   slope: float, intercept: float, bits_stored: int = 16, signed: bool = True) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = SLICE_MM
    ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
    ds.ImageOrientationPatient = [*iop[0], *iop[1]]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    return ds


def write_series(directory, stored: np.ndarray, *, orientation="oblique", slopes=None, intercepts=None,
                 seed=0, series_uid=None, names=None, transfer_syntax=ExplicitVRLittleEndian, step=None,
                 bits_stored=16):
    """Write `stored` (z, y, x) as one slice per file, in shuffled order and shuffled InstanceNumbers.

    `step` is the LPS offset (mm) between slice origins (default: the normal times SLICE_MM);
    unsigned `stored` is written with PixelRepresentation 0.

    Returns:
        The LPS origin (ImagePositionPatient as written) of each slice, in z order, (z, 3) float64.
    """
    directory.mkdir(parents=True, exist_ok=True)
    row, col = ORIENTATIONS[orientation]
    normal = np.cross(row, col)
    n = stored.shape[0]
    slopes = slopes if slopes is not None else [1.0] * n
    intercepts = intercepts if intercepts is not None else [-1024.0] * n
    rng = np.random.default_rng(seed)
    file_order = rng.permutation(n)
    instances = rng.permutation(n) + 1
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    step = np.asarray(step if step is not None else SLICE_MM * normal, dtype=np.float64)
    ipps = np.array([np.round(np.array(IPP0) + k * step, 6) for k in range(n)])
    for i, k in enumerate(file_order):
        ds = _slice_dataset(stored[k], ipp=ipps[k], iop=(row, col), series_uid=series_uid, study_uid=study_uid,
                            instance=int(instances[i]), slope=slopes[k], intercept=intercepts[k],
                            bits_stored=bits_stored, signed=stored.dtype.kind == "i")
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, stored[k])
        elif transfer_syntax != ExplicitVRLittleEndian:
            # Encapsulated bytes that are no valid codestream: open must refuse before decoding.
            ds.file_meta.TransferSyntaxUID = transfer_syntax
            ds.PixelData = encapsulate([b"\x00" * 64])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        name = names[i] if names is not None else f"IM{rng.integers(10**6):06d}_{i}.dcm"
        ds.save_as(directory / name, enforce_file_format=True)
    return ipps


def _expected_values(stored, slopes, intercepts) -> np.ndarray:
    out = stored.astype(np.float64) * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    return out.astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_caches():
    dicom_reader.clear_caches()
    yield
    dicom_reader.clear_caches()


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_window_equals_the_rescaled_volume_and_the_affine_places_voxels(tmp_path, orientation):
    stored = _stored_volume()
    n = SHAPE[0]
    slopes = [1.0] * n
    intercepts = [-1024.0] * n
    slopes[7], intercepts[7] = 2.0, -2048.0  # per-slice rescale
    slopes[12], intercepts[12] = 0.5, -1000.5
    series = tmp_path / "series"
    ipps = write_series(series, stored, orientation=orientation, slopes=slopes, intercepts=intercepts)

    info = open_scene(series)
    assert info.format == "dicom" and info.shape == SHAPE and info.count == 1 and info.nodata is None
    assert info.dtype == "float32" and info.source_dtype == "int16" and info.block_shape == (1, 40, 48)
    np.testing.assert_allclose(info.spacing, (SLICE_MM, *PIXEL_SPACING), rtol=1e-12)
    assert pickle.loads(pickle.dumps(info)) == info  # what the driver sends to the readers

    # Every halo window equals the same window of the reflect-padded expected volume.
    expected = _expected_values(stored, slopes, intercepts)
    chunk, halo = (8, 16, 20), (2, 3, 4)
    padded = np.pad(expected, tuple((h, h) for h in halo), mode="reflect")
    for window in plan_chunks(info.shape, chunk, halo):
        pixels, valid = read_window(info, window)
        origin = window.core_origin
        cut = padded[tuple(slice(o, o + s) for o, s in zip(origin, window.window_shape))]
        assert pixels.dtype == np.float32 and pixels.shape == (1, *window.window_shape)
        np.testing.assert_array_equal(pixels[0], cut)
        assert valid.shape == window.window_shape and valid.all()

    # The affine against an independent computation: voxel (k, r, c) of the position-sorted
    # slices sits at IPP_k + c * col_spacing * row_cos + r * row_spacing * col_cos (LPS).
    row_cos, col_cos = (np.array(v) for v in ORIENTATIONS[orientation])
    affine = np.array(info.affine).reshape(4, 4)
    rng = np.random.default_rng(1)
    voxels = [(0, 0, 0), (n - 1, 39, 47), *(tuple(int(rng.integers(s)) for s in SHAPE) for _ in range(20))]
    for k, r, c in voxels:
        lps = ipps[k] + c * PIXEL_SPACING[1] * row_cos + r * PIXEL_SPACING[0] * col_cos
        ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose((affine @ [k, r, c, 1.0])[:3], ras, atol=1e-6)
    grid = VolumeGrid(affine=info.affine, spacing_mm=info.spacing)  # what the store accepts
    assert grid.spacing_mm == info.spacing


@pytest.mark.parametrize(("orientation", "codes"), [("axial", "SPL"), ("axial_flipped", "IPR"),
                                                     ("sagittal", "RIP")])
def test_orientation_codes_name_the_direction_of_each_array_axis(tmp_path, orientation, codes):
    # In LPS: axial rows run along the column cosines +y (P), columns along +x (L), slices along
    # the normal +z (S). Flipped axial: row cosines -x, so columns run to R and the normal is -z (I).
    # Sagittal: row cosines +y (P), column cosines -z (I), normal P x I = -x (R).
    write_series(tmp_path / "s", _stored_volume((4, 6, 5)), orientation=orientation)
    info = open_scene(tmp_path / "s")
    assert info.orientation == codes


def test_without_rescale_the_stored_integers_come_back_unchanged(tmp_path):
    stored = _stored_volume((5, 12, 10), seed=4)
    write_series(tmp_path / "s", stored, orientation="axial", intercepts=[0.0] * 5)
    info = open_scene(tmp_path / "s")
    assert info.dtype == info.source_dtype == "int16"
    (window,) = plan_chunks(info.shape, 16, 0)
    pixels, valid = read_window(info, window)
    np.testing.assert_array_equal(pixels[0], stored)
    assert pixels.dtype == np.int16 and valid.all()


@pytest.mark.parametrize(("dtype", "bits_stored", "low", "high"),
                         [("int16", 12, -2048, 2048), ("uint16", 12, 0, 4096), ("uint16", 16, 0, 65536)])
def test_stored_types_and_bit_depths_come_back_as_stored(tmp_path, dtype, bits_stored, low, high):
    rng = np.random.default_rng(9)
    stored = rng.integers(low, high, size=(4, 9, 11)).astype(dtype)
    write_series(tmp_path / "s", stored, orientation="axial", intercepts=[0.0] * 4, bits_stored=bits_stored)
    info = open_scene(tmp_path / "s")
    assert info.dtype == info.source_dtype == dtype
    (window,) = plan_chunks(info.shape, 16, 0)
    np.testing.assert_array_equal(read_window(info, window)[0][0], stored)


def test_a_gantry_tilt_gives_a_sheared_affine_that_still_places_every_voxel(tmp_path):
    tilt_step = (0.0, 0.5, SLICE_MM)  # LPS: each slice 0.5 mm further posterior, 2.5 mm superior
    stored = _stored_volume((6, 10, 12), seed=7)
    ipps = write_series(tmp_path / "tilt", stored, orientation="axial", step=tilt_step)
    info = open_scene(tmp_path / "tilt")
    affine = np.array(info.affine).reshape(4, 4)
    assert info.spacing[0] == pytest.approx(np.hypot(0.5, SLICE_MM))
    for k, r, c in [(0, 0, 0), (5, 9, 11), (3, 4, 7)]:
        lps = ipps[k] + c * PIXEL_SPACING[1] * np.array([1.0, 0, 0]) + r * PIXEL_SPACING[0] * np.array([0, 1.0, 0])
        np.testing.assert_allclose((affine @ [k, r, c, 1.0])[:3], lps * [-1, -1, 1], atol=1e-6)
    VolumeGrid(affine=info.affine, spacing_mm=info.spacing)


def test_a_slice_off_the_line_of_origins_is_refused(tmp_path):
    series = tmp_path / "off"
    write_series(series, _stored_volume((5, 8, 8)), orientation="axial")
    index = dicom_reader.scan_series(str(series))
    ds = dicom_reader.pydicom.dcmread(series / index.files[2])
    ds.ImagePositionPatient = [IPP0[0] + 3.0, IPP0[1], IPP0[2] + 2 * SLICE_MM]  # 3 mm to the patient's left
    ds.save_as(series / index.files[2], enforce_file_format=True)
    with pytest.raises(InputError, match=rf"off/{re.escape(index.files[2])}: ImagePositionPatient .* is 3\.0000 mm "
                                         r"off the line through the first"):
        open_scene(series)


def test_rle_lossless_slices_decode_natively(tmp_path):
    stored = _stored_volume((6, 14, 18), seed=2)
    write_series(tmp_path / "rle", stored, orientation="oblique", transfer_syntax=RLELossless)
    info = open_scene(tmp_path / "rle")
    padded = np.pad(_expected_values(stored, [1.0] * 6, [-1024.0] * 6), ((1, 1), (2, 2), (2, 2)), mode="reflect")
    for window in plan_chunks(info.shape, (3, 8, 8), (1, 2, 2)):
        pixels, _ = read_window(info, window)
        cut = padded[tuple(slice(o, o + s) for o, s in zip(window.core_origin, window.window_shape))]
        np.testing.assert_array_equal(pixels[0], cut)


def test_a_window_decodes_only_the_slices_of_its_z_range(tmp_path, monkeypatch):
    stored = _stored_volume((12, 10, 10), seed=5)
    write_series(tmp_path / "s", stored, orientation="axial")
    info = open_scene(tmp_path / "s")
    series = dicom_reader.scan_series(str(tmp_path / "s"))
    decoded = []
    real = dicom_reader.pydicom.dcmread

    def counting(path, *args, **kwargs):
        if not kwargs.get("stop_before_pixels"):
            decoded.append(str(path).rsplit("/", 1)[-1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicom_reader.pydicom, "dcmread", counting)
    windows = plan_chunks(info.shape, (4, 10, 5), (1, 0, 0))
    read_window(info, windows[2])  # core z 4:8, read z 3:9
    assert decoded == list(series.files[3:9])
    decoded.clear()
    read_window(info, windows[3])  # same z range, other columns: every slice from the cache
    assert decoded == []


def test_the_slice_cache_stays_within_its_bound(tmp_path, monkeypatch):
    stored = _stored_volume((10, 32, 32), seed=6)  # 2 KiB per slice
    write_series(tmp_path / "s", stored, orientation="axial")
    info = open_scene(tmp_path / "s")
    monkeypatch.setattr(dicom_reader, "SLICE_CACHE_MB", 3 * 2048 / 2**20)  # three slices
    for window in plan_chunks(info.shape, (4, 32, 32), (1, 0, 0)):
        read_window(info, window)
    assert len(dicom_reader._slice_cache) == 3 and dicom_reader._slice_cache_bytes == 3 * 2048


def test_a_missing_slice_is_refused_naming_the_gap_and_files(tmp_path):
    series = tmp_path / "gap"
    ipps = write_series(series, _stored_volume((10, 8, 8)), orientation="oblique")
    index = dicom_reader.scan_series(str(series))
    (series / index.files[4]).unlink()
    normal = np.cross(*ORIENTATIONS["oblique"])
    before, after = ipps[3] @ normal, ipps[5] @ normal
    with pytest.raises(InputError, match=(
            rf"gap: 1 slice\(s\) missing between {before:.4f} mm \({re.escape(index.files[3])}\) and "
            rf"{after:.4f} mm \({re.escape(index.files[5])}\): a gap of 5.0000 mm .* spacing is 2.5000 mm")):
        open_scene(series)


def test_duplicated_positions_are_refused_naming_both_files(tmp_path):
    series = tmp_path / "dup"
    write_series(series, _stored_volume((6, 8, 8)), orientation="axial")
    index = dicom_reader.scan_series(str(series))
    shutil.copy(series / index.files[2], series / "copy.dcm")
    with pytest.raises(InputError, match=r"dup: two slices at the same position along the slice normal") as exc:
        open_scene(series)
    assert "copy.dcm" in str(exc.value) and index.files[2] in str(exc.value)


def test_uneven_spacing_is_refused(tmp_path):
    series = tmp_path / "uneven"
    write_series(series, _stored_volume((6, 8, 8)), orientation="axial", seed=3)
    index = dicom_reader.scan_series(str(series))
    ds = dicom_reader.pydicom.dcmread(series / index.files[-1])
    ds.ImagePositionPatient = [IPP0[0], IPP0[1], IPP0[2] + 5 * SLICE_MM + 1.0]  # 3.5 mm instead of 2.5
    ds.save_as(series / index.files[-1], enforce_file_format=True)
    with pytest.raises(InputError, match=r"uneven slice spacing: 3\.5000 mm between"):
        open_scene(series)


def test_two_series_in_one_directory_are_refused_naming_both(tmp_path):
    series = tmp_path / "two"
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    write_series(series, _stored_volume((4, 8, 8)), series_uid=uids[0], names=[f"a{i}.dcm" for i in range(4)])
    write_series(series, _stored_volume((3, 8, 8)), series_uid=uids[1], names=[f"b{i}.dcm" for i in range(3)])
    with pytest.raises(InputError, match=rf"holds 2 DICOM series \({re.escape(uids[0])}: 4 files, e\.g\. a0\.dcm; "
                                         rf"{re.escape(uids[1])}: 3 files, e\.g\. b0\.dcm\); split them"):
        open_scene(series)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_compressed_syntaxes_without_a_decoder_are_refused_at_open(tmp_path, syntax):
    series = tmp_path / "compressed"
    write_series(series, _stored_volume((3, 8, 8)), transfer_syntax=syntax)
    if get_decoder(syntax).is_available:
        info = open_scene(series)  # decodable here: open accepts it (the bytes are checked at read)
        assert info.format == "dicom" and info.shape == (3, 8, 8)
    else:
        with pytest.raises(InputError, match=rf"pixel data in {re.escape(UID(syntax).name)} \({re.escape(syntax)}\), "
                                             r"which no installed package decodes .* install "):
            open_scene(series)


def test_the_refusal_names_the_file_syntax_and_what_to_install(tmp_path, monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["openjpeg plugin requires pylibjpeg-openjpeg"]

    series = tmp_path / "j2k"
    write_series(series, _stored_volume((3, 8, 8)), transfer_syntax=JPEG2000Lossless, names=["x0", "x1", "x2"])
    monkeypatch.setattr(dicom_reader, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(InputError, match=r"j2k/x0: pixel data in JPEG 2000 Image Compression \(Lossless Only\) "
                                         r"\(1\.2\.840\.10008\.1\.2\.4\.90\), which no installed package decodes "
                                         r"\(pydicom reports missing: openjpeg plugin requires pylibjpeg-openjpeg\); "
                                         r"install pylibjpeg \+ pylibjpeg-openjpeg"):
        open_scene(series)


def test_multi_frame_objects_are_refused(tmp_path):
    series = tmp_path / "enhanced"
    write_series(series, _stored_volume((2, 8, 8)), names=["f0.dcm", "f1.dcm"])
    ds = dicom_reader.pydicom.dcmread(series / "f0.dcm")
    ds.NumberOfFrames = 2
    ds.save_as(series / "f0.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match=r"f0\.dcm: a multi-frame \(Enhanced\) DICOM object \(2 frames\)"):
        open_scene(series)


def test_files_that_are_not_dicom_images_are_ignored_and_counted(tmp_path, caplog):
    series = tmp_path / "s"
    stored = _stored_volume((4, 8, 8), seed=8)
    write_series(series, stored, orientation="axial")
    (series / "README.txt").write_text("exported by the scanner")
    (series / ".DS_Store").write_bytes(b"\x00\x01")
    with caplog.at_level(logging.WARNING, logger=dicom_reader.__name__):
        info = open_scene(series)
    assert info.shape == (4, 8, 8)
    assert "ignored 1 entries that are not DICOM images: README.txt" in caplog.text
    (series / "broken.dcm").write_bytes(b"no preamble")
    with pytest.raises(InputError, match=r"broken\.dcm: no DICOM preamble"):
        open_scene(series)


def test_a_single_file_or_a_missing_directory_is_refused_with_the_fix(tmp_path):
    series = tmp_path / "s"
    write_series(series, _stored_volume((2, 8, 8)), names=["a.dcm", "b.dcm"])
    with pytest.raises(InputError, match=rf"a\.dcm: a single DICOM file; .* pass {re.escape(str(series))}"):
        open_scene(series / "a.dcm")
    with pytest.raises(InputError, match="nowhere: directory not found"):
        dicom_reader.DicomReader().open(str(tmp_path / "nowhere"), policy=dicom_reader.InputPolicy())


def test_bands_other_than_the_one_channel_are_refused(tmp_path):
    write_series(tmp_path / "s", _stored_volume((3, 8, 8)))
    info = open_scene(tmp_path / "s")
    (window,) = plan_chunks(info.shape, 8, 0)
    assert read_window(info, window, bands=(1,))[0].shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match=r"one channel; bands \[2\]"):
        read_window(info, window, bands=(2,))


def test_reader_for_takes_dicom_directories_by_content_and_nothing_else(tmp_path):
    write_series(tmp_path / "named", _stored_volume((2, 8, 8)))
    write_series(tmp_path / "unnamed", _stored_volume((2, 8, 8)), names=["IM0001", "IM0002"])
    geo = tmp_path / "geotiffs"
    geo.mkdir()
    write_geotiff(geo / "a.tif", smooth_scene((16, 16), bands=1))
    write_geotiff(geo / "b", smooth_scene((16, 16), bands=1))  # no suffix: no DICM magic either
    assert reader_for(tmp_path / "named").name == "dicom"
    assert reader_for(tmp_path / "unnamed").name == "dicom"
    assert reader_for(str(tmp_path / "unnamed")).name == "dicom"
    assert reader_for(geo).name == "geotiff"
    assert reader_for(geo / "a.tif").name == "geotiff"
    assert reader_for(tmp_path / "missing").name == "geotiff"


def test_a_series_changed_after_open_is_refused_at_read(tmp_path):
    series = tmp_path / "s"
    write_series(series, _stored_volume((5, 8, 8)), orientation="axial")
    info = open_scene(series)
    index = dicom_reader.scan_series(str(series))
    (series / index.files[-1]).unlink()
    dicom_reader.clear_caches()  # as in a worker process that did not open the series
    (window,) = plan_chunks(info.shape, 8, 0)
    with pytest.raises(InputError, match=r"s: the series changed since it was opened \(now shape \(4, 8, 8\)"):
        read_window(info, window)
