"""Products of a prediction run: valid extents, quick-looks, styles, merged polygons, GeoParquet and mosaics."""

from __future__ import annotations

import datetime
import math
import os
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyogrio
import pyogrio.raw
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import shapes
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rts_tf.errors import InputError
from rts_tf.records import write_text
from rts_tf.vectorize import GPKG_OPTIONS, Polygons, column, read_polygons_file

# area_m2 of merged polygons: NSIDC EASE-Grid 2.0 North, a Lambert azimuthal equal-area projection of
# the northern hemisphere centred on the pole (where every RTS lies).
EQUAL_AREA = CRS.from_epsg(6931)
GEOGRAPHIC = CRS.from_epsg(4326)
PERIODS = ("year", "all", "none")
QUICKLOOK_SIZE = 1024  # longest side of a quick-look (and the resolution of the valid extent), pixels
MERGED_NAME = "rts_polygons.gpkg"
PARQUET_NAMES = {"detections": "rts_detections.parquet", "merged": "rts_merged.parquet"}
MOSAIC_STEM = "rts_probability"


# --- per scene -------------------------------------------------------------------------------

def decimation(height: int, width: int, size: int = QUICKLOOK_SIZE) -> int:
    """The whole factor that brings a raster's longest side to at most `size` pixels."""
    return max(1, math.ceil(max(height, width) / size))


def valid_extent(probability_path: str | os.PathLike, size: int = QUICKLOOK_SIZE) -> shapely.Geometry:
    """Where the model looked: the outline of the probability raster's valid (not nodata) pixels,
    at the quick-look resolution (exact for scenes up to `size` pixels), in the raster's CRS."""
    with rasterio.open(probability_path) as dataset:
        step = decimation(dataset.height, dataset.width, size)
        shape = (math.ceil(dataset.height / step), math.ceil(dataset.width / step))
        probability = dataset.read(1, out_shape=shape, resampling=Resampling.nearest)
        transform = dataset.transform * rasterio.Affine.scale(dataset.width / shape[1], dataset.height / shape[0])
        valid = probability != dataset.nodata
    parts = [shapely.geometry.shape(geometry) for geometry, _ in
             shapes(valid.astype(np.uint8), mask=valid, transform=transform, connectivity=8)]
    return shapely.union_all(parts) if parts else shapely.MultiPolygon()


def extent_layer(geometry: shapely.Geometry, crs: CRS, scene_id: str, sensor: str, image_date: str) -> Polygons:
    """The valid extent as a one-feature layer with its area."""
    return Polygons(crs, [geometry], {"scene_id": [scene_id], "sensor": [sensor], "image_date": [image_date],
                                      "valid_area_km2": [float(geometry.area) / 1e6]})


