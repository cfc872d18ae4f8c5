"""Record building: scenes and auxiliary sources -> tiles -> TFRecord shards and manifest.json."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import rasterio
import shapely

import rts_tf
from rts_tf.bands import UNITS, describe_bands
from rts_tf.engine import (ENGINES, failures_message, local_jobs, outcome, quiet_worker, run_job, start_ray_early,
                           stop_workers)
from rts_tf.errors import InputError
from rts_tf.labels import LabelMatcher, rasterize_labels, read_polygons, select_labels, site_of
from rts_tf.rasters import GDAL_CACHE_BYTES
from rts_tf.records import (COMPRESSIONS, IGNORE, LABEL_VALUES, MANIFEST_NAME, SCHEMA_VERSION, BandStatistics,
                            ExampleEncoder, ShardWriter, features, parts_to_float32, read_manifest, shard_suffix, verify_shard,
                            write_json)
from rts_tf.scene import SENSORS, SceneFiles, SceneSources, find_scenes, recipe_settings, scene_grid
from rts_tf.settings import BuildSettings, SensorSettings
from rts_tf.tiling import blocks, count_tiles
from rts_tf.locks import locks_folder

SETTINGS_NAME = "build-settings.json"
# Band statistics use every 4th pixel along rows and columns: plenty for normalisation, 16x cheaper.
STATISTICS_STEP = 4


@dataclass
class SceneJob:
    """One scene to build: its files, where it belongs, its labels and every input path."""

    scene: SceneFiles
    region: str
    site: str
    polygons: list  # shapely polygons in the scene CRS
    tcvis: list[str] | None  # None: the band set has no TCVIS band
    dem: list[str] | None
    rel_elevation: list[str] | None
    slope: list[str] | None
    settings: BuildSettings
    out: str
    height: int = 0
    width: int = 0
    fingerprint: str = ""
    label_counts: dict[str, int] = field(default_factory=dict)  # slump polygons matched per rule
    label_selection: dict[str, Any] = field(default_factory=dict)  # --label-field/--label-value
    region_from: str = ""  # "sites", "labels" or "default" (--default-region)

    @property
    def shard_path(self) -> str:
        return f"{folder_name(self.region)}/{self.scene.scene_id}{shard_suffix(COMPRESSIONS[self.settings.compression])}"

    @property
    def part_path(self) -> Path:
        return Path(self.out) / folder_name(self.region) / f"{self.scene.scene_id}.json"


@dataclass
class BuildSummary:
    """What a build did, for the closing summary line."""

    out: str
    scenes: int = 0
    scenes_built: int = 0
    scenes_skipped: int = 0
    tiles: int = 0
    tiles_built: int = 0
    slump_tiles: int = 0
    ignored_share: float = 0.0
    bytes_written: int = 0
    seconds: float = 0.0
    regions: dict[str, int] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)  # the manifest's "labels" entry
    # scene_id -> {"region", "region_from", "image_id", "footprint"}: where each scene's labels came from
    scene_labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    # scene_id -> why every tile of the scene was dropped: the inputs that cover none of it, by file
    empty_scenes: dict[str, str] = field(default_factory=dict)
    dropped_rule: str = ""  # which tiles are dropped, e.g. "had more than --max-ignored 50% ignored pixels"
    sensors: dict[str, int] = field(default_factory=dict)  # scenes per sensor profile
    sensor_given: bool = False  # chosen with --sensor, else detected from the files
    scene_warnings: list[str] = field(default_factory=list)  # e.g. a Sentinel-2 scene without SCL
    bands: list[str] = field(default_factory=list)  # the records' band set

    def lines(self) -> list[str]:
        rate = self.tiles_built / self.seconds if self.seconds > 0 else 0.0
        regions = ", ".join(f"{name} {count}" for name, count in sorted(self.regions.items()))
        sensors = ", ".join(f"{name} {count}" for name, count in sorted(self.sensors.items()))
        return [
            f"records: {self.out}",
            f"scenes: {self.scenes} ({self.scenes_built} built, {self.scenes_skipped} already complete)",
            f"sensors: {sensors} ({'--sensor' if self.sensor_given else 'detected from the files'})",
            f"bands: {describe_bands(self.bands)} ({', '.join(self.bands)})",
            f"tiles: {self.tiles} ({self.slump_tiles} with slumps; by region: {regions})",
            f"ignored pixels: {100 * self.ignored_share:.1f}%",
            f"written: {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({rate:.1f} tiles/s, {self.bytes_written / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)",
            *self.label_lines(),
            *self.warnings(),
        ]

    def warnings(self) -> list[str]:
        """Lines starting with "warning:": scenes that gave no tile, and label polygons that reached no tile."""
        lines = [f"warning: {warning}" for warning in self.scene_warnings]
        lines += [f"warning: scene {scene_id} gave no tiles: every tile {self.dropped_rule}; {cause}"
                  for scene_id, cause in sorted(self.empty_scenes.items())]
        if self.labels and self.labels["selected"] and self.tiles and not self.slump_tiles:
            info = self.labels
            unmatched = info["unmatched"]["count"]
            lines.append(f"warning: no tile holds a slump pixel although {info['file']} has {info['selected']} slump "
                         f"polygon(s): {unmatched} matched no scene (listed in manifest.json under labels.unmatched)"
                         + (", the others cover only ignored pixels or dropped tiles"
                            if unmatched < info["selected"] else "")
                         + "; the records hold background only")
        return lines

    def no_tiles_message(self) -> str:
        """The error of a build that wrote no tile at all: the rule that dropped them and why, by scene."""
        scenes: dict[str, list[str]] = {}
        for scene_id, cause in sorted(self.empty_scenes.items()):
            scenes.setdefault(cause, []).append(scene_id)
        reasons = [f"scene{'s' if len(ids) > 1 else ''} {', '.join(ids[:3])}"
                   f"{f' and {len(ids) - 3} more' if len(ids) > 3 else ''}: {cause}" for cause, ids in scenes.items()]
        return (f"{self.out}: no tiles written (the records would be empty): every tile {self.dropped_rule}; "
                + "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more causes" if len(reasons) > 3 else ""))

    def label_lines(self) -> list[str]:
        """How many label polygons are slumps, how they reached scenes, and how many reached none."""
        if not self.labels:
            return []
        info = self.labels
        if info["label_field"]:
            selection = (f"{info['selected']} of {info['polygons']} polygons selected as slumps "
                         f"({info['label_field']} = {', '.join(info['label_values'])})")
        else:
            selection = f"{info['polygons']} polygons, all slumps"
        unmatched = info["unmatched"]["count"]
        lines = [f"labels: {selection}; matched {info['matched']['image_id']} by image_id, "
                 f"{info['matched']['footprint']} by footprint; {unmatched} matched no scene"
                 + (" (listed in manifest.json under labels.unmatched)" if unmatched else "")]
        lines.append("labels by scene (by image_id + by footprint):")
        for scene_id, scene in sorted(self.scene_labels.items()):
            region = scene["region"] + (" from --default-region" if scene["region_from"] == "default" else "")
            total = scene["image_id"] + scene["footprint"]
            lines.append(f"  {scene_id} ({region}): {scene['image_id']} + {scene['footprint']}"
                         + ("  no labels: all background" if total == 0 else ""))
        return lines


def folder_name(region: str) -> str:
    """A file-system-safe folder name for a region."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in region) or "unknown"


