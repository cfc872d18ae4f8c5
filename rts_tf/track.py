"""Slump histories across dates: dated slump polygons linked into tracks, growth rates, change maps and plots."""

from __future__ import annotations

import datetime
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rts_tf.errors import InputError, disk_problem, output_error
from rts_tf.locks import locks_folder

# Areas, distances and change maps are computed in the NSIDC EASE-Grid 2.0 North projection
# (Lambert azimuthal equal-area on the North Pole, WGS 84): areas are exact everywhere in the
# northern hemisphere, and distances (the linking tolerance) are within 4% north of 60 N.
EQUAL_AREA_CRS = "EPSG:6931"
DAYS_PER_YEAR = 365.25
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".parquet", ".geoparquet", ".fgb")
PREDICT_MERGED = "rts_polygons.gpkg"  # what `rts-tf predict` writes beside its per-scene folders
PREFERRED_LAYERS = ("detections", "rts")  # predict's per-scene layer (issue 18) and its older name
DEFAULT_PIXEL_SIZE = 3.0  # PlanetScope, when no input says its pixel size
SENSOR_PIXEL_SIZES = {"planetscope": 3.0, "sentinel2": 10.0}
MAX_CHANGE_PIXELS = 2_000_000_000  # a bigger change map per site is skipped with a warning
CHANGE_NODATA = 0
CHANGE_WINDOW = 4096
RELATION_KINDS = ("MergedRTS", "SplitRTS", "StabilizedRTS")  # the ARTS inventory's vocabulary
STATUSES = ("active", "new", "merged", "split", "stabilised")
OUTPUT_COLUMNS = ("track_id", "date", "area_m2", "source", "site")
# A date in a file name or scene id: YYYY-MM-DD or YYYYMMDD (PlanetScope ids start with it,
# Sentinel-2 product names hold YYYYMMDDTHHMMSS), not inside a longer run of digits.
NAME_DATE = re.compile(r"(?<!\d)(\d{4})(-?)(\d{2})\2(\d{2})(?!\d)")


@dataclass
class TrackSummary:
    """What `track` wrote and found."""

    out: str
    observations: int = 0
    tracks: int = 0
    sites: dict[str, dict] = field(default_factory=dict)  # site -> {dates, statuses, change}
    statuses: dict[str, int] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)
    tolerance: float = 0.0
    pixel_size: float = 0.0
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{self.statuses.get(status, 0)} {status}" for status in STATUSES)
        lines = [f"{self.observations} polygons in {len(self.sites)} site(s) -> {self.tracks} tracks ({counts})",
                 f"relations: " + (", ".join(f"{n} {kind}" for kind, n in self.relations.items()) or "none"),
                 f"areas in {EQUAL_AREA_CRS} (EASE-Grid 2.0 North, equal-area); linking tolerance "
                 f"{self.tolerance:g} m; change map pixel {self.pixel_size:g} m"]
        for site, info in self.sites.items():
            lines.append(f"site {site}: {len(info['dates'])} dates {info['dates'][0]} .. {info['dates'][-1]}")
        return lines + [f"wrote {path}" for path in self.files]


# ---------------------------------------------------------------- dates

def parse_date(value) -> datetime.date | None:
    """A date from a field value (text YYYY-MM-DD[...] or YYYYMMDD, a date or timestamp, an
    integer YYYYMMDD); None for null. Raises ValueError for a value that is not a date."""
    import pandas as pd

    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime.datetime)):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else pd.Timestamp(value).date()
    if isinstance(value, (int, np.integer)):
        value = str(int(value))
    text = str(value).strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})([T ].*)?", text)
    if match is None:
        raise ValueError(text)
    return datetime.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))


def date_in_name(name: str) -> datetime.date | None:
    """The first valid date (YYYY-MM-DD or YYYYMMDD, years 1950-2100) in a file name or scene id."""
    for match in NAME_DATE.finditer(name):
        year, month, day = int(match.group(1)), int(match.group(3)), int(match.group(4))
        if 1950 <= year <= 2100:
            try:
                return datetime.date(year, month, day)
            except ValueError:
                continue
    return None


# ---------------------------------------------------------------- reading

