"""Prediction: a trained run over whole scenes -> probability and mask COGs -> polygons -> the run's products."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from rts_tf.bands import BAND_NAMES, band_sources
from rts_tf.engine import ENGINES, failures_message, local_jobs
from rts_tf.errors import InputError, disk_problem, output_error
from rts_tf.inference import Run, StripBlender, check_recipes, choose_threshold, load_run, predict_tiles
from rts_tf.labels import read_polygons, site_of
from rts_tf.rasters import GDAL_CACHE_BYTES
from rts_tf.scene import SceneFiles, SceneSources, find_scenes, recipe_sensors, scene_grid, sensor_warning
from rts_tf.settings import SensorSettings
from rts_tf.records import attempt_id, write_json, write_text
from rts_tf.tiling import tile_offsets
from rts_tf.products import MERGED_NAME, MOSAIC_STEM, PARQUET_NAMES, PERIODS, MASK_STYLE, Products, SceneProduct, \
    extent_layer, probability_style, quicklook, run_products, valid_extent, write_raster_style
from rts_tf.vectorize import Polygons, polygons_from_rasters, probability_statistics, write_polygons
from rts_tf.locks import locks_folder
from rts_tf.stacking import WINDOWS_PER_READ, Stackers, column_groups, default_readers, read_order, thread_stacked

PROBABILITY_NODATA = -1.0
MASK_NODATA = 255
COMPLETE_SUFFIX = "_complete.json"  # OUT/<scene_id>/<scene_id>_complete.json: the scene's completion marker


@dataclass
class SceneResult:
    scene_id: str
    probability: str
    mask: str
    polygons: str
    km2: float
    slumps: int
    slump_area_m2: float
    valid_km2: float = 0.0  # area of the scene's valid pixels
    complete_before: bool = False  # skipped: complete from an earlier command with the same settings
    quicklook: str = ""
    sensor: str = ""
    image_date: str = ""


@dataclass
class PredictSummary:
    out: str
    scenes: list[SceneResult] = field(default_factory=list)
    seconds: float = 0.0
    merged: str = ""
    threshold: float = 0.5
    threshold_source: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # scene_id -> why it failed (one line)
    sensors: dict[str, int] = field(default_factory=dict)  # scenes per sensor profile
    sensor_given: bool = False  # chosen with --sensor, else detected from the files
    warnings: list[str] = field(default_factory=list)  # another sensor than the model's, no SCL, ...
    products: Products = field(default_factory=Products)
    engine: str = "local (this process)"  # how the scenes were predicted (engine_description)

    def lines(self) -> list[str]:
        km2 = sum(s.km2 for s in self.scenes)
        slumps = sum(s.slumps for s in self.scenes)
        area = sum(s.slump_area_m2 for s in self.scenes) / 1e4
        computed = [s for s in self.scenes if not s.complete_before]
        rate = sum(s.km2 for s in computed) / (self.seconds / 60) if self.seconds else 0.0
        products = self.products
        merged = (f"{products.merged} merged polygons (per {products.period}), " if products.period != "none"
                  else "")
        lines = [f"{s.scene_id}: {s.slumps} slumps, {s.slump_area_m2 / 1e4:.2f} ha -> {s.probability}"
                 + (" (already complete)" if s.complete_before else "") for s in self.scenes]
        skipped = len(self.scenes) - len(computed)
        return lines + [f"threshold {self.threshold:.2f} ({self.threshold_source})",
                        f"predicted {len(self.scenes)} scenes"
                        + (f" ({len(computed)} now, {skipped} already complete)" if skipped else "")
                        + f", {km2:.1f} km2 in {self.seconds:.0f} s"
                        + (f" ({rate:.1f} km2/min)" if computed else "") + f": {slumps} slumps, {area:.2f} ha",
                        f"polygons of all scenes (EPSG:4326): {self.merged}: {products.detections} detections, "
                        f"{merged}valid extents; GeoParquet: "
                        + (", ".join(Path(path).name for path in products.parquet.values()) or "none"),
                        "probability mosaic (open in QGIS): " + (", ".join(products.mosaics) or "none"),
                        f"STAC catalog: {products.catalog or 'none'}",
                        f"engine: {self.engine}",
                        "sensors: " + ", ".join(f"{name} {count}" for name, count in sorted(self.sensors.items()))
                        + f" ({'--sensor' if self.sensor_given else 'detected from the files'})",
                        *(f"warning: {warning}" for warning in self.warnings)]

    def failure_message(self) -> str:
        return failures_message(self.failed, len(self.failed) + len(self.scenes), "scenes",
                                f"{len(self.scenes)} predicted and kept, in {self.merged or 'no merged file'}; fix "
                                "or remove the failed scenes and run the command again: finished scenes are skipped")


@dataclass
class PredictOptions:
    """What predicting a scene needs besides the scene: everything a predicting process (this one,
    or a Ray actor elsewhere) loads or opens once."""

    runs: list[str]
    out: str
    tcvis: list[str]
    dem: list[str] | None
    rel_elevation: list[str] | None
    slope: list[str] | None
    recipe: dict
    rel_elevation_radius: float | None
    allow_feature_mismatch: bool
    trust_model: bool
    overlap: int
    batch_size: int
    flips: bool
    threshold: float
    min_area: float
    drop_touching: bool
    tags: dict = field(default_factory=dict)  # GeoTIFF tags of the COGs: model, threshold, bands, version
    readers: int = 0  # stacking processes of each predicting process (0: one thread of it)


@dataclass
class SceneTask:
    """One scene to predict: its files, its region (for the polygons) and what its results depend on."""

    scene: SceneFiles
    region: str
    fingerprint: dict


class ScenePredictor:
    """Loads the runs and opens the feature recipe once, starts its stacking processes
    (options.readers); predicts the scenes it is given (`predictor(task, advance)`), each ending
    with its completion marker. `close()` stops the stacking processes."""

    def __init__(self, options: PredictOptions, threads: int | None = None, runs: Sequence[Run] | None = None,
                 sources: SceneSources | None = None, stackers: Stackers | None = None):
        if threads:  # a Ray actor given `threads` CPUs: TensorFlow would take every core of the node
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
        self.options = options
        self.runs = list(runs) if runs is not None else [load_run(path, trust_model=options.trust_model)
                                                         for path in options.runs]
        self.sources = sources if sources is not None else open_recipe(
            options.recipe, options.tcvis, options.dem, options.rel_elevation, options.slope,
            options.rel_elevation_radius, options.allow_feature_mismatch)
        # Stacking processes started by the caller (ahead of loading the models), else its own.
        self.own_stackers = stackers is None and options.readers > 0
        stackers = Stackers(options.readers) if self.own_stackers else stackers
        self.stackers = stackers.open(self.sources) if stackers is not None and stackers.count else None

    def close(self) -> None:
        if self.stackers is not None and self.own_stackers:
            self.stackers.close()
        self.stackers = None

    def __enter__(self) -> "ScenePredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, task: SceneTask, advance: Callable[[int], None]) -> dict:
        options, scene = self.options, task.scene
        out = Path(options.out)
        attempt = attempt_id()
        with cleaned_up(out / scene.scene_id, attempt):
            result, _ = predict_scene(scene, self.runs, self.sources, out, options.overlap, options.batch_size,
                                      options.flips, options.threshold, options.min_area, options.drop_touching,
                                      task.region, advance, attempt, options.tags, self.stackers)
        # The completion marker, written last: a scene without it is recomputed.
        write_json(complete_path(out, scene.scene_id), {"fingerprint": task.fingerprint, "result": vars(result)},
                   unique=True)
        return vars(result)


@locks_folder("out", "--out")
def predict(runs: Sequence[str], scenes: Sequence[str], out: str, tcvis: Sequence[str],
            dem: Sequence[str] | None = None, rel_elevation: Sequence[str] | None = None,
            slope: Sequence[str] | None = None, sites: str | None = None, overlap: int | None = None,
            batch_size: int = 8, flips: bool = False, threshold: float | None = None, min_area: float = 100.0,
            drop_touching: bool = False, overwrite: bool = False, rel_elevation_radius: float | None = None,
            allow_feature_mismatch: bool = False, trust_model: bool = False,
            progress: Callable[[int, int], None] | None = None, engine: str = "local",
            workers: int = 1, sensor: SensorSettings = SensorSettings(), merge_period: str = "year",
            readers: int | None = None) -> PredictSummary:
    """Predict slumps over whole scenes with one run or the mean of several (an ensemble).

    The bands are made by the feature recipe the runs' records were built with (run.json); other
    terrain inputs or settings are refused unless allow_feature_mismatch. Scenes whose results are
    complete (their marker) with the same settings are skipped; results of other settings are
    refused unless overwrite, which recomputes them. engine "local" predicts in this process,
    "ray" in Ray actors (one per GPU, or per `workers` CPUs). A scene whose input fails does not
    stop the others: the summary lists it in `failed`. `sensor` chooses the sensor profile that
    reads the scenes (default: detected); a scene of another sensor than the runs' records warns.
    The run's products (products.run_products) merge overlapping detections per `merge_period`
    ("year", "all" or "none"). `readers` processes per predicting process stack the windows ahead
    of the model (default: stacking.default_readers(); 0: one thread of the predicting process).
    """
    if readers is not None and readers < 0:
        raise InputError(f"--readers must be 0 or more, got {readers}")
    with Stackers() as stackers:  # started once the scenes are known, stopped however predict ends
        return predict_with(runs, scenes, out, tcvis, dem, rel_elevation, slope, sites, overlap, batch_size, flips,
                            threshold, min_area, drop_touching, overwrite, rel_elevation_radius, allow_feature_mismatch,
                            trust_model, progress, engine, workers, sensor, merge_period, readers, stackers)


def predict_with(runs: Sequence[str], scenes: Sequence[str], out: str, tcvis: Sequence[str],
                 dem: Sequence[str] | None, rel_elevation: Sequence[str] | None, slope: Sequence[str] | None,
                 sites: str | None, overlap: int | None, batch_size: int, flips: bool, threshold: float | None,
                 min_area: float, drop_touching: bool, overwrite: bool, rel_elevation_radius: float | None,
                 allow_feature_mismatch: bool, trust_model: bool, progress: Callable[[int, int], None] | None,
                 engine: str, workers: int, sensor: SensorSettings, merge_period: str, readers: int | None,
                 stackers: Stackers) -> PredictSummary:
    """predict(), whose stacking processes for the local engine `stackers` starts."""
    started = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if merge_period not in PERIODS:
        raise InputError(f"--merge-period must be one of {', '.join(PERIODS)}, got {merge_period}")
    scene_list = find_scenes(scenes, sensor)
    pixels = 0
    for scene in scene_list:
        grid = scene_grid(scene)
        pixels += grid.width * grid.height
    if readers is None:
        readers = default_readers(pixels)
    if engine == "local":  # started now, they import while this process imports TensorFlow and loads the models
        stackers.start(readers)
    if not runs:
        raise InputError("give at least one --run")
    # With Ray the models are loaded by the actors: this process only checks the run folders.
    loaded = [load_run(path, trust_model=trust_model, with_model=engine == "local") for path in runs]
    recipe = check_recipes(loaded)
    tile_size = loaded[0].tile_size
    overlap = loaded[0].overlap if overlap is None else overlap
    if not 0 <= overlap < tile_size:
        raise InputError(f"--overlap must be at least 0 and smaller than the tile size ({tile_size}), got {overlap}")
    threshold, threshold_source = choose_threshold(loaded, threshold)
    sources = open_recipe(recipe, tcvis, dem, rel_elevation, slope, rel_elevation_radius, allow_feature_mismatch)
    site_layer = read_polygons(sites, "sites", ("region",)) if sites else None
    out_path = Path(out)
    options = PredictOptions([str(run.path) for run in loaded], str(out_path), list(tcvis), list(dem or []) or None,
                             list(rel_elevation or []) or None, list(slope or []) or None, recipe,
                             rel_elevation_radius, allow_feature_mismatch, trust_model, overlap, batch_size, flips,
                             threshold, min_area, drop_touching, cog_tags(loaded, threshold, threshold_source),
                             readers)
    try:
        grids = {}
        for scene in scene_list:
            grids[scene.scene_id] = scene_grid(scene)
            sources.check(scene, grids[scene.scene_id])
        shared = shared_inputs(loaded, sources)
        tasks = [SceneTask(scene, site_of(site_layer, grids[scene.scene_id])[1] or "" if site_layer is not None else "",
                           {}) for scene in scene_list]
        for task in tasks:
            task.fingerprint = scene_fingerprint(task, options, shared)
        done_before = {} if overwrite else completed_scenes(out_path, tasks)
        prepare_output(out_path, [scene.scene_id for scene in scene_list], overwrite)
        todo = [task for task in tasks if task.scene.scene_id not in done_before]
        total = sum(len(tile_offsets(grid.height, tile_size, overlap)) * len(tile_offsets(grid.width, tile_size, overlap))
                    for grid in (grids[task.scene.scene_id] for task in todo))
        done = 0

        def advance(tiles: int) -> None:
            nonlocal done
            done += tiles
            if progress:
                progress(done, total)

        keys = [task.scene.scene_id for task in todo]
        results: dict[str, dict] = {}
        summary = PredictSummary(str(out_path), threshold=threshold, threshold_source=threshold_source,
                                 sensor_given=sensor.sensor is not None)
        summary.warnings += run_warnings(loaded)
        summary.engine = engine_description(engine, workers, len(todo))
        for scene in scene_list:
            summary.sensors[scene.sensor] = summary.sensors.get(scene.sensor, 0) + 1
            mismatch = sensor_warning(scene, recipe_sensors(recipe))
            summary.warnings += [*scene.warnings, *([mismatch] if mismatch else [])]
        for result in run_predictions(options, todo, keys, loaded, sources, engine, workers, advance, stackers):
            if result.error is None:
                results[result.key] = result.result
            else:
                summary.failed[result.key] = result.error
        # Every scene has ended: temporaries left now are of attempts that died (a killed worker).
        remove_temporaries(out_path, [scene.scene_id for scene in scene_list])
    finally:
        sources.close()
    # The run's products are made here from the scenes' own files, in the scenes' order.
    products = []
    for scene in scene_list:
        scene_id = scene.scene_id
        if scene_id in done_before or scene_id in results:
            result = done_before[scene_id] if scene_id in done_before else SceneResult(**results[scene_id])
            summary.scenes.append(result)
            if result.valid_km2 and result.slump_area_m2 / 1e6 > MAX_SLUMP_SHARE * result.valid_km2:
                summary.warnings.append(
                    f"{scene_id}: {result.slump_area_m2 / 1e4:.1f} ha predicted as slumps, over half of the scene's "
                    f"{result.valid_km2 * 100:.1f} ha of valid pixels: the model (or its threshold "
                    f"{threshold:.2f}) does not fit this scene")
            products.append(SceneProduct(scene_id, scene.sensor, scene.image_date, result.probability, result.mask,
                                         result.polygons, result.quicklook))
    summary.merged = str(out_path / MERGED_NAME)
    try:
        summary.products = run_products(out_path, products, merge_period, threshold, options.tags)
    except Exception as error:
        if disk_problem(error, summary.merged) is None:
            raise
        raise output_error(summary.merged, error) from None
    summary.seconds = time.perf_counter() - started
    write_text(out_path / "summary.json", json.dumps({"scenes": [vars(s) for s in summary.scenes],
                                                       "failed": summary.failed,
                                                       "threshold": threshold, "threshold_source": threshold_source,
                                                       "recipe": recipe, "runs": [str(r.path) for r in loaded],
                                                       "merge_period": merge_period,
                                                       "products": vars(summary.products),
                                                       "seconds": summary.seconds}, indent=1))
    return summary


# A scene whose valid area is predicted more than half slump: a model that does not fit it, not slumps.
MAX_SLUMP_SHARE = 0.5


def run_warnings(runs: Sequence[Run]) -> list[str]:
    """Warnings about runs that were selected on nothing: a best validation IoU of 0."""
    return [f"{run.path}: its best validation IoU is 0 (the model found no slump in its validation data), so its "
            "epoch and threshold were chosen on nothing; its maps are unlikely to mean much"
            for run in runs if not (run.info.get("metrics") or {}).get("iou", 1.0)]


def engine_description(engine: str, workers: int, scenes: int) -> str:
    """How the scenes were predicted, for the summary: whether Ray was used, and where."""
    if engine == "local":
        return "local (this process)"
    if not scenes:
        return "ray, not started (every scene was complete)"
    where = f"the cluster of RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") \
        else "an embedded one-machine Ray"
    return f"ray ({scenes} scenes in Ray actors on {where}; one actor per GPU, else per {workers} CPUs)"


def cog_tags(runs: Sequence[Run], threshold: float, threshold_source: str) -> dict[str, str]:
    """GeoTIFF metadata of the COGs (and properties of the STAC items): which model, threshold and
    bands made them, by which rts-tf."""
    import rts_tf

    models = [f"{run.info.get('arch', '?')}-{run.info.get('encoder', '?')} ({run.path.resolve()})" for run in runs]
    return {"RTS_MODEL": "; ".join(models), "RTS_THRESHOLD": f"{threshold:g}", "RTS_THRESHOLD_SOURCE": threshold_source,
            "RTS_BANDS": ",".join(runs[0].bands), "RTS_TF_VERSION": rts_tf.__version__}


def run_predictions(options: PredictOptions, todo: list[SceneTask], keys: list[str], loaded: list[Run],
                    sources: SceneSources, engine: str, workers: int, advance: Callable[[int], None],
                    stackers: Stackers | None = None):
    """Each scene's Outcome as it finishes: in this process (its windows stacked by `stackers`), or
    in Ray actors that each load the runs once (one actor per GPU, or per `workers` CPUs without
    GPUs) and start their own stacking processes."""
    if not todo:
        return
    if engine == "local":
        with ScenePredictor(options, runs=loaded, sources=sources, stackers=stackers) as predictor:
            yield from local_jobs(predictor, todo, keys, advance)
        return
    from rts_tf.engine import cluster_cpus, cluster_gpus, ray_actors, ray_session

    with ray_session(workers) as ray:
        gpus = cluster_gpus(ray)
        if gpus:
            actors, resources, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, None
        else:
            actors, resources, threads = max(1, cluster_cpus(ray) // workers), {"num_cpus": workers}, workers
        yield from ray_actors(ray, ScenePredictor, (options, threads), todo, keys, actors, resources, advance,
                              label="predict_scene")


def file_state(path: str | os.PathLike | None) -> list | None:
    """A file's identity for fingerprints: resolved path, size and modification time."""
    if path is None:
        return None
    info = os.stat(path)
    return [str(Path(path).resolve()), info.st_size, info.st_mtime_ns]


