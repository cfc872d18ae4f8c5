"""Raster sources: a file, a VRT or a folder of GeoTIFF tiles, read onto a target grid."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import rasterio.errors
import rasterio.merge
from affine import Affine
from rasterio.coords import BoundingBox, disjoint_bounds
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.warp import reproject, transform_bounds

from rts_tf.errors import InputError

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
# GDAL's block cache while streaming a scene; its default (5% of RAM) would grow with the scene.
GDAL_CACHE_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and shape (height, width)."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def bounds(self) -> BoundingBox:
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return BoundingBox(min(left, right), min(top, bottom), max(left, right), max(top, bottom))

    def window_grid(self, row: int, col: int, height: int, width: int) -> "Grid":
        """The sub-grid whose top-left pixel is (row, col) of this grid; it may extend beyond it."""
        return Grid(self.crs, self.transform @ Affine.translation(col, row), height, width)


def open_raster(path: str | os.PathLike, what: str) -> rasterio.DatasetReader:
    """Open a raster, turning GDAL's errors into an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        dataset = rasterio.open(path)
    except RasterioError as error:
        raise InputError(f"{path}: not a readable raster ({what}): {_first_line(error)}") from None
    return dataset


def check_readable(dataset: rasterio.DatasetReader, what: str) -> None:
    """Read the first and the last pixel of every band so that truncated files fail early."""
    try:
        for row, col in ((0, 0), (dataset.height - 1, dataset.width - 1)):
            dataset.read(window=((row, row + 1), (col, col + 1)))
    except RasterioError as error:
        raise InputError(f"{dataset.name}: {what} is truncated or corrupt: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class RasterSource:
    """One logical raster made of one or more files (a file, a VRT, or a folder of tiles).

    Tiles must share a CRS and band count; only the tiles that overlap a requested area are read.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], what: str, bands: int | None = None,
                 check: bool = True):
        """check: read each file's first and last pixels now (check_readable), so that a truncated
        file fails at once; off where the files were checked before (a record-building worker)."""
        self.what = what
        files: list[Path] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                found = sorted(p for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
                if not found:
                    raise InputError(f"{path}: no GeoTIFF or VRT files in this {what} folder")
                files.extend(found)
            elif path.exists():
                files.append(path)
            else:
                raise InputError(f"{path}: {what} not found")
        if not files:
            raise InputError(f"no {what} given")
        self.datasets: list[rasterio.DatasetReader] = []
        try:
            for file in files:
                dataset = open_raster(file, what)
                self.datasets.append(dataset)
                if dataset.crs is None:
                    raise InputError(f"{file}: {what} has no CRS")
                if bands is not None and dataset.count != bands:
                    raise InputError(f"{file}: {what} must have {bands} bands, found {dataset.count}")
                if dataset.crs != self.datasets[0].crs:
                    raise InputError(f"{file}: {what} tiles must share one CRS "
                                     f"({dataset.crs} differs from {self.datasets[0].crs})")
                if check:
                    check_readable(dataset, what)
        except Exception:
            self.close()
            raise
        self.crs = self.datasets[0].crs
        self.count = self.datasets[0].count
        self.resolution = self.datasets[0].res

    @property
    def paths(self) -> list[str]:
        return [dataset.name for dataset in self.datasets]

    def close(self) -> None:
        for dataset in self.datasets:
            dataset.close()

    def __enter__(self) -> "RasterSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def overlapping(self, grid: Grid, margin: float = 0.0, bounds: tuple | None = None) -> list[rasterio.DatasetReader]:
        """The datasets whose extent overlaps the grid's (plus a margin in source units); `bounds`:
        the grid's bounds in the source CRS when already known."""
        left, bottom, right, top = bounds or transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        area = BoundingBox(left - margin, bottom - margin, right + margin, top + margin)
        return [d for d in self.datasets if not disjoint_bounds(area, d.bounds)]

    def check_overlaps(self, grid: Grid, name: str) -> None:
        """Raise when no part of this source overlaps the grid."""
        if not self.overlapping(grid):
            raise InputError(f"{self.paths[0] if len(self.paths) == 1 else Path(self.paths[0]).parent}: "
                             f"{self.what} does not overlap {name}")

    def read_native(self, grid: Grid, margin: float) -> tuple[np.ndarray, Affine] | None:
        """Mosaic the source on its own pixel grid over the grid's extent plus a margin.

        Returns float32 (bands, rows, cols) with NaN where there is no data, and its transform;
        None where nothing overlaps. Bounds are snapped to the source's pixel grid so that
        pixels are copied, never resampled, here.
        """
        bounds = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        datasets = self.overlapping(grid, margin, bounds)
        if not datasets:
            return None
        left, bottom, right, top = bounds
        reference = datasets[0].transform
        res_x, res_y = abs(reference.a), abs(reference.e)
        origin_x, origin_y = reference.c, reference.f
        left = origin_x + math.floor((left - margin - origin_x) / res_x) * res_x
        right = origin_x + math.ceil((right + margin - origin_x) / res_x) * res_x
        top = origin_y - math.floor((origin_y - top - margin) / res_y) * res_y
        bottom = origin_y - math.ceil((origin_y - bottom + margin) / res_y) * res_y
        try:
            if len(datasets) == 1:
                array, transform = merge_one(datasets[0], (left, bottom, right, top), (res_x, res_y))
            else:
                array, transform = rasterio.merge.merge(
                    datasets, bounds=(left, bottom, right, top), res=(res_x, res_y),
                    nodata=np.nan, dtype="float32")
        except RasterioError as error:
            raise InputError(f"{datasets[0].name}: cannot read {self.what}: {_first_line(error)}") from None
        return array, transform

    def read_on(self, grid: Grid, resampling: Resampling = Resampling.bilinear) -> np.ndarray:
        """The source resampled onto the grid: float32 (bands, rows, cols), NaN where no data."""
        native = self.read_native(grid, margin=2 * max(self.resolution))
        return warp_array(native, self.crs, grid, self.count, resampling)


def merge_one(dataset: rasterio.DatasetReader, bounds: tuple[float, float, float, float],
              res: tuple[float, float]) -> tuple[np.ndarray, Affine]:
    """rasterio.merge.merge([dataset], bounds=bounds, res=res, nodata=NaN, dtype="float32") for one
    dataset, step by step as merge does it (the same windows, the same read, the same copy), so the
    same array: without merge's per-call overhead (profile, colour map, nodata checks; about half of
    a chunk's read), which a scene pays for every 512 px chunk of TCVIS and terrain."""
    from rasterio import windows

    west, south, east, north = bounds
    width, height = int(round((east - west) / res[0])), int(round((north - south) / res[1]))
    transform = Affine.translation(west, north) * Affine.scale(res[0], -res[1])
    count = dataset.count
    destination = np.full((count, height, width), np.nan, dtype=np.float32)
    chunk = windows.Window(0, 0, width, height)
    chunk_bounds = windows.bounds(chunk, transform)
    chunk_transform = windows.transform(chunk, transform)
    source = dataset.bounds
    # merge's _intersect_bounds (north-up output)
    int_w, int_e = max(source[0], chunk_bounds[0]), min(source[2], chunk_bounds[2])
    int_s, int_n = max(source[1], chunk_bounds[1]), min(source[3], chunk_bounds[3])
    if int_w >= int_e or int_s >= int_n:
        return destination, transform
    try:
        source_window = windows.from_bounds(int_w, int_s, int_e, int_n, dataset.transform)
        window = windows.from_bounds(int_w, int_s, int_e, int_n, chunk_transform)
    except rasterio.errors.WindowError:
        return destination, transform
    # merge's win_align
    window = windows.Window(math.floor(window.col_off + 0.1), math.floor(window.row_off + 0.1),
                            math.floor(window.width + 0.5), math.floor(window.height + 0.5))
    rows, cols = window.toslices()
    region = destination[:, rows, cols]
    data = dataset.read(out_shape=(count, window.height, window.width), masked=True, window=source_window,
                        resampling=Resampling.nearest)
    rasterio.merge.copy_first(region, data, np.isnan(region), data.mask)
    return destination, transform


def warp_array(native: tuple[np.ndarray, Affine] | None, crs: CRS, grid: Grid, count: int,
               resampling: Resampling = Resampling.bilinear) -> np.ndarray:
    """Resample a float array (bands, rows, cols) with NaN nodata onto a grid."""
    destination = np.full((count, grid.height, grid.width), np.nan, dtype=np.float32)
    if native is None:
        return destination
    array, transform = native
    # No nodata is declared on purpose: GDAL's masked warp is three times slower, and NaN already
    # propagates through the resampling kernel, so pixels that touch a hole become NaN (invalid),
    # and pixels the source does not reach keep the NaN they start with.
    reproject(array, destination, src_transform=transform, src_crs=crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=resampling, init_dest_nodata=False)
    return destination
