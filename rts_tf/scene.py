"""Scene stack: a scene of any sensor and its auxiliary sources, aligned band by band on its grid."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from rts_tf.bands import BAND_NAMES, BANDS, REFLECTANCE_BANDS, SOURCE_OPTIONS, SOURCES, band_sources
from rts_tf.errors import InputError
from rts_tf.rasters import Grid, RasterSource, check_readable, open_raster, warp_array
from rts_tf.records import IMAGE_PARTS, ImagePart, image_parts_for, parts_to_float32
# SceneFiles and find_scenes live with the sensor profiles; scenes are found and stacked through this module.
from rts_tf.sensors import REFLECTANCE_CONVENTION, REFLECTANCE_STEP, SENSORS, SceneFiles, family, find_scenes  # noqa: F401
from rts_tf.settings import DEM_MIN_VALID
from rts_tf.terrain import relative_elevation, slope_degrees

REFLECTANCE_SCALE = 1 / REFLECTANCE_STEP  # reflectance x 10000: the records' uint16 steps
# TCVIS and terrain are resampled onto the scene grid in fixed chunks of this many pixels, aligned
# with the scene's top-left corner: GDAL's warper gives slightly different values for the same
# pixel in differently placed windows (up to 0.2 DN of TCVIS, 0.01 degree of slope on the demo
# data), so a pixel's bands would depend on the tile or window it was read in. With fixed chunks
# they depend on the scene grid alone, in build-records, evaluate and predict alike.
AUXILIARY_CHUNK = 512


def scene_grid(scene: SceneFiles) -> Grid:
    """Open and validate a scene's files as its sensor reads them; return its grid (that of its bands)."""
    sensor = SENSORS[scene.sensor]
    grid, first = None, None
    for path in dict.fromkeys(path for path, _ in scene.bands):
        with open_raster(path, f"{sensor.title}") as dataset:
            if grid is None:
                if dataset.crs is None:
                    raise InputError(f"{path}: scene has no CRS")
                if dataset.crs.is_geographic or (dataset.crs.linear_units or "").lower() not in ("metre", "meter", "m"):
                    raise InputError(f"{path}: scene CRS {dataset.crs} does not have metre units")
                grid, first = Grid(dataset.crs, dataset.transform, dataset.height, dataset.width), path
            elif (dataset.crs, dataset.transform, dataset.height, dataset.width) != \
                    (grid.crs, grid.transform, grid.height, grid.width):
                raise InputError(f"{path}: not on the grid of {first.name} ({dataset.width} x {dataset.height} px at "
                                 f"{dataset.res[0]:g} m against {grid.width} x {grid.height}): a scene's bands must share "
                                 "one grid")
            _check_bands(scene, path, dataset.count)
            check_readable(dataset, f"{sensor.title}")
    if scene.mask is not None:
        what = {"udm2": "UDM2 mask", "scl": "Sentinel-2 scene classification (SCL)", "classes": "--mask"}[sensor.mask]
        with open_raster(scene.mask, what) as dataset:
            if sensor.mask == "udm2" and dataset.count != 8:
                raise InputError(f"{scene.mask}: UDM2 must have 8 bands, found {dataset.count}")
            if dataset.crs is None:
                raise InputError(f"{scene.mask}: {what} has no CRS")
            check_readable(dataset, what)
    return grid


def _check_bands(scene: SceneFiles, path: Path, count: int) -> None:
    """Refuse a reflectance file whose band count does not fit the sensor (one line naming the file)."""
    sensor = SENSORS[scene.sensor]
    if scene.sensor == "planetscope" and count != 4:
        raise InputError(f"{path}: surface reflectance must have 4 bands (B, G, R, NIR), found {count}"
                         + ("; an 8-band PlanetScope product: leave out --sensor or give --sensor planetscope-8b"
                            if count == 8 else ""))
    if scene.sensor == "planetscope-8b" and count != 8:
        raise InputError(f"{path}: an 8-band PlanetScope file must have 8 bands (coastal blue, blue, green I, green, "
                         f"yellow, red, red edge, NIR), found {count}")
    if sensor.count is not None and count < sensor.count:
        raise InputError(f"{path}: {sensor.title} band file must have {sensor.count} band, found {count}")
    for name, (band_path, band) in zip(REFLECTANCE_BANDS, scene.bands):
        if band_path == path and band > count:
            raise InputError(f"{path}: --band-map names band {band} for {name}, but the file has {count} "
                             f"band{'s' if count > 1 else ''}")


