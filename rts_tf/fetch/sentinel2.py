"""Fetch, Sentinel-2: the least cloudy L2A scenes over an area, as band windows that build-records reads.

Default catalogue: Element 84's Earth Search (no account), collection `sentinel-2-c1-l2a`, ESA's
reprocessed "collection 1" whose items are consistent: DN carry ESA's +1000 offset from baseline
04.00 on, and every band's `raster:bands` declares scale 0.0001 and offset -0.1. Any STAC API with
Sentinel-2 L2A items works (assets named blue/green/red/nir/scl or B02/B03/B04/B08/SCL).

Selection: items whose catalogue cloud cover (`eo:cloud_cover`, the whole tile's, filtered here:
not every API has the Query extension) is at most --max-tile-cloud are candidates; for each the
SCL window over the area is read and the share of the area's pixels that SCL marks unusable (no
data, defective, cloud shadow, clouds, cirrus, snow: `sensors.SCL_IGNORED`) is its cloud over the
area. The --per-period best candidates of each MGRS tile and period (the whole --dates range, a
year or a month) with at most --max-cloud percent are fetched.

Reflectance rule (surface reflectance = DN * scale + offset), per scene:
1. what the metadata says: the processing baseline (`s2:processing_baseline`, or _Nxxyy_ in the
   product id) gives ESA's offset: -0.1 from 04.00 on, 0 before; the item's `raster:bands` may
   declare scale and offset; `earthsearch:boa_offset_applied: true` says the catalogue removed
   the offset from the pixels (offset 0).
2. when the sources present agree, that offset is used;
3. when they disagree (public catalogues' flags are wrong on some 2022-2025 items), the pixels
   decide: with ESA's offset a pixel of clear vegetation or bare soil has DN >= 1000 (reflectance
   >= 0) in every band; without it most have DN < 1000 (blue and red reflectance < 0.1). At least
   20 % of such pixels below 1000: no offset in the pixels; at most 2 %: offset; in between, or
   fewer than 100 such pixels: the baseline's offset, with a warning;
4. no baseline and nothing declared: the pixels, else the scene is refused.
The pixels are written as the catalogue serves them; the scene's item.json carries the resolved
scale and offset in each band's `raster:bands` (what build-records reads), and fetch.json the
evidence (baseline, declared, flag, pixel test, rule used).

Output, one folder per scene (what `build-records --scenes OUT` reads as a Sentinel-2 scene):

    OUT/<item id>/B02.tif B03.tif B04.tif B08.tif (10 m)  SCL.tif (20 m)  item.json
    OUT/fetch.json   catalogue, collection, candidates with their cloud over the area, chosen scenes
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio
from rasterio.features import geometry_mask

from rts_tf.errors import InputError
from rts_tf.fetch import EARTH_SEARCH, SENTINEL2_COLLECTION, stac
from rts_tf.records import write_json
from rts_tf.locks import locks_folder
from rts_tf.sensors import SCL_IGNORED, baseline_offset

DEFAULT_COLLECTION = SENTINEL2_COLLECTION
BANDS = ("B02", "B03", "B04", "B08")
ASSET_KEYS = {"B02": ("blue", "B02", "b02"), "B03": ("green", "B03", "b03"), "B04": ("red", "B04", "b04"),
              "B08": ("nir", "B08", "b08"), "SCL": ("scl", "SCL")}
PERIODS = ("all", "year", "month")
ESA_OFFSET_DN = 1000  # baseline >= 04.00: DN = reflectance * 10000 + 1000
# SCL classes of clear land whose reflectance in B02, B03, B04 and B08 is (almost) never negative:
# vegetation, bare soil, unclassified. Water and dark areas may be slightly negative in L2A.
PIXEL_TEST_CLASSES = (4, 5, 7)
PIXEL_TEST_MIN = 100
PIXEL_ABSENT, PIXEL_PRESENT = 0.20, 0.02
STEP = 1e-4


@dataclass
class Candidate:
    """One STAC item considered for an MGRS tile and period."""

    item: object
    tile: str
    period: str
    tile_cloud: float | None
    scl: stac.WindowPlan | None = None
    cloud: float | None = None  # share of the area's pixels SCL marks unusable (0..1)
    chosen: bool = False
    skipped: bool = False  # complete from an earlier run
    bands: dict = field(default_factory=dict)  # band -> WindowPlan
    reflectance: dict = field(default_factory=dict)
    scl_pixels: np.ndarray | None = None


@dataclass
class Sentinel2Result:
    """What fetch sentinel2 did (or would do)."""

    out: Path
    collection: str
    candidates: list[Candidate]
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    per_period: int = 1

    @property
    def chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if c.chosen]

    def lines(self) -> list[str]:
        lines = []
        for c in self.candidates:
            cloud = "?" if c.cloud is None else f"{100 * c.cloud:.1f}%"
            mark = "*" if c.chosen else " "
            lines.append(f"{mark} {c.item.id}  tile {c.tile}  period {c.period}  cloud over area {cloud}  "
                         f"(tile {c.tile_cloud if c.tile_cloud is not None else '?'}%)"
                         + ("  complete, skipped" if c.skipped else ""))
        if self.dry_run:
            scl = sum(c.scl.window_bytes for c in self.candidates if c.scl)
            per_group = {}
            for c in self.candidates:
                per_group.setdefault((c.tile, c.period), []).append(sum(p.window_bytes for p in c.bands.values()))
            worst = sum(sum(sorted(v, reverse=True)[:self.per_period]) for v in per_group.values())
            whole = sum((p.file_bytes or 0) for c in self.candidates for p in list(c.bands.values()) + [c.scl] if p)
            lines.append(f"would read the SCL windows of {len(self.candidates)} candidate(s) ({stac.human_bytes(scl)}) "
                         f"to rank them by cloud over the area, then the B02, B03, B04, B08 windows of the best "
                         f"{self.per_period} per tile and period (at most {stac.human_bytes(worst)}); whole files of "
                         f"all candidates: {stac.human_bytes(whole)}")
        else:
            read = sum(c.scl.window_bytes for c in self.candidates if c.scl) + sum(
                p.window_bytes for c in self.chosen if not c.skipped for p in c.bands.values())
            lines.append(f"{len(self.chosen)} scene(s) in {self.out} ({sum(c.skipped for c in self.chosen)} already "
                         f"complete); read about {stac.human_bytes(read)}; build-records --scenes {self.out}")
        return lines + [f"warning: {w}" for w in self.warnings]


def parse_dates(value: str) -> tuple[dt.date, dt.date]:
    """'2022-07-01/2022-08-31' -> (start, end); one line when it is not two dates in order."""
    parts = str(value).split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (dt.date.fromisoformat(part.strip()) for part in parts)
    except ValueError:
        raise InputError(f"--dates {value}: expected START/END as YYYY-MM-DD/YYYY-MM-DD, e.g. 2022-07-01/2022-08-31") \
            from None
    if end < start:
        raise InputError(f"--dates {value}: the end is before the start")
    return start, end


def mgrs_tile(item) -> str:
    """The MGRS tile of an item (e.g. 08WMB) from its properties or id, or 'unknown'."""
    props = item.properties
    code = props.get("grid:code") or ""
    if str(code).upper().startswith("MGRS-"):
        return str(code)[5:].upper().zfill(5)
    if props.get("mgrs:utm_zone") and props.get("mgrs:latitude_band") and props.get("mgrs:grid_square"):
        return f"{int(props['mgrs:utm_zone']):02d}{props['mgrs:latitude_band']}{props['mgrs:grid_square']}".upper()
    if props.get("s2:mgrs_tile"):
        return str(props["s2:mgrs_tile"]).upper().lstrip("T").zfill(5)
    match = re.search(r"(?:^|_)T?(\d{1,2}[C-X][A-Z]{2})(?:_|$)", item.id)
    return match.group(1).zfill(5) if match else "unknown"


def _period(item, period: str, dates: str) -> str:
    when = item.datetime or dt.datetime.fromisoformat(str(item.properties.get("start_datetime")).replace("Z", "+00:00"))
    return {"all": dates, "year": f"{when:%Y}", "month": f"{when:%Y-%m}"}[period]


def _baseline(item) -> str | None:
    value = item.properties.get("s2:processing_baseline")
    if value:
        return str(value)
    match = re.search(r"_N(\d{2})(\d{2})(?:_|$)", str(item.properties.get("s2:product_uri") or item.id))
    return f"{match.group(1)}.{match.group(2)}" if match else None


@locks_folder("out", "--out")
def fetch_sentinel2(out: str | os.PathLike, aoi: str | os.PathLike, dates: str, stac_url: str = EARTH_SEARCH,
                    collection: str = DEFAULT_COLLECTION, max_cloud: float = 20.0, max_tile_cloud: float = 90.0,
                    per_period: int = 1, period: str = "all", workers: int = 4, dry_run: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Sentinel2Result:
    """Choose and fetch the least cloudy Sentinel-2 L2A scenes over an AOI file between two dates."""
    start, end = parse_dates(dates)
    if period not in PERIODS:
        raise InputError(f"--period {period}: choose one of {', '.join(PERIODS)}")
    if per_period < 1:
        raise InputError(f"--per-period {per_period}: at least 1")
    for name, value in (("--max-cloud", max_cloud), ("--max-tile-cloud", max_tile_cloud)):
        if not 0 <= value <= 100:
            raise InputError(f"{name} {value:g}: a percentage from 0 to 100")
    area = stac.read_aoi(aoi)
    out = Path(out)
    client, _ = stac.open_collection(stac_url, collection)
    span = f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z"
    items = stac.search_items(client, stac_url, collection, area.wgs84, span)
    label = f"{start.isoformat()}/{end.isoformat()}"
    if not items:
        raise InputError(f"{aoi}: no Sentinel-2 scene of {collection} at {stac_url} over the area between {label}")
    # One item per tile and acquisition: the newest processing baseline (catalogues keep reprocessed twins).
    newest: dict[tuple, object] = {}
    for item in items:
        key = (mgrs_tile(item), item.datetime)
        if key not in newest or (_baseline(item) or "") > (_baseline(newest[key]) or ""):
            newest[key] = item
    candidates = [Candidate(item, mgrs_tile(item), _period(item, period, label), item.properties.get("eo:cloud_cover"))
                  for item in sorted(newest.values(), key=lambda i: (mgrs_tile(i), i.datetime, i.id))]
    candidates = [c for c in candidates if c.tile_cloud is None or c.tile_cloud <= max_tile_cloud]
    if not candidates:
        raise InputError(f"{aoi}: {len(newest)} scene(s) between {label}, none with tile cloud cover <= "
                         f"{max_tile_cloud:g}% (raise --max-tile-cloud)")
    result = Sentinel2Result(out, collection, candidates, dry_run=dry_run, per_period=per_period)
    with stac.gdal_env():
        stac.run_jobs(candidates, lambda c: _plan(c, area, dry_run), workers, "plan")
        if dry_run:
            return result
        groups: dict[tuple, list[Candidate]] = {}
        for c in candidates:
            groups.setdefault((c.tile, c.period), []).append(c)
        for members in groups.values():
            usable = [c for c in members if c.cloud is not None and c.cloud < 1.0 and 100 * c.cloud <= max_cloud]
            for c in sorted(usable, key=lambda c: (c.cloud, c.tile_cloud if c.tile_cloud is not None else 100,
                                                   c.item.id))[:per_period]:
                c.chosen = True
        for c in candidates:
            if not c.chosen:
                c.scl_pixels = None  # only the chosen scenes' SCL windows are written
        chosen = result.chosen
        if not chosen:
            best = min((c.cloud for c in candidates if c.cloud is not None), default=1.0)
            raise InputError(f"{aoi}: no scene between {label} has at most {max_cloud:g}% cloud over the area "
                             f"(the best has {100 * best:.1f}%); raise --max-cloud or widen --dates")
        stac.clean_partial(out, [c.item.id for c in chosen])  # what killed runs left
        for c in chosen:
            c.skipped = _complete(c, out)
        stac.run_jobs([c for c in chosen if not c.skipped], lambda c: _fetch_scene(c, out, result.warnings),
                      workers, "scene", progress)
        stac.clean_partial(out, [c.item.id for c in chosen])
    chosen_ids = {c.item.id for c in chosen}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / "item.json").exists()):
        if folder.name not in chosen_ids:  # build-records --scenes OUT would read it too
            result.warnings.append(f"{folder}: a scene of an earlier fetch that this one did not choose; "
                                   "remove it unless you want it in the records")
    for c in chosen:
        if c.skipped and not c.reflectance:
            c.reflectance = {"from": "an earlier run (see its item.json)"}
    write_json(out / "fetch.json", {
        "source": "Sentinel-2 L2A", "stac": stac_url, "collection": collection, "dates": label, "period": period,
        "per_period": per_period, "max_cloud": max_cloud, "max_tile_cloud": max_tile_cloud,
        "area": stac.geojson(area.wgs84),
        "candidates": [{"id": c.item.id, "tile": c.tile, "period": c.period, "tile_cloud": c.tile_cloud,
                        "cloud_over_area": None if c.cloud is None else round(c.cloud, 6), "chosen": c.chosen}
                       for c in candidates],
        "scenes": [{"id": c.item.id, "folder": c.item.id,
                    "urls": {band: plan.href for band, plan in sorted(c.bands.items())} | (
                        {"SCL": c.scl.href} if c.scl else {}),
                    "reflectance": c.reflectance} for c in chosen],
        "reflectance_rule": __doc__.split("Reflectance rule")[1].split("Output,")[0].strip(),
    })
    return result


def _plan(candidate: Candidate, area, dry_run: bool) -> None:
    """Plan the SCL window over the area and read it to measure the cloud over the area (not in a dry run)."""
    item = candidate.item
    _, scl_href = stac.asset_href(item, ASSET_KEYS["SCL"], "SCL (scene classification)")
    with stac.open_remote(scl_href, "Sentinel-2 SCL") as dataset:
        local = area.in_crs(dataset.crs)
        # Windows snap to 20 m so the 10 m bands and the 20 m SCL cover the same ground.
        plan = stac.plan_window(dataset, local.bounds, scl_href, align=20.0)
        candidate.scl = plan
        if plan is None:
            candidate.cloud = 1.0
            return
        if dry_run:
            _plan_bands(candidate, local.bounds)
            return
        scl = stac.read_plan(dataset, plan)[0]
    inside = geometry_mask([local], out_shape=scl.shape, transform=plan.transform, invert=True)
    if not inside.any():
        inside = geometry_mask([local], out_shape=scl.shape, transform=plan.transform, invert=True, all_touched=True)
    candidate.cloud = float(np.isin(scl[inside], SCL_IGNORED).mean()) if inside.any() else 1.0
    candidate.scl_pixels = scl  # kept: a chosen scene's SCL.tif is this window


def _plan_bands(candidate: Candidate, bounds) -> None:
    for band in BANDS:
        _, href = stac.asset_href(candidate.item, ASSET_KEYS[band], f"Sentinel-2 {band}")
        with stac.open_remote(href, f"Sentinel-2 {band}") as dataset:
            plan = stac.plan_window(dataset, bounds, href, align=20.0)
        if plan is None:
            raise InputError(f"{href}: band {band} does not cover the area that its SCL covers")
        candidate.bands[band] = plan


def _complete(candidate: Candidate, out: Path) -> bool:
    """A scene is complete when its folder exists (renamed into place last) on the planned grid."""
    folder = out / candidate.item.id
    if not folder.exists():
        return False
    scl = folder / "SCL.tif"
    if not scl.exists() or not stac.same_grid(scl, candidate.scl.crs, candidate.scl.transform, candidate.scl.width,
                                              candidate.scl.height):
        raise InputError(f"{folder}: exists with another extent or incomplete (an earlier fetch of another area?); "
                         "choose another --out or remove it")
    return True


def _fetch_scene(candidate: Candidate, out: Path, warnings: list[str]) -> None:
    """Read the band windows, resolve the reflectance convention, write the scene folder, rename it into place."""
    item = candidate.item
    scl_plan = candidate.scl
    bounds = rasterio.transform.array_bounds(scl_plan.height, scl_plan.width, scl_plan.transform)
    bounds = (bounds[0], bounds[1], bounds[2], bounds[3])
    _plan_bands(candidate, bounds)
    numbers = {}
    for band in BANDS:
        plan = candidate.bands[band]
        with stac.open_remote(plan.href, f"Sentinel-2 {band}") as dataset:
            numbers[band] = stac.read_plan(dataset, plan)
    scl = candidate.scl_pixels
    reflectance = resolve_reflectance(item, {band: numbers[band][0] for band in BANDS}, scl)
    candidate.reflectance = reflectance
    if reflectance.get("warning"):
        warnings.append(f"{item.id}: {reflectance['warning']}")
    work = stac.partial_folder(out, item.id)
    for band in BANDS:
        plan = candidate.bands[band]
        stac.write_geotiff(work / f"{band}.tif", numbers[band], plan.crs, plan.transform,
                           plan.nodata if plan.nodata is not None else 0)
    stac.write_geotiff(work / "SCL.tif", scl[np.newaxis], scl_plan.crs, scl_plan.transform,
                       scl_plan.nodata if scl_plan.nodata is not None else 0)
    write_json(work / "item.json", local_item(item, reflectance))
    os.replace(work, out / item.id)


def local_item(item, reflectance: dict) -> dict:
    """The STAC item with the fetched assets pointing at the local files (the catalogue's URL kept as the
    asset's `alternate` href) and each band's raster:bands scale and offset set to the resolved ones."""
    data = item.to_dict(include_self_link=False, transform_hrefs=False)
    data["links"] = [link for link in data.get("links", []) if link.get("rel") not in ("self", "root", "parent")]
    assets = data.get("assets", {})
    for band in BANDS + ("SCL",):
        key = next(k for k in ASSET_KEYS[band] if k in assets)
        asset = assets[key]
        asset["alternate"] = {**asset.get("alternate", {}), "source": {"href": item.assets[key].get_absolute_href()}}
        asset["href"] = f"{band}.tif"
        if band != "SCL":
            raster = (asset.get("raster:bands") or [{}])[0]
            asset["raster:bands"] = [{**raster, "scale": reflectance["scale"], "offset": reflectance["offset"]}]
    data.setdefault("properties", {})["rts_tf:reflectance"] = {k: v for k, v in reflectance.items()}
    return data


def resolve_reflectance(item, numbers: dict[str, np.ndarray], scl: np.ndarray) -> dict:
    """The scene's scale and offset by the module's reflectance rule, with the evidence."""
    props = item.properties
    baseline = _baseline(item)
    expected = None
    if baseline:
        try:
            expected = baseline_offset(baseline)
        except ValueError:
            raise InputError(f"STAC item {item.id}: s2:processing_baseline {baseline!r} is not a baseline") from None
    declared_scale, declared = [], []
    for band in BANDS:
        key = next((k for k in ASSET_KEYS[band] if k in item.assets), None)
        raster = ((item.assets[key].extra_fields.get("raster:bands") or [{}])[0]) if key else {}
        if "offset" in raster or "scale" in raster:
            declared_scale.append(float(raster.get("scale", 1.0)))
            declared.append(float(raster.get("offset", 0.0)))
    declared_offset = declared[0] if len(declared) == len(BANDS) and len(set(declared)) == 1 else None
    scale = declared_scale[0] if len(declared_scale) == len(BANDS) and len(set(declared_scale)) == 1 else STEP
    flag = props.get("earthsearch:boa_offset_applied")
    sources = {}
    if expected is not None:
        sources["baseline"] = expected
    if declared_offset is not None:
        sources["raster:bands"] = declared_offset
    if flag is True:
        sources["earthsearch:boa_offset_applied"] = 0.0
    pixels = pixel_offset(numbers, scl, scale)
    evidence = {"processing_baseline": baseline, "declared_offset": declared_offset, "declared_scale": scale,
                "boa_offset_applied": flag, "pixels": pixels}
    values = set(sources.values())
    if len(values) == 1:
        offset = values.pop()
        rule = f"metadata agree ({', '.join(sources)})"
        warning = None
        if pixels["offset"] is not None and not np.isclose(pixels["offset"], offset):
            warning = (f"the metadata say offset {offset:g} but the pixels look like {pixels['offset']:g} "
                       f"({pixels['below_1000']:.0%} of clear land DN below 1000); kept the metadata's")
    elif pixels["offset"] is not None:
        offset = pixels["offset"]
        rule = f"metadata disagree ({', '.join(f'{k}: {v:g}' for k, v in sources.items()) or 'none'}); the pixels decide"
        warning = None if sources else "no processing baseline or declared offset: the pixels decided"
    elif expected is not None:
        offset = expected
        rule = f"metadata disagree ({', '.join(f'{k}: {v:g}' for k, v in sources.items())}); pixels undecided; baseline"
        warning = f"reflectance offset uncertain: {rule}"
    else:
        raise InputError(f"STAC item {item.id}: no processing baseline, no declared raster:bands offset, and too few "
                         "clear pixels to tell whether its numbers carry ESA's +1000 offset")
    return {"scale": scale, "offset": float(offset), "rule": rule, **evidence,
            **({"warning": warning} if warning else {})}


def pixel_offset(numbers: dict[str, np.ndarray], scl: np.ndarray, scale: float = STEP) -> dict:
    """Whether the pixels carry ESA's +1000 offset, from clear land pixels (see the module's rule)."""
    factor = numbers[BANDS[0]].shape[0] // scl.shape[0]
    classes = np.repeat(np.repeat(scl, factor, axis=0), factor, axis=1)[:numbers[BANDS[0]].shape[0],
                                                                        :numbers[BANDS[0]].shape[1]]
    clear = np.isin(classes, PIXEL_TEST_CLASSES)
    for band in BANDS:
        clear &= numbers[band] > 0
    count = int(clear.sum())
    if count < PIXEL_TEST_MIN:
        return {"offset": None, "clear_pixels": count, "below_1000": None}
    below = float(np.mean(np.stack([numbers[band][clear] for band in BANDS]) < ESA_OFFSET_DN))
    offset = 0.0 if below >= PIXEL_ABSENT else (-ESA_OFFSET_DN * scale if below <= PIXEL_PRESENT else None)
    return {"offset": offset, "clear_pixels": count, "below_1000": round(below, 6)}