def shared_inputs(runs: Sequence[Run], sources: SceneSources) -> str:
    """A digest of the inputs every scene shares: the runs' files and the auxiliary rasters."""
    files = [file_state(run.path / "run.json") for run in runs]
    files += [file_state(run.path / str(run.info.get("model", "model.keras"))) for run in runs]
    files += [file_state(run.path / str(run.info["export"].get("file"))) for run in runs  # an exported package
              if isinstance(run.info.get("export"), dict)]
    files += [file_state(path) for source in sources.sources for path in source.paths]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def scene_fingerprint(task: SceneTask, options: PredictOptions, shared: str) -> dict:
    """What a scene's results depend on: settings (other settings are refused without --overwrite)
    and inputs (changed input files are recomputed)."""
    settings = {"runs": [str(Path(run).resolve()) for run in options.runs], "overlap": options.overlap,
                "flips": options.flips, "threshold": options.threshold, "min_area": options.min_area,
                "drop_touching": options.drop_touching, "rel_elevation_radius": options.rel_elevation_radius,
                "terrain": "dem" if options.dem else "precomputed"}
    inputs = {"scene": [file_state(path) for path in task.scene.files], "sensor": task.scene.reflectance(),
              "bands": [[str(path), band] for path, band in task.scene.bands], "shared": shared,
              "region": task.region, "mask_ignore": sorted(int(value) for value in task.scene.mask_ignore)}
    return {"settings": settings, "inputs": inputs}