@locks_folder("out", "--out")
def build_records(scenes: Sequence[str], labels: str, out: str, tcvis: Sequence[str] | None,
                  dem: Sequence[str] | None = None, rel_elevation: Sequence[str] | None = None,
                  slope: Sequence[str] | None = None, sites: str | None = None,
                  settings: BuildSettings = BuildSettings(), workers: int = 1, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None, label_field: str | None = None,
                  label_values: Sequence[str] | None = None, default_region: str | None = None,
                  engine: str = "local", sensor: SensorSettings = SensorSettings(),
                  allow_no_labels: bool = False) -> BuildSummary:
    """Build TFRecord shards and manifest.json for scenes; resume where shards are complete.

    progress(done, total) is called with tile counts as blocks finish. Polygons whose label_field
    is one of label_values are slumps (every polygon without label_field). A scene in no site
    polygon whose labels carry no region gets default_region; without it the build fails. `sensor`
    chooses the sensor profile that reads the scenes (rts_tf.sensors; default: detected per scene).
    The records hold the bands of `settings.bands`; TCVIS and terrain inputs are needed (and read)
    only when the set has bands made from them.
    engine "local" builds scenes in `workers` processes, "ray" on Ray actors (rts_tf.engine). A
    scene whose input fails does not stop the others: the build ends with an InputError naming
    the failed scenes (and writes no manifest); the finished scenes are kept for a re-run. Labels
    of which no polygon lies on any scene are refused unless allow_no_labels (negatives only).
    """
    started = time.perf_counter()
    settings.validate()
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    # Ray starts while the jobs are planned (seconds of its start-up otherwise added to the command).
    early = start_ray_early(engine, workers)
    try:
        return _build_records(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings, workers,
                              overwrite, progress, label_field, label_values, default_region, engine, sensor,
                              allow_no_labels, started, early)
    finally:
        if early is not None:
            early.close()  # nothing left to do when the jobs' Ray session took it over


