"""Tiny real inputs for tests: GeoTIFFs with real CRSs and transforms, and label polygons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.warp import transform, transform_geom
from shapely.geometry import mapping, shape

SCENE_CRS = "EPSG:32608"  # UTM 8N, Tuktoyaktuk
ORIGIN = (560000.0, 7700000.0)  # UTM x, y of a scene's top-left corner


def write_raster(path: Path, array: np.ndarray, crs: str, transform_, nodata=None, **profile) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = array if array.ndim == 3 else array[None]
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=array.dtype, crs=crs, transform=transform_,
                       nodata=nodata, **profile) as dataset:
        dataset.write(array)
    return path


def write_scene(folder: Path, scene_id: str, size: int = 64, origin=ORIGIN, udm2: np.ndarray | None = None,
                nodata_border: int = 0, seed: int = 0) -> Path:
    """A 4-band uint16 PlanetScope-like scene at 3 m with an optional UDM2 (all clear by default)."""
    rng = np.random.default_rng(seed)
    sr = np.stack([np.full((size, size), v) for v in (300, 500, 400, 2500)]).astype(np.float64)
    sr = (sr * rng.uniform(0.9, 1.1, sr.shape)).astype(np.uint16)
    if nodata_border:
        sr[:, :nodata_border, :] = 0
    scene = folder / scene_id
    affine = from_origin(origin[0], origin[1], 3.0, 3.0)
    write_raster(scene / f"{scene_id}_3B_AnalyticMS_SR.tif", sr, SCENE_CRS, affine, nodata=0)
    if udm2 is None:
        udm2 = np.zeros((8, size, size), dtype=np.uint8)
        udm2[0] = 1
    write_raster(scene / f"{scene_id}_3B_udm2.tif", udm2, SCENE_CRS, affine)
    return scene


def scene_bounds_in(crs: str, size: int = 64, origin=ORIGIN, margin: float = 300.0):
    xs = [origin[0] - margin, origin[0] + size * 3 + margin]
    ys = [origin[1] + margin, origin[1] - size * 3 - margin]
    x, y = transform(SCENE_CRS, crs, [xs[0], xs[1], xs[0], xs[1]], [ys[0], ys[0], ys[1], ys[1]])
    return min(x), min(y), max(x), max(y)


def write_dem(path: Path, elevation, resolution: float = 10.0, size: int = 64, origin=ORIGIN,
              nodata: float = -9999.0) -> Path:
    """A DEM in EPSG:3413 covering the scene with a margin; elevation(x_utm, y_utm) -> metres."""
    left, bottom, right, top = scene_bounds_in("EPSG:3413", size, origin)
    left, top = np.floor(left / resolution) * resolution, np.ceil(top / resolution) * resolution
    width, height = int(np.ceil((right - left) / resolution)), int(np.ceil((top - bottom) / resolution))
    affine = from_origin(left, top, resolution, resolution)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = affine @ (cols, rows)
    ux, uy = transform("EPSG:3413", SCENE_CRS, x.ravel(), y.ravel())
    dem = np.asarray(elevation(np.array(ux), np.array(uy)), dtype=np.float32).reshape(height, width)
    return write_raster(path, dem, "EPSG:3413", affine, nodata=nodata)


def write_tcvis(path: Path, colour=(110, 150, 105), size: int = 64, origin=ORIGIN, bands: int = 3) -> Path:
    """A constant-colour TCVIS in EPSG:4326 at about 30 m covering the scene with a margin."""
    left, bottom, right, top = scene_bounds_in("EPSG:4326", size, origin)
    step_y = 0.00027
    step_x = step_y / np.cos(np.radians((top + bottom) / 2))
    width, height = int(np.ceil((right - left) / step_x)), int(np.ceil((top - bottom) / step_y))
    array = np.stack([np.full((height, width), c % 256, dtype=np.uint8) for c in (list(colour) * 2)[:bands]])
    return write_raster(path, array, "EPSG:4326", from_origin(left, top, step_x, step_y))


def write_polygons(path: Path, polygons_utm: list, fields: dict[str, list], crs: str = "EPSG:4326",
                   driver: str | None = None) -> Path:
    """Polygons given in the scene's UTM CRS, written in `crs` with string fields."""
    geometries = [shape(transform_geom(SCENE_CRS, crs, mapping(p))) if crs else p for p in polygons_utm]
    path.parent.mkdir(parents=True, exist_ok=True)
    pyogrio.raw.write(path, shapely.to_wkb(np.array(geometries, dtype=object)),
                      [np.array(values, dtype=object) for values in fields.values()], list(fields),
                      crs=crs, driver=driver, geometry_type="Unknown")
    return path