def complete_path(out: Path, scene_id: str) -> Path:
    return out / scene_id / f"{scene_id}{COMPLETE_SUFFIX}"


def completed_scenes(out: Path, tasks: Sequence[SceneTask]) -> dict[str, SceneResult]:
    """Scenes whose results are complete with the same settings and inputs (to skip). Results of
    other settings are refused (the caller's --overwrite replaces them); changed inputs are redone."""
    complete, conflicts = {}, []
    for task in tasks:
        scene_id = task.scene.scene_id
        try:
            marker = json.loads(complete_path(out, scene_id).read_text())
            fingerprint, result = marker["fingerprint"], SceneResult(**{**marker["result"], "complete_before": True})
        except (OSError, ValueError, TypeError, KeyError):
            continue  # no marker (never finished) or unreadable: the scene is predicted again
        if fingerprint.get("settings") != task.fingerprint["settings"]:
            before = fingerprint.get("settings") or {}
            conflicts.append((scene_id, sorted(k for k in task.fingerprint["settings"]
                                               if before.get(k) != task.fingerprint["settings"][k])))
        elif fingerprint.get("inputs") == task.fingerprint["inputs"] and all(
                Path(path).exists() for path in (result.probability, result.mask, result.polygons)):
            complete[scene_id] = result
    if conflicts:
        scene_id, keys = conflicts[0]
        more = f" (and {len(conflicts) - 1} more scenes)" if len(conflicts) > 1 else ""
        raise InputError(f"{out}: already holds results of scene {scene_id}{more} made with other settings "
                         f"({', '.join(keys)}); use --overwrite to replace them or another --out")
    return complete


