"""Prediction: a trained run over whole scenes -> probability and mask COGs -> polygons (GeoPackage)."""

from __future__ import annotations

import json
import os
import shutil
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

from rts_tf.errors import InputError
from rts_tf.labels import read_polygons, site_of
from rts_tf.rasters import GDAL_CACHE_BYTES, RasterSource
from rts_tf.scene import BAND_NAMES, SceneFiles, SceneStack, Terrain, find_scenes, scene_grid
from rts_tf.tiling import tile_offsets
from rts_tf.vectorize import Polygons, polygons_from_rasters, write_polygons

PROBABILITY_NODATA = -1.0
MASK_NODATA = 255
MERGED_NAME = "rts_polygons.gpkg"
WINDOWS_PER_READ = 16  # windows stacked per read: bounds memory, keeps reads large enough to be cheap


@dataclass
class Run:
    """A trained run as prediction needs it: the model and what travels with it."""

    path: Path
    model: object
    tile_size: int
    bands: list[str]
    threshold: float


def load_run(path: str | os.PathLike) -> Run:
    """Load run.json and model.keras from a run folder, with clear errors for incomplete runs."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: run folder not found")
    run_file = path / "run.json"
    if not run_file.exists():
        raise InputError(f"{path}: no run.json (is the run finished? `rts-tf fit` writes it at the end)")
    try:
        run = json.loads(run_file.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{run_file}: unreadable: {error}") from None
    model_file = path / run.get("model", "model.keras")
    if not model_file.exists():
        raise InputError(f"{path}: no model file {model_file.name}")
    from rts_tf.models import load_model

    try:
        model = load_model(model_file)
    except Exception as error:  # Keras raises many kinds for broken files
        raise InputError(f"{model_file}: cannot load the model: {str(error).splitlines()[0]}") from None
    return Run(path, model, int(run["tile_size"]), [b["name"] for b in run["bands"]],
               float(run.get("threshold", 0.5)))


def window_weights(size: int, floor: float = 1e-3) -> np.ndarray:
    """A 2-D blending window (squared sine in each direction) so that overlapping predictions fade
    into each other without seams; a small floor keeps scene edges covered."""
    ramp = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.maximum(np.outer(ramp, ramp), floor).astype(np.float32)


def predict_tiles(runs: Sequence[Run], tiles: np.ndarray, batch_size: int, flips: bool) -> np.ndarray:
    """Mean probability of the runs (and of flipped copies with flips) for tiles (N, T, T, C)."""
    total = np.zeros(tiles.shape[:3], dtype=np.float32)
    variants = [(False, False), (True, False), (False, True), (True, True)] if flips else [(False, False)]
    for run in runs:
        chosen = tiles[..., [BAND_NAMES.index(name) for name in run.bands]]
        for flip_rows, flip_cols in variants:
            batch = chosen[:, ::-1] if flip_rows else chosen
            batch = batch[:, :, ::-1] if flip_cols else batch
            batch = np.ascontiguousarray(batch)
            # predict_on_batch per chunk: Keras' predict() sets up a data pipeline on every call.
            probability = np.concatenate([np.asarray(run.model.predict_on_batch(batch[i:i + batch_size]))
                                          for i in range(0, len(batch), batch_size)])[..., 0]
            probability = probability[:, ::-1] if flip_rows else probability
            total += probability[:, :, ::-1] if flip_cols else probability
    return total / (len(runs) * len(variants))


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

    def lines(self) -> list[str]:
        km2 = sum(s.km2 for s in self.scenes)
        slumps = sum(s.slumps for s in self.scenes)
        area = sum(s.slump_area_m2 for s in self.scenes) / 1e4
        rate = km2 / (self.seconds / 60) if self.seconds else 0.0
        lines = [f"{s.scene_id}: {s.slumps} slumps, {s.slump_area_m2 / 1e4:.2f} ha -> {s.probability}"
                 for s in self.scenes]
        return lines + [f"predicted {len(self.scenes)} scenes, {km2:.1f} km2 in {self.seconds:.0f} s "
                        f"({rate:.1f} km2/min): {slumps} slumps, {area:.2f} ha",
                        f"polygons of all scenes (EPSG:4326): {self.merged}"]


def predict(runs: Sequence[str], scenes: Sequence[str], out: str, tcvis: Sequence[str],
            dem: Sequence[str] | None = None, rel_elevation: Sequence[str] | None = None,
            slope: Sequence[str] | None = None, sites: str | None = None, overlap: int | None = None,
            batch_size: int = 8, flips: bool = False, threshold: float | None = None, min_area: float = 100.0,
            drop_touching: bool = False, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> PredictSummary:
    """Predict slumps over whole scenes with one run or the mean of several (an ensemble)."""
    started = time.perf_counter()
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError(f"--threshold must be between 0 and 1, got {threshold}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    scene_list = find_scenes(scenes)
    for scene in scene_list:
        scene_grid(scene)
    if not runs:
        raise InputError("give at least one --run")
    loaded = [load_run(path) for path in runs]
    tile_size = loaded[0].tile_size
    if any(run.tile_size != tile_size for run in loaded):
        raise InputError("the runs of an ensemble must share one tile size")
    for run in loaded:
        missing = [name for name in run.bands if name not in BAND_NAMES]
        if missing:
            raise InputError(f"{run.path}: the model needs bands the scene stack does not make: {', '.join(missing)}")
    overlap = tile_size // 4 if overlap is None else overlap
    if not 0 <= overlap < tile_size:
        raise InputError(f"--overlap must be at least 0 and smaller than the tile size ({tile_size}), got {overlap}")
    threshold = float(np.mean([run.threshold for run in loaded])) if threshold is None else threshold
    site_layer = read_polygons(sites, "sites", ("region",)) if sites else None
    tcvis_source = RasterSource(tcvis, "TCVIS", bands=3)
    terrain = Terrain(RasterSource(dem, "DEM", 1) if dem else None,
                      RasterSource(rel_elevation, "relative elevation", 1) if rel_elevation else None,
                      RasterSource(slope, "slope", 1) if slope else None)
    out_path = Path(out)
    try:
        stacks = [SceneStack(scene, tcvis_source, terrain) for scene in scene_list]  # checks coverage
        for stack in stacks:
            stack.close()
        prepare_output(out_path, [scene.scene_id for scene in scene_list], overwrite)
        total = sum(len(tile_offsets(s.grid.height, tile_size, overlap)) * len(tile_offsets(s.grid.width, tile_size,
                                                                                          overlap)) for s in stacks)
        summary = PredictSummary(str(out_path))
        merged = Polygons(CRS.from_epsg(4326))
        done = 0
        for scene in scene_list:
            def advance(tiles: int) -> None:
                nonlocal done
                done += tiles
                if progress:
                    progress(done, total)

            region = ""
            if site_layer is not None:
                region = site_of(site_layer, scene_grid(scene))[1] or ""
            result, polygons = predict_scene(scene, loaded, tcvis_source, terrain, out_path, overlap, batch_size, flips,
                                             threshold, min_area, drop_touching, region, advance)
            summary.scenes.append(result)
            merged.extend(polygons.to_crs(CRS.from_epsg(4326)))
        summary.merged = str(out_path / MERGED_NAME)
        write_polygons(merged, summary.merged)
    finally:
        for source in (tcvis_source, *terrain.sources):
            source.close()
    summary.seconds = time.perf_counter() - started
    (out_path / "summary.json").write_text(json.dumps({"scenes": [vars(s) for s in summary.scenes],
                                                       "threshold": threshold, "runs": [str(r.path) for r in loaded],
                                                       "seconds": summary.seconds}, indent=1))
    return summary


def prepare_output(out: Path, scene_ids: list[str], overwrite: bool) -> None:
    """Refuse to overwrite earlier results unless asked; remove leftovers of interrupted runs."""
    existing = [out / scene_id for scene_id in scene_ids if (out / scene_id).exists()] + \
        [p for p in (out / MERGED_NAME,) if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{out}: already holds results ({existing[0].name}); use --overwrite or another --out")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def predict_scene(scene: SceneFiles, runs: Sequence[Run], tcvis: RasterSource, terrain: Terrain, out: Path,
                  overlap: int, batch_size: int, flips: bool, threshold: float, min_area: float, drop_touching: bool,
                  region: str, advance: Callable[[int], None]) -> tuple[SceneResult, Polygons]:
    """Stream one scene through the model in groups of windows along each row of tiles; write COGs
    and polygons."""
    size = runs[0].tile_size
    weights = window_weights(size)
    folder = out / scene.scene_id
    folder.mkdir(parents=True, exist_ok=True)
    names = {kind: folder / f"{scene.scene_id}_{kind}.tif" for kind in ("probability", "mask")}
    staging = {kind: folder / f".{kind}.staging.tif" for kind in names}
    # A small GDAL cache for the whole scene: streaming, COG conversion and vectorising.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), SceneStack(scene, tcvis, terrain) as stack:
        grid = stack.grid
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, crs=grid.crs,
                       transform=grid.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        rows, cols = tile_offsets(grid.height, size, overlap), tile_offsets(grid.width, size, overlap)
        width = cols[-1] + size
        # Running sums over the rows the current row of tiles touches; rows above it are final.
        sums = np.zeros((size, width), dtype=np.float32)
        norms = np.zeros((size, width), dtype=np.float32)
        valid_rows = np.zeros((size, width), dtype=bool)
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
            written = 0
            upcoming = reader.submit(read, reads[0])
            for number, (index, group) in enumerate(reads):
                image, valid = upcoming.result()
                if number + 1 < len(reads):
                    upcoming = reader.submit(read, reads[number + 1])
                left = group[0]
                tiles = np.stack([image[:, col - left:col - left + size] for col in group])
                for col, tile in zip(group, predict_tiles(runs, tiles, batch_size, flips)):
                    sums[:, col:col + size] += tile * weights
                    norms[:, col:col + size] += weights
                valid_rows[:, left:left + valid.shape[1]] |= valid
                advance(len(group))
                if group is not groups[-1]:
                    continue
                shift = rows[index + 1] - rows[index] if index + 1 < len(rows) else size
                final = min(shift, grid.height - written)
                if final > 0:
                    block = sums[:final, :grid.width] / np.maximum(norms[:final, :grid.width], 1e-12)
                    block_valid = valid_rows[:final, :grid.width]
                    window = Window(0, written, grid.width, final)
                    prob_out.write(np.where(block_valid, block, PROBABILITY_NODATA).astype(np.float32)[None],
                                   window=window)
                    mask_out.write(np.where(block_valid, block >= threshold, MASK_NODATA).astype(np.uint8)[None],
                                   window=window)
                    written += final
                for array in (sums, norms, valid_rows):
                    array[:size - shift] = array[shift:]
                    array[size - shift:] = 0
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
