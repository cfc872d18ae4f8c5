"""Record building: scenes and auxiliary sources -> tiles -> TFRecord shards and manifest.json."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import rasterio
import shapely

import rts_tf
from rts_tf.errors import InputError
from rts_tf.labels import rasterize_labels, read_polygons, scene_attribute, scene_labels, site_of
from rts_tf.rasters import GDAL_CACHE_BYTES, RasterSource
from rts_tf.records import (COMPRESSIONS, IGNORE, LABEL_VALUES, MANIFEST_NAME, SCHEMA_VERSION, BandStatistics,
                            ShardWriter, encode_example, features, read_manifest, shard_suffix, verify_shard,
                            write_json)
from rts_tf.scene import BANDS, SceneFiles, SceneStack, Terrain, find_scenes, scene_grid
from rts_tf.tiling import blocks, check_tiling, count_tiles

SETTINGS_NAME = "build-settings.json"
# Band statistics use every 4th pixel along rows and columns: plenty for normalisation, 16x cheaper.
STATISTICS_STEP = 4


@dataclass(frozen=True)
class BuildSettings:
    """Everything that changes the content of records; a folder is built with one set of these."""

    tile_size: int = 256
    overlap: int = 25
    max_ignored: float = 0.5
    compression: str = "gzip"
    compression_level: int = 1
    image_dtype: str = "float16"
    rel_elevation_radius: float = 100.0
    all_touched: bool = False

    def validate(self) -> None:
        check_tiling(self.tile_size, self.overlap)
        if not 0.0 <= self.max_ignored <= 1.0:
            raise InputError(f"--max-ignored must be between 0 and 1, got {self.max_ignored}")
        if self.compression not in COMPRESSIONS:
            raise InputError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression}")
        if not 0 <= self.compression_level <= 9:
            raise InputError(f"--compression-level must be 0 to 9, got {self.compression_level}")
        if self.image_dtype not in ("float16", "float32"):
            raise InputError(f"--image-dtype must be float16 or float32, got {self.image_dtype}")
        if self.rel_elevation_radius <= 0:
            raise InputError(f"--rel-elevation-radius must be positive, got {self.rel_elevation_radius}")


@dataclass
class SceneJob:
    """One scene to build: its files, where it belongs, its labels and every input path."""

    scene: SceneFiles
    region: str
    site: str
    polygons: list  # shapely polygons in the scene CRS
    tcvis: list[str]
    dem: list[str] | None
    rel_elevation: list[str] | None
    slope: list[str] | None
    settings: BuildSettings
    out: str
    height: int = 0
    width: int = 0
    fingerprint: str = ""

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

    def lines(self) -> list[str]:
        rate = self.tiles_built / self.seconds if self.seconds > 0 else 0.0
        regions = ", ".join(f"{name} {count}" for name, count in sorted(self.regions.items()))
        return [
            f"records: {self.out}",
            f"scenes: {self.scenes} ({self.scenes_built} built, {self.scenes_skipped} already complete)",
            f"tiles: {self.tiles} ({self.slump_tiles} with slumps; by region: {regions})",
            f"ignored pixels: {100 * self.ignored_share:.1f}%",
            f"written: {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({rate:.1f} tiles/s, {self.bytes_written / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)",
        ]


def folder_name(region: str) -> str:
    """A file-system-safe folder name for a region."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in region) or "unknown"


