"""STAC items as scenes: the job spec names an ItemCollection and asset keys; each item is one
scene whose channels are the assets' bands, stacked on the finest asset's grid.

- Job spec: ``stac: {items: items.json, assets: [B04, B03, B02, B08]}`` (``schemas.job.StacSpec``).
  The ItemCollection is a local GeoJSON file or an ``http(s)://`` URL, parsed with pystac. Each item
  becomes a scene named by its item id, with the path ``<items>#<item id>``
  (``schemas.uris.stac_scene_path``), which is its ``source`` in ``tables/scenes``.
- Assets: the listed keys, in order, each contributing all its bands (a single-band Sentinel-2 band
  file: one channel). Hrefs may be local paths, ``http(s)://`` or ``s3://`` COGs (read by byte
  ranges as any remote input: :mod:`pipelines.readers.remote`), relative hrefs resolved against
  the ItemCollection's location. Every asset must share one CRS, have a north-up grid and cover
  the finest asset's extent.
- Grid: the finest asset's (smallest pixel area). A window of it is read from each coarser asset
  as the same ground extent (a fractional window of the coarse grid) resampled bilinearly to the
  window's pixel size on the fly (rasterio ``read`` with ``out_shape`` and GDAL's bilinear
  resampling); the same-grid assets are plain windowed reads. Bilinear suits reflectance bands;
  categorical bands (e.g. a scene classification) would want nearest, which is not offered yet.
- nodata: the assets must agree on it (the finest asset's value); a pixel is invalid where every
  channel is nodata, as for any reader.
- Identity (``input_sha256``): SHA-256 of the item's JSON, the asset keys, and each asset's own
  identity (a local file's SHA-256, a remote object's ETag / Last-Modified / size).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipelines.readers.base import InputPolicy, SceneInfo, check_dtype, finish_window
from pipelines.readers.geotiff import cached_dataset, close_datasets, open_raster, remote_env
from pipelines.readers.remote import check_remote, remote_input_sha256
from schemas.errors import InputError
from schemas.uris import is_uri, redact_uri, split_stac_path, stac_scene_path
from schemas.window import ChunkWindow

#: How far (in fine pixels) an asset's extent may fall short of the finest grid's before it is refused.
EXTENT_TOLERANCE_PX = 0.5


@functools.lru_cache(maxsize=8)
def _load_items(items: str) -> tuple[dict[str, Any], ...]:
    """The item dicts of an ItemCollection (local file or http(s) URL), parsed once per process."""
    import pystac

    try:
        collection = pystac.ItemCollection.from_file(items)
    except (OSError, ValueError, KeyError, pystac.STACError) as exc:
        raise InputError(f"{redact_uri(items)}: cannot read a STAC ItemCollection: {exc}") from None
    return tuple(item.to_dict(transform_hrefs=False) for item in collection)


def stac_scene_paths(items: str, *, base_dir: Path) -> list[str]:
    """One scene path per item of an ItemCollection, in its order (relative paths against base_dir).

    Raises:
        InputError: the collection cannot be read, or two items share an id.
    """
    items = resolve_items_ref(items, base_dir=base_dir)
    ids = [item["id"] for item in _load_items(items)]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"{items}: item ids {repeated} appear more than once")
    return [stac_scene_path(items, i) for i in ids]


def resolve_items_ref(items: str, *, base_dir: Path) -> str:
    """A URL as it is (refused if it carries credentials); a local path made absolute."""
    if is_uri(items):
        check_remote(items)
        return items
    path = Path(items).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _item(path: str) -> tuple[str, dict[str, Any]]:
    split = split_stac_path(path)
    if split is None:
        raise InputError(f"{path}: not a STAC scene path (<items.json>#<item id>)")
    items, item_id = split
    for item in _load_items(items):
        if item.get("id") == item_id:
            return items, item
    raise InputError(f"{path}: item {item_id!r} is not in {redact_uri(items)}")


def _href(items: str, href: str) -> str:
    """An asset href made absolute against the ItemCollection's location."""
    if is_uri(href) or os.path.isabs(href):
        return href
    if is_uri(items):
        return urljoin(items, href)
    return os.path.normpath(os.path.join(os.path.dirname(items), href))


def asset_hrefs(path: str, keys: tuple[str, ...] | None) -> tuple[str, dict[str, Any], list[str]]:
    """(items, item dict, absolute hrefs of the asset `keys` in order) of a STAC scene.

    Raises:
        InputError: no keys given, a key the item lacks, or an href with credentials.
    """
    items, item = _item(path)
    if not keys:
        raise InputError(f"{path}: a STAC scene needs asset keys (stac.assets in the job spec)")
    assets = item.get("assets", {})
    missing = [k for k in keys if k not in assets]
    if missing:
        raise InputError(f"{path}: item has no assets {missing} (it has {sorted(assets)})")
    hrefs = [_href(items, assets[k]["href"]) for k in keys]
    for href in hrefs:
        if is_uri(href):
            check_remote(href)
    return items, item, hrefs