def _build_records(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings, workers, overwrite,
                   progress, label_field, label_values, default_region, engine, sensor, allow_no_labels, started,
                   early) -> BuildSummary:
    jobs, label_report = plan_jobs(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings,
                                   label_field, label_values, default_region, sensor, allow_no_labels)
    out_path = Path(out)
    prepare_output(out_path, settings, overwrite)

    parts: dict[str, dict] = {}
    todo, rebuilt = [], []
    for job in jobs:
        part = completed_part(job)
        if isinstance(part, dict):
            parts[job.scene.scene_id] = part
        else:
            todo.append(job)
            if part:  # a finished scene whose shard was damaged since: rebuilt, and said so
                rebuilt.append(f"{part}: rebuilt scene {job.scene.scene_id}")
    total = sum(count_tiles(job.height, job.width, settings.tile_size, settings.overlap) for job in todo)
    done = 0

    def advance(tiles: int) -> None:
        nonlocal done
        done += tiles
        if progress is not None:
            progress(done, total)

    failed: dict[str, str] = {}
    try:
        for result in run_jobs(todo, workers, advance, engine, early):
            if result.error is None:
                parts[result.key] = result.result
            else:
                failed[result.key] = result.error
    finally:
        # Every job has ended, or was stopped (Ctrl-C, SIGTERM): temporaries left now are of
        # attempts that died; finished scenes stay for a re-run.
        remove_temporaries(out_path)
    if failed:
        raise InputError(failures_message(failed, len(jobs), "scenes",
                                          f"{len(jobs) - len(failed)} built or complete and kept; no manifest "
                                          "written; fix or remove the failed scenes and run the command again"))
    manifest = assemble_manifest(jobs, parts, settings, label_report)
    write_json(out_path / MANIFEST_NAME, manifest)

    summary = BuildSummary(out=str(out_path), scenes=len(jobs), scenes_built=len(todo),
                           scenes_skipped=len(jobs) - len(todo), seconds=time.perf_counter() - started,
                           labels=label_report, sensor_given=sensor.sensor is not None,
                           scene_warnings=[*rebuilt, *(warning for job in jobs for warning in job.scene.warnings)],
                           bands=list(settings.bands))
    pixels = ignored = 0
    for job in jobs:
        part = parts[job.scene.scene_id]
        summary.tiles += part["tiles"]
        summary.slump_tiles += part["slump_tiles"]
        summary.regions[part["region"]] = summary.regions.get(part["region"], 0) + part["tiles"]
        summary.sensors[job.scene.sensor] = summary.sensors.get(job.scene.sensor, 0) + 1
        pixels += part["tiles"] * settings.tile_size ** 2
        ignored += part["ignored_pixels"]
        summary.scene_labels[job.scene.scene_id] = {"region": job.region, "region_from": job.region_from,
                                                    **job.label_counts}
        if job in todo:
            summary.tiles_built += part["tiles"]
            summary.bytes_written += sum(shard["bytes"] for shard in part["shards"].values())
    summary.ignored_share = ignored / pixels if pixels else 0.0
    summary.dropped_rule = ("held only ignored pixels" if settings.max_ignored >= 1 else
                            f"had more than --max-ignored {100 * settings.max_ignored:g}% ignored pixels")
    for job in jobs:
        if not parts[job.scene.scene_id]["tiles"]:
            causes = uncovered_inputs(job)
            summary.empty_scenes[job.scene.scene_id] = ", ".join(causes) if causes else (
                "no input is empty on its own: nodata, pixels the quality mask makes unusable, DEM or TCVIS gaps "
                "and the padding of edge tiles together leave too few valid pixels")
    if not summary.tiles:
        # Records without a tile are no records: remove what the build wrote (manifest, settings, empty
        # shards), so that nothing half-made is left; the error says why by scene and input.
        remove_records(out_path)
        raise InputError(summary.no_tiles_message())
    return summary


