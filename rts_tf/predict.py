"""Prediction: a trained run over whole scenes -> probability and mask COGs -> polygons (GeoPackage)."""

from __future__ import annotations

import contextlib
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
from rasterio.crs import CRS
from rasterio.windows import Window

from rts_tf.errors import InputError, disk_problem, output_error
from rts_tf.inference import Run, StripBlender, check_recipes, choose_threshold, load_run, predict_tiles
from rts_tf.labels import read_polygons, site_of
from rts_tf.rasters import GDAL_CACHE_BYTES
from rts_tf.scene import SceneFiles, SceneSources, find_scenes, scene_grid
from rts_tf.records import write_text
from rts_tf.tiling import tile_offsets
from rts_tf.vectorize import Polygons, polygons_from_rasters, write_polygons

PROBABILITY_NODATA = -1.0
MASK_NODATA = 255
MERGED_NAME = "rts_polygons.gpkg"
WINDOWS_PER_READ = 16  # windows stacked per read: bounds memory, keeps reads large enough to be cheap


@dataclass
class SceneResult:
    scene_id: str
    probability: str
    mask: str
    polygons: str
    km2: float
    slumps: int
    slump_area_m2: float


@dataclass
class PredictSummary:
    out: str
    scenes: list[SceneResult] = field(default_factory=list)
    seconds: float = 0.0
    merged: str = ""
    threshold: float = 0.5
    threshold_source: str = ""

    def lines(self) -> list[str]:
        km2 = sum(s.km2 for s in self.scenes)
        slumps = sum(s.slumps for s in self.scenes)
        area = sum(s.slump_area_m2 for s in self.scenes) / 1e4
        rate = km2 / (self.seconds / 60) if self.seconds else 0.0
        lines = [f"{s.scene_id}: {s.slumps} slumps, {s.slump_area_m2 / 1e4:.2f} ha -> {s.probability}"
                 for s in self.scenes]
        return lines + [f"threshold {self.threshold:.2f} ({self.threshold_source})",
                        f"predicted {len(self.scenes)} scenes, {km2:.1f} km2 in {self.seconds:.0f} s "
                        f"({rate:.1f} km2/min): {slumps} slumps, {area:.2f} ha",
                        f"polygons of all scenes (EPSG:4326): {self.merged}"]