def stretch(band: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """0-255 with the 2nd and 98th percentiles of the valid pixels as black and white."""
    if not valid.any():
        return np.zeros(band.shape, np.uint8)
    low, high = np.percentile(band[valid], (2, 98))
    return (np.clip((band - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def quicklook(scene, probability_path: str | os.PathLike, polygons: Polygons, path: Path, threshold: float,
              size: int = QUICKLOOK_SIZE) -> None:
    """A PNG of the scene in true colour (2-98% stretch) with the probability overlaid from the
    threshold up (yellow to red, more opaque with probability) and the polygons outlined in cyan;
    nodata dark grey. At most `size` pixels on its longest side."""
    from PIL import Image, ImageDraw

    with rasterio.open(probability_path) as dataset:
        step = decimation(dataset.height, dataset.width, size)
        shape = (math.ceil(dataset.height / step), math.ceil(dataset.width / step))
        probability = dataset.read(1, out_shape=shape, resampling=Resampling.nearest)
        to_pixels = ~(dataset.transform * rasterio.Affine.scale(dataset.width / shape[1], dataset.height / shape[0]))
        valid = probability != dataset.nodata
    rgb = []
    for index in (2, 1, 0):  # canonical blue, green, red: red first in the picture
        band_path, band = scene.bands[index]
        with rasterio.open(band_path) as dataset:
            numbers = dataset.read(band, out_shape=shape, resampling=Resampling.nearest).astype(np.float64)
        rgb.append(numbers * scene.scale[index] + scene.offset[index])
    picture = np.stack([stretch(band, valid) for band in rgb], axis=-1)
    picture[~valid] = 40
    # Probability from the threshold up: yellow (threshold) to red (1), opacity 40% to 80%.
    weight = np.clip((probability - threshold) / max(1 - threshold, 1e-6), 0, 1)
    shown = valid & (probability >= threshold)
    colour = np.stack([np.full(shape, 255.0), 255 * (1 - weight), np.zeros(shape)], axis=-1)
    alpha = (0.4 + 0.4 * weight)[..., None]
    picture = np.where(shown[..., None], (1 - alpha) * picture + alpha * colour, picture).astype(np.uint8)
    image = Image.fromarray(picture, "RGB")
    draw = ImageDraw.Draw(image)
    for geometry in polygons.geometries:
        for polygon in getattr(geometry, "geoms", [geometry]):
            for ring in [polygon.exterior, *polygon.interiors]:
                points = [to_pixels * xy for xy in ring.coords]
                draw.line(points, fill=(0, 255, 255), width=1)
    temporary = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.tmp.png")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- QGIS styles -------------------------------------------------------------------------------

QML_HEAD = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n<qgis version=\"3.28.0\" styleCategories=\"Symbology\">\n"


def probability_style(threshold: float) -> str:
    """QGIS style of a probability raster: transparent under the threshold, yellow to red above it."""
    low = max(threshold - 0.1, 0.0)
    return QML_HEAD + f"""  <pipe>
    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1" classificationMin="0" classificationMax="1" nodataColor="">
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="0" maximumValue="1">
          <item value="0" label="0" color="#ffffb2" alpha="0"/>
          <item value="{low:g}" label="{low:g}" color="#fecc5c" alpha="0"/>
          <item value="{threshold:g}" label="{threshold:g} (threshold)" color="#fd8d3c" alpha="170"/>
          <item value="1" label="1" color="#bd0026" alpha="230"/>
        </colorrampshader>
      </rastershader>
    </rasterrenderer>
  </pipe>
</qgis>
"""


MASK_STYLE = QML_HEAD + """  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
        <paletteEntry value="0" label="background" color="#000000" alpha="0"/>
        <paletteEntry value="1" label="slump" color="#e31a1c" alpha="255"/>
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""


def polygon_style(outline: str, fill_alpha: int = 40) -> str:
    """QGIS style of polygons: an outline and a faint fill of one colour ('r,g,b')."""
    return QML_HEAD + f"""  <renderer-v2 type="singleSymbol" symbollevels="0" enableorderby="0" forceraster="0">
    <symbols>
      <symbol type="fill" name="0" alpha="1" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" pass="0" locked="0">
          <Option type="Map">
            <Option type="QString" name="color" value="{outline},{fill_alpha}"/>
            <Option type="QString" name="style" value="solid"/>
            <Option type="QString" name="outline_color" value="{outline},255"/>
            <Option type="QString" name="outline_style" value="solid"/>
            <Option type="QString" name="outline_width" value="0.5"/>
            <Option type="QString" name="outline_width_unit" value="MM"/>
          </Option>
        </layer>
      </symbol>
    </symbols>
  </renderer-v2>
</qgis>
"""


LAYER_STYLES = {"rts": polygon_style("227,26,28"), "detections": polygon_style("227,26,28"),
                "merged": polygon_style("255,127,0", 60), "extent": polygon_style("31,120,180", 0),
                "extents": polygon_style("31,120,180", 0)}


def layer_styles_table(path: Path, layers: Sequence[str]) -> None:
    """Add QGIS' `layer_styles` table to a GeoPackage: QGIS applies each layer's default style on open."""
    names = [name for name in layers if name in LAYER_STYLES]
    text = lambda values: np.array(values, dtype=object)  # noqa: E731
    columns = {"f_table_catalog": text([""] * len(names)), "f_table_schema": text([""] * len(names)),
               "f_table_name": text(names), "f_geometry_column": text(["geom"] * len(names)),
               "styleName": text(names), "styleQML": text([LAYER_STYLES[name] for name in names]),
               "styleSLD": text([""] * len(names)), "useAsDefault": np.ones(len(names), np.int64),
               "description": text([f"rts-tf style of {name}" for name in names]),
               "owner": text(["rts-tf"] * len(names)), "ui": text([""] * len(names)),
               "update_time": np.array(["2000-01-01T00:00:00"] * len(names), dtype="datetime64[ms]")}
    pyogrio.raw.write(path, None, list(columns.values()), list(columns), layer="layer_styles", driver="GPKG")


def write_raster_style(raster: Path, style: str) -> None:
    """`<raster>.qml` beside a raster: QGIS loads it as the layer's default style."""
    write_text(raster.with_suffix(".qml"), style)


# --- the run's merged products ----------------------------------------------------------------

@dataclass
class Products:
    """The files that describe a whole prediction run."""

    geopackage: str = ""
    parquet: dict[str, str] = field(default_factory=dict)
    mosaics: list[str] = field(default_factory=list)
    catalog: str = ""
    detections: int = 0
    merged: int = 0
    period: str = "year"


def period_of(image_date: str, period: str) -> str:
    """The merge period of a detection: its calendar year, 'all', or 'unknown' without a date."""
    if period == "all":
        return "all"
    return image_date[:4] if image_date else "unknown"


def merge_detections(detections: Polygons, period: str) -> tuple[Polygons, list[int]]:
    """Overlapping (or touching) detections of one period, from any scene or sensor, as one polygon
    each, and each detection's merged_id. Unions are made in EASE-Grid 2.0 North (EQUAL_AREA), where
    area_m2 and perimeter_m are measured; the result is in EPSG:4326. Deterministic: merged polygons
    are ordered by period, then by their first detection in the order given."""
    attributes = detections.attributes
    projected = shapely.make_valid(np.array(detections.to_crs(EQUAL_AREA).geometries, dtype=object))
    periods = [period_of(date, period) for date in attributes["image_date"]]
    groups: list[list[int]] = []
    for name in sorted(set(periods)):
        members = np.array([i for i, p in enumerate(periods) if p == name])
        tree = shapely.STRtree(projected[members])
        left, right = tree.query(projected[members], predicate="intersects")
        graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(len(members), len(members)))
        _, labels = connected_components(graph, directed=False)
        order = {}
        for index, label in enumerate(labels):  # components numbered by their first member
            order.setdefault(label, []).append(int(members[index]))
        groups += list(order.values())
    merged = Polygons(EQUAL_AREA, [], {key: [] for key in (
        "merged_id", "period", "n_scenes", "n_detections", "scene_ids", "sensors", "first_date", "last_date",
        "max_probability", "mean_probability", "area_m2", "perimeter_m")})
    merged_ids = [0] * len(detections)
    for number, members in enumerate(groups, start=1):
        union = shapely.normalize(shapely.union_all(projected[members]))
        dates = sorted(attributes["image_date"][i] for i in members if attributes["image_date"][i])
        areas = np.array([attributes["area_m2"][i] for i in members])
        means = np.array([attributes["mean_probability"][i] for i in members])
        values = {"merged_id": number, "period": periods[members[0]],
                  "n_scenes": len({attributes["scene_id"][i] for i in members}), "n_detections": len(members),
                  "scene_ids": ",".join(sorted({attributes["scene_id"][i] for i in members})),
                  "sensors": ",".join(sorted({attributes["sensor"][i] for i in members})),
                  "first_date": dates[0] if dates else "", "last_date": dates[-1] if dates else "",
                  "max_probability": max(attributes["max_probability"][i] for i in members),
                  "mean_probability": float((areas * means).sum() / areas.sum()),  # weighted by area
                  "area_m2": float(union.area), "perimeter_m": float(union.length)}
        merged.geometries.append(union)
        for key, value in values.items():
            merged.attributes[key].append(value)
        for i in members:
            merged_ids[i] = number
    return merged.to_crs(GEOGRAPHIC), merged_ids


MERGED_TYPES = {"merged_id": np.int64, "n_scenes": np.int64, "n_detections": np.int64, "touches_nodata": np.int64}
MERGED_DATES = ("image_date", "first_date", "last_date")
MERGED_TEXT = ("period", "scene_ids", "sensors", "scene_id", "sensor", "region", "site")


def typed(key: str, values: list) -> np.ndarray:
    """A column of the run's GeoPackage layers: dates as DATE, counts as integers, text, numbers."""
    if key in MERGED_DATES:
        return np.array([value or "NaT" for value in values], dtype="datetime64[D]")
    if key in MERGED_TEXT:
        return np.array(values, dtype=object)
    if key in MERGED_TYPES:
        return np.array(values, dtype=MERGED_TYPES[key])
    return column(key, values)


def as_multipolygons(geometries: Sequence[shapely.Geometry]) -> np.ndarray:
    """Every geometry as a MultiPolygon (one geometry type per layer, as GIS software expects)."""
    return np.array([g if g.geom_type == "MultiPolygon" else shapely.MultiPolygon([g]) if g.geom_type == "Polygon"
                     else shapely.MultiPolygon([p for p in shapely.get_parts(g) if p.geom_type == "Polygon"])
                     for g in geometries], dtype=object)


def write_layers(path: Path, layers: dict[str, Polygons], timestamp: str) -> None:
    """A GeoPackage 1.2 with these layers (MultiPolygons) and their QGIS styles, atomically. GDAL's
    `last_change` timestamps are set to `timestamp`, so the same content gives the same bytes."""
    temporary = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": timestamp})
    try:
        for number, (name, layer) in enumerate(layers.items()):
            keys = list(layer.attributes)
            pyogrio.raw.write(temporary, shapely.to_wkb(as_multipolygons(layer.geometries)),
                              [typed(key, layer.attributes[key]) for key in keys], keys, layer=name, driver="GPKG",
                              geometry_type="MultiPolygon", crs=layer.crs.to_wkt(),
                              dataset_options=GPKG_OPTIONS if number == 0 else None)
        layer_styles_table(temporary, list(layers))
        os.replace(temporary, path)
    except BaseException:
        for leftover in temporary.parent.glob(temporary.name + "*"):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})


def write_parquet(layer: Polygons, path: Path) -> None:
    """GeoParquet (1.0 metadata, WKB geometries, dates as date32) through geopandas and pyarrow, atomically."""
    import geopandas

    data = {}
    for key, values in layer.attributes.items():
        if key in MERGED_DATES:
            data[key] = [datetime.date.fromisoformat(value) if value else None for value in values]
        else:
            data[key] = typed(key, values)
    frame = geopandas.GeoDataFrame(data, geometry=list(as_multipolygons(layer.geometries)), crs=layer.crs.to_wkt())
    temporary = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        frame.to_parquet(temporary, index=False, schema_version="1.0.0", write_covering_bbox=False)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def mosaic_vrts(out: Path, probabilities: Sequence[str]) -> list[str]:
    """One VRT mosaic of the scenes' probability COGs per CRS (a VRT has one CRS), at the finest
    resolution of its scenes; where scenes overlap, the later scene in the list is on top.
    `rts_probability.vrt` for one CRS, else `rts_probability_<EPSG or n>.vrt`."""
    by_crs: dict[str, list[rasterio.DatasetReader]] = {}
    opened = [rasterio.open(path) for path in probabilities]
    try:
        for dataset in opened:
            by_crs.setdefault(dataset.crs.to_wkt(), []).append(dataset)
        written = []
        for number, datasets in enumerate(by_crs.values(), start=1):
            epsg = datasets[0].crs.to_epsg()
            name = f"{MOSAIC_STEM}.vrt" if len(by_crs) == 1 else f"{MOSAIC_STEM}_{epsg or number}.vrt"
            path = out / name
            write_text(path, vrt_xml(datasets, path.parent))
            written.append(str(path))
        return written
    finally:
        for dataset in opened:
            dataset.close()


def vrt_xml(datasets: Sequence[rasterio.DatasetReader], folder: Path) -> str:
    """GDAL VRT XML mosaicking single-band rasters of one CRS (nodata kept), paths relative to `folder`.
    rasterio has no BuildVRT and GDAL's Python bindings are not a dependency; the format is GDAL's
    documented VRT (https://gdal.org/drivers/raster/vrt.html), one ComplexSource per raster."""
    resolution = min(min(abs(d.transform.a), abs(d.transform.e)) for d in datasets)
    left = min(d.bounds.left for d in datasets)
    top = max(d.bounds.top for d in datasets)
    right = max(d.bounds.right for d in datasets)
    bottom = min(d.bounds.bottom for d in datasets)
    width, height = math.ceil((right - left) / resolution - 1e-9), math.ceil((top - bottom) / resolution - 1e-9)
    first = datasets[0]
    root = ElementTree.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ElementTree.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = first.crs.to_wkt()
    ElementTree.SubElement(root, "GeoTransform").text = ", ".join(
        repr(float(v)) for v in (left, resolution, 0.0, top, 0.0, -resolution))
    band = ElementTree.SubElement(root, "VRTRasterBand", dataType="Float32", band="1")
    ElementTree.SubElement(band, "NoDataValue").text = repr(float(first.nodata))
    ElementTree.SubElement(band, "Description").text = "slump probability"
    for dataset in datasets:
        source = ElementTree.SubElement(band, "ComplexSource")
        ElementTree.SubElement(source, "SourceFilename", relativeToVRT="1").text = \
            os.path.relpath(dataset.name, folder)
        ElementTree.SubElement(source, "SourceBand").text = "1"
        ElementTree.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(dataset.width),
                               ySize=str(dataset.height))
        x_off = (dataset.bounds.left - left) / resolution
        y_off = (top - dataset.bounds.top) / resolution
        ElementTree.SubElement(source, "DstRect", xOff=repr(x_off), yOff=repr(y_off),
                               xSize=repr(dataset.width * abs(dataset.transform.a) / resolution),
                               ySize=repr(dataset.height * abs(dataset.transform.e) / resolution))
        ElementTree.SubElement(source, "NODATA").text = repr(float(dataset.nodata))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"