def open_recipe(recipe: dict, tcvis: Sequence[str], dem: Sequence[str] | None, rel_elevation: Sequence[str] | None,
                slope: Sequence[str] | None, rel_elevation_radius: float | None = None,
                allow_mismatch: bool = False) -> SceneSources:
    """The scene sources that make the runs' bands (the recipe's `bands`, see check_recipes) as the
    run's records made them; only the sources of those bands are needed (no TCVIS for a model without it)."""
    bands = recipe.get("bands") or BAND_NAMES
    # (without any terrain input SceneSources names the missing option)
    uses_terrain = "terrain" in band_sources(bands) and bool(dem or rel_elevation or slope)
    terrain = "dem" if dem else "precomputed"
    radius = recipe["rel_elevation_radius"] if rel_elevation_radius is None else rel_elevation_radius
    changes = []
    if uses_terrain and terrain != recipe["terrain"]:
        changes.append(f"terrain from {'a DEM' if terrain == 'dem' else 'precomputed rasters'}, the run's records "
                       f"from {'a DEM' if recipe['terrain'] == 'dem' else 'precomputed rasters'}")
    if uses_terrain and radius != recipe["rel_elevation_radius"]:
        changes.append(f"relative-elevation radius {radius} m, the run's records {recipe['rel_elevation_radius']} m")
    if changes and not allow_mismatch:
        raise InputError("these inputs make other bands than the model was trained on (" + "; ".join(changes) +
                         "); give the inputs the records were built from, or --allow-feature-mismatch")
    return SceneSources(tcvis or None, dem or None, rel_elevation or None, slope or None, rel_elevation_radius=radius,
                        dem_min_valid=recipe["dem_min_valid"], legacy_dtype=recipe.get("image_dtype"), bands=bands)


