"""Label polygons: read a vector file, repair, match to scenes, rasterise onto a scene grid."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
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
    indices: np.ndarray | None = None  # each polygon's 0-based position among the file's features
    fids: np.ndarray | None = None  # each polygon's feature id in the file (GeoPackage fids start at 1)

    def __len__(self) -> int:
        return len(self.geometries)

    def values(self, name: str, index: int) -> str | None:
        """A field's value as text; None for a missing field, null, NaN or a blank string."""
        column = self.attributes.get(name)
        if column is None:
            return None
        value = column[index]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        text = str(value)
        return text if text.strip() else None

    def strings(self, name: str) -> np.ndarray:
        """A field as an object array of text or None (see values); all None without the field."""
        return np.array([self.values(name, index) for index in range(len(self))], dtype=object)

    def file_index(self, position: int) -> int:
        return int(self.indices[position]) if self.indices is not None else position

    def fid(self, position: int) -> int:
        return int(self.fids[position]) if self.fids is not None else self.file_index(position)


def read_polygons(path: str | os.PathLike, what: str, required_fields: tuple[str, ...] = ()) -> VectorLayer:
    """Read polygons and attributes; repair invalid geometries; keep only polygonal parts."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    # Imported here: pyogrio imports pandas and geopandas (about 0.5 s), which the processes that
    # only rasterise labels (record building's workers) do not need.
    import pyogrio.errors
    import pyogrio.raw

    try:
        meta, fids, wkb, field_data = pyogrio.raw.read(path, return_fids=True)
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
    indices = np.flatnonzero(keep)[polygonal]
    fids = np.asarray(fids)[indices] if fids is not None and len(fids) == len(keep) else None
    return VectorLayer(str(path), CRS.from_user_input(meta["crs"]), repaired[polygonal], attributes,
                       indices=indices, fids=fids)


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


def select_labels(labels: VectorLayer, label_field: str | None,
                  label_values: Sequence[str] | None) -> np.ndarray:
    """Which polygons are slumps: those whose `label_field` is one of `label_values` (all by default)."""
    if label_field is None and not label_values:
        return np.ones(len(labels), dtype=bool)
    if label_field is None:
        raise InputError("--label-value needs --label-field (the label field that holds the class)")
    if not label_values:
        raise InputError(f"--label-field {label_field} needs --label-value (the value(s) that mark a slump)")
    if label_field not in labels.attributes:
        raise InputError(f"{labels.path}: labels have no field '{label_field}' (fields present: "
                         f"{', '.join(labels.attributes) or 'none'})")
    column, wanted = labels.strings(label_field), set(label_values)
    selected = np.array([value in wanted for value in column], dtype=bool)
    if not selected.any():
        present = sorted({value for value in column if value is not None})
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        raise InputError(f"{labels.path}: no polygon has {label_field} = {', '.join(label_values)} "
                         f"(values present: {shown or 'none'})")
    return selected


@dataclass
class SceneLabels:
    """The label polygons of one scene and how they were matched to it."""

    polygons: list  # the selected (slump) polygons, in the scene CRS
    counts: dict[str, int]  # selected polygons matched per rule: {"image_id": n, "footprint": n}
    positions: np.ndarray  # layer positions of every polygon matched to the scene, selected or not
    region: str | None  # most common `region` of the matched polygons (image_id matches first)
    site: str | None


class LabelMatcher:
    """Matches label polygons to scenes.

    A polygon with an `image_id` belongs to the scene of that id, or of one of its aliases (a
    Sentinel-2 product's tile id), so labels of other images of the same place do not leak in; a polygon whose `image_id` is null or blank, or any polygon of a
    file without that field, belongs to every scene whose footprint it intersects.
    """

    def __init__(self, labels: VectorLayer, selected: np.ndarray | None = None):
        self.labels = labels
        self.selected = np.ones(len(labels), dtype=bool) if selected is None else np.asarray(selected, dtype=bool)
        self.image_ids = labels.strings("image_id")
        self.by_footprint = np.array([value is None for value in self.image_ids], dtype=bool)
        self._moved: dict[str, np.ndarray] = {}  # footprint candidates reprojected, per scene CRS

    def match(self, scene_id: str, grid: Grid, aliases: Sequence[str] = ()) -> SceneLabels:
        ids = {scene_id, *aliases}
        by_id = np.flatnonzero([image_id in ids for image_id in self.image_ids])
        candidates = np.flatnonzero(self.by_footprint)
        moved = self._reprojected(candidates, grid.crs)
        hits = shapely.intersects(moved, box(*grid.bounds)) if len(moved) else np.zeros(0, dtype=bool)
        by_footprint = candidates[hits]
        chosen = by_id[self.selected[by_id]]
        polygons = reproject_geometries(self.labels.geometries[chosen], self.labels.crs, grid.crs, self.labels.path)
        polygons += list(moved[hits][self.selected[by_footprint]])
        counts = {"image_id": len(chosen), "footprint": int(self.selected[by_footprint].sum())}
        return SceneLabels(polygons, counts, np.concatenate([by_id, by_footprint]),
                           region=self._most_common("region", by_id, by_footprint),
                           site=self._most_common("site", by_id, by_footprint))

    def report(self, matches: Sequence[SceneLabels]) -> dict[str, Any]:
        """Polygons in the file, selected as slumps, matched per rule, and the selected ones matched to no scene."""
        matched = np.zeros(len(self.labels), dtype=bool)
        for match in matches:
            matched[match.positions] = True
        selected = self.selected
        unmatched = []
        for position in np.flatnonzero(selected & ~matched):
            entry = {"index": self.labels.file_index(position), "fid": self.labels.fid(position)}
            if self.image_ids[position] is not None:
                entry["image_id"] = self.image_ids[position]
            unmatched.append(entry)
        return {"polygons": len(self.labels), "selected": int(selected.sum()),
                "matched": {"image_id": int((selected & matched & ~self.by_footprint).sum()),
                            "footprint": int((selected & matched & self.by_footprint).sum())},
                "unmatched": {"count": len(unmatched), "polygons": unmatched}}

    def _reprojected(self, positions: np.ndarray, crs) -> np.ndarray:
        key = str(crs)
        if key not in self._moved:
            moved = reproject_geometries(self.labels.geometries[positions], self.labels.crs, crs, self.labels.path)
            self._moved[key] = np.array(moved, dtype=object)
        return self._moved[key]

    def _most_common(self, name: str, *groups: np.ndarray) -> str | None:
        for positions in groups:
            values = [self.labels.values(name, int(position)) for position in positions]
            values = [value for value in values if value is not None]
            if values:
                return Counter(values).most_common(1)[0][0]
        return None


def scene_labels(labels: VectorLayer, scene_id: str, grid: Grid) -> list:
    """The label polygons of one scene, in the scene's CRS (matched as LabelMatcher does)."""
    return LabelMatcher(labels).match(scene_id, grid).polygons


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