def check_labels_on_scenes(label_layer, selected, grids: list, labels: str) -> None:
    """Refuse labels of which no slump polygon overlaps any scene (far away, or in a wrong CRS):
    records of such labels would hold background only and look like any others. Scene footprints
    are moved into the labels' CRS (one polygon each, cheaper than moving every label)."""
    from rts_tf.labels import reproject_geometries

    slumps = label_layer.geometries[selected]
    for grid in grids:
        footprint = shapely.box(*grid.bounds)
        footprint = shapely.segmentize(footprint, max(grid.bounds.right - grid.bounds.left, 1.0) / 16)
        moved = reproject_geometries([footprint], grid.crs, label_layer.crs, label_layer.path)[0]
        if shapely.intersects(slumps, moved).any():
            return
    raise InputError(f"{labels}: none of its {len(slumps)} slump polygon(s) lies on any of the {len(grids)} "
                     "scene(s) (far away, or a wrong CRS in the file?); the records would hold background only. "
                     "Give --allow-no-labels to build records of negatives only")


def uncovered_inputs(job: SceneJob) -> list[str]:
    """The inputs that leave every pixel of a scene ignored, each named with its file: why a scene
    gave no tile. Read chunk by chunk, each input only until it shows one usable pixel."""
    from contextlib import ExitStack

    from rasterio.windows import Window

    from rts_tf.scene import AUXILIARY_CHUNK, SceneReader

    scene, settings = job.scene, job.settings
    grid = scene_grid(scene)
    chunks = [(row, col, min(AUXILIARY_CHUNK, grid.height - row), min(AUXILIARY_CHUNK, grid.width - col))
              for row in range(0, grid.height, AUXILIARY_CHUNK) for col in range(0, grid.width, AUXILIARY_CHUNK)]
    causes = []
    with ExitStack() as opened:
        opened.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        sources = opened.enter_context(open_sources(job.tcvis, job.dem, job.rel_elevation, job.slope, settings))
        reader = SceneReader(scene, grid)
        opened.callback(reader.close)
        checks = [(f"{scene.sr} holds no data", lambda window, _: reader.numbers(window)[1])]
        if scene.mask is not None:
            kind = {"udm2": "UDM2", "scl": "SCL", "classes": "--mask"}[SENSORS[scene.sensor].mask]
            checks.append((f"its {kind} {scene.mask} marks no pixel usable", lambda window, _: reader.quality(window)))
        for source in sources.sources:
            is_dem = sources.terrain is not None and source is sources.terrain.dem
            # NaN (no data) fails any comparison, also with -inf.
            minimum = settings.dem_min_valid if is_dem else -np.inf
            files = [dataset.name for dataset in source.overlapping(grid)] or source.paths
            name = files[0] + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "")
            checks.append((f"the {source.what} {name} has no valid value over it"
                           + (f" (nodata, or below --dem-min-valid {settings.dem_min_valid:g})" if is_dem else ""),
                           lambda _, chunk, source=source, minimum=minimum:
                           (source.read_on(chunk) >= minimum).all(axis=0)))
        for cause, usable in checks:
            if not any(usable(Window(col, row, width, height), grid.window_grid(row, col, height, width)).any()
                       for row, col, height, width in chunks):
                causes.append(cause)
    return causes