def output_files(out: Path, scene_ids: list[str], temporary: bool | None = None) -> list[Path]:
    """The files predict writes for these scenes that exist, by name: results and completion markers
    (temporary=False), staging and temporary files of any attempt (True), or both (None)."""
    results = [out / MERGED_NAME, out / "summary.json", out / "collection.json",
               *(out / name for name in PARQUET_NAMES.values()), *out.glob(f"{MOSAIC_STEM}*.vrt"),
               *out.glob(f"{MOSAIC_STEM}*.qml")]
    patterns = ["rts_polygons.tmp.gpkg*", "rts_polygons.*.tmp.gpkg*", "summary.json.tmp", "summary.json.*.tmp",
                "rts_*.*.tmp.parquet", f"{MOSAIC_STEM}*.vrt.tmp", f"{MOSAIC_STEM}*.qml.tmp", "collection.json.tmp"]
    temporaries = [path for pattern in patterns for path in out.glob(pattern)]
    for scene_id in scene_ids:
        folder = out / scene_id
        results += [folder / f"{scene_id}_{kind}.tif" for kind in ("probability", "mask")]
        results += [folder / f"{scene_id}_polygons.gpkg", complete_path(out, scene_id)]
        results += [folder / f"{scene_id}_{kind}.qml" for kind in ("probability", "mask")]
        results += [folder / f"{scene_id}_quicklook.png", folder / f"{scene_id}.json"]  # the STAC item
        # `<name>.tmp.<ext>` of earlier versions, `<name>.<attempt>.tmp.<ext>` now
        patterns = [f"{scene_id}_probability*.tmp.tif", f"{scene_id}_mask*.tmp.tif", ".probability*.staging.tif",
                    ".mask*.staging.tif", f"{scene_id}_polygons*.tmp.gpkg*", f"{scene_id}{COMPLETE_SUFFIX}.*.tmp",
                    f"{scene_id}_quicklook.*.tmp.png", f"{scene_id}_*.qml.tmp", f"{scene_id}.json.tmp"]
        if folder.is_dir():
            temporaries += [path for pattern in patterns for path in folder.glob(pattern)]
    results = [path for path in results if path.exists()]
    return results if temporary is False else temporaries if temporary else results + temporaries