def stac_input_sha256(path: str, keys: tuple[str, ...] | None) -> str:
    """The identity of a STAC scene (see the module docstring)."""
    from workers.hashing import file_sha256

    _, item, hrefs = asset_hrefs(path, keys)
    parts = [remote_input_sha256(h) if is_uri(h) else file_sha256(h) for h in hrefs]
    payload = json.dumps({"item": item, "assets": list(keys or ()), "objects": parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class StacReader:
    """STAC items (see the module docstring); claimed by path form (``<items.json>#<id>``), not suffix."""

    name = "stac"
    suffixes: tuple[str, ...] = ()

    def open(self, path: str, *, policy: InputPolicy = InputPolicy()) -> SceneInfo:
        """The scene of one item: the finest asset's grid, one channel per asset band.

        Raises:
            InputError: naming the item and asset: unreadable, another CRS, a rotated grid, an
                extent short of the finest grid's, disagreeing nodata, or a refused dtype.
        """
        _, _, hrefs = asset_hrefs(path, policy.assets)
        metas = []
        for key, href in zip(policy.assets, hrefs, strict=True):
            if not is_uri(href) and not Path(href).exists():
                raise InputError(f"{path}: asset {key!r}: {href}: file not found")
            try:
                with remote_env(href), open_raster(href) as ds:
                    metas.append({"key": key, "href": href, "crs": ds.crs, "transform": ds.transform,
                                  "shape": (ds.height, ds.width), "count": ds.count, "dtypes": tuple(ds.dtypes),
                                  "nodata": ds.nodata, "bounds": ds.bounds, "block": tuple(ds.block_shapes[0])})
            except RasterioError as exc:
                raise InputError(f"{path}: asset {key!r}: {redact_uri(href)}: cannot open as a raster: {exc}") from None
        fine = min(metas, key=lambda m: abs(m["transform"].a * m["transform"].e))
        for m in metas:
            t = m["transform"]
            if t.b != 0 or t.d != 0:
                raise InputError(f"{path}: asset {m['key']!r} has a rotated grid ({tuple(t)[:6]}); north-up grids only")
            if m["crs"] != fine["crs"]:
                raise InputError(f"{path}: asset {m['key']!r} is in {m['crs']}, asset {fine['key']!r} in "
                                 f"{fine['crs']}; the assets of an item must share a CRS")
            if m["nodata"] != fine["nodata"] and not (m["nodata"] is not None and fine["nodata"] is not None
                                                       and np.isnan(m["nodata"]) and np.isnan(fine["nodata"])):
                raise InputError(f"{path}: asset {m['key']!r} has nodata {m['nodata']}, asset {fine['key']!r} "
                                 f"{fine['nodata']}; the assets must agree")
            tol = EXTENT_TOLERANCE_PX * abs(fine["transform"].a)
            b, f = m["bounds"], fine["bounds"]
            if b.left > f.left + tol or b.right < f.right - tol or b.bottom > f.bottom + tol or b.top < f.top - tol:
                raise InputError(f"{path}: asset {m['key']!r} covers {tuple(b)}, short of the finest asset "
                                 f"{fine['key']!r}'s extent {tuple(f)}")
        dtypes = tuple(d for m in metas for d in m["dtypes"])
        dtype, derive = check_dtype(path, dtypes, policy)
        crs = fine["crs"]
        epsg = crs.to_epsg() if crs else None
        layout = [{"href": m["href"], "count": m["count"], "same_grid": m["transform"] == fine["transform"]
                   and m["shape"] == fine["shape"], "transform": tuple(m["transform"])[:6]} for m in metas]
        return SceneInfo(
            path=path, shape=fine["shape"], count=sum(m["count"] for m in metas), dtype=dtype,
            crs_wkt=crs.to_wkt() if crs else None, crs=(f"EPSG:{epsg}" if epsg else crs.to_wkt()) if crs else None,
            transform=tuple(fine["transform"])[:6], nodata=fine["nodata"], block_shape=fine["block"],
            format=self.name, source_dtype=np.result_type(*dtypes).name, derive=derive,
            data_path=json.dumps(layout),
        )

    def read(self, info: SceneInfo, window: ChunkWindow, *, bands: tuple[int, ...] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """One halo window: each asset's bands over the window's ground extent on the finest grid
        (coarser assets resampled bilinearly), stacked in asset order, then `bands` picked.

        Returns:
            ``(pixels (C, H, W) of info.dtype, valid (H, W) bool)``, reflect-padded at edges.

        Raises:
            InputError: naming the item, the asset and the window when a read fails.
        """
        from affine import Affine

        (r, c) = window.read
        height, width = r.stop - r.start, c.stop - c.start
        fine = Affine(*info.transform)
        # the window's ground extent: its top-left and bottom-right corners in CRS units
        x0, y0 = fine * (c.start, r.start)
        x1, y1 = fine * (c.stop, r.stop)
        parts = []
        for asset in json.loads(info.data_path or "[]"):
            href = asset["href"]
            try:
                with remote_env(href):
                    ds = cached_dataset(href)
                    if asset["same_grid"]:
                        part = ds.read(window=Window(c.start, r.start, width, height), out_dtype=info.source_dtype)
                    else:
                        inverse = ~Affine(*asset["transform"])
                        col0, row0 = inverse * (x0, y0)
                        col1, row1 = inverse * (x1, y1)
                        part = ds.read(window=Window(col0, row0, col1 - col0, row1 - row0),
                                       out_shape=(asset["count"], height, width), resampling=Resampling.bilinear,
                                       out_dtype=info.source_dtype)
            except (RasterioError, OSError) as exc:
                close_datasets()
                raise InputError(f"{info.path}: reading {redact_uri(href)} failed for rows {r.start}:{r.stop}, "
                                 f"cols {c.start}:{c.stop}: {exc}") from None
            parts.append(part)
        pixels = np.concatenate(parts, axis=0)
        if bands is not None:
            pixels = pixels[[b - 1 for b in bands]]
        return finish_window(pixels, window, info)

    def close(self) -> None:
        close_datasets()
