"""Scene stack: a PlanetScope scene and its auxiliary sources, aligned band by band on its grid."""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from rts_tf.bands import BANDS
from rts_tf.errors import InputError
from rts_tf.rasters import Grid, RasterSource, check_readable, open_raster, warp_array
from rts_tf.records import IMAGE_PARTS, parts_to_float32
from rts_tf.settings import DEM_MIN_VALID
from rts_tf.terrain import relative_elevation, slope_degrees

REFLECTANCE_SCALE = 10000.0
# TCVIS and terrain are resampled onto the scene grid in fixed chunks of this many pixels, aligned
# with the scene's top-left corner: GDAL's warper gives slightly different values for the same
# pixel in differently placed windows (up to 0.2 DN of TCVIS, 0.01 degree of slope on the demo
# data), so a pixel's bands would depend on the tile or window it was read in. With fixed chunks
# they depend on the scene grid alone, in build-records, evaluate and predict alike.
AUXILIARY_CHUNK = 512
SR_PATTERN = re.compile(r"^(?P<id>.+?)(_3B_AnalyticMS_SR.*|_BGRN_SR)\.tiff?$", re.IGNORECASE)
UDM2_BANDS = ("clear", "snow", "shadow", "light_haze", "heavy_haze", "cloud", "confidence", "udm1")


@dataclass(frozen=True)
class SceneFiles:
    """The files of one PlanetScope scene: surface reflectance and, optionally, its UDM2 mask."""

    scene_id: str
    sr: Path
    udm2: Path | None

    @property
    def image_date(self) -> str:
        """The acquisition date from a PSScene id (YYYYMMDD_...), or '' when the id has none."""
        match = re.match(r"^(\d{4})(\d{2})(\d{2})_", self.scene_id)
        return "-".join(match.groups()) if match else ""


def find_scenes(folders: Sequence[str | os.PathLike]) -> list[SceneFiles]:
    """Scenes in folders: each folder is a scene folder, a folder of scene folders, or both."""
    scenes: dict[str, SceneFiles] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"{folder}: scene folder not found")
        if folder.is_file():
            candidates = [folder]
        else:
            candidates = sorted(folder.iterdir()) + sorted(
                p for sub in sorted(folder.iterdir()) if sub.is_dir() for p in sub.iterdir())
        found = [scene_files(path) for path in candidates if SR_PATTERN.match(path.name)]
        if not found:
            raise InputError(f"{folder}: no PlanetScope scene found (expected *_3B_AnalyticMS_SR*.tif "
                             "or *_BGRN_SR.tif here or in its sub-folders)")
        for scene in found:
            if scene.scene_id in scenes and scenes[scene.scene_id].sr != scene.sr:
                raise InputError(f"{scene.sr}: scene {scene.scene_id} is also at {scenes[scene.scene_id].sr}")
            scenes[scene.scene_id] = scene
    return [scenes[key] for key in sorted(scenes)]


def scene_files(sr_path: Path) -> SceneFiles:
    """The SceneFiles of a surface-reflectance file, with its UDM2 beside it if there is one."""
    scene_id = SR_PATTERN.match(sr_path.name).group("id")
    udm2 = sorted(p for p in sr_path.parent.glob(f"{scene_id}*udm2*") if p.suffix.lower() in (".tif", ".tiff"))
    return SceneFiles(scene_id, sr_path, udm2[0] if udm2 else None)


