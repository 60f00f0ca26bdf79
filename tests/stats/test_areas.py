"""area_m2 of the chunk partials and of both merges, on arrays small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.stats import merge_regions
from pipelines.stats.partials import ChunkRegions, chunk_regions, label_chunk, region_id_offset
from schemas.store import GeoGrid
from tests.stats.cases import NODATA, row_merge

X = NODATA
# scene rows have pixel areas 1, 2, 4, 8 m²
ROW_AREAS = np.array([1.0, 2.0, 4.0, 8.0])
# class 1 (left) and class 2 (right) each cross every border of the 2x2 chunks
MASK = np.array([[1, 1, 2, 2],
                 [1, 1, 2, 2],
                 [1, X, X, 2],
                 [1, 1, X, 2]], dtype=np.uint8)
AREA_1 = 2 * 1 + 2 * 2 + 1 * 4 + 2 * 8  # 26
AREA_2 = 2 * 1 + 2 * 2 + 1 * 4 + 1 * 8  # 18


def _parts(*, with_areas: bool = True, supply_labels: bool = False) -> list[ChunkRegions]:
    parts = []
    for i in range(2):
        for j in range(2):
            core = (slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2))
            offset = region_id_offset((i, j), (2, 2), (2, 2))
            labels = label_chunk(MASK[core], id_offset=offset) if supply_labels else None
            parts.append(chunk_regions(MASK[core], chunk_index=(i, j), origin=(2 * i, 2 * j), id_offset=offset,
                                       labels=labels, pixel_area_m2_by_row=ROW_AREAS[core[0]] if with_areas else None))
    return parts


@pytest.mark.parametrize("supply_labels", [False, True])
def test_partial_areas_by_hand(supply_labels: bool) -> None:
    classes = np.array([[4, 4, X], [X, 4, 2], [2, X, 2]], dtype=np.uint8)
    kw = dict(chunk_index=(1, 2), origin=(10, 20), id_offset=100)
    labels = label_chunk(classes, id_offset=100) if supply_labels else None
    part = chunk_regions(classes, **kw, labels=labels, pixel_area_m2_by_row=np.array([1.0, 2.0, 4.0]))
    # region 101: (0,0) (0,1) (1,1); 102: (1,2) (2,2); 103: (2,0)
    assert part.ids.tolist() == [101, 102, 103]
    assert part.area_m2.tolist() == [1 + 1 + 2, 2 + 4, 4]
    # the other arrays are those computed without areas, byte for byte
    plain = chunk_regions(classes, **kw)
    assert np.isnan(plain.area_m2).all()
    for name, values in plain.arrays.items():
        if name != "area_m2":
            assert values.dtype == part.arrays[name].dtype and values.tobytes() == part.arrays[name].tobytes(), name


def test_npz_adds_only_the_area_key(tmp_path) -> None:
    part = _parts()[0]
    part.to_npz(tmp_path / "a.npz")
    chunk_regions(MASK[:2, :2], chunk_index=(0, 0), origin=(0, 0), id_offset=0).to_npz(tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(b.files) and "area_m2" in a.files
        assert all(a[k].tobytes() == b[k].tobytes() for k in a.files if k != "area_m2")
        assert a["area_m2"].tolist() == [2 * 1 + 2 * 2]
        older = {k: a[k] for k in a.files if k != "area_m2"}  # a file written before area_m2
    np.savez(tmp_path / "old.npz", **older)
    back = ChunkRegions.from_npz(tmp_path / "old.npz")
    assert np.isnan(back.area_m2).all() and back.pixel_count.tolist() == part.pixel_count.tolist()
    assert ChunkRegions.from_npz(tmp_path / "a.npz") == part


def test_partial_area_argument_is_checked() -> None:
    kw = dict(chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    with pytest.raises(ValueError, match=r"float64 of shape \(4,\)"):
        chunk_regions(MASK, **kw, pixel_area_m2_by_row=ROW_AREAS[:3])
    with pytest.raises(ValueError, match="float64"):
        chunk_regions(MASK, **kw, pixel_area_m2_by_row=ROW_AREAS.astype(np.float32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        chunk_regions(MASK, **kw, pixel_area_m2_by_row=np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="2D chunks only"):
        chunk_regions(np.ones((2, 2, 2), np.uint8), chunk_index=(0, 0, 0), origin=(0, 0, 0), id_offset=0,
                      pixel_area_m2_by_row=np.ones(2))
    part = chunk_regions(MASK, **kw, pixel_area_m2_by_row=ROW_AREAS)
    with pytest.raises(ValueError, match="area_m2 must be >= 0 or NaN"):
        ChunkRegions(chunk_index=(0, 0), origin=(0, 0), shape=(4, 4),
                     arrays=dict(part.arrays) | {"area_m2": -part.area_m2})


@pytest.mark.parametrize("supply_labels", [False, True])
def test_merged_areas_add_up_in_memory_and_row_by_row(supply_labels: bool) -> None:
    parts = _parts(supply_labels=supply_labels)
    assert sorted(p.area_m2.tolist() for p in parts) == sorted([[2.0 + 4.0], [2.0 + 4.0], [4.0 + 16.0], [4.0 + 8.0]])
    for merged in (merge_regions(parts), row_merge(parts)):
        assert merged.class_id.tolist() == [1, 2]
        assert merged.area_m2.tolist() == [AREA_1, AREA_2]


def test_unknown_area_in_one_chunk_makes_the_region_unknown() -> None:
    parts = _parts()
    parts[3] = _parts(with_areas=False)[3]  # bottom-right chunk: class 2 only
    for merged in (merge_regions(parts), row_merge(parts)):
        assert merged.area_m2[0] == AREA_1 and np.isnan(merged.area_m2[1])


def test_write_regions_writes_areas_and_class_sums(tmp_path) -> None:
    from pipelines.writers.regions_table import write_regions
    from pipelines.writers.tables import table_path

    parts = _parts()
    work = tmp_path / "work"
    work.mkdir()
    geo = dict(grid=GeoGrid((0.001, 0.0, 10.0, 0.0, -0.001, 60.0), "EPSG:4326"))
    summary = write_regions(tmp_path, "s", [parts[:2], parts[2:]], work_dir=work, class_names=["a", "b", "c"], **geo)
    assert summary.class_area_m2 == (0.0, AREA_1, AREA_2)
    table = pq.read_table(table_path(tmp_path, "regions", "s"))
    assert table.column("area_m2").to_pylist() == [AREA_1, AREA_2]
    plain = _parts(with_areas=False)
    unknown = write_regions(tmp_path, "u", [plain[:2], plain[2:]], work_dir=work, class_names=["a", "b", "c"], **geo)
    assert unknown.class_area_m2 == (0.0, None, None)  # no pixels of class 0: 0 m² anyway
    assert pq.read_table(table_path(tmp_path, "regions", "u")).column("area_m2").null_count == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_partial_areas_equal_per_pixel_sums(seed: int) -> None:
    from tests.stats.cases import blobby_mask

    rng = np.random.default_rng(seed)
    classes = blobby_mask((37, 29), seed)
    classes[rng.random(classes.shape) < 0.1] = X  # short runs too
    row_areas = rng.uniform(10.0, 20.0, size=37)
    part = chunk_regions(classes, chunk_index=(0, 0), origin=(5, 0), id_offset=0, pixel_area_m2_by_row=row_areas)
    labels = label_chunk(classes, id_offset=0)
    want = [float(row_areas @ (labels == k).sum(axis=1)) for k in part.ids]
    np.testing.assert_allclose(part.area_m2, want, rtol=1e-13)