def input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The polygon files of the inputs: files as given; a `predict` output folder gives its
    merged GeoPackage (or its per-scene polygon files); any other folder its vector files."""
    files = []
    for entry in inputs:
        path = Path(entry)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_file():
            files.append(path)
            continue
        if (path / PREDICT_MERGED).is_file():
            files.append(path / PREDICT_MERGED)
            continue
        scenes = sorted(path.glob("*/*_polygons.gpkg"))
        found = scenes or sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VECTOR_SUFFIXES
                                 and ".tmp" not in p.name)
        if not found:
            raise InputError(f"{path}: holds no polygon files (neither {PREDICT_MERGED}, per-scene "
                             f"*_polygons.gpkg nor {', '.join(VECTOR_SUFFIXES)} files)")
        files += found
    return files


def choose_layer(path: Path, layer: str | None) -> str | None:
    """The layer to read: `layer` if given, else predict's `detections` (or `rts`), else the only one."""
    import pyogrio

    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as error:  # pyogrio raises DataSourceError for files GDAL cannot open
        raise InputError(f"{path}: not a readable vector file: {str(error).splitlines()[0]}") from None
    if layer is not None:
        if layer not in layers:
            raise InputError(f"{path}: has no layer {layer!r} (layers: {', '.join(layers)})")
        return layer
    for name in PREFERRED_LAYERS:
        if name in layers:
            return name
    if len(layers) > 1:
        raise InputError(f"{path}: has several layers ({', '.join(layers)}); choose one with --layer")
    return layers[0] if layers else None


def read_file(path: Path, layer: str | None):
    """One polygon file as a GeoDataFrame (GeoParquet through pyarrow, the rest through pyogrio)."""
    import geopandas

    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return geopandas.read_parquet(path)
        return geopandas.read_file(path, layer=choose_layer(path, layer), engine="pyogrio")
    except InputError:
        raise
    except Exception as error:  # pyogrio's, pyarrow's and geopandas' own errors for unreadable files
        raise InputError(f"{path}: not a readable vector file: {str(error).strip().splitlines()[0]}") from None


def polygonal(geometries: np.ndarray) -> np.ndarray:
    """Geometries repaired where invalid and reduced to their polygonal parts (None where none is left)."""
    import shapely

    from rts_tf.labels import _polygonal

    geometries = np.asarray(geometries, dtype=object).copy()
    present = ~shapely.is_missing(geometries)
    invalid = present & ~shapely.is_valid(geometries)
    geometries[invalid] = shapely.make_valid(geometries[invalid])
    # Only what is not already a (multi)polygon needs looking into (collections of a repair, lines, points).
    other = present & ~np.isin(shapely.get_type_id(geometries), (3, 6))
    geometries[other] = [_polygonal(g) for g in geometries[other]]
    geometries[~present] = None
    empty = np.array([g is not None for g in geometries], dtype=bool)
    empty[empty] = shapely.is_empty(geometries[empty].astype(object))
    geometries[empty] = None
    return geometries


def dates_of(frame, path: Path, date_field: str | None) -> tuple[np.ndarray, str]:
    """Each row's date (datetime64[D]) and where it came from: the date field, else the file
    name, else the scene id. Unparsable field values and rows left without a date are errors."""
    fields = [date_field] if date_field else ["image_date", "date"]
    present = [name for name in fields if name in frame.columns]
    if date_field and not present:
        raise InputError(f"{path}: has no field {date_field!r} (--date-field); fields: "
                         f"{', '.join(c for c in frame.columns if c != 'geometry') or 'none'}")
    dates: list[datetime.date | None] = [None] * len(frame)
    source = ""
    if present:
        name = present[0]
        for row, value in enumerate(frame[name].to_numpy(dtype=object)):
            try:
                dates[row] = parse_date(value)
            except ValueError:
                raise InputError(f"{path}: field {name!r} holds {str(value)!r} (feature {row + 1}), "
                                 "which is not a date (YYYY-MM-DD or YYYYMMDD)") from None
        source = f"field {name}"
    if any(d is None for d in dates):
        from_name = date_in_name(path.stem)
        if from_name is not None:
            dates = [from_name if d is None else d for d in dates]
            source = source or "file name"
    if any(d is None for d in dates):
        for scene_field in ("scene_id", "image_id"):
            if scene_field in frame.columns:
                ids = frame[scene_field].to_numpy(dtype=object)
                dates = [date_in_name(str(ids[row])) if d is None and ids[row] is not None else d
                         for row, d in enumerate(dates)]
                source = source or f"{scene_field}"
    missing = [row for row, d in enumerate(dates) if d is None]
    if missing:
        raise InputError(f"{path}: {len(missing)} polygon(s) have no date (first: feature {missing[0] + 1}): "
                         f"give a date field (--date-field, default image_date or date), a date in the file "
                         f"name (YYYY-MM-DD or YYYYMMDD) or a scene_id that starts with one")
    return np.array(dates, dtype="datetime64[D]"), source


