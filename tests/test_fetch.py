"""rts-tf fetch against real servers on 127.0.0.1: a STAC API (stac-fastapi.static over a pystac catalogue
shaped like Earth Search's and the PGC's) and Cloud-Optimised GeoTIFFs served with range requests."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

pystac = pytest.importorskip("pystac")
pytest.importorskip("pystac_client")
pytest.importorskip("stac_fastapi.static")

from helpers import write_raster  # noqa: E402
from stac_servers import file_server, garbage_server, stac_server  # noqa: E402

from rts_tf.cli import main  # noqa: E402

from rts_tf.errors import InputError  # noqa: E402
from rts_tf.fetch.dem import fetch_dem  # noqa: E402
from rts_tf.fetch.sentinel2 import fetch_sentinel2, pixel_offset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UTM = "EPSG:32607"  # Herschel Island, Yukon coast: UTM zone 7N
# The S2 tile's upper-left corner (a multiple of 60 m, like real MGRS tile origins) and size.
S2_X0, S2_Y0, S2_SIZE = 579960.0, 7722000.0, 384  # 10 m pixels: 3.84 km
# The area of interest: 1200 m x 800 m, on 20 m edges, inside the tile.
AOI_UTM = (580960.0, 7719600.0, 582160.0, 7720400.0)  # left, bottom, right, top
DEM_RES, DEM_SIZE = 32.0, 96


def cog(path: Path, data: np.ndarray, crs: str, transform, nodata, blocksize: int = 128) -> None:
    """A Cloud-Optimised GeoTIFF (GDAL's COG driver, deflate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=data.shape[-1], height=data.shape[-2], count=1,
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, compress="deflate",
                       blocksize=blocksize) as out:
        out.write(data[np.newaxis] if data.ndim == 2 else data)


def surface_reflectance() -> dict[str, np.ndarray]:
    """Tundra-like surface reflectance steps (x 10000) of B02, B03, B04, B08 on the tile's 10 m grid."""
    rows, cols = np.mgrid[0:S2_SIZE, 0:S2_SIZE]
    base = (rows * 7 + cols * 3) % 400
    return {"B02": (300 + base).astype(np.uint16), "B03": (500 + base).astype(np.uint16),
            "B04": (400 + base).astype(np.uint16), "B08": (2500 + 2 * base).astype(np.uint16)}


def lonlat_box(bounds, crs):
    xs, ys = warp_transform(crs, "EPSG:4326", [bounds[0], bounds[2], bounds[2], bounds[0]],
                            [bounds[1], bounds[1], bounds[3], bounds[3]])
    return [min(xs), min(ys), max(xs), max(ys)]


def write_aoi(path: Path, bounds, crs: str) -> Path:
    from pyogrio.raw import write

    geometry = shapely.box(*bounds)
    write(str(path), geometry=np.array([shapely.to_wkb(geometry)], dtype=object), field_data=[np.array(["aoi"])],
          fields=["name"], crs=crs, geometry_type="Polygon", driver="GPKG")
    return path


def s2_item(files_url: str, files: Path, item_id: str, when: str, scl: np.ndarray, dn: dict[str, np.ndarray],
            baseline: str, tile: str = "07WEU", tile_cloud: float = 10.0, declared: float | None = -0.1,
            flag: bool | None = None, x0: float = S2_X0) -> dict:
    """An item shaped like Earth Search's sentinel-2-c1-l2a items, its COGs written under files/."""
    folder = f"sentinel-2-c1-l2a/{tile}/{item_id}"
    transform10, transform20 = from_origin(x0, S2_Y0, 10, 10), from_origin(x0, S2_Y0, 20, 20)
    assets = {}
    for key, band in (("blue", "B02"), ("green", "B03"), ("red", "B04"), ("nir", "B08")):
        cog(files / folder / f"{band}.tif", dn[band], UTM, transform10, 0)
        raster = {"nodata": 0, "data_type": "uint16", "bits_per_sample": 15, "spatial_resolution": 10}
        if declared is not None:
            raster.update(scale=0.0001, offset=declared)
        assets[key] = {"href": f"{files_url}/files/{folder}/{band}.tif",
                       "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"],
                       "raster:bands": [raster], "gsd": 10}
    cog(files / folder / "SCL.tif", scl, UTM, transform20, 0)
    assets["scl"] = {"href": f"{files_url}/files/{folder}/SCL.tif", "roles": ["data"],
                     "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                     "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}]}
    right = x0 + S2_SIZE * 10
    bbox = lonlat_box((x0, S2_Y0 - S2_SIZE * 10, right, S2_Y0), UTM)
    properties = {"datetime": when, "platform": "sentinel-2b", "constellation": "sentinel-2",
                  "eo:cloud_cover": tile_cloud, "s2:processing_baseline": baseline, "grid:code": f"MGRS-{tile}",
                  "mgrs:utm_zone": int(tile[:2]), "mgrs:latitude_band": tile[2], "mgrs:grid_square": tile[3:],
                  "proj:code": UTM, "s2:product_type": "S2MSI2A"}
    if flag is not None:
        properties["earthsearch:boa_offset_applied"] = flag
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "bbox": bbox,
            "geometry": {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]],
                                                             [bbox[2], bbox[3]], [bbox[0], bbox[3]],
                                                             [bbox[0], bbox[1]]]]},
            "properties": properties, "assets": assets, "links": [],
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                                "https://stac-extensions.github.io/projection/v2.0.0/schema.json"]}


