"""Polygons from a slump mask: connected components with area and probability statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio.raw
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry import shape

from rts_tf.labels import reproject_geometries


@dataclass
class Polygons:
    """Polygons with attribute columns, in one CRS."""

    crs: CRS
    geometries: list = field(default_factory=list)
    attributes: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geometries)

    def extend(self, other: "Polygons") -> None:
        self.geometries.extend(other.geometries)
        for key, values in other.attributes.items():
            self.attributes.setdefault(key, []).extend(values)

    def to_crs(self, crs: CRS) -> "Polygons":
        return Polygons(crs, reproject_geometries(self.geometries, self.crs, crs),
                        {key: list(values) for key, values in self.attributes.items()})


def polygons_from_mask(mask: np.ndarray, probability: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS,
                       min_area: float = 100.0, drop_touching: bool = False) -> Polygons:
    """One polygon per connected slump component (8-connected), with `area_m2` (of the pixels),
    `mean_probability`, `max_probability` and `touches_nodata`. Components smaller than min_area m2
    are dropped; with drop_touching, so are those touching nodata or the raster's edge."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    result = Polygons(crs, [], {"area_m2": [], "mean_probability": [], "max_probability": [], "touches_nodata": []})
    if count == 0:
        return result
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    index = np.arange(1, count + 1)
    pixels = ndimage.sum_labels(np.ones_like(components), components, index)
    means = ndimage.mean(probability, components, index)
    maxima = ndimage.maximum(probability, components, index)
    # A component touches nodata when its one-pixel dilation reaches an invalid pixel or the edge.
    outside = np.pad(~valid, 1, constant_values=True)
    grown = ndimage.grey_dilation(np.pad(components, 1), size=(3, 3))
    touching = set(np.unique(grown[outside & (grown > 0)]).tolist())
    geometries: dict[int, list] = {}
    for geometry, value in shapes(components.astype(np.int32), mask=components > 0, transform=transform,
                                  connectivity=8):
        geometries.setdefault(int(value), []).append(shape(geometry))
    for label in index:
        area = float(pixels[label - 1] * pixel_area)
        if area < min_area or (drop_touching and label in touching):
            continue
        parts = geometries[int(label)]
        result.geometries.append(parts[0] if len(parts) == 1 else shapely.union_all(parts))
        result.attributes["area_m2"].append(area)
        result.attributes["mean_probability"].append(float(means[label - 1]))
        result.attributes["max_probability"].append(float(maxima[label - 1]))
        result.attributes["touches_nodata"].append(int(label in touching))
    return result


STRING_FIELDS = ("scene_id", "image_date", "region", "site")
INTEGER_FIELDS = ("touches_nodata",)


def write_polygons(polygons: Polygons, path: str | os.PathLike, layer: str = "rts") -> None:
    """Write a GeoPackage of MultiPolygons atomically (temporary name, then rename)."""
    path = Path(path)
    temporary = path.with_name(path.stem + ".tmp" + path.suffix)
    temporary.unlink(missing_ok=True)
    fields = list(polygons.attributes)
    dtypes = [object if key in STRING_FIELDS else np.int64 if key in INTEGER_FIELDS else np.float64 for key in fields]
    values = [np.array(polygons.attributes[key], dtype=dtype) for key, dtype in zip(fields, dtypes)]
    multi = [g if g.geom_type == "MultiPolygon" else shapely.MultiPolygon([g]) for g in polygons.geometries]
    pyogrio.raw.write(temporary, shapely.to_wkb(np.array(multi, dtype=object)), values, fields, layer=layer,
                      driver="GPKG", geometry_type="MultiPolygon", crs=polygons.crs.to_wkt())
    os.replace(temporary, path)
