"""Terrain bands from a DEM: slope (degrees) and relative elevation (metres), on the DEM's own grid."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def slope_degrees(dem: np.ndarray, pixel_width: float, pixel_height: float) -> np.ndarray:
    """Slope in degrees by Horn's method (as `gdaldem slope`); NaN where a neighbour is NaN.

    The outermost rows and columns use replicated edges, so callers read a halo and crop it.
    """
    dem = np.asarray(dem, dtype=np.float32)
    # Horn's 3x3 weights (1, 2, 1) are exactly scipy's Sobel; divide by 8 x pixel size.
    dz_dx = ndimage.sobel(dem, axis=1, mode="nearest") / (8.0 * pixel_width)
    dz_dy = ndimage.sobel(dem, axis=0, mode="nearest") / (8.0 * pixel_height)
    return np.degrees(np.arctan(np.hypot(dz_dx, dz_dy))).astype(np.float32)


def disk(radius_pixels_x: float, radius_pixels_y: float) -> np.ndarray:
    """A boolean disk footprint of the given radius in pixels along x and y (pixel centres inside)."""
    half_x, half_y = int(np.floor(radius_pixels_x)), int(np.floor(radius_pixels_y))
    y, x = np.mgrid[-half_y:half_y + 1, -half_x:half_x + 1]
    return (x / radius_pixels_x) ** 2 + (y / radius_pixels_y) ** 2 <= 1.0


def relative_elevation(dem: np.ndarray, pixel_width: float, pixel_height: float,
                       radius: float = 100.0) -> np.ndarray:
    """Elevation minus its mean within a circle of `radius` metres, ignoring NaN holes.

    The circular mean is a normalised convolution done by FFT (overlap-add), so its cost does not
    grow with the footprint. Pixels that are NaN stay NaN; near holes the mean uses the valid
    pixels of the circle only.
    """
    # Imported here: scipy.signal takes about 0.5 s to import, a cost for every worker process
    # even when the terrain is precomputed.
    from scipy import signal

    dem = np.asarray(dem, dtype=np.float32)
    footprint = disk(radius / pixel_width, radius / pixel_height).astype(np.float64)
    valid = np.isfinite(dem)
    filled = np.where(valid, dem, 0.0).astype(np.float64)
    # Subtract a reference level first: sums of large elevations lose precision in float32 FFTs.
    reference = float(filled[valid].mean()) if valid.any() else 0.0
    filled = np.where(valid, filled - reference, 0.0)
    sums = signal.oaconvolve(filled, footprint, mode="same")
    counts = signal.oaconvolve(valid.astype(np.float64), footprint, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / np.round(counts)
    result = (filled - mean).astype(np.float32)
    result[~valid | (np.round(counts) < 1)] = np.nan
    return result