def scl_clear(value: int = 4) -> np.ndarray:
    return np.full((S2_SIZE // 2, S2_SIZE // 2), value, dtype=np.uint8)


def aoi_pixels_20m():
    """Rows and columns of the tile's 20 m SCL grid inside the AOI."""
    col0, col1 = int((AOI_UTM[0] - S2_X0) / 20), int((AOI_UTM[2] - S2_X0) / 20)
    row0, row1 = int((S2_Y0 - AOI_UTM[3]) / 20), int((S2_Y0 - AOI_UTM[1]) / 20)
    return slice(row0, row1), slice(col0, col1)


def dem_values(x, y):
    """A smooth DEM (metres) of EPSG:3413 coordinates, distinct everywhere."""
    return (50 + 0.01 * (x % 10000) + 0.003 * (y % 10000) + 5 * np.sin(x / 700.0)).astype(np.float32)


def dem_origin() -> tuple[float, float]:
    """The upper-left corner of the first DEM tile: the boundary between the two tiles (on a multiple of the
    tile size, like PGC's tile grid) crosses the S2 AOI, whose centre is half a tile below the top."""
    xs, ys = warp_transform(UTM, "EPSG:3413", [(AOI_UTM[0] + AOI_UTM[2]) / 2], [(AOI_UTM[1] + AOI_UTM[3]) / 2])
    step = DEM_RES * DEM_SIZE
    boundary = np.round(xs[0] / step) * step
    return boundary - step, float(np.round((ys[0] + step / 2) / DEM_RES) * DEM_RES)


def dem_item(files_url: str, files: Path, col: int, collection: str, query: str = "") -> dict:
    """An item shaped like PGC's ArcticDEM mosaic items (assets dem and datamask), COGs under files/."""
    x_origin, y_origin = dem_origin()
    left = x_origin + col * DEM_RES * DEM_SIZE
    transform = from_origin(left, y_origin, DEM_RES, DEM_RES)
    cols, rows = np.meshgrid(np.arange(DEM_SIZE), np.arange(DEM_SIZE))
    x, y = left + (cols + 0.5) * DEM_RES, y_origin - (rows + 0.5) * DEM_RES
    dem = dem_values(x, y)
    mask = np.ones_like(dem, dtype=np.uint8)
    mask[40:43, :] = 0  # a masked strip (lake edge)
    dem[40:42, :] = -9999.0  # the DEM's own nodata on part of it
    tile_id = f"47_{13 + col}_32m_v4.1"
    folder = f"arcticdem/mosaics/v4.1/32m/{tile_id}"
    cog(files / folder / f"{tile_id}_dem.tif", dem, "EPSG:3413", transform, -9999.0)
    cog(files / folder / f"{tile_id}_datamask.tif", mask, "EPSG:3413", transform, 0)
    bounds = (left, y_origin - DEM_SIZE * DEM_RES, left + DEM_SIZE * DEM_RES, y_origin)
    bbox = lonlat_box(bounds, "EPSG:3413")
    asset = {"type": "image/tiff; application=geotiff; profile=cloud-optimized"}
    return {"type": "Feature", "stac_version": "1.0.0", "id": tile_id, "bbox": bbox, "collection": collection,
            "geometry": {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]],
                                                             [bbox[2], bbox[3]], [bbox[0], bbox[3]],
                                                             [bbox[0], bbox[1]]]]},
            "properties": {"datetime": "2015-07-01T00:00:00Z", "gsd": DEM_RES, "proj:code": "EPSG:3413",
                           "proj:shape": [DEM_SIZE, DEM_SIZE], "proj:transform": list(transform)[:6],
                           "pgc:release_version": "4.1", "pgc:tile": tile_id.rsplit("_", 2)[0]},
            "assets": {"dem": {**asset, "href": f"{files_url}/files/{folder}/{tile_id}_dem.tif{query}", "roles": ["data"],
                               "unit": "meter", "nodata": -9999, "data_type": "float32"},
                       "datamask": {**asset, "href": f"{files_url}/files/{folder}/{tile_id}_datamask.tif{query}",
                                    "roles": ["metadata", "data-mask"], "nodata": 0, "data_type": "uint8"}},
            "links": []}


