"""Polygons from a slump mask: connected components with area and probability statistics."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.windows import Window
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


EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def polygons_from_rasters(probability_path: str | os.PathLike, mask_path: str | os.PathLike, nodata: int,
                          min_area: float = 100.0, drop_touching: bool = False, strip_rows: int = 1024) -> Polygons:
    """One polygon per 8-connected slump component of a mask raster (1 = slump, `nodata` = unusable),
    with `area_m2`, `mean_probability`, `max_probability` and `touches_nodata` (the component
    touches nodata or the raster's edge). Components under min_area m2 are dropped; with
    drop_touching, so are those touching nodata.

    The rasters are read in strips of `strip_rows`, so memory does not grow with the scene:
    components are labelled per strip and those meeting across a strip edge are merged, their
    pixel counts and probability sums added, maxima and flags combined, outlines unioned.
    """
    parent: dict[int, int] = {}

    def root(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    pixels: dict[int, int] = {}
    sums: dict[int, float] = {}
    maxima: dict[int, float] = {}
    touching: set[int] = set()
    outlines: dict[int, list] = {}
    with rasterio.open(mask_path) as mask_file, rasterio.open(probability_path) as probability_file:
        height, width, transform, crs = mask_file.height, mask_file.width, mask_file.transform, mask_file.crs
        previous_row, offset = None, 0
        for top in range(0, height, strip_rows):
            rows = min(strip_rows, height - top)
            above, below = int(top > 0), int(top + rows < height)
            context = mask_file.read(1, window=Window(0, top - above, width, rows + above + below))
            slump = context[above:above + rows] == 1
            local, count = ndimage.label(slump, EIGHT_CONNECTED)
            if count == 0:
                previous_row = np.zeros(width, dtype=np.int64)
                continue
            probability = probability_file.read(1, window=Window(0, top, width, rows))
            index = np.arange(1, count + 1)
            strip_pixels = np.bincount(local.ravel(), minlength=count + 1)[1:]
            strip_sums = np.bincount(local.ravel(), weights=probability.ravel(), minlength=count + 1)[1:]
            strip_maxima = ndimage.maximum(probability, local, index)
            # Touching nodata: a component's 3x3 neighbourhood reaches an unusable pixel or the edge.
            labelled = np.zeros(context.shape, dtype=np.int32)
            labelled[above:above + rows] = local
            edges = ((0 if above else 1, 0 if below else 1), (1, 1))
            outside = np.pad(context == nodata, edges, constant_values=True)
            grown = ndimage.grey_dilation(np.pad(labelled, edges), size=(3, 3))
            strip_touching = np.unique(grown[outside & (grown > 0)])
            strip_transform = transform @ Affine.translation(0, top)
            for geometry, value in shapes(local, mask=slump, transform=strip_transform, connectivity=8):
                outlines.setdefault(offset + int(value), []).append(shape(geometry))
            for label in index:
                key = offset + int(label)
                parent[key] = key
                pixels[key], sums[key], maxima[key] = int(strip_pixels[label - 1]), float(strip_sums[label - 1]), \
                    float(strip_maxima[label - 1])
            touching.update(offset + int(label) for label in strip_touching)
            first_row = np.where(local[0] > 0, local[0] + offset, 0)
            if previous_row is not None:
                # 8-connectivity across the strip edge: the pixel below and its two diagonal neighbours.
                for shift in (-1, 0, 1):
                    upper = previous_row[max(0, -shift):width - max(0, shift)]
                    lower = first_row[max(0, shift):width - max(0, -shift)]
                    for a, b in set(zip(upper[(upper > 0) & (lower > 0)].tolist(), lower[(upper > 0) & (lower > 0)].tolist())):
                        parent[root(b)] = root(a)
            previous_row = np.where(local[-1] > 0, local[-1] + offset, 0)
            offset += count
    groups: dict[int, list[int]] = {}
    for label in parent:
        groups.setdefault(root(label), []).append(label)
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    result = Polygons(crs, [], {"area_m2": [], "mean_probability": [], "max_probability": [], "touches_nodata": []})
    for members in groups.values():
        count = sum(pixels[m] for m in members)
        touches = any(m in touching for m in members)
        if count * pixel_area < min_area or (drop_touching and touches):
            continue
        parts = [part for m in members for part in outlines[m]]
        result.geometries.append(parts[0] if len(parts) == 1 else shapely.union_all(parts))
        result.attributes["area_m2"].append(float(count * pixel_area))
        result.attributes["mean_probability"].append(sum(sums[m] for m in members) / count)
        result.attributes["max_probability"].append(max(maxima[m] for m in members))
        result.attributes["touches_nodata"].append(int(touches))
    return result


STRING_FIELDS = ("scene_id", "sensor", "region", "site")
INTEGER_FIELDS = ("touches_nodata",)
DATE_FIELDS = ("image_date",)  # 'YYYY-MM-DD' or '' in Polygons; a GeoPackage DATE field in the file
# GeoPackage 1.2: every GDAL since 2.2 opens it without a version warning (1.4 warns before GDAL 3.3).
GPKG_OPTIONS = {"VERSION": "1.2"}


def probability_statistics(polygons: Polygons, probability_path: str | os.PathLike) -> None:
    """Set min, max, mean, median and std of the probability of each polygon's pixels (those whose
    centre lies inside it: exactly the component's pixels for polygons from polygons_from_rasters)
    and its perimeter in metres, reading only each polygon's window of the raster."""
    from rasterio.features import geometry_mask
    from rasterio.windows import from_bounds

    names = ("min_probability", "max_probability", "mean_probability", "median_probability", "std_probability")
    values: dict[str, list] = {name: [] for name in names}
    with rasterio.open(probability_path) as dataset:
        for geometry in polygons.geometries:
            # One pixel of margin around the bounds (they lie on pixel edges, give or take rounding).
            near = from_bounds(*geometry.bounds, transform=dataset.transform)
            window = Window(int(np.floor(near.col_off)) - 1, int(np.floor(near.row_off)) - 1,
                            int(np.ceil(near.width)) + 3, int(np.ceil(near.height)) + 3).intersection(
                Window(0, 0, dataset.width, dataset.height))
            probability = dataset.read(1, window=window)
            inside = ~geometry_mask([geometry], probability.shape, dataset.window_transform(window))
            pixels = probability[inside & (probability != dataset.nodata)].astype(np.float64)
            for name, function in zip(names, (np.min, np.max, np.mean, np.median, np.std)):
                values[name].append(float(function(pixels)) if pixels.size else float("nan"))
    polygons.attributes.update(values)
    polygons.attributes["perimeter_m"] = [float(g.length) for g in polygons.geometries]


def read_polygons_file(path: str | os.PathLike, layer: str = "rts") -> Polygons:
    """Polygons and their attribute columns back from a GeoPackage written by write_polygons."""
    meta, _, geometry, fields = pyogrio.raw.read(path, layer=layer)
    wkb = [g for g in geometry] if geometry is not None else []
    columns = {name: list(np.where(np.isnat(values), "", np.datetime_as_string(values, unit="D")))
               if np.issubdtype(values.dtype, np.datetime64) else list(values)
               for name, values in zip(meta["fields"], fields)}
    return Polygons(CRS.from_user_input(meta["crs"]), list(shapely.from_wkb(np.array(wkb, dtype=object))) if wkb else [],
                    columns)


def column(key: str, values: list) -> np.ndarray:
    """An attribute column as the GeoPackage stores it: dates as DATE, flags as integers, text, numbers."""
    if key in DATE_FIELDS:
        return np.array([value or "NaT" for value in values], dtype="datetime64[D]")
    dtype = object if key in STRING_FIELDS else np.int64 if key in INTEGER_FIELDS else np.float64
    return np.array(values, dtype=dtype)


def write_polygons(polygons: Polygons, path: str | os.PathLike, layer: str = "rts",
                   temporary_id: str | None = None, more_layers: dict[str, Polygons] | None = None,
                   styles: bool = False) -> None:
    """Write a GeoPackage of MultiPolygons atomically: under a temporary name of this attempt's own
    (`<stem>.<temporary_id>.tmp.gpkg`, a random id by default), then renamed. `more_layers` go
    into the same file; with styles, QGIS styles of the layers too (products.layer_styles_table)."""
    path = Path(path)
    temporary = path.with_name(f"{path.stem}.{temporary_id or uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        for name, content in {layer: polygons, **(more_layers or {})}.items():
            fields = list(content.attributes)
            values = [column(key, content.attributes[key]) for key in fields]
            multi = [g if g.geom_type == "MultiPolygon" else shapely.MultiPolygon([g]) for g in content.geometries]
            pyogrio.raw.write(temporary, shapely.to_wkb(np.array(multi, dtype=object)), values, fields, layer=name,
                              driver="GPKG", geometry_type="MultiPolygon", crs=content.crs.to_wkt(),
                              dataset_options=GPKG_OPTIONS if name == layer else None)
        if styles:
            from rts_tf.products import layer_styles_table

            layer_styles_table(temporary, [layer, *(more_layers or {})])
        os.replace(temporary, path)
    except BaseException:
        for leftover in temporary.parent.glob(temporary.name + "*"):  # with SQLite's -journal, -wal
            leftover.unlink(missing_ok=True)
        raise
