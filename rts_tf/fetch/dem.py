"""Fetch, DEM: the ArcticDEM mosaic windows over an area, from the Polar Geospatial Center's STAC API.

ArcticDEM mosaics (release 4.1 at the time of writing) are published by the PGC as Cloud-Optimised
GeoTIFF tiles in EPSG:3413, one STAC item per tile in the collections
`arcticdem-mosaics-v4.1-2m|10m|32m`, with assets `dem` (float32 metres, nodata -9999) and
`datamask` (1 where the DEM is valid). Only the window of each tile that covers the area plus a
buffer is read (the relative-elevation kernel is a 100 m circle, slope a 3x3 kernel: the buffer
keeps both exact up to the area's edge). Output, ready for `build-records --dem OUT/dem.vrt` or
`--dem OUT/tiles`:

    OUT/tiles/<item id>_dem.tif      the DEM window of each tile, pixels where datamask is 0 set to nodata
    OUT/datamask/<item id>_datamask.tif  (when the catalogue has the asset)
    OUT/dem.vrt                      the tiles as one raster
    OUT/fetch.json                   catalogue URL, collection, release, item ids, source URLs, windows
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS

from rts_tf.errors import InputError
from rts_tf.fetch import DEM_BUFFER, PGC_STAC, stac
from rts_tf.records import write_json, write_text
from rts_tf.locks import locks_folder

ARCTICDEM_RELEASE = "v4.1"
RESOLUTIONS = (2, 10, 32)
DEM_CRS = CRS.from_epsg(3413)
DEM_NODATA = -9999.0
DEFAULT_BUFFER = DEM_BUFFER
MIN_BUFFER = 100.0
DEM_KEYS = ("dem",)
DATAMASK_KEYS = ("datamask",)


def default_collection(resolution: int) -> str:
    """The ArcticDEM mosaic collection of a resolution (metres)."""
    return f"arcticdem-mosaics-{ARCTICDEM_RELEASE}-{resolution}m"


@dataclass
class DemTile:
    """One tile's window: what is read and where it goes."""

    item_id: str
    dem: stac.WindowPlan
    datamask: stac.WindowPlan | None
    path: Path
    mask_path: Path | None
    release: str | None
    skipped: bool = False


@dataclass
class DemResult:
    """What fetch dem did (or, with dry_run, would do)."""

    out: Path
    collection: str
    tiles: list[DemTile] = field(default_factory=list)
    vrt: Path | None = None
    dry_run: bool = False

    def lines(self) -> list[str]:
        read = sum(t.dem.window_bytes + (t.datamask.window_bytes if t.datamask else 0) for t in self.tiles
                   if not t.skipped)
        whole = sum((t.dem.file_bytes or 0) + ((t.datamask.file_bytes or 0) if t.datamask else 0) for t in self.tiles)
        lines = []
        for tile in self.tiles:
            size = f"{tile.dem.width} x {tile.dem.height} px"
            state = "complete, skipped" if tile.skipped else (
                f"{stac.human_bytes(tile.dem.window_bytes + (tile.datamask.window_bytes if tile.datamask else 0))} "
                f"of {stac.human_bytes((tile.dem.file_bytes or 0) + ((tile.datamask.file_bytes or 0) if tile.datamask else 0))}")
            lines.append(f"{'would read' if self.dry_run else 'tile'} {tile.item_id}: {size}, {state}  {tile.dem.href}")
        verb = "would read" if self.dry_run else "read"
        lines.append(f"{len(self.tiles)} ArcticDEM tile(s) of {self.collection}: {verb} about {stac.human_bytes(read)} "
                     f"(whole files: {stac.human_bytes(whole)})"
                     + ("" if self.dry_run else f"; DEM: {self.vrt} (or {self.out / 'tiles'})"))
        return lines