def collection(collection_id: str, items: list[dict], bbox) -> "pystac.Collection":
    extent = pystac.Extent(pystac.SpatialExtent([bbox]),
                           pystac.TemporalExtent([[dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc), None]]))
    result = pystac.Collection(collection_id, f"test copy of {collection_id}", extent, license="proprietary")
    for item in items:
        item = dict(item, collection=collection_id)
        result.add_item(pystac.Item.from_dict(item))
    return result


REFLECTANCE_CASES = {  # item id: (baseline, DN offset in the pixels, declared raster:bands offset, flag)
    "S2B_T07WEU_20220701_0_L2A": ("03.01", 0, None, None),  # before 04.00, nothing declared
    "S2B_T07WEU_20220702_0_L2A": ("03.01", 0, 0.0, None),  # before 04.00, offset 0 declared
    "S2B_T07WEU_20220703_0_L2A": ("04.00", 1000, None, None),  # 04.00, nothing declared
    "S2B_T07WEU_20220704_0_L2A": ("04.00", 1000, -0.1, None),  # 04.00, -0.1 declared (collection 1)
    "S2B_T07WEU_20220705_0_L2A": ("05.09", 0, -0.1, True),  # catalogue removed the offset, still declares -0.1
    "S2B_T07WEU_20220706_0_L2A": ("04.00", 1000, 0.0, False),  # offset in the pixels, wrongly declared 0
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers with three collections: reflectance cases, cloud selection, ArcticDEM 32 m."""
    root = tmp_path_factory.mktemp("stac")
    files = root / "files"
    files.mkdir()
    files_server, files_app = file_server(files)
    url = files_server.url
    reflectance = surface_reflectance()
    cases = []
    for number, (item_id, (baseline, offset, declared, flag)) in enumerate(REFLECTANCE_CASES.items()):
        dn = {band: (values + offset).astype(np.uint16) for band, values in reflectance.items()}
        cases.append(s2_item(url, files, item_id, f"2022-07-0{number + 1}T20:40:19Z", scl_clear(), dn, baseline,
                             declared=declared, flag=flag))
    # Cloud selection: on tile 07WEU in July, A is clear on the tile but cloudy over the area, B the other way
    # round; C is clear but the catalogue calls the tile 95 % cloudy (never read at --max-tile-cloud 90); in
    # August D has 25 % of the area cloudy. Tile 07WEV (another grid:code) has one July scene, E.
    rows, cols = aoi_pixels_20m()
    dn = {band: (values + 1000).astype(np.uint16) for band, values in reflectance.items()}
    scl_a = scl_clear()
    scl_a[rows.start:rows.start + 12, cols] = 9  # 12 of the area's 40 rows: 30 % of its pixels
    scl_b = scl_clear(9)
    scl_b[rows, cols] = 4
    scl_b[rows.start, cols.start:cols.start + 6] = 3  # 6 shadow pixels of 40 x 60
    scl_d = scl_clear()
    scl_d[rows.start:rows.start + 10, cols] = 8
    scl_e = scl_clear()
    scl_e[rows, cols.start:cols.start + 3] = 10
    clouds = [s2_item(url, files, "S2A_T07WEU_20220710_0_L2A", "2022-07-10T20:40:19Z", scl_a, dn, "05.09",
                      tile_cloud=3.0),
              s2_item(url, files, "S2B_T07WEU_20220715_0_L2A", "2022-07-15T20:40:19Z", scl_b, dn, "05.09",
                      tile_cloud=60.0),
              s2_item(url, files, "S2A_T07WEU_20220720_0_L2A", "2022-07-20T20:40:19Z", scl_clear(), dn, "05.09",
                      tile_cloud=95.0),
              s2_item(url, files, "S2A_T07WEU_20220810_0_L2A", "2022-08-10T20:40:19Z", scl_d, dn, "05.09",
                      tile_cloud=30.0),
              s2_item(url, files, "S2A_T07WEV_20220712_0_L2A", "2022-07-12T20:40:19Z", scl_e, dn, "05.09",
                      tile="07WEV", tile_cloud=12.0)]
    dem_collection = "arcticdem-mosaics-v4.1-32m"
    dems = [dem_item(url, files, col, dem_collection) for col in (0, 1)]
    catalog = pystac.Catalog("test", "rts-tf fetch test catalogue")
    catalog.add_child(collection("s2-reflectance", cases, [-180, -90, 180, 90]))
    catalog.add_child(collection("s2-clouds", clouds, [-180, -90, 180, 90]))
    catalog.add_child(collection(dem_collection, dems, [-180, 50, 180, 90]))
    # The same tiles under other URLs (GDAL caches what it read by URL, per process).
    catalog.add_child(collection("arcticdem-retry", [dem_item(url, files, col, "arcticdem-retry", "?retry")
                                                     for col in (0, 1)], [-180, 50, 180, 90]))
    # A catalogue whose COGs' server is down (port 9: nothing listens).
    catalog.add_child(collection("s2-unreachable", [
        s2_item("http://127.0.0.1:9", root / "unserved", "S2B_T07WEU_20220716_0_L2A", "2022-07-16T20:40:19Z",
                scl_clear(), dn, "05.09")], [-180, -90, 180, 90]))
    catalog.normalize_hrefs(str(root / "catalog"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    api_server, api_app = stac_server(root / "catalog" / "catalog.json")
    yield {"stac": api_server.url, "files": url, "files_app": files_app, "api_app": api_app, "root": root,
           "reflectance": reflectance, "dem_collection": dem_collection}
    api_server.stop()
    files_server.stop()


@pytest.fixture
def aoi(tmp_path):
    return write_aoi(tmp_path / "aoi.gpkg", AOI_UTM, UTM)


def scene_reflectance(folder: Path) -> tuple[np.ndarray, object]:
    """Reflectance steps (x 10000) of a fetched scene as build-records reads it (sensors + scene)."""
    from rts_tf.scene import SceneReader, scene_grid
    from rts_tf.sensors import find_scenes

    (scene,) = find_scenes([folder])
    grid = scene_grid(scene)
    reader = SceneReader(scene, grid)
    try:
        numbers, usable = reader.read(rasterio.windows.Window(0, 0, grid.width, grid.height))
    finally:
        reader.close()
    return numbers, grid, scene, usable


def test_reflectance_of_every_baseline_and_declaration_is_the_surface_reflectance(servers, aoi, tmp_path):
    out = tmp_path / "s2"
    result = fetch_sentinel2(out, aoi, "2022-07-01/2022-07-06", stac_url=servers["stac"],
                             collection="s2-reflectance", per_period=10, workers=2)
    assert sorted(c.item.id for c in result.chosen) == sorted(REFLECTANCE_CASES)
    truth = servers["reflectance"]
    rules = {}
    for item_id in REFLECTANCE_CASES:
        numbers, grid, scene, usable = scene_reflectance(out / item_id)
        assert scene.sensor == "sentinel2-l2a" and scene.date == f"2022-07-0{item_id[18]}"
        col0, row0 = int((grid.transform.c - S2_X0) / 10), int((S2_Y0 - grid.transform.f) / 10)
        expected = np.stack([truth[band][row0:row0 + grid.height, col0:col0 + grid.width]
                             for band in ("B02", "B03", "B04", "B08")])
        np.testing.assert_array_equal(numbers, expected, err_msg=item_id)
        assert usable.all()
        rules[item_id] = json.loads((out / item_id / "item.json").read_text())["properties"]["rts_tf:reflectance"]
    # The window: the AOI (on 20 m edges, in the scenes CRS) exactly.
    assert (grid.width, grid.height) == (120, 80)
    offsets = {item_id: rule["offset"] for item_id, rule in rules.items()}
    assert offsets == {"S2B_T07WEU_20220701_0_L2A": 0.0, "S2B_T07WEU_20220702_0_L2A": 0.0,
                       "S2B_T07WEU_20220703_0_L2A": -0.1, "S2B_T07WEU_20220704_0_L2A": -0.1,
                       "S2B_T07WEU_20220705_0_L2A": 0.0, "S2B_T07WEU_20220706_0_L2A": -0.1}
    assert rules["S2B_T07WEU_20220704_0_L2A"]["rule"].startswith("metadata agree")
    assert "pixels decide" in rules["S2B_T07WEU_20220705_0_L2A"]["rule"]
    assert "pixels decide" in rules["S2B_T07WEU_20220706_0_L2A"]["rule"]
    # Only the windows were read: far fewer bytes than the files.
    summary = json.loads((out / "fetch.json").read_text())
    assert [s["id"] for s in summary["scenes"]] == sorted(REFLECTANCE_CASES)


def test_pixel_test_thresholds():
    """The pixel test against hand-made numbers: clear land all >= 1000 (offset), mostly < 1000 (none)."""
    scl = np.full((10, 10), 4, dtype=np.uint8)
    with_offset = {band: np.full((20, 20), 1300, dtype=np.uint16) for band in ("B02", "B03", "B04", "B08")}
    assert pixel_offset(with_offset, scl) == {"offset": -0.1, "clear_pixels": 400, "below_1000": 0.0}
    without = {band: np.full((20, 20), 300, dtype=np.uint16) for band in ("B02", "B03", "B04", "B08")}
    without["B08"][:] = 2800  # NIR of vegetation stays above 1000: 3 of 4 bands below
    assert pixel_offset(without, scl) == {"offset": 0.0, "clear_pixels": 400, "below_1000": 0.75}
    scl[:] = 8  # all cloud: no clear land to judge
    assert pixel_offset(without, scl)["offset"] is None


def test_cloud_selection_best_scene_per_tile_and_month_by_scl_over_the_area(servers, aoi, tmp_path):
    out = tmp_path / "s2"
    log = servers["files_app"].log
    before = len(log)
    result = fetch_sentinel2(out, aoi, "2022-07-01/2022-08-31", stac_url=servers["stac"], collection="s2-clouds",
                             per_period=1, period="month", max_cloud=50, max_tile_cloud=90, workers=2)
    clouds = {c.item.id: c.cloud for c in result.candidates}
    # C (tile 95 % cloudy in the catalogue) is no candidate; the others' cloud over the area by hand:
    assert clouds == pytest.approx({"S2A_T07WEU_20220710_0_L2A": 12 / 40, "S2B_T07WEU_20220715_0_L2A": 6 / 2400,
                                    "S2A_T07WEU_20220810_0_L2A": 10 / 40, "S2A_T07WEV_20220712_0_L2A": 3 / 60})
    assert sorted(c.item.id for c in result.chosen) == [
        "S2A_T07WEU_20220810_0_L2A", "S2A_T07WEV_20220712_0_L2A", "S2B_T07WEU_20220715_0_L2A"]
    requested = {entry[1] for entry in log[before:]}
    assert not any("20220720" in path for path in requested)  # filtered on eo:cloud_cover before any read
    assert not any("20220710" in path and "B0" in path for path in requested)  # only its SCL was read
    assert sorted(p.name for p in out.iterdir()) == [
        "S2A_T07WEU_20220810_0_L2A", "S2A_T07WEV_20220712_0_L2A", "S2B_T07WEU_20220715_0_L2A", "fetch.json"]
    assert sorted(p.name for p in (out / "S2B_T07WEU_20220715_0_L2A").iterdir()) == [
        "B02.tif", "B03.tif", "B04.tif", "B08.tif", "SCL.tif", "item.json"]
    # Over the whole range (not per month) the same two tiles' best are complete; August's is left over.
    again = fetch_sentinel2(out, aoi, "2022-07-01/2022-08-31", stac_url=servers["stac"], collection="s2-clouds",
                            max_cloud=50)
    assert [(c.item.id, c.skipped) for c in again.chosen] == [("S2B_T07WEU_20220715_0_L2A", True),
                                                               ("S2A_T07WEV_20220712_0_L2A", True)]
    assert again.warnings == [f"{out / 'S2A_T07WEU_20220810_0_L2A'}: a scene of an earlier fetch that this one did "
                              "not choose; remove it unless you want it in the records"]
    # A stricter --max-cloud than any scene: one line naming the best.
    with pytest.raises(InputError, match=r"at most 0.1% cloud over the area \(the best has 0.2%\)"):
        fetch_sentinel2(tmp_path / "none", aoi, "2022-07-01/2022-07-31", stac_url=servers["stac"],
                        collection="s2-clouds", max_cloud=0.1)


def dem_aoi() -> tuple[float, float, float, float]:
    """An area (EPSG:3413) across the boundary of the two DEM tiles."""
    x_origin, y_origin = dem_origin()
    boundary = x_origin + DEM_RES * DEM_SIZE
    return boundary - 700, y_origin - 2200, boundary + 500, y_origin - 1000


def check_dem(path: Path, aoi_3413) -> None:
    """The fetched DEM covers the AOI plus 200 m and equals the source pixel for pixel."""
    _, y_origin = dem_origin()
    with rasterio.open(path) as vrt:
        assert vrt.crs == rasterio.crs.CRS.from_epsg(3413) and vrt.res == (32.0, 32.0)
        left, bottom, right, top = vrt.bounds
        # The AOI plus 200 m, grown to whole 32 m pixels of the mosaic grid.
        assert left <= aoi_3413[0] - 200 < left + 32 and right - 32 < aoi_3413[2] + 200 <= right
        assert bottom <= aoi_3413[1] - 200 < bottom + 32 and top - 32 < aoi_3413[3] + 200 <= top
        values = vrt.read(1)
        rows, cols = np.mgrid[0:vrt.height, 0:vrt.width]
        x, y = left + (cols + 0.5) * 32, top - (rows + 0.5) * 32
    source_rows = np.round((y_origin - y - 16) / 32).astype(int)
    expected = dem_values(x, y)
    expected[(source_rows >= 40) & (source_rows <= 42)] = -9999.0  # datamask 0 and the DEM's nodata
    np.testing.assert_array_equal(values, expected)


def test_dem_window_across_two_tiles_matches_the_source(servers, tmp_path):
    from rts_tf.rasters import RasterSource

    aoi_3413 = dem_aoi()
    aoi = write_aoi(tmp_path / "aoi.gpkg", aoi_3413, "EPSG:3413")
    out = tmp_path / "dem"
    result = fetch_dem(out, aoi=aoi, resolution=32, buffer=200, stac_url=servers["stac"],
                       collection=servers["dem_collection"], workers=2)
    assert [t.item_id for t in result.tiles] == ["47_13_32m_v4.1", "47_14_32m_v4.1"]
    check_dem(out / "dem.vrt", aoi_3413)
    info = json.loads((out / "fetch.json").read_text())
    assert info["release"] == ["v4.1"] and info["collection"] == "arcticdem-mosaics-v4.1-32m"
    assert [t["dem_url"] for t in info["tiles"]] == [
        f"{servers['files']}/files/arcticdem/mosaics/v4.1/32m/{i}/{i}_dem.tif" for i in ("47_13_32m_v4.1", "47_14_32m_v4.1")]
    # build-records' DEM reader takes the folder of tiles and the VRT alike.
    for given in (out / "tiles", out / "dem.vrt"):
        source = RasterSource([given], "DEM")
        assert source.crs == rasterio.crs.CRS.from_epsg(3413)
        source.close()
    # A second run reads nothing: both tiles complete.
    log = servers["files_app"].log
    before = len(log)
    again = fetch_dem(out, aoi=aoi, resolution=32, buffer=200, stac_url=servers["stac"],
                      collection=servers["dem_collection"])
    assert all(t.skipped for t in again.tiles)
    assert all(entry[3] < 20000 for entry in log[before:])  # headers only (planning), no pixel windows


def test_dem_dry_run_lists_windows_and_sizes_without_writing(servers, tmp_path):
    x_origin, y_origin = dem_origin()
    aoi = write_aoi(tmp_path / "aoi.gpkg", (x_origin + 1000, y_origin - 2000, x_origin + 2000, y_origin - 1000),
                    "EPSG:3413")
    result = fetch_dem(tmp_path / "dem", aoi=aoi, resolution=32, stac_url=servers["stac"],
                       collection=servers["dem_collection"], dry_run=True)
    assert not (tmp_path / "dem").exists()
    (tile,) = result.tiles
    assert (tile.dem.width, tile.dem.height) == (45, 45) or (tile.dem.width, tile.dem.height) == (44, 44)
    assert 0 < tile.dem.window_bytes < tile.dem.file_bytes
    assert result.lines()[-1].startswith("1 ArcticDEM tile(s) of arcticdem-mosaics-v4.1-32m: would read about")


def test_one_line_errors(servers, aoi, tmp_path):
    # Nothing listening (connection refused).
    with pytest.raises(InputError, match=r"cannot reach the STAC API \(connection refused\)"):
        fetch_dem(tmp_path / "d", aoi=aoi, resolution=32, stac_url="http://127.0.0.1:9/")
    # A server answering garbage.
    garbage = garbage_server()
    try:
        with pytest.raises(InputError, match="did not answer as a STAC API"):
            fetch_sentinel2(tmp_path / "s", aoi, "2022-07-01/2022-07-31", stac_url=garbage.url)
    finally:
        garbage.stop()
    # No scene in the dates.
    with pytest.raises(InputError, match="no Sentinel-2 scene of s2-clouds .* between 2021-07-01/2021-07-31"):
        fetch_sentinel2(tmp_path / "s", aoi, "2021-07-01/2021-07-31", stac_url=servers["stac"],
                        collection="s2-clouds")
    # An unknown collection names the ones there are.
    with pytest.raises(InputError, match="no collection 'sentinel-2-c1-l2a' .*s2-clouds"):
        fetch_sentinel2(tmp_path / "s", aoi, "2022-07-01/2022-07-31", stac_url=servers["stac"])
    # The catalogue answers, the COGs' server does not.
    with pytest.raises(InputError, match=r"127.0.0.1:9/.*SCL.tif: cannot read Sentinel-2 SCL: connection refused"):
        fetch_sentinel2(tmp_path / "s", aoi, "2022-07-01/2022-07-31", stac_url=servers["stac"],
                        collection="s2-unreachable")
    # An AOI outside ArcticDEM (south of the collection's extent).
    south = write_aoi(tmp_path / "south.gpkg", (10.0, 45.0, 10.1, 45.1), "EPSG:4326")
    with pytest.raises(InputError, match="outside ArcticDEM's coverage"):
        fetch_dem(tmp_path / "d", aoi=south, resolution=32, stac_url=servers["stac"],
                  collection=servers["dem_collection"])
    with pytest.raises(InputError, match="--dates 2022-07-01: expected START/END"):
        fetch_sentinel2(tmp_path / "s", aoi, "2022-07-01", stac_url=servers["stac"])
    # The command line: one line, no traceback, exit status 1.
    result = CliRunner().invoke(main, ["fetch", "sentinel2", "--aoi", str(aoi), "--dates", "2021-07-01/2021-07-31",
                                       "--stac", servers["stac"], "--collection", "s2-clouds", "--out",
                                       str(tmp_path / "s")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_fetch_resumes_to_identical_outputs(servers, aoi, tmp_path):
    command = [sys.executable, "-m", "rts_tf", "fetch", "sentinel2", "--aoi", str(aoi),
               "--dates", "2022-07-01/2022-07-06", "--stac", servers["stac"], "--collection", "s2-reflectance",
               "--per-period", "10", "--workers", "1", "--out", str(tmp_path / "killed")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    app = servers["files_app"]
    app.delay = 0.05  # slow enough to kill it between scenes
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            done = [p for p in (tmp_path / "killed").glob("S2B_*") if p.is_dir()]
            if done:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        app.delay = 0.0
    finished = sorted(p.name for p in (tmp_path / "killed").glob("S2B_*"))
    assert 1 <= len(finished) < len(REFLECTANCE_CASES), process.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "fetch.json").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(finished)} already complete)" in rerun.stdout
    fetch_sentinel2(tmp_path / "clean", aoi, "2022-07-01/2022-07-06", stac_url=servers["stac"],
                    collection="s2-reflectance", per_period=10)
    resumed, clean = _tree(tmp_path / "killed"), _tree(tmp_path / "clean")
    assert not (tmp_path / "killed" / ".partial").exists()
    assert resumed.keys() == clean.keys() and len(clean) == 6 * 6 + 1
    assert {k: v for k, v in resumed.items() if k != "fetch.json"} == {k: v for k, v in clean.items()
                                                                        if k != "fetch.json"}


def test_build_records_reads_fetched_sentinel2_and_fetched_dem(servers, aoi, tmp_path):
    """Two commands from an AOI file to inputs: fetch sentinel2, fetch dem --scenes, then build-records."""
    runner = CliRunner()
    s2, dem = tmp_path / "s2", tmp_path / "dem"
    result = runner.invoke(main, ["fetch", "sentinel2", "--aoi", str(aoi), "--dates", "2022-07-01/2022-07-31",
                                  "--stac", servers["stac"], "--collection", "s2-clouds", "--out", str(s2)])
    assert result.exit_code == 0, result.output
    assert "2 scene(s) in" in result.output  # the best of tile 07WEU and the one of 07WEV
    result = runner.invoke(main, ["fetch", "dem", "--scenes", str(s2), "--resolution", "32", "--stac",
                                  servers["stac"], "--collection", servers["dem_collection"], "--out", str(dem)])
    assert result.exit_code == 0, result.output
    # TCVIS over the area (EPSG:4326, 30 m-ish) and one slump polygon in the middle of the area.
    left, bottom, right, top = lonlat_box((AOI_UTM[0] - 300, AOI_UTM[1] - 300, AOI_UTM[2] + 300, AOI_UTM[3] + 300),
                                          UTM)
    write_raster(tmp_path / "tcvis.tif", np.full((3, 60, 60), 120, dtype=np.uint8), "EPSG:4326",
                 from_origin(left, top, (right - left) / 60, (top - bottom) / 60))
    middle = ((AOI_UTM[0] + AOI_UTM[2]) / 2, (AOI_UTM[1] + AOI_UTM[3]) / 2)
    slump = shapely.box(middle[0] - 100, middle[1] - 100, middle[0] + 100, middle[1] + 100)
    from pyogrio.raw import write  # the polygon as it is, in UTM (helpers.write_polygons moves geometries)

    write(str(tmp_path / "labels.gpkg"), geometry=np.array([shapely.to_wkb(slump)], dtype=object),
          field_data=[np.array(["Herschel"]), np.array(["herschel_1"])], fields=["region", "site"], crs=UTM,
          geometry_type="Polygon", driver="GPKG")
    records = tmp_path / "records"
    result = runner.invoke(main, ["build-records", "--scenes", str(s2), "--dem", str(dem / "dem.vrt"),
                                  "--tcvis", str(tmp_path / "tcvis.tif"), "--labels", str(tmp_path / "labels.gpkg"),
                                  "--default-region", "Herschel", "--out", str(records), "--tile-size", "32",
                                  "--overlap", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((records / "manifest.json").read_text())
    scenes = {s["scene_id"]: s for s in manifest["scenes"]}
    assert sorted(scenes) == ["S2A_T07WEV_20220712_0_L2A", "S2B_T07WEU_20220715_0_L2A"]
    scene = scenes["S2B_T07WEU_20220715_0_L2A"]
    assert (scene["width"], scene["height"], scene["region"]) == (120, 80, "Herschel")
    assert scene["reflectance"]["offset"] == [-0.1] * 4
    assert scene["tiles"] > 0


def test_sentinel2_dry_run_reads_no_pixels(servers, aoi, tmp_path):
    log = servers["files_app"].log
    before = len(log)
    result = CliRunner().invoke(main, ["fetch", "sentinel2", "--aoi", str(aoi), "--dates", "2022-07-01/2022-08-31",
                                       "--stac", servers["stac"], "--collection", "s2-clouds", "--dry-run",
                                       "--out", str(tmp_path / "s2")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "s2").exists()
    lines = result.output.strip().splitlines()
    assert len([line for line in lines if "cloud over area ?" in line]) == 4  # C is filtered on eo:cloud_cover
    assert lines[-1].startswith("would read the SCL windows of 4 candidate(s)")
    # Only headers were read: the COGs' first bytes (GDAL's 16 kB first range), no pixel windows.
    assert all(entry[2].startswith("bytes=0-") for entry in log[before:] if entry[0] == "GET")


def test_missing_fetch_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pystac_client", None)  # as if the fetch extra were not installed
    result = CliRunner().invoke(main, ["fetch", "dem", "--aoi", str(tmp_path / "aoi.gpkg"), "--out",
                                       str(tmp_path / "dem")])
    assert result.exit_code == 1
    assert result.output == ("Error: rts-tf fetch needs the optional packages of the 'fetch' extra: "
                             "pip install 'rts-tf[fetch]'\n")


def test_http_errors_are_retried_with_backoff(servers, tmp_path):
    """Every path's first GET answers 503, on the STAC API and on the file server: the STAC client
    (urllib3 Retry) and GDAL (GDAL_HTTP_MAX_RETRY) retry, and the DEM is complete and exact."""
    apps = servers["files_app"], servers["api_app"]
    starts = [len(app.log) for app in apps]
    for app in apps:
        app.fail_once, app.failed = True, set()
    try:
        aoi = write_aoi(tmp_path / "aoi.gpkg", dem_aoi(), "EPSG:3413")
        fetch_dem(tmp_path / "dem", aoi=aoi, resolution=32, stac_url=servers["stac"], collection="arcticdem-retry",
                  workers=4)
    finally:
        for app in apps:
            app.fail_once = False
    check_dem(tmp_path / "dem" / "dem.vrt", dem_aoi())
    files_log, api_log = (app.log[start:] for app, start in zip(apps, starts))
    tifs = {entry[1] for entry in files_log if entry[1].endswith(".tif")}
    assert len(tifs) == 4  # dem and datamask of two tiles, each refused once, then read
    assert sorted(entry[1] for entry in files_log if entry[4] == 503) == sorted(tifs)
    assert {entry[1] for entry in api_log if entry[4] == 503} == {entry[1] for entry in api_log if entry[4] == 200}