def prepare_output(out: Path, scene_ids: list[str], overwrite: bool) -> None:
    """Create the folder; with overwrite remove the results of these scenes (only predict's own
    files, by name); remove temporaries of earlier attempts."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not holds_predictions(out):
        raise InputError(f"{out}: folder is not empty and holds no rts-tf predictions (no summary.json, "
                         f"{MERGED_NAME} or scene results); choose a new or empty --out (nothing was changed)")
    if overwrite and out.is_dir():
        remove_files(output_files(out, scene_ids), out, scene_ids)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, scene_ids)


def holds_predictions(out: Path) -> bool:
    """True when a folder holds predict's files: the run's products, or a scene folder with its
    results or the staging files of an interrupted attempt (`<scene_id>/<scene_id>_probability*`)."""
    if (out / "summary.json").exists() or (out / MERGED_NAME).exists():
        return True
    patterns = [f"{kind}*" for kind in ("_probability", "_mask", "_polygons", COMPLETE_SUFFIX[:-5])]
    return any(folder.is_dir() and (any(any(folder.glob(folder.name + pattern)) for pattern in patterns)
                                    or any(folder.glob(".probability*.staging.tif")))
               for folder in out.iterdir())


def remove_temporaries(out: Path, scene_ids: list[str]) -> None:
    """Delete temporaries of earlier attempts. Only this process calls it, before and after all
    scenes of a command, never a scene's job: a job that may run twice must not delete its other
    attempt's files."""
    remove_files(output_files(out, scene_ids, temporary=True), out, scene_ids)