class SceneReader:
    """A scene's canonical reflectance, as records store it, and its usable pixels, window by window.

    Each sensor's numbers become reflectance = DN * scale + offset, clipped at 0 and rounded to the
    records' uint16 steps of 1e-4; numbers already in that convention (PlanetScope's, Sentinel-2's
    before baseline 04.00) are passed through untouched. A pixel is usable where every band file
    has data (Sentinel-2: DN 0 is no data) and the quality mask (UDM2, SCL, --mask) allows it.
    """

    def __init__(self, scene: SceneFiles, grid: Grid):
        self.scene, self.grid, self.sensor = scene, grid, SENSORS[scene.sensor]
        self._opened: list = []
        self._groups: list[tuple] = []  # (dataset, band numbers, canonical positions), one per file
        try:
            by_path: dict[Path, tuple] = {}
            for position, (path, band) in enumerate(scene.bands):
                if path not in by_path:
                    by_path[path] = (self._open(path), [], [])
                    self._groups.append(by_path[path])
                by_path[path][1].append(band)
                by_path[path][2].append(position)
            self._mask = self._mask_coverage = None
            if scene.mask is not None:
                mask = self._open(scene.mask)
                if (mask.crs, mask.transform, mask.height, mask.width) == (grid.crs, grid.transform, grid.height,
                                                                            grid.width):
                    self._mask = mask
                    self._mask_coverage = mask if mask.nodata is not None else None
                else:  # SCL at 20 m, or a --mask on another grid: nearest neighbour onto the scene grid
                    self._mask = WarpedVRT(mask, crs=grid.crs, transform=grid.transform, width=grid.width,
                                           height=grid.height, resampling=Resampling.nearest,
                                           add_alpha=mask.nodata is None, nodata=mask.nodata)
                    self._opened.append(self._mask)
                    self._mask_coverage = self._mask
        except BaseException:
            self.close()
            raise
        self._as_stored = all(scale == REFLECTANCE_STEP for scale in scene.scale) and not any(scene.offset)

    def _open(self, path: Path):
        dataset = rasterio.open(path)
        self._opened.append(dataset)
        return dataset

    def close(self) -> None:
        for dataset in reversed(self._opened):
            dataset.close()
        self._opened.clear()

    def numbers(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Reflectance in the records' uint16 steps (4, h, w) and where the scene has data (h, w)."""
        if len(self._groups) == 1 and self._groups[0][2] == [0, 1, 2, 3]:
            dataset, bands, _ = self._groups[0]
            raw = dataset.read(bands, window=window)
            data = dataset.dataset_mask(window=window) > 0
        else:
            raw, data = None, np.ones((int(window.height), int(window.width)), dtype=bool)
            for dataset, bands, positions in self._groups:
                values = dataset.read(bands, window=window)
                if raw is None:
                    raw = np.empty((4,) + values.shape[1:], values.dtype)
                raw[positions] = values
                data &= dataset.dataset_mask(window=window) > 0
        if self.sensor.mask == "scl":
            data &= (raw != 0).all(axis=0)  # Sentinel-2's NODATA special value
        if self._as_stored and raw.dtype == np.uint16:
            return raw, data
        values = raw.astype(np.float64)
        finite = np.isfinite(values).all(axis=0)
        data &= finite
        values[:, ~finite] = 0.0
        values = values * np.asarray(self.scene.scale)[:, None, None] + np.asarray(self.scene.offset)[:, None, None]
        steps = np.rint(np.maximum(values, 0.0) / REFLECTANCE_STEP)  # negative reflectance (S2 offset) -> 0
        return np.minimum(steps, np.iinfo(np.uint16).max).astype(np.uint16), data

    def quality(self, window: Window) -> np.ndarray:
        """Pixels the quality mask allows (h, w); all without a mask."""
        if self._mask is None:
            return np.ones((int(window.height), int(window.width)), dtype=bool)
        if self.sensor.mask == "udm2":
            return usable_udm2(self._mask.read(list(range(1, 9)), window=window))
        usable = ~np.isin(self._mask.read(1, window=window), self.scene.mask_ignore)
        if self._mask_coverage is not None:  # pixels the mask does not reach are not known to be usable
            usable &= self._mask_coverage.dataset_mask(window=window) > 0
        return usable

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Reflectance steps (4, h, w) uint16 and usable pixels (h, w)."""
        numbers, usable = self.numbers(window)
        usable &= self.quality(window)
        return numbers, usable


class Terrain:
    """Relative elevation and slope on any grid: computed from a DEM or read precomputed."""

    def __init__(self, dem: RasterSource | None = None, rel_elevation: RasterSource | None = None,
                 slope: RasterSource | None = None, radius: float = 100.0, dem_min_valid: float = DEM_MIN_VALID):
        if dem is None and (rel_elevation is None or slope is None):
            raise InputError("give a DEM, or both a relative-elevation and a slope raster")
        for source in (dem, rel_elevation, slope):
            if source is not None and source.crs.is_geographic:
                raise InputError(f"{source.paths[0]}: {source.what} must be in a projected CRS in metres, "
                                 f"not {source.crs}")
        self.dem, self.rel_elevation, self.slope, self.radius = dem, rel_elevation, slope, radius
        self.dem_min_valid = dem_min_valid

    @property
    def kind(self) -> str:
        """'dem' (computed here) or 'precomputed' (read from rasters)."""
        return "dem" if self.dem is not None else "precomputed"

    @property
    def sources(self) -> list[RasterSource]:
        return [s for s in (self.dem, self.rel_elevation, self.slope) if s is not None]

    def _read_precomputed(self, grid: Grid) -> np.ndarray:
        """Relative elevation and slope rasters resampled onto the grid. Two rasters on one pixel grid
        (as terrain tools write them) are warped as one 2-band array: GDAL computes each pixel's
        source position once for both bands, and every band's values are those of a warp of its
        own (the warper treats bands alike and independently)."""
        first, second = self.rel_elevation, self.slope
        if first.crs == second.crs and first.resolution == second.resolution:
            margin = 2 * max(first.resolution)
            natives = [first.read_native(grid, margin), second.read_native(grid, margin)]
            if all(native is not None for native in natives) and natives[0][1] == natives[1][1] and \
                    natives[0][0].shape[1:] == natives[1][0].shape[1:]:
                stacked = np.concatenate([natives[0][0][:1], natives[1][0][:1]])
                return warp_array((stacked, natives[0][1]), first.crs, grid, 2)
        return np.concatenate([first.read_on(grid)[:1], second.read_on(grid)[:1]])

    def read(self, grid: Grid) -> np.ndarray:
        """(2, rows, cols) float32: relative elevation (m) and slope (degrees), NaN where unknown."""
        if self.dem is None:
            return self._read_precomputed(grid)
        pixel_width, pixel_height = self.dem.resolution
        # The halo covers the circle of the relative elevation and the 3x3 slope kernel.
        native = self.dem.read_native(grid, margin=self.radius + 3 * max(pixel_width, pixel_height))
        if native is None:
            return warp_array(None, self.dem.crs, grid, 2)
        dem, transform = native
        dem[dem < self.dem_min_valid] = np.nan  # undeclared nodata such as -9999
        terrain = np.stack([relative_elevation(dem[0], pixel_width, pixel_height, self.radius),
                            slope_degrees(dem[0], pixel_width, pixel_height)])
        return warp_array((terrain, transform), self.dem.crs, grid, 2)


class SceneSources:
    """The feature recipe: the auxiliary sources and settings that turn any scene into model bands.

    `build-records`, `evaluate` and `predict` all stack scenes through this one class, so a pixel's
    bands are made by the same code and settings at training and inference. `settings()` is what
    records and runs carry (see `recipe_settings`).

    `bands` is the band set to make (canonical order); only the sources its bands need are
    opened (no TCVIS for a set without TCVIS bands: any given is left unread), and a missing one is
    a one-line InputError naming the option and the bands that need it. check_files=False skips
    reading each file's first and last pixels (RasterSource) where they were checked before.
    """

    def __init__(self, tcvis: Sequence[str] | None, dem: Sequence[str] | None = None,
                 rel_elevation: Sequence[str] | None = None, slope: Sequence[str] | None = None,
                 rel_elevation_radius: float = 100.0, dem_min_valid: float = DEM_MIN_VALID,
                 legacy_dtype: str | None = None, bands: Sequence[str] = BAND_NAMES, check_files: bool = True):
        self.bands = [name for name in BAND_NAMES if name in set(bands)]
        if legacy_dtype and self.bands != BAND_NAMES:
            raise InputError("runs trained on schema-1 records have all ten bands")
        needed = band_sources(self.bands)
        given = {"tcvis": bool(tcvis), "terrain": bool(dem or (rel_elevation and slope))}
        for source in needed:
            if not given[source]:
                need = [name for name in self.bands if SOURCES.get(name) == source]
                raise InputError(f"give {SOURCE_OPTIONS[source]}: the band{'s' if len(need) > 1 else ''} "
                                 f"{', '.join(need)} {'are' if len(need) > 1 else 'is'} made from it")
        self.legacy_dtype = legacy_dtype
        self.rel_elevation_radius, self.dem_min_valid = rel_elevation_radius, dem_min_valid
        self.parts = image_parts_for(self.bands)
        self.tcvis: RasterSource | None = None
        self.terrain: Terrain | None = None
        opened: list[RasterSource] = []

        def open_source(paths: Sequence[str], what: str, bands: int) -> RasterSource:
            opened.append(RasterSource(paths, what, bands=bands, check=check_files))
            return opened[-1]

        try:
            if "tcvis" in needed:
                self.tcvis = open_source(tcvis, "TCVIS", 3)
            if "terrain" in needed and dem:
                self.terrain = Terrain(open_source(dem, "DEM", 1), radius=rel_elevation_radius,
                                       dem_min_valid=dem_min_valid)
            elif "terrain" in needed:
                self.terrain = Terrain(None, open_source(rel_elevation, "relative elevation", 1),
                                       open_source(slope, "slope", 1), radius=rel_elevation_radius,
                                       dem_min_valid=dem_min_valid)
        except BaseException:
            for source in opened:
                source.close()
            raise

    @property
    def sources(self) -> list[RasterSource]:
        """The auxiliary rasters opened: those the band set needs."""
        return [*([self.tcvis] if self.tcvis else []), *(self.terrain.sources if self.terrain else [])]

    def settings(self) -> dict:
        """The recipe's settings, as records and runs carry them (terrain 'none': a set without terrain bands)."""
        return recipe_settings(self.terrain.kind if self.terrain else "none", self.rel_elevation_radius,
                               self.dem_min_valid, self.legacy_dtype)

    def check(self, scene: SceneFiles, grid: "Grid | None" = None) -> None:
        """Raise unless every source overlaps the scene."""
        grid = grid or scene_grid(scene)
        for source in self.sources:
            source.check_overlaps(grid, f"scene {scene.scene_id} ({scene.sr})")

    def stack(self, scene: SceneFiles) -> "SceneStack":
        return SceneStack(scene, self.tcvis, self.terrain, self.legacy_dtype, self.parts)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "SceneSources":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Recipes written before sensor profiles said this; the rule is the same for PlanetScope (see comparable_recipe).
LEGACY_VALID_PIXELS = ("scene data, UDM2 usable (clear; no snow, shadow, heavy haze, cloud, unusable), "
                       "TCVIS and terrain defined")
VALID_PIXELS = ("scene data, the sensor's quality mask usable (UDM2: clear; no snow, shadow, heavy haze, cloud, "
                "unusable; Sentinel-2 SCL: not 0, 1, 3, 8, 9, 10, 11; generic: --mask value not in --mask-ignore), "
                "TCVIS and terrain defined")
# Since band sets: only the sources of the records' (or model's) bands count.
BAND_SET_VALID_PIXELS = ("scene data, the sensor's quality mask usable (UDM2: clear; no snow, shadow, heavy haze, "
                         "cloud, unusable; Sentinel-2 SCL: not 0, 1, 3, 8, 9, 10, 11; generic: --mask value not in "
                         "--mask-ignore), the auxiliary sources of the bands (TCVIS, terrain) defined")


def recipe_settings(terrain: str, rel_elevation_radius: float, dem_min_valid: float,
                    legacy_dtype: str | None = None, sensors: Sequence[str] | None = None) -> dict:
    """Every setting that decides a pixel's band values (besides the input files themselves): the
    stored types of schema 2 (`image_encoding`), or for runs on schema-1 records their one
    `image_dtype`; the reflectance convention every sensor is converted to; and, for information,
    the sensors the records were built from (`sensors`: another sensor at prediction warns, it
    does not fail)."""
    encoding = {"image_dtype": legacy_dtype} if legacy_dtype else {"image_encoding": {
        part.name: {"dtype": part.dtype, "bands": list(part.bands), "scale": part.scale, "offset": part.offset}
        for part in IMAGE_PARTS}}
    return {"terrain": terrain, "rel_elevation_radius": float(rel_elevation_radius),
            "dem_min_valid": float(dem_min_valid), **encoding,
            "auxiliary_resampling": "bilinear", "auxiliary_chunk": AUXILIARY_CHUNK,
            "valid_pixels": BAND_SET_VALID_PIXELS, "reflectance": REFLECTANCE_CONVENTION,
            "sensors": sorted(set(sensors or ["planetscope"]))}


def recipe_sensors(recipe: dict) -> list[str]:
    """The sensors a recipe's records were built from (recipes from before sensor profiles: PlanetScope)."""
    return list(recipe.get("sensors") or ["planetscope"])


def comparable_recipe(recipe: dict) -> dict:
    """A recipe without its sensors, with what older recipes left unsaid filled in: what must be
    equal for two models, or a model and records, to see the same bands."""
    recipe = {key: value for key, value in recipe.items() if key not in ("sensors", "bands")}
    recipe.setdefault("reflectance", REFLECTANCE_CONVENTION)  # PlanetScope numbers were already in it
    if recipe.get("valid_pixels") in (LEGACY_VALID_PIXELS, VALID_PIXELS):
        recipe["valid_pixels"] = BAND_SET_VALID_PIXELS
    return recipe


# The recipe's terrain settings: they matter only to band sets with terrain bands.
TERRAIN_SETTINGS = ("terrain", "rel_elevation_radius", "dem_min_valid")


def recipe_differences(first: dict, second: dict, bands: Sequence[str] | None = None) -> list[str]:
    """The keys on which two recipes make other bands (sensors aside); with `bands`, only those that
    make these bands differ (no terrain settings for a set without terrain bands)."""
    first, second = comparable_recipe(first), comparable_recipe(second)
    ignored = TERRAIN_SETTINGS if bands is not None and "terrain" not in band_sources(bands) else ()
    return sorted(key for key in set(first) | set(second)
                  if key not in ignored and first.get(key) != second.get(key))


def sensor_warning(scene: SceneFiles, sensors: Sequence[str]) -> str | None:
    """A warning when a scene's sensor is not among those a model was trained on, else None.
    (PlanetScope 4- and 8-band are one family: their canonical bands are harmonised.)"""
    if family(scene.sensor) in {family(sensor) for sensor in sensors}:
        return None
    return (f"scene {scene.scene_id} is {scene.sensor} imagery, but the model was trained on "
            f"{', '.join(sensors)} records: its bands are the same canonical reflectance, but another sensor's "
            "resolution and spectral response may lower the accuracy")


def stored_bands(part: ImagePart, values: dict[str, np.ndarray]) -> np.ndarray:
    """A part's bands (n, h, w) in its stored type, from the window's values of its source
    (SceneStack._values): only the part's bands where the band set keeps some of the source's."""
    source = values[part.name]
    full = next(whole for whole in IMAGE_PARTS if whole.name == part.name).bands
    if part.bands != full:  # a band set with only some bands of this source
        source = source[[full.index(name) for name in part.bands]]
    return source if source.dtype == part.dtype else part.store(source)


class SceneStack:
    """All model bands of one scene on its grid, read window by window with bounded memory."""

    def __init__(self, scene: SceneFiles, tcvis: RasterSource | None, terrain: Terrain | None,
                 legacy_dtype: str | None = None, parts: Sequence[ImagePart] = IMAGE_PARTS):
        self.scene = scene
        self.grid = scene_grid(scene)
        self.tcvis, self.terrain, self.legacy_dtype = tcvis, terrain, legacy_dtype
        self.parts = tuple(parts)  # what read_parts makes: the band set's parts (records.image_parts_for)
        self.bands = [name for part in self.parts for name in part.bands]
        name = f"scene {scene.scene_id}"
        for source in [*([tcvis] if tcvis else []), *(terrain.sources if terrain else [])]:
            source.check_overlaps(self.grid, name)
        # The auxiliary channels of the chunks: TCVIS (3) and terrain (2), those opened.
        self._auxiliary = [*(["tcvis"] * 3 if tcvis else []), *(["terrain"] * 2 if terrain else [])]
        # Enough chunks for the rows of chunks one block or row of windows spans.
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._capacity = 3 * math.ceil(self.grid.width / AUXILIARY_CHUNK) + 2
        self._reader = SceneReader(scene, self.grid)

    def close(self) -> None:
        self._reader.close()
        self._chunks.clear()

    def keep_chunks(self, rows: int, width: int) -> None:
        """Keep the warped chunks of `rows` rows of chunks across `width` pixels only: enough for a
        strip of the scene `width` wide read row by row (a window spans at most two rows of chunks);
        the default keeps three rows across the whole scene."""
        self._capacity = rows * (math.ceil(width / AUXILIARY_CHUNK) + 1) + 2

    def __enter__(self) -> "SceneStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _chunk(self, chunk_row: int, chunk_col: int) -> np.ndarray:
        """TCVIS and terrain (up to 5, rows, cols) float32, NaN where unknown, of one fixed chunk."""
        key = (chunk_row, chunk_col)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        top, left = chunk_row * AUXILIARY_CHUNK, chunk_col * AUXILIARY_CHUNK
        grid = self.grid.window_grid(top, left, min(AUXILIARY_CHUNK, self.grid.height - top),
                                     min(AUXILIARY_CHUNK, self.grid.width - left))
        chunk = np.concatenate([*([self.tcvis.read_on(grid)] if self.tcvis else []),
                                *([self.terrain.read(grid)] if self.terrain else [])])
        self._chunks[key] = chunk
        if len(self._chunks) > self._capacity:
            self._chunks.popitem(last=False)
        return chunk

    def auxiliary(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """TCVIS and terrain (those opened: up to 5, height, width) of a window inside the scene, from the fixed chunks."""
        result = np.empty((len(self._auxiliary), height, width), dtype=np.float32)
        if not self._auxiliary:
            return result
        for chunk_row in range(top // AUXILIARY_CHUNK, (top + height - 1) // AUXILIARY_CHUNK + 1):
            for chunk_col in range(left // AUXILIARY_CHUNK, (left + width - 1) // AUXILIARY_CHUNK + 1):
                chunk = self._chunk(chunk_row, chunk_col)
                row0, col0 = chunk_row * AUXILIARY_CHUNK, chunk_col * AUXILIARY_CHUNK
                rows = slice(max(top, row0), min(top + height, row0 + chunk.shape[1]))
                cols = slice(max(left, col0), min(left + width, col0 + chunk.shape[2]))
                result[:, rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = \
                    chunk[:, rows.start - row0:rows.stop - row0, cols.start - col0:cols.stop - col0]
        return result

    def _values(self, row: int, col: int, height: int, width: int):
        """The sources' values in the part of a window inside the scene, 0 where not usable:
        ((rows, cols) slices of the window, {part name: (n, h, w) array}, usable (h, w)), or None."""
        top, left = max(row, 0), max(col, 0)
        bottom, right = min(row + height, self.grid.height), min(col + width, self.grid.width)
        if bottom <= top or right <= left:
            return None
        window = Window(left, top, right - left, bottom - top)
        try:
            numbers, usable = self._reader.read(window)
        except RasterioError as error:
            raise InputError(f"{self.scene.sr}: cannot read scene: {str(error).splitlines()[0]}") from None
        auxiliary = self.auxiliary(top, left, bottom - top, right - left)
        usable &= np.isfinite(auxiliary).all(axis=0)
        unusable = ~usable
        # copyto with a broadcast mask: the same as indexing every band with the mask, several times faster
        np.copyto(numbers, np.uint16(0), where=unusable)
        np.copyto(auxiliary, np.float32(0.0), where=unusable)
        red, nir = numbers[2].astype(np.float32), numbers[3].astype(np.float32)
        total = nir + red
        ndvi = np.divide(nir - red, total, out=np.zeros_like(total), where=total > 0)
        inside = (slice(top - row, bottom - row), slice(left - col, right - col))
        values = {"reflectance": numbers, "ndvi": ndvi[None]}
        for name in ("tcvis", "terrain"):
            if name in self._auxiliary:
                first = self._auxiliary.index(name)
                values[name] = auxiliary[first:first + self._auxiliary.count(name)]
        return inside, values, usable

    def read_parts(self, row: int, col: int, height: int, width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The bands of a window as records store them, {feature key: (height, width, n) array in
        its stored type} (records.IMAGE_PARTS), and a validity mask (height, width).

        The window may extend past the scene: pixels outside are 0 and invalid. A pixel is valid
        when the scene has data there, its quality mask (UDM2, SCL, --mask) calls it usable, and every
        auxiliary source of the band set covers it.
        Invalid pixels hold 0 in every band. A pixel's values do not depend on the window.
        """
        parts = {part.key: np.zeros((height, width, len(part.bands)), part.dtype) for part in self.parts}
        valid = np.zeros((height, width), dtype=bool)
        found = self._values(row, col, height, width)
        if found is None:
            return parts, valid
        inside, values, usable = found
        for part in self.parts:
            stored = stored_bands(part, values)
            # Band by band into the channels-last view: no stacked copy of the whole block.
            view = parts[part.key][inside]
            for index in range(len(part.bands)):
                view[..., index] = stored[index]
        valid[inside] = usable
        return parts, valid

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Bands (height, width, bands of the set) float32 in physical units, as the records' values decode
        (bit for bit), and the validity mask of `read_parts`. With a legacy dtype (runs trained on
        schema-1 records) the physical values rounded to that dtype, as those records held them."""
        if self.legacy_dtype is None:
            parts, valid = self.read_parts(row, col, height, width)
            return parts_to_float32(parts, band_names=self.bands), valid
        image = np.zeros((height, width, len(BANDS)), dtype=np.float32)
        valid = np.zeros((height, width), dtype=bool)
        found = self._values(row, col, height, width)
        if found is not None:
            inside, values, usable = found
            bands = np.concatenate([values["reflectance"] / np.float32(REFLECTANCE_SCALE), values["ndvi"],
                                    values["tcvis"], values["terrain"]])
            image[inside] = np.moveaxis(bands, 0, -1)
            valid[inside] = usable
        return image.astype(self.legacy_dtype).astype(np.float32), valid

    def read_into(self, image: np.ndarray, valid: np.ndarray, row: int, col: int) -> None:
        """`read` of the window of valid's shape at (row, col) into given arrays (image (h, w, bands)
        float32, valid (h, w) bool; predict's stacking processes give views of shared memory): the
        same values bit for bit, each band decoded from its stored type as records.parts_to_float32
        does (float32 of the stored value, times the part's scale, plus its offset), without the
        channels-last copy of the stored parts and their concatenation."""
        height, width = valid.shape
        if self.legacy_dtype is not None:
            image[...], valid[...] = self.read(row, col, height, width)
            return
        found = self._values(row, col, height, width)
        if found is None or found[0] != (slice(0, height), slice(0, width)):  # pixels outside the scene: stored 0
            image[...] = [np.float32(0) * np.float32(part.scale) + np.float32(part.offset)
                          for part in self.parts for _ in part.bands]
            valid[...] = False
        if found is None:
            return
        inside, values, usable = found
        channel = 0
        for part in self.parts:
            stored = stored_bands(part, values)
            for index in range(len(part.bands)):
                band = stored[index].astype(np.float32)
                if part.scale != 1.0:
                    band *= np.float32(part.scale)
                if part.offset != 0.0:
                    band += np.float32(part.offset)
                image[inside + (channel,)] = band
                channel += 1
        valid[inside] = usable


def usable_udm2(udm2: np.ndarray) -> np.ndarray:
    """Usable pixels of a UDM2 stack (8, rows, cols): clear, and no snow, shadow, heavy haze,
    cloud or legacy-unusable bits. Light haze is usable."""
    clear, snow, shadow, _light_haze, heavy_haze, cloud, _confidence, unusable = udm2
    return (clear == 1) & (snow == 0) & (shadow == 0) & (heavy_haze == 0) & (cloud == 0) & (unusable == 0)