def predict(runs: Sequence[str], scenes: Sequence[str], out: str, tcvis: Sequence[str],
            dem: Sequence[str] | None = None, rel_elevation: Sequence[str] | None = None,
            slope: Sequence[str] | None = None, sites: str | None = None, overlap: int | None = None,
            batch_size: int = 8, flips: bool = False, threshold: float | None = None, min_area: float = 100.0,
            drop_touching: bool = False, overwrite: bool = False, rel_elevation_radius: float | None = None,
            allow_feature_mismatch: bool = False, trust_model: bool = False,
            progress: Callable[[int, int], None] | None = None) -> PredictSummary:
    """Predict slumps over whole scenes with one run or the mean of several (an ensemble).

    The bands are made by the feature recipe the runs' records were built with (run.json); other
    terrain inputs or settings are refused unless allow_feature_mismatch.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    scene_list = find_scenes(scenes)
    for scene in scene_list:
        scene_grid(scene)
    if not runs:
        raise InputError("give at least one --run")
    loaded = [load_run(path, trust_model=trust_model) for path in runs]
    recipe = check_recipes(loaded)
    tile_size = loaded[0].tile_size
    overlap = loaded[0].overlap if overlap is None else overlap
    if not 0 <= overlap < tile_size:
        raise InputError(f"--overlap must be at least 0 and smaller than the tile size ({tile_size}), got {overlap}")
    threshold, threshold_source = choose_threshold(loaded, threshold)
    sources = open_recipe(recipe, tcvis, dem, rel_elevation, slope, rel_elevation_radius, allow_feature_mismatch)
    site_layer = read_polygons(sites, "sites", ("region",)) if sites else None
    out_path = Path(out)
    try:
        for scene in scene_list:
            sources.check(scene)
        prepare_output(out_path, [scene.scene_id for scene in scene_list], overwrite)
        grids = [scene_grid(scene) for scene in scene_list]
        total = sum(len(tile_offsets(g.height, tile_size, overlap)) * len(tile_offsets(g.width, tile_size, overlap))
                    for g in grids)
        summary = PredictSummary(str(out_path), threshold=threshold, threshold_source=threshold_source)
        merged = Polygons(CRS.from_epsg(4326))
        done = 0
        for scene, grid in zip(scene_list, grids):
            def advance(tiles: int) -> None:
                nonlocal done
                done += tiles
                if progress:
                    progress(done, total)

            region = site_of(site_layer, grid)[1] or "" if site_layer is not None else ""
            with cleaned_up(out_path, [scene.scene_id], out_path / scene.scene_id):
                result, polygons = predict_scene(scene, loaded, sources, out_path, overlap, batch_size, flips,
                                                 threshold, min_area, drop_touching, region, advance)
            summary.scenes.append(result)
            merged.extend(polygons.to_crs(CRS.from_epsg(4326)))
        summary.merged = str(out_path / MERGED_NAME)
        with cleaned_up(out_path, [], out_path / MERGED_NAME):
            write_polygons(merged, summary.merged)
    finally:
        sources.close()
    summary.seconds = time.perf_counter() - started
    write_text(out_path / "summary.json", json.dumps({"scenes": [vars(s) for s in summary.scenes],
                                                       "threshold": threshold, "threshold_source": threshold_source,
                                                       "recipe": recipe, "runs": [str(r.path) for r in loaded],
                                                       "seconds": summary.seconds}, indent=1))
    return summary


def open_recipe(recipe: dict, tcvis: Sequence[str], dem: Sequence[str] | None, rel_elevation: Sequence[str] | None,
                slope: Sequence[str] | None, rel_elevation_radius: float | None = None,
                allow_mismatch: bool = False) -> SceneSources:
    """The scene sources that make the bands as the run's records made them."""
    terrain = "dem" if dem else "precomputed"
    radius = recipe["rel_elevation_radius"] if rel_elevation_radius is None else rel_elevation_radius
    changes = []
    if terrain != recipe["terrain"]:
        changes.append(f"terrain from {'a DEM' if terrain == 'dem' else 'precomputed rasters'}, the run's records "
                       f"from {'a DEM' if recipe['terrain'] == 'dem' else 'precomputed rasters'}")
    if radius != recipe["rel_elevation_radius"]:
        changes.append(f"relative-elevation radius {radius} m, the run's records {recipe['rel_elevation_radius']} m")
    if changes and not allow_mismatch:
        raise InputError("these inputs make other bands than the model was trained on (" + "; ".join(changes) +
                         "); give the inputs the records were built from, or --allow-feature-mismatch")
    return SceneSources(tcvis, dem or None, rel_elevation or None, slope or None, rel_elevation_radius=radius,
                        dem_min_valid=recipe["dem_min_valid"], legacy_dtype=recipe.get("image_dtype"))


def output_files(out: Path, scene_ids: list[str], temporary: bool | None = None) -> list[Path]:
    """The files predict writes for these scenes, by name: results (temporary=False), staging and
    temporary files (True), or both (None)."""
    results, temporaries = [out / MERGED_NAME, out / "summary.json"], [out / "rts_polygons.tmp.gpkg",
                                                                       out / "summary.json.tmp"]
    for scene_id in scene_ids:
        folder = out / scene_id
        results += [folder / f"{scene_id}_{kind}.tif" for kind in ("probability", "mask")]
        results.append(folder / f"{scene_id}_polygons.gpkg")
        temporaries += [folder / f"{scene_id}_{kind}.tmp.tif" for kind in ("probability", "mask")]
        temporaries += [folder / f".{kind}.staging.tif" for kind in ("probability", "mask")]
        temporaries.append(folder / f"{scene_id}_polygons.tmp.gpkg")
    return results if temporary is False else temporaries if temporary else results + temporaries


def prepare_output(out: Path, scene_ids: list[str], overwrite: bool) -> None:
    """Refuse to overwrite earlier results unless asked; then remove only predict's own files."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    results = [path for path in output_files(out, scene_ids, temporary=False)
               if path.exists() and path.name != "summary.json"]
    if results and not overwrite:
        raise InputError(f"{out}: already holds results ({results[0].relative_to(out)}); use --overwrite or "
                         "another --out")
    remove_files(output_files(out, scene_ids), out, scene_ids)
    out.mkdir(parents=True, exist_ok=True)


def remove_files(paths: list[Path], out: Path, scene_ids: list[str]) -> None:
    """Delete some of predict's files, and the scene folders that leaves empty."""
    for path in paths:
        path.unlink(missing_ok=True)
    for scene_id in scene_ids:
        folder = out / scene_id
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def cleaned_up(out: Path, scene_ids: list[str], target: Path):
    """On failure remove the staging and temporary files of these scenes; a full or read-only disk
    becomes a one-line error naming `target`."""
    try:
        yield
    except Exception as error:
        remove_files(output_files(out, scene_ids, temporary=True), out, scene_ids)
        if disk_problem(error, target) is None:
            raise
        raise output_error(target, error) from None