def plan_jobs(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings, label_field=None,
              label_values=None, default_region=None, sensor: SensorSettings = SensorSettings(),
              allow_no_labels: bool = True) -> tuple[list[SceneJob], dict[str, Any]]:
    """Validate every input and decide each scene's region, site and labels, before writing anything.

    Returns the jobs and the manifest's "labels" entry: the label file, the selection, how many
    polygons matched scenes by each rule and which matched none.
    """
    scene_list = find_scenes(scenes, sensor)
    if default_region is not None and not default_region.strip():
        raise InputError("--default-region must not be empty")
    site_layer = read_polygons(sites, "sites", ("region",)) if sites else None
    label_layer = read_polygons(labels, "labels", () if sites or default_region else ("region",))
    matcher = LabelMatcher(label_layer, select_labels(label_layer, label_field, label_values))
    selection = {"label_field": label_field,
                 "label_values": sorted(set(label_values)) if label_field and label_values else None}
    matches, no_region, grids = [], [], []
    with open_sources(tcvis, dem, rel_elevation, slope, settings) as sources:
        jobs = []
        for scene in scene_list:
            grid = scene_grid(scene)
            grids.append(grid)
            sources.check(scene, grid)
            match = matcher.match(scene.scene_id, grid, scene.aliases)
            matches.append(match)
            site, region = site_of(site_layer, grid) if site_layer else (None, None)
            region_from = "sites" if region else "labels" if match.region else "default"
            region = region or match.region or default_region
            if region is None:
                no_region.append(scene.scene_id)
                continue
            site = site or match.site or region
            terrain = sources.terrain
            job = SceneJob(scene, region, site, match.polygons,
                           tcvis=sources.tcvis.paths if sources.tcvis else None,
                           dem=terrain.dem.paths if terrain and terrain.dem else None,
                           rel_elevation=terrain.rel_elevation.paths if terrain and not terrain.dem else None,
                           slope=terrain.slope.paths if terrain and not terrain.dem else None,
                           settings=settings, out=str(out), height=grid.height, width=grid.width,
                           label_counts=match.counts, label_selection=selection, region_from=region_from)
            job.fingerprint = fingerprint(job, label_layer.path)
            jobs.append(job)
    if not allow_no_labels and grids:
        check_labels_on_scenes(label_layer, matcher.selected, grids, labels)
    if no_region:
        names = ", ".join(no_region[:5]) + (f" and {len(no_region) - 5} more" if len(no_region) > 5 else "")
        where = f"no site polygon in {sites} contains it" if sites else "no --sites given"
        raise InputError(f"scene{'s' if len(no_region) > 1 else ''} {names}: region unknown ({where} and its "
                         f"labels carry no region); give --sites covering it, a 'region' field in {labels}, "
                         "or --default-region NAME")
    return jobs, {"file": label_layer.path, **selection, "default_region": default_region,
                  **matcher.report(matches)}


def open_sources(tcvis, dem, rel_elevation, slope, settings: BuildSettings, check_files: bool = True) -> SceneSources:
    """The feature recipe of a build: the auxiliary sources of its band set, with the build's settings."""
    return SceneSources(tcvis or None, dem or None, rel_elevation or None, slope or None,
                        rel_elevation_radius=settings.rel_elevation_radius,
                        dem_min_valid=settings.dem_min_valid, bands=settings.bands, check_files=check_files)


def fingerprint(job: SceneJob, labels_path: str) -> str:
    """A digest of everything a scene's shards depend on, so that changed inputs are rebuilt."""
    def stat(path):
        info = os.stat(path)
        return [str(Path(path).resolve()), info.st_size, info.st_mtime_ns]

    scene = job.scene
    files = [*scene.files, *(job.tcvis or []), *(job.dem or []), *(job.rel_elevation or []), *(job.slope or [])]
    content = {"settings": asdict(job.settings), "files": [stat(f) for f in files if f is not None],
               "sensor": [scene.sensor, [[str(path), band] for path, band in scene.bands], scene.reflectance(),
                          list(scene.mask_ignore)],
               "region": job.region, "site": job.site, "schema_version": SCHEMA_VERSION,
               "labels": hashlib.sha256(b"".join(shapely.to_wkb(g) for g in job.polygons)).hexdigest(),
               "label_selection": job.label_selection}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def prepare_output(out: Path, settings: BuildSettings, overwrite: bool) -> None:
    """Create the folder; refuse one built with other settings unless overwrite, and any non-empty
    folder that holds no records (with or without overwrite); clear leftovers of interrupted builds."""
    settings_path = out / SETTINGS_NAME
    wanted = settings_record(settings)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (settings_path.exists() or (out / MANIFEST_NAME).exists()):
            raise InputError(f"{out}: folder is not empty and holds no rts-tf records (no {MANIFEST_NAME} or "
                             f"{SETTINGS_NAME}); choose a new or empty --out (nothing was changed)")
        existing = previous_settings(out)
        if existing != wanted and not overwrite:
            differs = sorted(k for k in wanted if existing is None or existing.get(k) != wanted[k])
            raise InputError(f"{out}: holds records built with different settings ({', '.join(differs)}); "
                             "use --overwrite to replace them or choose another --out")
        if overwrite:
            remove_records(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, wanted)
    remove_temporaries(out)


