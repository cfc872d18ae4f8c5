"""STAC catalog of a prediction run: a collection of one item per scene, written with pystac."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Sequence

import shapely

from rts_tf.records import write_json

COLLECTION_NAME = "collection.json"
GEOPACKAGE = "application/geopackage+sqlite3"
PARQUET = "application/vnd.apache.parquet"
VRT = "application/xml"


def scene_datetime(image_date: str) -> datetime.datetime | None:
    """Noon UTC of the image date (rts-tf knows scenes by day), or None without a date."""
    if not image_date:
        return None
    return datetime.datetime.combine(datetime.date.fromisoformat(image_date), datetime.time(12),
                                     tzinfo=datetime.timezone.utc)


def write_catalog(out: Path, scenes: Sequence, products, threshold: float, tags: dict, extents) -> str:
    """OUT/collection.json and OUT/<scene_id>/<scene_id>.json (STAC 1.1, self-contained, relative
    links): an item per scene (geometry: its valid extent; assets: probability and mask COGs,
    polygons, quick-look; the model and threshold as properties) and the run's merged files as the
    collection's assets. Each file is written atomically."""
    import pystac

    footprints = {scene_id: geometry for scene_id, geometry in zip(extents.attributes.get("scene_id", []),
                                                                   extents.geometries)}
    properties = {"rts_tf:model": tags.get("RTS_MODEL", ""), "rts_tf:threshold": threshold,
                  "rts_tf:threshold_source": tags.get("RTS_THRESHOLD_SOURCE", ""),
                  "rts_tf:bands": tags.get("RTS_BANDS", ""), "rts_tf:version": tags.get("RTS_TF_VERSION", "")}
    items = []
    for scene in scenes:
        footprint = footprints.get(scene.scene_id)
        if footprint is None or footprint.is_empty:
            continue  # no valid pixel: nothing to find in a catalogue
        moment = scene_datetime(scene.image_date)
        # A scene without a date (a generic raster) gets an open-ended range, which STAC requires.
        unknown = {} if moment else {"start_datetime": datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc),
                                     "end_datetime": datetime.datetime.now(datetime.timezone.utc)}
        item = pystac.Item(scene.scene_id, shapely.geometry.mapping(footprint), list(footprint.bounds), moment,
                           {**properties, "rts_tf:sensor": scene.sensor}, **unknown)
        assets = {"probability": (scene.probability, pystac.MediaType.COG, ["data"], "Slump probability (0-1, nodata -1)"),
                  "mask": (scene.mask, pystac.MediaType.COG, ["data"], "Slump mask (1 slump, 0 background, 255 nodata)"),
                  "polygons": (scene.polygons, GEOPACKAGE, ["data"], "Slump polygons and the valid extent"),
                  "quicklook": (scene.quicklook, pystac.MediaType.PNG, ["overview", "visual"],
                                "True colour with the probability and polygons")}
        for key, (href, media_type, roles, title) in assets.items():
            if href:  # relative to the item, which lies in the scene's folder
                item.add_asset(key, pystac.Asset(f"./{Path(href).name}", title, media_type=media_type, roles=roles))
        items.append(item)
    collection = pystac.Collection(
        "rts-tf-prediction", "Retrogressive thaw slumps mapped by rts-tf: per-scene probability, masks and "
        "polygons; merged polygons of all scenes.",
        pystac.Extent.from_items(items) if items else pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[None, None]])),
        license="other", title="rts-tf prediction", extra_fields={"rts_tf:model": properties["rts_tf:model"],
                                                                  "rts_tf:threshold": threshold})
    run_assets = {"polygons": (products.geopackage, GEOPACKAGE, "Detections, merged polygons, valid extents")}
    run_assets.update({f"{name}_parquet": (path, PARQUET, f"{name.capitalize()} as GeoParquet")
                       for name, path in products.parquet.items()})
    run_assets.update({Path(path).stem: (path, VRT, "Mosaic of the scenes' probability (GDAL VRT)")
                       for path in products.mosaics})
    for key, (href, media_type, title) in run_assets.items():
        collection.add_asset(key, pystac.Asset(f"./{Path(href).name}", title, media_type=media_type, roles=["data"]))
    collection.add_items(items)
    # Relative links everywhere: the folder can be moved or served as it is.
    collection.catalog_type = pystac.CatalogType.SELF_CONTAINED
    collection.normalize_hrefs(str(Path(out).resolve()))
    for item in items:
        write_json(Path(item.get_self_href()), item.to_dict(include_self_link=False, transform_hrefs=True))
    write_json(Path(collection.get_self_href()), collection.to_dict(include_self_link=False, transform_hrefs=True))
    return str(Path(out) / COLLECTION_NAME)