def remove_files(paths: list[Path], out: Path, scene_ids: list[str]) -> None:
    """Delete some of predict's files, and the scene folders that leaves empty."""
    for path in paths:
        path.unlink(missing_ok=True)
    for scene_id in scene_ids:
        folder = out / scene_id
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def cleaned_up(folder: Path, attempt: str):
    """On failure, Ctrl-C or SIGTERM remove the staging and temporary files of this attempt (never
    another's); a full or read-only disk becomes a one-line error naming `folder`."""
    try:
        yield
    except BaseException as error:
        for path in folder.glob(f"*.{attempt}.*"):
            path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if not isinstance(error, Exception) or disk_problem(error, folder) is None:
            raise
        raise output_error(folder, error) from None


def predict_scene(scene: SceneFiles, runs: Sequence[Run], sources: SceneSources, out: Path,
                  overlap: int, batch_size: int, flips: bool, threshold: float, min_area: float, drop_touching: bool,
                  region: str, advance: Callable[[int], None],
                  attempt: str | None = None, tags: dict | None = None,
                  stackers: Stackers | None = None) -> tuple[SceneResult, Polygons]:
    """Stream one scene through the model in groups of windows along each row of tiles, stacked
    by `stackers` (worker processes) or else by a thread of this process; write COGs (with `tags`)
    and their QGIS styles, polygons with probability statistics and the valid extent, and a
    quick-look PNG."""
    size = runs[0].tile_size
    folder = out / scene.scene_id
    folder.mkdir(parents=True, exist_ok=True)
    names = {kind: folder / f"{scene.scene_id}_{kind}.tif" for kind in ("probability", "mask")}
    attempt = attempt or attempt_id()  # every temporary name carries it: two attempts never share one
    staging = {kind: folder / f".{kind}.{attempt}.staging.tif" for kind in names}
    # A small GDAL cache for the whole scene: streaming, COG conversion and vectorising.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), sources.stack(scene) as stack:
        grid = stack.grid
        # The staging files are uncompressed (5 bytes a pixel while the scene is predicted): they
        # are read once, by the COG conversion, and compressing them twice cost a second per 4096 px scene.
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, crs=grid.crs,
                       transform=grid.transform, tiled=True, blockxsize=512, blockysize=512)
        rows, cols = tile_offsets(grid.height, size, overlap), tile_offsets(grid.width, size, overlap)
        blender = StripBlender(grid.height, grid.width, size)
        # Each row of tiles is read in groups of a few batches, so no buffer grows with the scene.
        per_read = batch_size * max(1, WINDOWS_PER_READ // batch_size)
        groups = column_groups(cols, per_read, stackers.count if stackers else 1)
        reads = read_order(rows, groups)
        valid_pixels = 0
        # The stacking processes (or a thread) stack the next groups of windows while the model works on this one.
        stacked = stackers.stacked(scene, rows, groups, size, len(stack.bands)) if stackers else \
            thread_stacked(stack, rows, groups, size)
        with rasterio.open(staging["probability"], "w", dtype="float32", nodata=PROBABILITY_NODATA, **profile) as prob_out, \
                rasterio.open(staging["mask"], "w", dtype="uint8", nodata=MASK_NODATA, **profile) as mask_out, \
                contextlib.closing(stacked):
            for dataset, description in ((prob_out, "slump probability"), (mask_out, "slump mask")):
                dataset.update_tags(**(tags or {}))  # the COG conversion copies them
                dataset.set_band_description(1, description)
            # Windows wait here until a full batch is there, across rows of tiles: every call of
            # the model but the last gets `batch_size` windows.
            pending: list[tuple[int, int, np.ndarray, np.ndarray]] = []
            for number, ((index, group), (image, valid)) in enumerate(zip(reads, stacked)):
                last = number + 1 == len(reads)
                left = group[0]
                pending += [(rows[index], col, image[:, col - left:col - left + size],
                             valid[:, col - left:col - left + size]) for col in group]
                while len(pending) >= batch_size or (last and pending):
                    batch, pending = pending[:batch_size], pending[batch_size:]
                    probabilities = predict_tiles(runs, np.stack([tile for _, _, tile, _ in batch]), batch_size, flips,
                                                  band_names=stack.bands)
                    for (row, col, _, tile_valid), probability in zip(batch, probabilities):
                        blender.add(row, col, probability, tile_valid)
                    advance(len(batch))
                # Windows left for the next batch are copied: the stacked arrays may be reused.
                new = min(len(pending), len(group))
                pending[len(pending) - new:] = [(row, col, tile.copy(), tile_valid.copy())
                                                for row, col, tile, tile_valid in pending[len(pending) - new:]]
                image = valid = None
                # Rows above the next window still to be blended are final.
                boundary = pending[0][0] if pending else grid.height if last else rows[reads[number + 1][0]]
                first, probability, usable, _ = blender.pop(boundary)
                if len(probability):
                    usable = usable.astype(bool)
                    window = Window(0, first, grid.width, len(probability))
                    prob_out.write(np.where(usable, probability, PROBABILITY_NODATA).astype(np.float32)[None],
                                   window=window)
                    mask_out.write(np.where(usable, probability >= threshold, MASK_NODATA).astype(np.uint8)[None],
                                   window=window)
                    valid_pixels += int(np.count_nonzero(usable))
        # Both conversions at once: GDAL compresses without holding Python's lock.
        with ThreadPoolExecutor(len(names)) as converters:
            for done in [converters.submit(to_cog, staging[kind], names[kind],
                                           "float32" if kind == "probability" else "uint8", attempt) for kind in names]:
                done.result()
        polygons = polygons_from_rasters(names["probability"], names["mask"], MASK_NODATA, min_area, drop_touching)
        probability_statistics(polygons, names["probability"])
        extent = extent_layer(valid_extent(names["probability"]), grid.crs, scene.scene_id, scene.sensor,
                              scene.image_date)
    count = len(polygons)
    polygons.attributes.update(scene_id=[scene.scene_id] * count, sensor=[scene.sensor] * count,
                               image_date=[scene.image_date] * count, region=[region] * count)
    polygon_path = folder / f"{scene.scene_id}_polygons.gpkg"
    write_polygons(polygons, polygon_path, temporary_id=attempt, more_layers={"extent": extent}, styles=True)
    write_raster_style(names["probability"], probability_style(threshold))
    write_raster_style(names["mask"], MASK_STYLE)
    look = folder / f"{scene.scene_id}_quicklook.png"
    quicklook(scene, names["probability"], polygons, look, threshold)
    pixel_km2 = abs(grid.transform.a * grid.transform.e) / 1e6
    return SceneResult(scene.scene_id, str(names["probability"]), str(names["mask"]), str(polygon_path),
                       grid.width * grid.height * pixel_km2, count, float(sum(polygons.attributes["area_m2"])),
                       valid_km2=valid_pixels * pixel_km2, quicklook=str(look), sensor=scene.sensor,
                       image_date=scene.image_date), polygons


def to_cog(staging: Path, path: Path, dtype: str, attempt: str) -> None:
    """Convert a tiled GeoTIFF into a Cloud-Optimised GeoTIFF (internal overviews), atomically."""
    temporary = path.with_name(f"{path.stem}.{attempt}.tmp.tif")
    resampling = "AVERAGE" if dtype == "float32" else "NEAREST"
    rasterio.shutil.copy(staging, temporary, driver="COG", COMPRESS="DEFLATE", OVERVIEWS="AUTO",
                         RESAMPLING=resampling, BLOCKSIZE=512)
    os.replace(temporary, path)
    staging.unlink()