def settings_record(settings: BuildSettings) -> dict:
    """build-settings.json as JSON gives it back (the band set a list)."""
    return {"schema_version": SCHEMA_VERSION, **asdict(settings), "bands": list(settings.bands)}


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files of earlier attempts (interrupted builds, killed workers). Only
    the driver calls this, before and after all jobs of a command, never a job: a job that may run
    twice must not delete its other attempt's files."""
    for leftover in build_files(out, temporary_only=True):
        leftover.unlink(missing_ok=True)


# `<file>.tmp` (earlier versions) or `<file>.<attempt id>.tmp` of manifests, parts and shards.
TEMPORARY_NAME = re.compile(r"\.(json|tfrecord|tfrecord\.gz)(\.[0-9a-f]{12})?\.tmp$")


def previous_settings(out: Path) -> dict | None:
    """The settings an existing records folder was built with, or None when unreadable."""
    try:
        if (out / SETTINGS_NAME).exists():
            found = json.loads((out / SETTINGS_NAME).read_text())
        else:
            manifest = read_manifest(out)
            found = {"schema_version": manifest["schema_version"], **manifest["settings"]}
        # Records from before band sets hold the ten bands.
        return {**found, "bands": found.get("bands", list(BuildSettings().bands))}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, InputError):
        return None


def build_files(out: Path, temporary_only: bool = False) -> list[Path]:
    """The files a build wrote in a records folder: manifest, settings, the scene parts (JSON with a
    fingerprint, one folder down), the shards those and the manifest name, and temporary files of
    all of these (`*.tfrecord*.tmp`, `*.json.tmp`, each also with an attempt id before `.tmp`).
    Anything else is the user's."""
    found: set[Path] = set()
    for folder in [out, *sorted(p for p in out.iterdir() if p.is_dir())]:
        for path in folder.iterdir():
            if path.is_file() and TEMPORARY_NAME.search(path.name):
                found.add(path)
    if temporary_only:
        return sorted(found)
    found.update(p for p in (out / MANIFEST_NAME, out / SETTINGS_NAME) if p.exists())
    shards: set[str] = set()
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        for path in folder.glob("*.json"):
            try:
                part = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(part, dict) and "fingerprint" in part and "scene_id" in part:
                found.add(path)
                shards.update(part.get("shards", {}))
    try:
        shards.update(read_manifest(out)["shards"])
    except (InputError, KeyError, TypeError):
        pass
    found.update(out / shard for shard in shards if (out / shard).is_file())
    return sorted(found)


