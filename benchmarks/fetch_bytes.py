"""Bytes read over HTTP by rts-tf fetch for a 10 x 10 km AOI, versus the whole files, on local servers.

One full-size Sentinel-2 tile (10980 x 10980 px at 10 m, 1024 px internal tiles, deflate) with SCL
(5490 px at 20 m), and one full-size ArcticDEM 10 m mosaic tile (5000 x 5000 px, 512 px internal
tiles), served by the test servers (stac-fastapi.static, Starlette StaticFiles with range
requests), which count the bytes they send. Usage:

    PYTHONPATH=$PWD python benchmarks/fetch_bytes.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pystac
import rasterio
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stac_servers import file_server, stac_server  # noqa: E402
from test_fetch import collection, lonlat_box, write_aoi  # noqa: E402

from rts_tf.fetch.dem import fetch_dem  # noqa: E402
from rts_tf.fetch.sentinel2 import fetch_sentinel2  # noqa: E402

UTM = "EPSG:32607"
X0, Y0, S2 = 499980.0, 7800000.0, 10980


def cog(path: Path, data: np.ndarray, crs: str, transform, nodata, blocksize: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata, compress="deflate", blocksize=blocksize,
                       predictor=2) as out:
        out.write(data[np.newaxis])


def texture(size: int, seed: int, low: int, spread: int, dtype) -> np.ndarray:
    """Image-like numbers: a smooth field plus pixel noise (compresses about like real imagery)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (size // 64 + 2, size // 64 + 2))
    field = np.kron(coarse, np.ones((64, 64)))[:size, :size]
    return (low + spread * field + rng.normal(0, spread / 20, (size, size))).astype(dtype)


def main(work: Path) -> None:
    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    server, counter = file_server(files)
    url = server.url
    t = time.time()
    folder = "s2/S2B_T07WEU_20220715_0_L2A"
    assets = {}
    for key, band, low in (("blue", "B02", 1300), ("green", "B03", 1500), ("red", "B04", 1400), ("nir", "B08", 3500)):
        cog(files / folder / f"{band}.tif", texture(S2, hash(band) % 100, low, 400, np.uint16), UTM,
            from_origin(X0, Y0, 10, 10), 0, 1024)
        assets[key] = {"href": f"{url}/files/{folder}/{band}.tif", "roles": ["data"],
                       "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]}
    cog(files / folder / "SCL.tif", np.full((S2 // 2, S2 // 2), 4, np.uint8), UTM, from_origin(X0, Y0, 20, 20), 0,
        1024)
    assets["scl"] = {"href": f"{url}/files/{folder}/SCL.tif", "roles": ["data"]}
    bbox = lonlat_box((X0, Y0 - S2 * 10, X0 + S2 * 10, Y0), UTM)
    geometry = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                    [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}
    s2_item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_T07WEU_20220715_0_L2A", "bbox": bbox,
               "geometry": geometry, "assets": assets, "links": [],
               "properties": {"datetime": "2022-07-15T20:40:19Z", "eo:cloud_cover": 5.0,
                              "s2:processing_baseline": "05.09", "grid:code": "MGRS-07WEU"}}
    # ArcticDEM 10 m: one 50 km tile around the AOI.
    aoi_utm = (X0 + 50000, Y0 - 60000, X0 + 60000, Y0 - 50000)
    from rasterio.warp import transform as warp

    cx, cy = warp(UTM, "EPSG:3413", [(aoi_utm[0] + aoi_utm[2]) / 2], [(aoi_utm[1] + aoi_utm[3]) / 2])
    left, top = np.floor(cx[0] / 50000) * 50000, np.floor(cy[0] / 50000) * 50000 + 50000
    if cx[0] - left < 8000 or left + 50000 - cx[0] < 8000 or top - cy[0] < 8000 or cy[0] - (top - 50000) < 8000:
        left, top = cx[0] - 25000, cy[0] + 25000  # keep the AOI inside the one tile
    dem_folder = "arcticdem/mosaics/v4.1/10m/47_13"
    cog(files / dem_folder / "47_13_10m_v4.1_dem.tif", texture(5000, 7, 100, 50, np.float32), "EPSG:3413",
        from_origin(left, top, 10, 10), -9999.0, 512)
    cog(files / dem_folder / "47_13_10m_v4.1_datamask.tif", np.ones((5000, 5000), np.uint8), "EPSG:3413",
        from_origin(left, top, 10, 10), 0, 512)
    dem_bbox = lonlat_box((left, top - 50000, left + 50000, top), "EPSG:3413")
    dem_item = {"type": "Feature", "stac_version": "1.0.0", "id": "47_13_10m_v4.1", "bbox": dem_bbox,
                "geometry": {"type": "Polygon", "coordinates": [[[dem_bbox[0], dem_bbox[1]], [dem_bbox[2], dem_bbox[1]],
                                                                 [dem_bbox[2], dem_bbox[3]], [dem_bbox[0], dem_bbox[3]],
                                                                 [dem_bbox[0], dem_bbox[1]]]]},
                "properties": {"datetime": "2015-07-01T00:00:00Z", "pgc:release_version": "4.1"}, "links": [],
                "assets": {"dem": {"href": f"{url}/files/{dem_folder}/47_13_10m_v4.1_dem.tif"},
                           "datamask": {"href": f"{url}/files/{dem_folder}/47_13_10m_v4.1_datamask.tif"}}}
    catalog = pystac.Catalog("bench", "fetch bytes benchmark")
    catalog.add_child(collection("sentinel-2-c1-l2a", [s2_item], [-180, -90, 180, 90]))
    catalog.add_child(collection("arcticdem-mosaics-v4.1-10m", [dem_item], [-180, 50, 180, 90]))
    catalog.normalize_hrefs(str(work / "catalog"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    api, _ = stac_server(work / "catalog" / "catalog.json")
    print(f"test data written in {time.time() - t:.0f} s")
    aoi = write_aoi(work / "aoi.gpkg", aoi_utm, UTM)
    whole = {p.name: p.stat().st_size for p in files.rglob("*.tif")}
    for name, run in (
            ("fetch sentinel2", lambda: fetch_sentinel2(work / "out-s2", aoi, "2022-07-01/2022-07-31", stac_url=api.url)),
            ("fetch dem 10 m", lambda: fetch_dem(work / "out-dem", aoi=aoi, resolution=10, stac_url=api.url))):
        before = len(counter.log)
        start = time.time()
        run()
        seconds = time.time() - start
        entries = counter.log[before:]
        read = sum(e[3] for e in entries)
        names = {Path(e[1]).name for e in entries}
        files_bytes = sum(whole[n] for n in names)
        print(f"{name}: {read / 1e6:.2f} MB read in {len(entries)} requests ({seconds:.1f} s) of "
              f"{files_bytes / 1e6:.1f} MB in the {len(names)} whole files ({100 * read / files_bytes:.1f} %)")
    api.stop()
    server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fetch-bytes-")))