def pixel_size_of(path: Path, frame) -> float | None:
    """The pixel size (m) of the rasters the polygons were traced from, when known: predict's
    mask beside a per-scene file or in each scene's folder, else a `sensor` field."""
    import rasterio

    masks = []
    if path.name.endswith("_polygons.gpkg"):
        masks = [path.with_name(path.name.replace("_polygons.gpkg", "_mask.tif"))]
    elif "scene_id" in frame.columns:
        masks = [path.parent / str(s) / f"{s}_mask.tif" for s in frame["scene_id"].dropna().unique()[:50]]
    sizes = []
    for mask in masks:
        if mask.is_file():
            with rasterio.open(mask) as dataset:
                if dataset.crs is not None and dataset.crs.is_projected:
                    sizes.append(max(abs(dataset.transform.a), abs(dataset.transform.e)))
    if not sizes and "sensor" in frame.columns:
        sizes = [size for name, size in SENSOR_PIXEL_SIZES.items()
                 if frame["sensor"].astype(str).str.lower().str.startswith(name).any()]
    return max(sizes) if sizes else None


@dataclass
class Inputs:
    """All input polygons, in the equal-area CRS, with their dates, sites and sources."""

    frame: object  # GeoDataFrame: the inputs' attributes plus date, source, site, geometry
    pixel_size: float | None
    warnings: list[str]


def read_inputs(inputs: Sequence[str | os.PathLike], date_field: str | None = None, site_field: str | None = None,
                layer: str | None = None, progress: Callable[[int, int], None] | None = None) -> Inputs:
    """Read every input polygon with its date (see dates_of), site and source, reprojected to EPSG:6931."""
    import geopandas
    import pandas as pd

    files = input_files(inputs)
    frames, warnings, pixel_sizes = [], [], []
    for number, path in enumerate(files, start=1):
        frame = read_file(path, layer)
        if progress:
            progress(number, len(files))
        if len(frame) == 0:
            warnings.append(f"{path}: holds no polygons; skipped")
            continue
        if frame.crs is None:
            raise InputError(f"{path}: has no CRS")
        geometries = polygonal(frame.geometry.to_numpy())
        keep = np.array([g is not None for g in geometries], dtype=bool)
        if not keep.all():
            warnings.append(f"{path}: {int((~keep).sum())} feature(s) without polygon geometry skipped")
        if not keep.any():
            continue
        frame = frame.loc[keep].copy()
        frame = frame.set_geometry(geopandas.GeoSeries(geometries[keep], index=frame.index, crs=frame.crs))
        dates, _ = dates_of(frame, path, date_field)
        size = pixel_size_of(path, frame)
        if size is not None:
            pixel_sizes.append(size)
        attributes = frame.drop(columns=frame.geometry.name)
        # The input's own columns are kept; those the output defines are kept under input_<name>.
        attributes = attributes.rename(columns={c: f"input_{c}" for c in attributes.columns
                                                if c in OUTPUT_COLUMNS and c != "site"})
        for column in attributes.columns:
            if attributes[column].dtype.kind in "Mm" or attributes[column].dtype == object:
                attributes[column] = [None if v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v))
                                      else v.isoformat() if hasattr(v, "isoformat") else str(v)
                                      for v in attributes[column]]
        if site_field:
            if site_field not in attributes.columns:
                raise InputError(f"{path}: has no field {site_field!r} (--site-field)")
            sites = attributes[site_field]
        else:
            sites = attributes["site"] if "site" in attributes.columns else \
                attributes["region"] if "region" in attributes.columns else pd.Series([None] * len(frame))
        attributes["site"] = [str(s) if s is not None and str(s).strip() else "all" for s in sites]
        attributes["date"] = dates
        scene = attributes["scene_id"] if "scene_id" in attributes.columns else pd.Series([None] * len(frame))
        attributes["source"] = [str(s) if s is not None else str(path) for s in scene]
        try:
            moved = frame.geometry.to_crs(EQUAL_AREA_CRS)
        except Exception as error:  # pyproj's CRSError and ProjError
            raise InputError(f"{path}: coordinates cannot be transformed from {frame.crs} to {EQUAL_AREA_CRS}: "
                             f"{str(error).splitlines()[0]}") from None
        moved = geopandas.GeoSeries(polygonal(moved.to_numpy()), index=frame.index, crs=EQUAL_AREA_CRS)
        if not np.isfinite(moved.bounds.to_numpy()).all():
            raise InputError(f"{path}: some coordinates cannot be placed in {EQUAL_AREA_CRS} "
                             f"(is the file's CRS, {frame.crs}, right?)")
        frames.append(geopandas.GeoDataFrame(attributes.reset_index(drop=True),
                                             geometry=moved.reset_index(drop=True), crs=EQUAL_AREA_CRS))
    if not frames:
        raise InputError(f"{', '.join(str(p) for p in files)}: no polygons to track")
    frame = pd.concat(frames, ignore_index=True)
    return Inputs(geopandas.GeoDataFrame(frame, geometry="geometry", crs=EQUAL_AREA_CRS),
                  max(pixel_sizes) if pixel_sizes else None, warnings)


# ---------------------------------------------------------------- linking