@dataclass
class SceneProduct:
    """What the run's products need of one predicted scene."""

    scene_id: str
    sensor: str
    image_date: str
    probability: str
    mask: str
    polygons: str
    quicklook: str


def run_products(out: Path, scenes: Sequence[SceneProduct], period: str, threshold: float, tags: dict,
                 catalog: bool = True) -> Products:
    """The run's GeoPackage (`detections`, `merged` unless period is 'none', `extents`, styles),
    GeoParquet of the detections and merged polygons, VRT mosaics of the probability and the STAC
    catalog, from the scenes' own files."""
    if period not in PERIODS:
        raise InputError(f"--merge-period must be one of {', '.join(PERIODS)}, got {period}")
    detections, extents = Polygons(GEOGRAPHIC), Polygons(GEOGRAPHIC)
    for scene in scenes:
        found = read_polygons_file(scene.polygons)
        count = len(found)
        # Scenes predicted by an earlier version have no sensor field or extent layer.
        found.attributes.setdefault("sensor", [scene.sensor] * count)
        found.attributes["image_date"] = [scene.image_date] * count
        detections.extend(found.to_crs(GEOGRAPHIC))
        if "extent" in pyogrio.list_layers(scene.polygons)[:, 0]:
            extents.extend(read_polygons_file(scene.polygons, "extent").to_crs(GEOGRAPHIC))
    order = ("scene_id", "sensor", "image_date", "region", "area_m2", "perimeter_m", "min_probability",
             "max_probability", "mean_probability", "median_probability", "std_probability", "touches_nodata")
    keys = [key for key in order if key in detections.attributes] + \
           [key for key in detections.attributes if key not in order]
    detections.attributes = {key: detections.attributes.get(key, []) for key in keys}
    products = Products(period=period, detections=len(detections))
    layers = {"detections": detections}
    if period != "none":
        merged, merged_ids = merge_detections(detections, period)
        detections.attributes["merged_id"] = merged_ids
        layers["merged"] = merged
        products.merged = len(merged)
    layers["extents"] = extents
    dates = sorted(scene.image_date for scene in scenes if scene.image_date)
    timestamp = f"{dates[-1] if dates else '2000-01-01'}T00:00:00.000Z"
    products.geopackage = str(out / MERGED_NAME)
    write_layers(out / MERGED_NAME, layers, timestamp)
    for name in ("detections", "merged"):
        if name in layers:
            path = out / PARQUET_NAMES[name]
            write_parquet(layers[name], path)
            products.parquet[name] = str(path)
    for name in PARQUET_NAMES.values():  # a merged file of an earlier --merge-period
        if name not in [Path(p).name for p in products.parquet.values()]:
            (out / name).unlink(missing_ok=True)
    products.mosaics = mosaic_vrts(out, [scene.probability for scene in scenes]) if scenes else []
    for mosaic in products.mosaics:
        write_raster_style(Path(mosaic), probability_style(threshold))
    if catalog:
        from rts_tf.catalog import write_catalog

        products.catalog = write_catalog(out, scenes, products, threshold, tags, extents)
    return products