def scene_grid(scene: SceneFiles) -> Grid:
    """Open and validate a scene's files; return its grid."""
    with open_raster(scene.sr, "PlanetScope surface reflectance") as dataset:
        if dataset.count != 4:
            raise InputError(f"{scene.sr}: surface reflectance must have 4 bands (B, G, R, NIR), found {dataset.count}")
        if dataset.crs is None:
            raise InputError(f"{scene.sr}: scene has no CRS")
        if dataset.crs.is_geographic or (dataset.crs.linear_units or "").lower() not in ("metre", "meter", "m"):
            raise InputError(f"{scene.sr}: scene CRS {dataset.crs} does not have metre units")
        check_readable(dataset, "surface reflectance")
        grid = Grid(dataset.crs, dataset.transform, dataset.height, dataset.width)
    if scene.udm2 is not None:
        with open_raster(scene.udm2, "UDM2 mask") as dataset:
            if dataset.count != 8:
                raise InputError(f"{scene.udm2}: UDM2 must have 8 bands, found {dataset.count}")
            check_readable(dataset, "UDM2 mask")
    return grid


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

    def read(self, grid: Grid) -> np.ndarray:
        """(2, rows, cols) float32: relative elevation (m) and slope (degrees), NaN where unknown."""
        if self.dem is None:
            return np.concatenate([self.rel_elevation.read_on(grid)[:1], self.slope.read_on(grid)[:1]])
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
    """

    def __init__(self, tcvis: Sequence[str], dem: Sequence[str] | None = None,
                 rel_elevation: Sequence[str] | None = None, slope: Sequence[str] | None = None,
                 rel_elevation_radius: float = 100.0, dem_min_valid: float = DEM_MIN_VALID,
                 legacy_dtype: str | None = None):
        if not dem and not (rel_elevation and slope):
            raise InputError("give --dem, or both --rel-elevation and --slope")
        self.legacy_dtype = legacy_dtype
        opened: list[RasterSource] = []

        def open_source(paths: Sequence[str], what: str, bands: int) -> RasterSource:
            opened.append(RasterSource(paths, what, bands=bands))
            return opened[-1]

        try:
            self.tcvis = open_source(tcvis, "TCVIS", 3)
            if dem:
                self.terrain = Terrain(open_source(dem, "DEM", 1), radius=rel_elevation_radius,
                                       dem_min_valid=dem_min_valid)
            else:
                self.terrain = Terrain(None, open_source(rel_elevation, "relative elevation", 1),
                                       open_source(slope, "slope", 1), radius=rel_elevation_radius,
                                       dem_min_valid=dem_min_valid)
        except BaseException:
            for source in opened:
                source.close()
            raise

    @property
    def sources(self) -> list[RasterSource]:
        return [self.tcvis, *self.terrain.sources]

    def settings(self) -> dict:
        """The recipe's settings, as records and runs carry them."""
        return recipe_settings(self.terrain.kind, self.terrain.radius, self.terrain.dem_min_valid, self.legacy_dtype)

    def check(self, scene: SceneFiles, grid: "Grid | None" = None) -> None:
        """Raise unless every source overlaps the scene."""
        grid = grid or scene_grid(scene)
        for source in self.sources:
            source.check_overlaps(grid, f"scene {scene.scene_id} ({scene.sr})")

    def stack(self, scene: SceneFiles) -> "SceneStack":
        return SceneStack(scene, self.tcvis, self.terrain, self.legacy_dtype)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> "SceneSources":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def recipe_settings(terrain: str, rel_elevation_radius: float, dem_min_valid: float,
                    legacy_dtype: str | None = None) -> dict:
    """Every setting that decides a pixel's band values (besides the input files themselves): the
    stored types of schema 2 (`image_encoding`), or for runs on schema-1 records their one
    `image_dtype`."""
    encoding = {"image_dtype": legacy_dtype} if legacy_dtype else {"image_encoding": {
        part.name: {"dtype": part.dtype, "bands": list(part.bands), "scale": part.scale, "offset": part.offset}
        for part in IMAGE_PARTS}}
    return {"terrain": terrain, "rel_elevation_radius": float(rel_elevation_radius),
            "dem_min_valid": float(dem_min_valid), **encoding,
            "auxiliary_resampling": "bilinear", "auxiliary_chunk": AUXILIARY_CHUNK,
            "valid_pixels": "scene data, UDM2 usable (clear; no snow, shadow, heavy haze, cloud, unusable), "
                            "TCVIS and terrain defined"}