@dataclass
class Lineage:
    """Slump objects of one site (overlapping polygons of one date form one object) and how they link."""

    geometries: np.ndarray  # object outlines (equal-area CRS)
    dates: np.ndarray  # datetime64[D] per object
    members: np.ndarray  # object index of each input polygon
    edges: np.ndarray  # (E, 2) predecessor -> successor object pairs
    scars: np.ndarray  # (S, 2) earlier object -> object appearing on its scar without a link
    overlaps: np.ndarray  # (P, 2) earlier object -> later object, all pairs within the tolerance


def group_objects(geometries: np.ndarray, days: np.ndarray, near: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Object index of each polygon: polygons of one date that overlap are one object (a slump
    mapped in two overlapping scenes of the same day). `near`: pairs of polygons near each other."""
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    left, right = near
    same = (days[left] == days[right]) & (left < right)
    left, right = left[same], right[same]
    overlapping = shapely.intersects(geometries[left], geometries[right])
    count = len(geometries)
    graph = coo_matrix((np.ones(int(overlapping.sum())), (left[overlapping], right[overlapping])),
                       shape=(count, count))
    return connected_components(graph, directed=False)[1]


def link(earlier: np.ndarray, later: np.ndarray, dates: np.ndarray, max_gap_days: float) -> np.ndarray:
    """Predecessor -> successor pairs among candidate pairs of objects (earlier, later: objects
    of an earlier and a later date that lie within the tolerance) of one site.

    An earlier object p links to a later object o when p has no successor at a date between
    theirs, and o's date is the next date of the site after p's or at most `max_gap_days` later
    (a slump missed in one image keeps its track). Dates are walked in order, each vectorised.
    """
    unique_days, date_index = np.unique(dates.astype("datetime64[D]").astype(np.int64), return_inverse=True)
    order = np.lexsort((earlier, later, date_index[later]))
    earlier, later = earlier[order], later[order]
    first_successor = np.full(len(dates), -1, dtype=np.int64)  # date index of an object's first successor
    linked = np.zeros(len(earlier), dtype=bool)
    bounds = np.searchsorted(date_index[later], np.arange(len(unique_days) + 1))
    for index in range(1, len(unique_days)):
        start, stop = bounds[index], bounds[index + 1]
        p = earlier[start:stop]
        gap = unique_days[index] - unique_days[date_index[p]]
        allowed = (first_successor[p] < 0) & ((date_index[p] == index - 1) | (gap <= max_gap_days))
        linked[start:stop] = allowed
        first_successor[p[allowed]] = index
    return np.column_stack([earlier[linked], later[linked]])


def build_lineage(geometries: np.ndarray, dates: np.ndarray, tolerance: float, max_gap_days: float) -> Lineage:
    """Objects of one site's polygons, their links and the new slumps on old scars.

    One spatial-index query (polygons within the tolerance of each other) serves grouping,
    linking and scars, so the work grows with the number of polygons and their neighbours."""
    import shapely

    days = dates.astype("datetime64[D]").astype(np.int64)
    tree = shapely.STRtree(geometries)
    near = tree.query(geometries, predicate="dwithin", distance=max(float(tolerance), 0.0))
    members = group_objects(geometries, days, near)
    count = int(members.max()) + 1
    object_days = np.zeros(count, dtype=np.int64)
    object_days[members] = days
    outlines = np.empty(count, dtype=object)
    order = np.argsort(members, kind="stable")
    splits = np.flatnonzero(np.diff(members[order])) + 1
    for index, group in zip(range(count), np.split(order, splits)):
        outlines[index] = geometries[group[0]] if len(group) == 1 else shapely.union_all(geometries[group])
    later, earlier = members[near[0]], members[near[1]]
    keep = object_days[earlier] < object_days[later]
    overlaps = np.unique(np.column_stack([earlier[keep], later[keep]]), axis=0)
    edges = link(overlaps[:, 0], overlaps[:, 1], object_days.astype("datetime64[D]"), max_gap_days)
    has_predecessor = np.zeros(count, dtype=bool)
    has_predecessor[edges[:, 1]] = True
    # A slump without predecessor that lies on an earlier object's ground (one whose history
    # ended before) formed on a stabilised scar (the ARTS `StabilizedRTS` relationship).
    candidates = overlaps[~has_predecessor[overlaps[:, 1]]]
    if len(candidates):
        really = shapely.intersects(outlines[candidates[:, 0]], outlines[candidates[:, 1]])
        candidates = candidates[really]
    return Lineage(outlines, object_days.astype("datetime64[D]"), members, edges, candidates, overlaps)


def least_squares_slope(days: np.ndarray, areas: np.ndarray) -> float:
    """Growth in m2 per year: the least-squares slope of area against time (NaN for one date)."""
    if len(days) < 2:
        return float("nan")
    years = (days - days.mean()) / DAYS_PER_YEAR
    return float(np.dot(years, areas - areas.mean()) / np.dot(years, years))


@dataclass
class SiteTracks:
    """One site's result: per-object track ids and the tracks' rows and relations."""

    object_track: np.ndarray
    tracks: list[dict]
    relations: list[dict]
    new_area: np.ndarray  # per object: ground outside its track's earlier outlines (m2); see track_outlines


def track_outlines(geometries: np.ndarray, areas: np.ndarray, groups: list[np.ndarray],
                   edges: np.ndarray) -> tuple[list, np.ndarray]:
    """Each track's outline (the union of its objects, `groups` in date order) and each object's
    new area: ground outside its track's earlier outlines and, for the first object of a merger or
    a part of a split, outside its predecessors.

    The unions are folded date by date over all tracks at once, and the new area of the k-th object
    is the growth of its track's running union, so no difference is computed but for mergers and splits.
    """
    import shapely

    ranks = np.concatenate([np.arange(len(group)) for group in groups])
    members = np.concatenate(groups)
    track_of = np.repeat(np.arange(len(groups)), [len(group) for group in groups])
    outlines = geometries[[group[0] for group in groups]].copy()
    covered = areas[[group[0] for group in groups]].copy()
    new_area = areas.copy()
    for rank in range(1, int(ranks.max()) + 1 if len(ranks) else 1):
        step = ranks == rank
        tracks, objects = track_of[step], members[step]
        outlines[tracks] = shapely.union(outlines[tracks], geometries[objects])
        grown = shapely.area(outlines[tracks])
        new_area[objects] = np.maximum(grown - covered[tracks], 0.0)
        covered[tracks] = grown
    firsts = np.array([group[0] for group in groups])
    inherited = firsts[np.isin(firsts, edges[:, 1])]
    for target in inherited:  # mergers and parts of splits: rare
        cover = shapely.union_all(geometries[edges[edges[:, 1] == target, 0]])
        new_area[target] = shapely.area(shapely.difference(geometries[target], cover))
    return list(outlines), new_area


def tracks_of_site(lineage: Lineage, site: str, first_track_id: int) -> SiteTracks:
    """Tracks (chains of one-to-one links), their status, origin and fate, and the relations."""
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(lineage.geometries)
    edges = lineage.edges
    predecessors = np.bincount(edges[:, 1], minlength=count)
    successors = np.bincount(edges[:, 0], minlength=count)
    chain = edges[(successors[edges[:, 0]] == 1) & (predecessors[edges[:, 1]] == 1)]
    graph = coo_matrix((np.ones(len(chain)), (chain[:, 0], chain[:, 1])), shape=(count, count))
    components = connected_components(graph, directed=False)[1]
    days = lineage.dates.astype(np.int64)
    # Track ids in order of first date, then of the first object's position (deterministic).
    first_day = np.full(components.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_day, components, days)
    first_object = np.full(components.max() + 1, count)
    np.minimum.at(first_object, components, np.arange(count))
    rank = np.empty_like(first_day)
    rank[np.lexsort((first_object, first_day))] = np.arange(len(first_day))
    object_track = first_track_id + rank[components]
    areas = shapely.area(lineage.geometries)
    site_days = np.unique(days)
    relations = []
    for a, b in edges:
        if predecessors[b] >= 2:
            relations.append(("MergedRTS", a, b))
        if successors[a] >= 2:
            relations.append(("SplitRTS", a, b))
    scar_tracks = {}
    for a, b in lineage.scars:
        # Only a history that had ended before this slump appeared is a scar.
        last = days[object_track == object_track[a]].max()
        if last < days[b]:
            relations.append(("StabilizedRTS", a, b))
            scar_tracks.setdefault(object_track[b], set()).add(object_track[a])
    seen, relation_rows = set(), []
    for kind, a, b in relations:
        key = (kind, object_track[a], object_track[b])
        if key not in seen:
            seen.add(key)
            relation_rows.append({"track_from": int(key[1]), "track_to": int(key[2]),
                                  "date_from": str(lineage.dates[a]), "date_to": str(lineage.dates[b]),
                                  "kind": kind, "site": site})
    order = np.lexsort((days, object_track))
    splits = np.flatnonzero(np.diff(object_track[order])) + 1
    groups = np.split(order, splits)
    outlines, new_area = track_outlines(lineage.geometries, areas, groups, edges)
    rows = []
    for objects, geometry in zip(groups, outlines):
        track_id = int(object_track[objects[0]])
        first, last = objects[0], objects[-1]
        if successors[last] >= 2:
            fate = "split"
        elif successors[last] == 1:
            fate = "merged"
        elif days[last] == site_days[-1]:
            fate = "active"
        else:
            fate = "stabilised"
        if predecessors[first] >= 2:
            origin = "merged"
        elif predecessors[first] == 1:
            origin = "split"
        elif track_id in scar_tracks:
            origin = "new_on_scar"
        elif days[first] > site_days[0]:
            origin = "new"
        else:
            origin = "existing"
        status = fate if fate != "active" else {"existing": "active", "new": "new", "new_on_scar": "new",
                                                 "merged": "merged", "split": "split"}[origin]
        rows.append({"track_id": track_id, "site": site, "first_date": str(lineage.dates[first]),
                     "last_date": str(lineage.dates[last]), "n_observations": len(objects),
                     "area_first_m2": float(areas[first]), "area_last_m2": float(areas[last]),
                     "area_max_m2": float(areas[objects].max()),
                     "growth_m2_per_year": least_squares_slope(days[objects].astype(float), areas[objects]),
                     "status": status, "origin": origin, "fate": fate, "geometry": geometry})
    return SiteTracks(object_track, rows, relation_rows, new_area)


# ---------------------------------------------------------------- outputs

def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary) and rename the result into place; a failed write leaves nothing."""
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        for leftover in temporary.parent.glob(temporary.name + "*"):  # with SQLite's -journal, -wal
            leftover.unlink(missing_ok=True)
        if isinstance(error, Exception) and disk_problem(error, path) is not None:
            raise output_error(path, error) from None
        raise


def write_tables(out: Path, observations, tracks, relations) -> list[Path]:
    """tracks.gpkg with layers observations, tracks and relations, and one GeoParquet (or Parquet) each."""
    import pyogrio

    gpkg = out / "tracks.gpkg"

    def write_gpkg(temporary: Path) -> None:
        observations.to_file(temporary, layer="observations", driver="GPKG", engine="pyogrio")
        tracks.to_file(temporary, layer="tracks", driver="GPKG", engine="pyogrio")
        # A table without geometry: a GeoPackage attributes layer.
        pyogrio.write_dataframe(relations, temporary, layer="relations", driver="GPKG", append=True)

    write_atomically(gpkg, write_gpkg)
    written = [gpkg]
    for name, table in (("observations", observations), ("tracks", tracks), ("relations", relations)):
        path = out / f"{name}.parquet"
        write_atomically(path, lambda temporary, table=table: table.to_parquet(temporary, index=False))
        written.append(path)
    return written


def date_code(day: np.datetime64) -> int:
    """A date as the integer YYYYMMDD, the value of the change map."""
    text = str(np.datetime64(day, "D"))
    return int(text.replace("-", ""))


def write_change_map(path: Path, geometries: np.ndarray, dates: np.ndarray, pixel_size: float,
                     site: str) -> str | None:
    """A COG in EPSG:6931 whose pixels hold the first date (YYYYMMDD, int32; 0 = never a slump) at
    which they lay in a slump; rasterised window by window with a spatial index. Returns a warning
    instead of writing when the grid would be too large."""
    import rasterio
    import rasterio.shutil
    import shapely
    from affine import Affine
    from rasterio.features import rasterize
    from rasterio.windows import Window

    left, bottom, right, top = shapely.total_bounds(geometries)
    left, bottom = math.floor(left / pixel_size) * pixel_size, math.floor(bottom / pixel_size) * pixel_size
    right, top = math.ceil(right / pixel_size) * pixel_size, math.ceil(top / pixel_size) * pixel_size
    width, height = max(1, round((right - left) / pixel_size)), max(1, round((top - bottom) / pixel_size))
    if width * height > MAX_CHANGE_PIXELS:
        return (f"change map of site {site} skipped: {width} x {height} pixels of {pixel_size:g} m; give the "
                f"polygons a site field or a larger --pixel-size")
    transform = Affine(pixel_size, 0.0, left, 0.0, -pixel_size, top)
    codes = np.array([date_code(d) for d in dates], dtype=np.int32)
    # Later dates first, so that where slumps of several dates overlap the earliest is burnt last.
    order = np.argsort(-codes, kind="stable")
    geometries, codes = geometries[order], codes[order]
    tree = shapely.STRtree(geometries)
    staging = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.staging.tif")
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="int32", crs=EQUAL_AREA_CRS,
                   transform=transform, nodata=CHANGE_NODATA, tiled=True, blockxsize=512, blockysize=512,
                   compress="DEFLATE", BIGTIFF="IF_SAFER")
    try:
        with rasterio.open(staging, "w", **profile) as dataset:
            for row in range(0, height, CHANGE_WINDOW):
                for column in range(0, width, CHANGE_WINDOW):
                    window = Window(column, row, min(CHANGE_WINDOW, width - column), min(CHANGE_WINDOW, height - row))
                    window_transform = dataset.window_transform(window)
                    box = shapely.box(*rasterio.windows.bounds(window, transform))
                    hits = np.sort(tree.query(box))  # sorted positions keep the later-first order
                    if len(hits) == 0:
                        continue
                    burnt = rasterize(zip(geometries[hits], codes[hits].tolist()),
                                      out_shape=(int(window.height), int(window.width)), transform=window_transform,
                                      fill=CHANGE_NODATA, dtype="int32")
                    dataset.write(burnt[None], window=window)
            dataset.descriptions = ("first_date_yyyymmdd",)
            dataset.update_tags(ENCODING="first date at which the pixel lay in a slump, as YYYYMMDD; 0 = never",
                                SITE=site, DATES=",".join(str(d) for d in np.unique(dates)))

        def convert(temporary: Path) -> None:
            rasterio.shutil.copy(staging, temporary, driver="COG", COMPRESS="DEFLATE", OVERVIEWS="AUTO",
                                 RESAMPLING="NEAREST", BLOCKSIZE=512, BIGTIFF="IF_SAFER")

        write_atomically(path, convert)
    finally:
        staging.unlink(missing_ok=True)
    return None