def build_records(scenes: Sequence[str], labels: str, out: str, tcvis: Sequence[str],
                  dem: Sequence[str] | None = None, rel_elevation: Sequence[str] | None = None,
                  slope: Sequence[str] | None = None, sites: str | None = None,
                  settings: BuildSettings = BuildSettings(), workers: int = 1, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> BuildSummary:
    """Build TFRecord shards and manifest.json for scenes; resume where shards are complete.

    progress(done, total) is called with tile counts as blocks finish.
    """
    started = time.perf_counter()
    settings.validate()
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    jobs = plan_jobs(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings)
    out_path = Path(out)
    prepare_output(out_path, settings, overwrite)

    parts: dict[str, dict] = {}
    todo = []
    for job in jobs:
        part = completed_part(job)
        if part is None:
            todo.append(job)
        else:
            parts[job.scene.scene_id] = part
    total = sum(count_tiles(job.height, job.width, settings.tile_size, settings.overlap) for job in todo)
    done = 0

    def advance(tiles: int) -> None:
        nonlocal done
        done += tiles
        if progress is not None:
            progress(done, total)

    for part in run_jobs(todo, workers, advance):
        parts[part["scene_id"]] = part
    manifest = assemble_manifest(jobs, parts, settings)
    write_json(out_path / MANIFEST_NAME, manifest)

    summary = BuildSummary(out=str(out_path), scenes=len(jobs), scenes_built=len(todo),
                           scenes_skipped=len(jobs) - len(todo), seconds=time.perf_counter() - started)
    pixels = ignored = 0
    for job in jobs:
        part = parts[job.scene.scene_id]
        summary.tiles += part["tiles"]
        summary.slump_tiles += part["slump_tiles"]
        summary.regions[part["region"]] = summary.regions.get(part["region"], 0) + part["tiles"]
        pixels += part["tiles"] * settings.tile_size ** 2
        ignored += part["ignored_pixels"]
        if job in todo:
            summary.tiles_built += part["tiles"]
            summary.bytes_written += sum(shard["bytes"] for shard in part["shards"].values())
    summary.ignored_share = ignored / pixels if pixels else 0.0
    return summary


def plan_jobs(scenes, labels, out, tcvis, dem, rel_elevation, slope, sites, settings) -> list[SceneJob]:
    """Validate every input and decide each scene's region, site and labels, before writing anything."""
    scene_list = find_scenes(scenes)
    if not dem and not (rel_elevation and slope):
        raise InputError("give --dem, or both --rel-elevation and --slope")
    site_layer = read_polygons(sites, "sites", ("region",)) if sites else None
    label_layer = read_polygons(labels, "labels", () if sites else ("region",))
    sources = {"tcvis": RasterSource(tcvis, "TCVIS", bands=3)}
    if dem:
        sources["dem"] = RasterSource(dem, "DEM", bands=1)
    else:
        sources["rel_elevation"] = RasterSource(rel_elevation, "relative elevation", bands=1)
        sources["slope"] = RasterSource(slope, "slope", bands=1)
    try:
        Terrain(sources.get("dem"), sources.get("rel_elevation"), sources.get("slope"))
        jobs = []
        for scene in scene_list:
            grid = scene_grid(scene)
            for source in sources.values():
                source.check_overlaps(grid, f"scene {scene.scene_id} ({scene.sr})")
            site, region = site_of(site_layer, grid) if site_layer else (None, None)
            region = region or scene_attribute(label_layer, scene.scene_id, "region") or "unknown"
            site = site or scene_attribute(label_layer, scene.scene_id, "site") or region
            job = SceneJob(scene, region, site, scene_labels(label_layer, scene.scene_id, grid),
                           tcvis=sources["tcvis"].paths,
                           dem=sources["dem"].paths if "dem" in sources else None,
                           rel_elevation=sources["rel_elevation"].paths if "rel_elevation" in sources else None,
                           slope=sources["slope"].paths if "slope" in sources else None,
                           settings=settings, out=str(out), height=grid.height, width=grid.width)
            job.fingerprint = fingerprint(job, label_layer.path)
            jobs.append(job)
    finally:
        for source in sources.values():
            source.close()
    return jobs


def fingerprint(job: SceneJob, labels_path: str) -> str:
    """A digest of everything a scene's shards depend on, so that changed inputs are rebuilt."""
    def stat(path):
        info = os.stat(path)
        return [str(Path(path).resolve()), info.st_size, info.st_mtime_ns]

    files = [job.scene.sr, job.scene.udm2, *job.tcvis, *(job.dem or []), *(job.rel_elevation or []),
             *(job.slope or [])]
    content = {"settings": asdict(job.settings), "files": [stat(f) for f in files if f is not None],
               "region": job.region, "site": job.site, "schema_version": SCHEMA_VERSION,
               "labels": hashlib.sha256(b"".join(shapely.to_wkb(g) for g in job.polygons)).hexdigest()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def prepare_output(out: Path, settings: BuildSettings, overwrite: bool) -> None:
    """Create the folder; refuse one built with other settings unless overwrite; clear leftovers."""
    settings_path = out / SETTINGS_NAME
    wanted = {"schema_version": SCHEMA_VERSION, **asdict(settings)}
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output exists and is not a folder")
    if out.exists() and not overwrite:
        if settings_path.exists() or (out / MANIFEST_NAME).exists():
            existing = previous_settings(out)
            if existing != wanted:
                differs = sorted(k for k in wanted if existing is None or existing.get(k) != wanted[k])
                raise InputError(f"{out}: holds records built with different settings ({', '.join(differs)}); "
                                 "use --overwrite to replace them or choose another --out")
        elif any(out.iterdir()):
            raise InputError(f"{out}: folder is not empty and holds no rts-tf records; choose another --out "
                             "or use --overwrite")
    if overwrite and out.exists():
        remove_records(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, wanted)
    for leftover in out.rglob("*.tmp"):
        leftover.unlink()


def previous_settings(out: Path) -> dict | None:
    """The settings an existing records folder was built with, or None when unreadable."""
    try:
        if (out / SETTINGS_NAME).exists():
            return json.loads((out / SETTINGS_NAME).read_text())
        manifest = read_manifest(out)
        return {"schema_version": manifest["schema_version"], **manifest["settings"]}
    except (OSError, json.JSONDecodeError, KeyError, InputError):
        return None


def remove_records(out: Path) -> None:
    """Delete what a build writes (shards, scene parts, manifest, settings), nothing else."""
    for path in sorted(out.rglob("*"), reverse=True):
        if path.is_file() and (path.name.endswith((".tfrecord", ".tfrecord.gz", ".tmp", ".json"))):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def completed_part(job: SceneJob) -> dict | None:
    """The finished part of a scene when its inputs are unchanged and its shards verify, else None."""
    try:
        part = json.loads(job.part_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if part.get("fingerprint") != job.fingerprint:
        return None
    out = Path(job.out)
    if any(verify_shard(out, path, info) for path, info in part["shards"].items()):
        return None
    return part


def run_jobs(jobs: list[SceneJob], workers: int, advance: Callable[[int], None]):
    """Build scenes in this process (workers=1) or in a pool of spawned processes; yield parts."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield build_scene(job, advance)
        return
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=quiet_worker) as pool:
            pending = {pool.submit(build_scene_reporting, job, queue) for job in jobs}
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        advance(queue.get())
                    for future in finished:
                        yield future.result()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            while not queue.empty():
                advance(queue.get())


def quiet_worker() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_scene_reporting(job: SceneJob, queue) -> dict:
    return build_scene(job, queue.put)


def build_scene(job: SceneJob, advance: Callable[[int], None]) -> dict:
    """Tile one scene into its shard; return the scene's part of the manifest (also saved as JSON)."""
    settings = job.settings
    size = settings.tile_size
    limit = settings.max_ignored * size * size
    tcvis = RasterSource(job.tcvis, "TCVIS", bands=3)
    terrain = Terrain(RasterSource(job.dem, "DEM", bands=1) if job.dem else None,
                      RasterSource(job.rel_elevation, "relative elevation", 1) if job.rel_elevation else None,
                      RasterSource(job.slope, "slope", 1) if job.slope else None,
                      radius=settings.rel_elevation_radius)
    statistics = BandStatistics(len(BANDS))
    counts = {"tiles": 0, "slump_tiles": 0, "slump_pixels": 0, "ignored_pixels": 0, "dropped_tiles": 0}
    compression = COMPRESSIONS[settings.compression]
    writer = ShardWriter(Path(job.out) / job.shard_path, compression, settings.compression_level)
    try:
        # A small GDAL block cache: the default (5% of RAM) would grow with the scene.
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), SceneStack(job.scene, tcvis, terrain) as stack:
            grid = stack.grid
            for block in blocks(grid.height, grid.width, size, settings.overlap):
                image, valid = stack.read(block.row, block.col, block.height, block.width)
                block_grid = grid.window_grid(block.row, block.col, block.height, block.width)
                slumps = rasterize_labels(job.polygons, block_grid, settings.all_touched)
                label = np.where(valid, slumps, IGNORE).astype(np.uint8)
                image = image.astype(settings.image_dtype)
                for row, col in block.tiles:
                    y, x = row - block.row, col - block.col
                    tile_label = label[y:y + size, x:x + size]
                    ignored = int(np.count_nonzero(tile_label == IGNORE))
                    if ignored > limit or ignored == size * size:
                        counts["dropped_tiles"] += 1
                        continue
                    tile_image = image[y:y + size, x:x + size]
                    slump_pixels = int(np.count_nonzero(tile_label == 1))
                    writer.write(encode_example(
                        tile_image, tile_label, settings.image_dtype, scene_id=job.scene.scene_id,
                        region=job.region, site=job.site, row=row, col=col,
                        slump_pixels=slump_pixels, ignored_pixels=ignored))
                    lattice = (slice(None, None, STATISTICS_STEP),) * 2
                    statistics.update(tile_image[lattice][tile_label[lattice] != IGNORE])
                    counts["tiles"] += 1
                    counts["slump_tiles"] += slump_pixels > 0
                    counts["slump_pixels"] += slump_pixels
                    counts["ignored_pixels"] += ignored
                advance(len(block.tiles))
    except BaseException:
        writer.abort()
        raise
    finally:
        for source in (tcvis, *terrain.sources):
            source.close()
    shard = writer.close()
    part = {
        "scene_id": job.scene.scene_id, "region": job.region, "site": job.site,
        "image_date": job.scene.image_date, "crs": grid.crs.to_wkt(), "epsg": grid.crs.to_epsg(),
        "transform": list(grid.transform)[:6], "width": grid.width, "height": grid.height,
        **counts, "labels": len(job.polygons),
        "sources": {"sr": str(job.scene.sr), "udm2": str(job.scene.udm2) if job.scene.udm2 else None},
        "shards": {job.shard_path: shard},
        "statistics": statistics.to_dict(), "fingerprint": job.fingerprint,
    }
    write_json(job.part_path, part)
    return part


def assemble_manifest(jobs: list[SceneJob], parts: dict[str, dict], settings: BuildSettings) -> dict[str, Any]:
    """The records' manifest.json: schema, bands, scenes, shards with checksums, band statistics."""
    overall = BandStatistics(len(BANDS))
    by_region: dict[str, BandStatistics] = {}
    scenes, shards, regions = [], {}, {}
    for job in sorted(jobs, key=lambda j: j.scene.scene_id):
        part = parts[job.scene.scene_id]
        statistics = BandStatistics.from_dict(part["statistics"])
        overall.merge(statistics)
        by_region.setdefault(part["region"], BandStatistics(len(BANDS))).merge(statistics)
        region = regions.setdefault(part["region"], {"scenes": 0, "tiles": 0, "slump_tiles": 0, "slump_pixels": 0})
        region["scenes"] += 1
        for key in ("tiles", "slump_tiles", "slump_pixels"):
            region[key] += part[key]
        for path, info in part["shards"].items():
            shards[path] = {**info, "scene_id": part["scene_id"], "region": part["region"]}
        scenes.append({key: value for key, value in part.items() if key not in ("statistics", "fingerprint")}
                      | {"shards": sorted(part["shards"])})
    compression = COMPRESSIONS[settings.compression]
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"rts-tf {rts_tf.__version__}",
        "tile_size": settings.tile_size,
        "overlap": settings.overlap,
        "compression": compression,
        "bands": BANDS,
        "features": features(settings.tile_size, len(BANDS), settings.image_dtype),
        "label_values": LABEL_VALUES,
        "settings": asdict(settings),
        "regions": dict(sorted(regions.items())),
        "scenes": scenes,
        "shards": shards,
        "statistics": {"overall": overall.to_dict(),
                       "regions": {name: stats.to_dict() for name, stats in sorted(by_region.items())}},
    }
