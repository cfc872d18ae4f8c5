"""Label polygons: read a vector file, repair, match to scenes, rasterise onto a scene grid."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.errors
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from rts_tf.errors import InputError
from rts_tf.rasters import Grid
POLYGON_TYPES = ("Polygon", "MultiPolygon")


@dataclass
class VectorLayer:
    """Polygons with attributes and a CRS, as read from a GeoPackage, Shapefile or GeoJSON."""

    path: str
    crs: CRS
    geometries: np.ndarray  # shapely geometries, repaired, polygonal
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geometries)

    def values(self, name: str, index: int) -> str | None:
        column = self.attributes.get(name)
        if column is None:
            return None
        value = column[index]
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def read_polygons(path: str | os.PathLike, what: str, required_fields: tuple[str, ...] = ()) -> VectorLayer:
    """Read polygons and attributes; repair invalid geometries; keep only polygonal parts."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(path)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as error:
        raise InputError(f"{path}: not a readable vector file ({what}): {str(error).splitlines()[0]}") from None
    if meta.get("crs") is None:
        raise InputError(f"{path}: {what} has no CRS")
    names = [str(name) for name in meta["fields"]]
    missing = [name for name in required_fields if name not in names]
    if missing:
        raise InputError(f"{path}: {what} lacks the field(s) {', '.join(missing)} "
                         f"(fields present: {', '.join(names) or 'none'})")
    geometries = shapely.from_wkb(wkb) if wkb is not None else np.array([])
    keep = np.array([g is not None and not g.is_empty for g in geometries], dtype=bool)
    geometries = geometries[keep] if len(geometries) else geometries
    repaired = np.array([_polygonal(shapely.make_valid(g)) for g in geometries], dtype=object)
    polygonal = np.array([g is not None for g in repaired], dtype=bool)
    if not polygonal.any():
        raise InputError(f"{path}: {what} holds no polygons")
    attributes = {name: np.asarray(values, dtype=object)[keep][polygonal]
                  for name, values in zip(names, field_data)}
    return VectorLayer(str(path), CRS.from_user_input(meta["crs"]), repaired[polygonal], attributes)


def _polygonal(geometry):
    """The polygonal part of a (repaired) geometry, or None."""
    if geometry is None or geometry.is_empty:
        return None
    if geometry.geom_type in POLYGON_TYPES:
        return geometry
    if geometry.geom_type == "GeometryCollection":
        parts = [part for part in geometry.geoms if part.geom_type in POLYGON_TYPES]
        return shapely.union_all(parts) if parts else None
    return None


def reproject_geometries(geometries, source_crs: CRS, target_crs: CRS, path: str = "geometries") -> list:
    """Reproject shapely geometries with GDAL (no pyproj needed); repair what reprojection breaks."""
    if source_crs == target_crs:
        return list(geometries)
    result = []
    for geometry in geometries:
        try:
            moved = shape(transform_geom(source_crs, target_crs, mapping(geometry)))
        except Exception as error:  # GDAL/PROJ errors (rasterio's CPLE_* classes are private)
            raise InputError(f"{path}: coordinates cannot be transformed from {source_crs} to {target_crs} "
                             f"(is the file's CRS right?): {str(error).splitlines()[0]}") from None
        result.append(moved if moved.is_valid else shapely.make_valid(moved))
    return result


def scene_labels(labels: VectorLayer, scene_id: str, grid: Grid) -> list:
    """The label polygons of one scene, in the scene's CRS.

    Matched by `image_id` when the field exists (labels of other images of the same place must
    not leak in), else by intersection with the scene's extent.
    """
    if "image_id" in labels.attributes:
        chosen = labels.geometries[labels.attributes["image_id"].astype(str) == scene_id]
        return reproject_geometries(chosen, labels.crs, grid.crs, labels.path)
    footprint = box(*grid.bounds)
    moved = reproject_geometries(labels.geometries, labels.crs, grid.crs, labels.path)
    return [geometry for geometry in moved if geometry.intersects(footprint)]


def scene_attribute(labels: VectorLayer | None, scene_id: str, name: str) -> str | None:
    """The most common value of a field among a scene's labels (by image_id), or None."""
    if labels is None or name not in labels.attributes or "image_id" not in labels.attributes:
        return None
    chosen = labels.attributes[name][labels.attributes["image_id"].astype(str) == scene_id]
    values = [str(value) for value in chosen if value is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def site_of(sites: VectorLayer, grid: Grid) -> tuple[str | None, str | None]:
    """(site, region) of the site polygon containing the scene's centre, or (None, None)."""
    bounds = grid.bounds
    centre = shapely.Point((bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2)
    centre = reproject_geometries([centre], grid.crs, sites.crs, sites.path)[0]
    for index, geometry in enumerate(sites.geometries):
        if geometry.contains(centre):
            return sites.values("site", index), sites.values("region", index)
    return None, None


def rasterize_labels(polygons: list, grid: Grid, all_touched: bool = False) -> np.ndarray:
    """Burn polygons as 1 on a 0 background (uint8), pixel-centre rule unless all_touched."""
    if not polygons:
        return np.zeros((grid.height, grid.width), dtype=np.uint8)
    return rasterize(((mapping(polygon), 1) for polygon in polygons),
                     out_shape=(grid.height, grid.width), transform=grid.transform,
                     fill=0, dtype="uint8", all_touched=all_touched)