def predict_scene(scene: SceneFiles, runs: Sequence[Run], sources: SceneSources, out: Path,
                  overlap: int, batch_size: int, flips: bool, threshold: float, min_area: float, drop_touching: bool,
                  region: str, advance: Callable[[int], None]) -> tuple[SceneResult, Polygons]:
    """Stream one scene through the model in groups of windows along each row of tiles; write COGs
    and polygons."""
    size = runs[0].tile_size
    folder = out / scene.scene_id
    folder.mkdir(parents=True, exist_ok=True)
    names = {kind: folder / f"{scene.scene_id}_{kind}.tif" for kind in ("probability", "mask")}
    staging = {kind: folder / f".{kind}.staging.tif" for kind in names}
    # A small GDAL cache for the whole scene: streaming, COG conversion and vectorising.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), sources.stack(scene) as stack:
        grid = stack.grid
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, crs=grid.crs,
                       transform=grid.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        rows, cols = tile_offsets(grid.height, size, overlap), tile_offsets(grid.width, size, overlap)
        blender = StripBlender(grid.height, grid.width, size)
        # Each row of tiles is read in groups of a few batches, so no buffer grows with the scene.
        per_read = batch_size * max(1, WINDOWS_PER_READ // batch_size)
        groups = [cols[i:i + per_read] for i in range(0, len(cols), per_read)]
        reads = [(index, group) for index in range(len(rows)) for group in groups]

        def read(job: tuple[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
            index, group = job
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):  # GDAL environments are per thread
                return stack.read(rows[index], group[0], size, group[-1] + size - group[0])

        # One reader thread stacks the next group of windows while the model works on this one.
        with rasterio.open(staging["probability"], "w", dtype="float32", nodata=PROBABILITY_NODATA, **profile) as prob_out, \
                rasterio.open(staging["mask"], "w", dtype="uint8", nodata=MASK_NODATA, **profile) as mask_out, \
                ThreadPoolExecutor(1) as reader:
            upcoming = reader.submit(read, reads[0])
            # Windows wait here until a full batch is there, across rows of tiles: every call of
            # the model but the last gets `batch_size` windows.
            pending: list[tuple[int, int, np.ndarray, np.ndarray]] = []
            for number, (index, group) in enumerate(reads):
                image, valid = upcoming.result()
                last = number + 1 == len(reads)
                if not last:
                    upcoming = reader.submit(read, reads[number + 1])
                left = group[0]
                pending += [(rows[index], col, image[:, col - left:col - left + size],
                             valid[:, col - left:col - left + size]) for col in group]
                while len(pending) >= batch_size or (last and pending):
                    batch, pending = pending[:batch_size], pending[batch_size:]
                    probabilities = predict_tiles(runs, np.stack([tile for _, _, tile, _ in batch]), batch_size, flips)
                    for (row, col, _, tile_valid), probability in zip(batch, probabilities):
                        blender.add(row, col, probability, tile_valid)
                    advance(len(batch))
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
        for kind in names:
            to_cog(staging[kind], names[kind], "float32" if kind == "probability" else "uint8")
        polygons = polygons_from_rasters(names["probability"], names["mask"], MASK_NODATA, min_area, drop_touching)
    count = len(polygons)
    polygons.attributes.update(scene_id=[scene.scene_id] * count, image_date=[scene.image_date] * count,
                               region=[region] * count)
    polygon_path = folder / f"{scene.scene_id}_polygons.gpkg"
    write_polygons(polygons, polygon_path)
    km2 = grid.width * grid.height * abs(grid.transform.a * grid.transform.e) / 1e6
    return SceneResult(scene.scene_id, str(names["probability"]), str(names["mask"]), str(polygon_path), km2,
                       count, float(sum(polygons.attributes["area_m2"]))), polygons


def to_cog(staging: Path, path: Path, dtype: str) -> None:
    """Convert a tiled GeoTIFF into a Cloud-Optimised GeoTIFF (internal overviews), atomically."""
    temporary = path.with_name(path.stem + ".tmp.tif")
    resampling = "AVERAGE" if dtype == "float32" else "NEAREST"
    rasterio.shutil.copy(staging, temporary, driver="COG", COMPRESS="DEFLATE", OVERVIEWS="AUTO",
                         RESAMPLING=resampling, BLOCKSIZE=512)
    os.replace(temporary, path)
    staging.unlink()