class SceneStack:
    """All model bands of one scene on its grid, read window by window with bounded memory."""

    def __init__(self, scene: SceneFiles, tcvis: RasterSource, terrain: Terrain, legacy_dtype: str | None = None):
        self.scene = scene
        self.grid = scene_grid(scene)
        self.tcvis, self.terrain, self.legacy_dtype = tcvis, terrain, legacy_dtype
        name = f"scene {scene.scene_id}"
        tcvis.check_overlaps(self.grid, name)
        for source in terrain.sources:
            source.check_overlaps(self.grid, name)
        # Enough chunks for the rows of chunks one block or row of windows spans.
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._capacity = 3 * math.ceil(self.grid.width / AUXILIARY_CHUNK) + 2
        self._sr = rasterio.open(scene.sr)
        self._udm2 = rasterio.open(scene.udm2) if scene.udm2 else None

    def close(self) -> None:
        self._sr.close()
        if self._udm2 is not None:
            self._udm2.close()
        self._chunks.clear()

    def __enter__(self) -> "SceneStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _chunk(self, chunk_row: int, chunk_col: int) -> np.ndarray:
        """TCVIS and terrain (5, rows, cols) float32, NaN where unknown, of one fixed chunk."""
        key = (chunk_row, chunk_col)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        top, left = chunk_row * AUXILIARY_CHUNK, chunk_col * AUXILIARY_CHUNK
        grid = self.grid.window_grid(top, left, min(AUXILIARY_CHUNK, self.grid.height - top),
                                     min(AUXILIARY_CHUNK, self.grid.width - left))
        chunk = np.concatenate([self.tcvis.read_on(grid), self.terrain.read(grid)])
        self._chunks[key] = chunk
        if len(self._chunks) > self._capacity:
            self._chunks.popitem(last=False)
        return chunk

    def auxiliary(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """TCVIS and terrain (5, height, width) of a window inside the scene, from the fixed chunks."""
        result = np.empty((5, height, width), dtype=np.float32)
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
            numbers = self._sr.read(window=window)
            usable = self._sr.dataset_mask(window=window) > 0
            if self._udm2 is not None:
                usable &= usable_udm2(self._udm2.read(window=window))
        except RasterioError as error:
            raise InputError(f"{self.scene.sr}: cannot read scene: {str(error).splitlines()[0]}") from None
        auxiliary = self.auxiliary(top, left, bottom - top, right - left)
        usable &= np.isfinite(auxiliary).all(axis=0)
        unusable = ~usable
        numbers[:, unusable] = 0
        auxiliary[:, unusable] = 0.0
        red, nir = numbers[2].astype(np.float32), numbers[3].astype(np.float32)
        total = nir + red
        ndvi = np.divide(nir - red, total, out=np.zeros_like(total), where=total > 0)
        inside = (slice(top - row, bottom - row), slice(left - col, right - col))
        return inside, {"reflectance": numbers, "ndvi": ndvi[None], "tcvis": auxiliary[:3],
                        "terrain": auxiliary[3:]}, usable

    def read_parts(self, row: int, col: int, height: int, width: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The bands of a window as records store them, {feature key: (height, width, n) array in
        its stored type} (records.IMAGE_PARTS), and a validity mask (height, width).

        The window may extend past the scene: pixels outside are 0 and invalid. A pixel is valid
        when the scene has data there, UDM2 calls it usable, and every auxiliary source covers it.
        Invalid pixels hold 0 in every band. A pixel's values do not depend on the window.
        """
        parts = {part.key: np.zeros((height, width, len(part.bands)), part.dtype) for part in IMAGE_PARTS}
        valid = np.zeros((height, width), dtype=bool)
        found = self._values(row, col, height, width)
        if found is None:
            return parts, valid
        inside, values, usable = found
        for part in IMAGE_PARTS:
            source = values[part.name]
            if part.name == "reflectance" and source.dtype != np.uint16:  # numbers as delivered, if uint16
                source = source / REFLECTANCE_SCALE
            stored = source if source.dtype == part.dtype else part.store(source)
            # Band by band into the channels-last view: no stacked copy of the whole block.
            view = parts[part.key][inside]
            for index in range(len(part.bands)):
                view[..., index] = stored[index]
        valid[inside] = usable
        return parts, valid

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Bands (height, width, 10) float32 in physical units, as the records' values decode
        (bit for bit), and the validity mask of `read_parts`. With a legacy dtype (runs trained on
        schema-1 records) the physical values rounded to that dtype, as those records held them."""
        if self.legacy_dtype is None:
            parts, valid = self.read_parts(row, col, height, width)
            return parts_to_float32(parts), valid
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


def usable_udm2(udm2: np.ndarray) -> np.ndarray:
    """Usable pixels of a UDM2 stack (8, rows, cols): clear, and no snow, shadow, heavy haze,
    cloud or legacy-unusable bits. Light haze is usable."""
    clear, snow, shadow, _light_haze, heavy_haze, cloud, _confidence, unusable = udm2
    return (clear == 1) & (snow == 0) & (shadow == 0) & (heavy_haze == 0) & (cloud == 0) & (unusable == 0)