def write_plots(out: Path, summary_rows: list[dict], tracks, observations) -> list[Path]:
    """area_by_site.png (total slump area per site over time) and fastest_growing.png (the area of
    the ten fastest-growing tracks over time)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(9, 4), dpi=120)
    sites = sorted({row["site"] for row in summary_rows})
    for site in sites:
        rows = [row for row in summary_rows if row["site"] == site]
        axes.plot([np.datetime64(r["date"]) for r in rows], [r["total_area_m2"] / 1e4 for r in rows], marker="o",
                  label=site)
    axes.set_xlabel("date")
    axes.set_ylabel("total slump area (ha)")
    axes.set_title(f"Slump area per site ({EQUAL_AREA_CRS}, equal-area)")
    axes.grid(alpha=0.3)
    if len(sites) <= 12:
        axes.legend(title="site", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.autofmt_xdate()
    figure.tight_layout()
    path = out / "area_by_site.png"
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(figsize=(9, 4), dpi=120)
    growing = tracks[tracks["n_observations"] >= 2].sort_values("growth_m2_per_year", ascending=False).head(10)
    dated = observations.groupby(["track_id", "date"])["object_area_m2"].first().reset_index()
    for _, track in growing.iterrows():
        rows = dated[dated["track_id"] == track["track_id"]].sort_values("date")
        axes.plot(rows["date"].map(np.datetime64).to_numpy(), rows["object_area_m2"].to_numpy() / 1e4, marker="o",
                  label=f"{track['track_id']} ({track['site']}, {track['status']}): "
                        f"{track['growth_m2_per_year']:+,.0f} m²/yr")
    axes.set_xlabel("date")
    axes.set_ylabel("slump area (ha)")
    axes.set_title("The ten fastest-growing slumps (least-squares growth)")
    axes.grid(alpha=0.3)
    if len(growing):
        axes.legend(title="track (site, status): growth", fontsize="x-small", title_fontsize="small",
                    loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes.text(0.5, 0.5, "no slump seen on two dates", ha="center", va="center", transform=axes.transAxes)
    figure.autofmt_xdate()
    figure.tight_layout()
    path = out / "fastest_growing.png"
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    written.append(path)
    return written


def site_file_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site) or "site"


# ---------------------------------------------------------------- the command

@locks_folder("out", "--out")
def track(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, date_field: str | None = None,
          site_field: str | None = None, layer: str | None = None, tolerance: float | None = None,
          max_gap_years: float = 2.5, pixel_size: float | None = None, change_maps: bool = True,
          plots: bool = True, overwrite: bool = False,
          progress: Callable[[int, int], None] | None = None) -> TrackSummary:
    """Link dated slump polygons of several dates and sites into slump histories.

    Writes OUT/tracks.gpkg (layers observations, tracks, relations) and the same tables as
    GeoParquet/Parquet, OUT/summary.csv (per site and date), a change map per site (first date
    each pixel was in a slump) and two PNG plots. Areas and distances are in EPSG:6931.
    tolerance: metres within which objects of two dates link (default: two pixels of the
    coarsest input, as known from predict's rasters or a sensor field, else 6 m). A slump missed
    for at most max_gap_years keeps its track. progress(done, total) is called as files are read
    and sites linked. See README "Slump dynamics".
    """
    import geopandas
    import pandas as pd

    out = Path(out)
    if tolerance is not None and tolerance < 0:
        raise InputError(f"--tolerance must be at least 0 metres, got {tolerance}")
    if max_gap_years <= 0:
        raise InputError(f"--max-gap-years must be positive, got {max_gap_years}")
    if pixel_size is not None and pixel_size <= 0:
        raise InputError(f"--pixel-size must be positive, got {pixel_size}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if (out / "tracks.gpkg").exists() and not overwrite:
        raise InputError(f"{out}: already holds tracks.gpkg; give --overwrite to replace it or choose another --out")
    data = read_inputs(inputs, date_field, site_field, layer, progress)
    files = len(input_files(inputs))
    frame = data.frame
    coarsest = data.pixel_size or DEFAULT_PIXEL_SIZE
    summary = TrackSummary(str(out), warnings=list(data.warnings))
    summary.tolerance = 2.0 * coarsest if tolerance is None else float(tolerance)
    summary.pixel_size = coarsest if pixel_size is None else float(pixel_size)
    geometries = frame.geometry.to_numpy()
    frame["area_m2"] = frame.geometry.area.to_numpy()
    frame["track_id"] = np.int64(-1)
    frame["object_area_m2"] = 0.0
    track_rows, relation_rows, summary_rows, next_id = [], [], [], 1
    sites = sorted(frame["site"].unique())
    change_jobs = []
    for number, site in enumerate(sites, start=1):
        rows = np.flatnonzero(frame["site"].to_numpy() == site)
        dates = frame["date"].to_numpy()[rows].astype("datetime64[D]")
        lineage = build_lineage(geometries[rows], dates, summary.tolerance, max_gap_years * DAYS_PER_YEAR)
        result = tracks_of_site(lineage, site, next_id)
        next_id += len(result.tracks)
        frame.loc[rows, "track_id"] = result.object_track[lineage.members]
        object_areas = np.array([g.area for g in lineage.geometries])
        frame.loc[rows, "object_area_m2"] = object_areas[lineage.members]
        track_rows += result.tracks
        relation_rows += result.relations
        site_dates = np.unique(lineage.dates)
        for day in site_dates:
            at = lineage.dates == day
            summary_rows.append({"site": site, "date": str(day), "count": int(at.sum()),
                                 "total_area_m2": float(object_areas[at].sum()),
                                 "new_area_m2": float(result.new_area[at].sum())})
        statuses = {status: sum(1 for r in result.tracks if r["status"] == status) for status in STATUSES}
        summary.sites[site] = {"dates": [str(d) for d in site_dates], "statuses": statuses}
        change_jobs.append((site, geometries[rows], dates))
        if progress:
            progress(files + number, files + len(sites))  # files read, then sites linked
    if (frame["track_id"] < 0).any():
        raise RuntimeError("an observation was left without a track")  # a bug, not a user's mistake
    if all(len(info["dates"]) < 2 for info in summary.sites.values()):
        summary.warnings.append("every site has polygons of one date only: nothing to link (is a date field "
                                "missing or wrong, or were inputs of other dates left out?)")
    elif not relation_rows and not any(r["n_observations"] > 1 for r in track_rows):
        summary.warnings.append("no polygon of one date meets a polygon of another date within the tolerance "
                                f"({summary.tolerance:g} m): every track has a single observation; are the inputs "
                                "of the same places?")
    out.mkdir(parents=True, exist_ok=True)
    observations = frame.drop(columns=["object_area_m2"]).copy()
    observations["date"] = [str(d) for d in frame["date"].to_numpy().astype("datetime64[D]")]
    leading = ["track_id", "date", "area_m2", "source", "site"]
    observations = observations[leading + [c for c in observations.columns if c not in leading + ["geometry"]]
                                + ["geometry"]]
    observations = geopandas.GeoDataFrame(observations, geometry="geometry", crs=EQUAL_AREA_CRS)
    tracks = geopandas.GeoDataFrame(track_rows, geometry="geometry", crs=EQUAL_AREA_CRS)
    relations = pd.DataFrame(relation_rows, columns=["track_from", "track_to", "date_from", "date_to", "kind", "site"])
    summary.files += [str(p) for p in write_tables(out, observations, tracks, relations)]
    table = pd.DataFrame(summary_rows, columns=["site", "date", "count", "total_area_m2", "new_area_m2"])
    write_atomically(out / "summary.csv", lambda temporary: table.to_csv(temporary, index=False, float_format="%.2f"))
    summary.files.append(str(out / "summary.csv"))
    if change_maps:
        for site, site_geometries, dates in change_jobs:
            name = "change.tif" if len(sites) == 1 else f"change_{site_file_name(site)}.tif"
            warning = write_change_map(out / name, site_geometries, dates, summary.pixel_size, site)
            if warning:
                summary.warnings.append(warning)
            else:
                summary.sites[site]["change"] = str(out / name)
                summary.files.append(str(out / name))
    if plots:
        observations["object_area_m2"] = frame["object_area_m2"].to_numpy()
        summary.files += [str(p) for p in write_plots(out, summary_rows, tracks, observations)]
    summary.observations, summary.tracks = len(frame), len(track_rows)
    summary.statuses = {status: int((tracks["status"] == status).sum()) for status in STATUSES}
    summary.relations = {kind: int((relations["kind"] == kind).sum()) for kind in RELATION_KINDS
                         if (relations["kind"] == kind).any()}
    return summary