@locks_folder("out", "--out")
def fetch_dem(out: str | os.PathLike, aoi: str | os.PathLike | None = None, scenes: Sequence[str] = (),
              resolution: int = 2, buffer: float = DEFAULT_BUFFER, stac_url: str = PGC_STAC,
              collection: str | None = None, workers: int = 4, dry_run: bool = False,
              progress: Callable[[int, int], None] | None = None) -> DemResult:
    """Read the ArcticDEM windows covering an AOI file (or the footprints of scenes) plus a buffer (metres)."""
    if (aoi is None) == (not scenes):
        raise InputError("give either --aoi FILE or --scenes DIR (the area whose DEM to fetch)")
    if resolution not in RESOLUTIONS:
        raise InputError(f"--resolution {resolution}: ArcticDEM mosaics come at {', '.join(map(str, RESOLUTIONS))} m")
    if buffer < MIN_BUFFER:
        raise InputError(f"--buffer {buffer:g}: at least {MIN_BUFFER:g} m, the relative-elevation kernel's radius "
                         "(less leaves the area's edge without a full kernel)")
    collection = collection or default_collection(resolution)
    area = stac.read_aoi(aoi) if aoi is not None else stac.scenes_aoi(scenes)
    out = Path(out)
    area_3413 = area.buffered(DEM_CRS, buffer).geometry
    search_area = stac.Area(area_3413, DEM_CRS).wgs84
    client, found = stac.open_collection(stac_url, collection)
    items = stac.search_items(client, stac_url, collection, search_area)
    where = aoi if aoi is not None else ", ".join(map(str, scenes))
    if not items:
        coverage = stac.collection_bbox(found)
        if coverage is not None and not coverage.intersects(search_area):
            raise InputError(f"{where}: the area is outside ArcticDEM's coverage (collection {collection} covers "
                             f"longitude/latitude {', '.join(f'{v:.1f}' for v in coverage.bounds)})")
        raise InputError(f"{where}: no tile of {collection} at {stac_url} covers the area (outside ArcticDEM's "
                         "coverage, or a gap in the mosaic)")
    bounds = area_3413.bounds
    with stac.gdal_env():
        tiles = [tile for tile in stac.run_jobs(items, lambda item: _plan_tile(item, bounds, out), workers, "plan")
                 if tile is not None]
        if not tiles:
            raise InputError(f"{where}: the tiles of {collection} that the catalogue lists near the area hold no "
                             "pixels over it (outside ArcticDEM's coverage)")
        result = DemResult(out, collection, tiles, dry_run=dry_run)
        if dry_run:
            return result
        _check_grid(tiles)
        (out / "tiles").mkdir(parents=True, exist_ok=True)
        if any(t.datamask for t in tiles):
            (out / "datamask").mkdir(exist_ok=True)
        for tile in tiles:
            tile.skipped = _complete(tile)
        stac.run_jobs([t for t in tiles if not t.skipped], _fetch_tile, workers, "tile", progress)
    result.vrt = out / "dem.vrt"
    write_text(result.vrt, build_vrt(out, [t.path for t in tiles], tiles[0].dem))
    write_json(out / "fetch.json", {
        "source": "ArcticDEM mosaic (Polar Geospatial Center)", "stac": stac_url, "collection": collection,
        "release": sorted({t.release for t in tiles if t.release}) or [ARCTICDEM_RELEASE],
        "crs": "EPSG:3413", "resolution": resolution, "buffer_m": buffer,
        "area": stac.geojson(area.wgs84), "bounds_3413": list(bounds),
        "tiles": [{"id": t.item_id, "file": str(t.path.relative_to(out)),
                   "datamask_file": str(t.mask_path.relative_to(out)) if t.mask_path else None,
                   "dem_url": t.dem.href, "datamask_url": t.datamask.href if t.datamask else None,
                   "window": [int(t.dem.window.col_off), int(t.dem.window.row_off), t.dem.width, t.dem.height],
                   "file_bytes": t.dem.file_bytes} for t in tiles],
        "nodata": DEM_NODATA, "datamask_rule": "DEM pixels whose datamask is 0 are set to nodata",
    })
    return result


def _plan_tile(item, bounds, out: Path) -> DemTile | None:
    """Open a tile's DEM (and datamask) headers and plan the window over bounds (EPSG:3413)."""
    _, dem_href = stac.asset_href(item, DEM_KEYS, "ArcticDEM 'dem'")
    with stac.open_remote(dem_href, "ArcticDEM tile") as dataset:
        if dataset.crs != DEM_CRS:
            raise InputError(f"{dem_href}: ArcticDEM tile in {dataset.crs}, expected EPSG:3413")
        plan = stac.plan_window(dataset, bounds, dem_href)
    if plan is None:
        return None
    mask_plan, mask_path = None, None
    if any(key in item.assets for key in DATAMASK_KEYS):
        _, mask_href = stac.asset_href(item, DATAMASK_KEYS, "ArcticDEM 'datamask'")
        with stac.open_remote(mask_href, "ArcticDEM datamask") as dataset:
            mask_plan = stac.plan_window(dataset, bounds, mask_href)
        if mask_plan is not None and (mask_plan.transform, mask_plan.width, mask_plan.height) != \
                (plan.transform, plan.width, plan.height):
            raise InputError(f"{mask_href}: the datamask is not on its DEM's grid ({dem_href})")
        mask_path = out / "datamask" / f"{item.id}_datamask.tif"
    release = item.properties.get("pgc:release_version")
    return DemTile(item.id, plan, mask_plan, out / "tiles" / f"{item.id}_dem.tif", mask_path,
                   f"v{release}" if release and not str(release).startswith("v") else release)