def remove_records(out: Path) -> None:
    """Delete what a build wrote (see build_files), and the folders that leaves empty; nothing else."""
    for path in build_files(out):
        path.unlink()
    for folder in sorted((p for p in out.iterdir() if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def completed_part(job: SceneJob) -> dict | str | None:
    """The finished part of a scene when its inputs are unchanged and its shards verify; else what
    is wrong with a shard of a finished scene (damaged or missing since), or None (not finished)."""
    try:
        part = json.loads(job.part_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if part.get("fingerprint") != job.fingerprint:
        return None
    out = Path(job.out)
    for path, info in part["shards"].items():
        problem = verify_shard(out, path, info)
        if problem:
            return problem
    return part


def run_jobs(jobs: list[SceneJob], workers: int, advance: Callable[[int], None], engine: str = "local",
             started=None):
    """Build scenes in this process (workers=1), in a pool of worker processes, or on Ray actors
    (engine "ray"; `started`: an embedded Ray from engine.start_ray_early); yield each scene's
    Outcome (its part, or why it failed) as it finishes."""
    keys = [job.scene.scene_id for job in jobs]
    if not jobs:
        return
    if engine == "ray":
        from rts_tf.engine import cluster_cpus, largest_node_memory, ray_session, ray_streaming_actors

        with ray_session(workers, started) as ray:
            # Actors started once and given scene after scene, each with 1 CPU and the memory of the
            # largest scene: as many as the CPUs (`workers` on an embedded Ray) and the memory allow,
            # so that every actor can be placed and none holds a scene while waiting for a place.
            ceiling = largest_node_memory(ray)
            memory = max(scene_memory(job) for job in jobs)
            memory = min(memory, ceiling) if ceiling else memory
            cpus = workers if not os.environ.get("RAY_ADDRESS") else cluster_cpus(ray)
            fit = int(ray.cluster_resources().get("memory", 0) // memory) if memory else cpus
            actors = max(1, min(len(jobs), cpus, fit or 1))
            resources = {"num_cpus": 1, "memory": memory}
            yield from ray_streaming_actors(ray, scene_builder, (), jobs, keys, actors, resources, advance,
                                            label="build_scene")
        return
    if workers == 1 or len(jobs) <= 1:
        yield from local_jobs(build_scene, jobs, keys, advance)
        return
    context = worker_context(any(job.dem for job in jobs))
    with context.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=quiet_worker) as pool:
            pending = {pool.submit(build_scene_reporting, job, queue): key for job, key in zip(jobs, keys)}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        advance(queue.get())
                    for future in finished:
                        yield outcome(pending.pop(future), *future.result())
            except BaseException:
                stop_workers(pool)  # Ctrl-C, SIGTERM or an aborting error: running scenes too
                raise
            while not queue.empty():
                advance(queue.get())


def worker_context(terrain_from_dem: bool):
    """Processes for the local pool: forked from a fork server that has imported what building a
    scene needs (rts_tf.build with rasterio, NumPy, SciPy; scipy.signal when the terrain comes from
    a DEM), so each worker starts ready instead of importing it all again (about 1 CPU second per
    worker, which a build of few scenes waits for); spawned where there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Read when the fork server starts (once per process): later builds of this process reuse it.
    context.set_forkserver_preload(["rts_tf.build", *(["scipy.signal"] if terrain_from_dem else [])])
    return context


# What building a scene holds in memory besides its blocks (Python, GDAL, NumPy, the GDAL cache),
# and per pixel of the scene (an upper bound: blocks of 4 x 4 tiles bound it in fact).
SCENE_BASE_BYTES = 512 * 2 ** 20
SCENE_BYTES_PER_PIXEL = 8
SCENE_MAX_BYTES = 3 * 2 ** 30


def scene_memory(job: SceneJob) -> int:
    """The memory a Ray task building this scene asks for, from the scene's size."""
    return int(min(SCENE_BASE_BYTES + SCENE_BYTES_PER_PIXEL * job.height * job.width, SCENE_MAX_BYTES))


def scene_builder() -> Callable[[SceneJob, Callable[[int], None]], dict]:
    """What a Ray actor building scenes runs (made once per actor): build_scene."""
    return build_scene


def build_scene_reporting(job: SceneJob, queue) -> tuple[str, Any]:
    return run_job(build_scene, job, queue.put)


def build_scene(job: SceneJob, advance: Callable[[int], None]) -> dict:
    """Tile one scene into its shard; return the scene's part of the manifest (also saved as JSON)."""
    settings = job.settings
    size = settings.tile_size
    limit = settings.max_ignored * size * size
    # The driver checked every file when it planned the jobs (plan_jobs): no second check per scene.
    sources = open_sources(job.tcvis, job.dem, job.rel_elevation, job.slope, settings, check_files=False)
    statistics = BandStatistics(len(settings.bands))
    counts = {"tiles": 0, "slump_tiles": 0, "slump_pixels": 0, "ignored_pixels": 0, "dropped_tiles": 0}
    positions = []  # (row, col, slump pixels) of every tile written: fit splits and counts without reading
    compression = COMPRESSIONS[settings.compression]
    writer = ShardWriter(Path(job.out) / job.shard_path, compression, settings.compression_level)
    encoder = ExampleEncoder()  # encode_example's bytes, with one copy of each tile
    lattice = (slice(None, None, STATISTICS_STEP),) * 2
    band_names = list(settings.bands)
    try:
        # A small GDAL block cache: the default (5% of RAM) would grow with the scene.
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), sources.stack(job.scene) as stack:
            grid = stack.grid
            for block in blocks(grid.height, grid.width, size, settings.overlap):
                parts, valid = stack.read_parts(block.row, block.col, block.height, block.width)
                block_grid = grid.window_grid(block.row, block.col, block.height, block.width)
                slumps = rasterize_labels(job.polygons, block_grid, settings.all_touched)
                label = np.where(valid, slumps, IGNORE).astype(np.uint8)
                for row, col in block.tiles:
                    y, x = row - block.row, col - block.col
                    tile_label = label[y:y + size, x:x + size]
                    ignored = int(np.count_nonzero(tile_label == IGNORE))
                    if ignored > limit or ignored == size * size:
                        counts["dropped_tiles"] += 1
                        continue
                    tile_parts = {key: part[y:y + size, x:x + size] for key, part in parts.items()}
                    slump_pixels = int(np.count_nonzero(tile_label == 1))
                    writer.write(encoder.encode(
                        tile_parts, tile_label, scene_id=job.scene.scene_id,
                        region=job.region, site=job.site, row=row, col=col,
                        slump_pixels=slump_pixels, ignored_pixels=ignored))
                    sampled = parts_to_float32({key: part[lattice] for key, part in tile_parts.items()},
                                               band_names=band_names)
                    statistics.update(sampled[tile_label[lattice] != IGNORE])
                    counts["tiles"] += 1
                    positions.append([row, col, slump_pixels])
                    counts["slump_tiles"] += slump_pixels > 0
                    counts["slump_pixels"] += slump_pixels
                    counts["ignored_pixels"] += ignored
                advance(len(block.tiles))
    except BaseException:
        writer.abort()
        raise
    finally:
        sources.close()
    shard = writer.close()
    part = {
        "scene_id": job.scene.scene_id, "region": job.region, "site": job.site,
        "image_date": job.scene.image_date, "crs": grid.crs.to_wkt(), "epsg": grid.crs.to_epsg(),
        "transform": list(grid.transform)[:6], "width": grid.width, "height": grid.height,
        **counts, "label_polygons": len(job.polygons), "labels": dict(job.label_counts),
        "region_from": job.region_from,
        "sensor": job.scene.sensor, "reflectance": job.scene.reflectance(), "sources": job.scene.sources(),
        "shards": {job.shard_path: shard}, "positions": positions,
        "statistics": statistics.to_dict(), "fingerprint": job.fingerprint,
    }
    # The part is the scene's completion marker: written last, under this attempt's own temporary name.
    write_json(job.part_path, part, unique=True)
    return part


def assemble_manifest(jobs: list[SceneJob], parts: dict[str, dict], settings: BuildSettings,
                      labels: dict[str, Any] | None = None) -> dict[str, Any]:
    """The records' manifest.json: schema, bands, scenes, shards with checksums, band statistics, labels.

    labels is plan_jobs' report on the label file. Each scene's label counts come from its job,
    so that a reused part never shows stale matching.
    """
    bands = list(settings.bands)
    overall = BandStatistics(len(bands))
    by_region: dict[str, BandStatistics] = {}
    by_sensor: dict[str, BandStatistics] = {}
    scenes, shards, regions = [], {}, {}
    for job in sorted(jobs, key=lambda j: j.scene.scene_id):
        part = parts[job.scene.scene_id]
        statistics = BandStatistics.from_dict(part["statistics"])
        overall.merge(statistics)
        by_region.setdefault(part["region"], BandStatistics(len(bands))).merge(statistics)
        by_sensor.setdefault(job.scene.sensor, BandStatistics(len(bands))).merge(statistics)
        region = regions.setdefault(part["region"], {"scenes": 0, "tiles": 0, "slump_tiles": 0, "slump_pixels": 0})
        region["scenes"] += 1
        for key in ("tiles", "slump_tiles", "slump_pixels"):
            region[key] += part[key]
        for path, info in part["shards"].items():
            shards[path] = {**info, "scene_id": part["scene_id"], "region": part["region"]}
        scenes.append({key: value for key, value in part.items() if key not in ("statistics", "fingerprint")}
                      | {"shards": sorted(part["shards"]), "label_polygons": len(job.polygons),
                         "labels": dict(job.label_counts), "region_from": job.region_from})
    compression = COMPRESSIONS[settings.compression]
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"rts-tf {rts_tf.__version__}",
        "tile_size": settings.tile_size,
        "overlap": settings.overlap,
        "compression": compression,
        "bands": [{"name": name, "unit": UNITS[name]} for name in bands],
        "features": features(settings.tile_size, bands),
        "label_values": LABEL_VALUES,
        "settings": asdict(settings),
        "labels": labels or {},
        # What decides each pixel's band values: `fit` copies it into run.json for `predict`.
        "recipe": recipe_settings("dem" if jobs and jobs[0].dem else "precomputed" if jobs and jobs[0].slope else "none",
                                  settings.rel_elevation_radius,
                                  settings.dem_min_valid, sensors=sorted(by_sensor)),
        "regions": dict(sorted(regions.items())),
        "scenes": scenes,
        "shards": shards,
        "statistics": {"overall": overall.to_dict(),
                       "regions": {name: stats.to_dict() for name, stats in sorted(by_region.items())},
                       "sensors": {name: stats.to_dict() for name, stats in sorted(by_sensor.items())}},
    }