def _check_grid(tiles: list[DemTile]) -> None:
    """Tiles of one mosaic share a pixel size and a pixel grid (so one VRT holds them without resampling)."""
    first = tiles[0].dem.transform
    for tile in tiles[1:]:
        t = tile.dem.transform
        shift_x, shift_y = (t.c - first.c) / first.a, (t.f - first.f) / first.e
        if not (np.isclose(t.a, first.a) and np.isclose(t.e, first.e) and np.isclose(shift_x, round(shift_x))
                and np.isclose(shift_y, round(shift_y))):
            raise InputError(f"{tile.dem.href}: not on the pixel grid of {tiles[0].dem.href} (mixed resolutions or "
                             "collections?)")


def _complete(tile: DemTile) -> bool:
    """A tile is complete when its files exist (they are renamed into place last) on the planned grid."""
    for path in (tile.path, tile.mask_path) if tile.datamask else (tile.path,):
        if not path.exists():
            return False
        if not stac.same_grid(path, tile.dem.crs, tile.dem.transform, tile.dem.width, tile.dem.height):
            raise InputError(f"{path}: exists with another extent (an earlier fetch of another area?); "
                             "choose another --out or remove it")
    return True


def _fetch_tile(tile: DemTile) -> None:
    """Read one tile's windows and write them (datamask first, so a complete DEM file means a complete tile)."""
    with stac.open_remote(tile.dem.href, "ArcticDEM tile") as dataset:
        dem = stac.read_plan(dataset, tile.dem)
    nodata = tile.dem.nodata if tile.dem.nodata is not None else DEM_NODATA
    if tile.datamask is not None:
        with stac.open_remote(tile.datamask.href, "ArcticDEM datamask") as dataset:
            mask = stac.read_plan(dataset, tile.datamask)
        stac.write_geotiff(tile.mask_path, mask, tile.datamask.crs, tile.datamask.transform, tile.datamask.nodata)
        dem = np.where(mask == 0, np.asarray(nodata, dtype=dem.dtype), dem)
    stac.write_geotiff(tile.path, dem, tile.dem.crs, tile.dem.transform, nodata,
                       tags={"SOURCE": tile.dem.href, "STAC_ITEM": tile.item_id})


def build_vrt(out: Path, paths: list[Path], first: stac.WindowPlan) -> str:
    """A GDAL VRT mosaic of same-grid single-band tiles (paths relative to the VRT in `out`)."""
    opened = []
    for path in paths:
        with rasterio.open(path) as dataset:
            opened.append((path, dataset.bounds, dataset.width, dataset.height, dataset.dtypes[0], dataset.nodata))
    res_x, res_y = first.transform.a, -first.transform.e
    left = min(b.left for _, b, *_ in opened)
    top = max(b.top for _, b, *_ in opened)
    right = max(b.right for _, b, *_ in opened)
    bottom = min(b.bottom for _, b, *_ in opened)
    width, height = int(round((right - left) / res_x)), int(round((top - bottom) / res_y))
    root = ElementTree.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ElementTree.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = DEM_CRS.to_wkt()
    ElementTree.SubElement(root, "GeoTransform").text = f"{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {-res_y!r}"
    dtype = {"float32": "Float32", "float64": "Float64", "int16": "Int16", "uint16": "UInt16"}[opened[0][4]]
    band = ElementTree.SubElement(root, "VRTRasterBand", dataType=dtype, band="1")
    nodata = opened[0][5]
    if nodata is not None:
        ElementTree.SubElement(band, "NoDataValue").text = repr(float(nodata))
    for path, bounds, tile_width, tile_height, _, tile_nodata in opened:
        source = ElementTree.SubElement(band, "ComplexSource")
        ElementTree.SubElement(source, "SourceFilename", relativeToVRT="1").text = \
            os.path.relpath(path, out).replace(os.sep, "/")
        ElementTree.SubElement(source, "SourceBand").text = "1"
        ElementTree.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(tile_width), ySize=str(tile_height))
        ElementTree.SubElement(source, "DstRect", xOff=str(int(round((bounds.left - left) / res_x))),
                               yOff=str(int(round((top - bounds.top) / res_y))), xSize=str(tile_width),
                               ySize=str(tile_height))
        if tile_nodata is not None:  # nodata of one tile does not hide another tile's data where they overlap
            ElementTree.SubElement(source, "NODATA").text = repr(float(tile_nodata))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"

