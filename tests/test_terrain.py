"""Terrain against analytic values: slope of tilted planes, relative elevation of a bowl."""

import numpy as np
import pytest

from rts_tf.terrain import relative_elevation, slope_degrees


@pytest.mark.parametrize("gradient_x, gradient_y, resolution", [(0.1, 0.2, 10.0), (1.0, 0.0, 2.0), (0.0, -0.5, 32.0)])
def test_slope_of_tilted_plane(gradient_x, gradient_y, resolution):
    rows, cols = np.mgrid[0:50, 0:60].astype(np.float64)
    plane = gradient_x * cols * resolution - gradient_y * rows * resolution
    slope = slope_degrees(plane, resolution, resolution)
    expected = np.degrees(np.arctan(np.hypot(gradient_x, gradient_y)))
    np.testing.assert_allclose(slope[1:-1, 1:-1], expected, atol=1e-3)


def test_slope_with_rectangular_pixels():
    rows, cols = np.mgrid[0:20, 0:20].astype(np.float64)
    surface = 0.3 * cols * 4.0  # 4 m wide pixels, rising 0.3 m per metre eastwards
    slope = slope_degrees(surface, 4.0, 8.0)
    np.testing.assert_allclose(slope[1:-1, 1:-1], np.degrees(np.arctan(0.3)), atol=1e-3)


def test_relative_elevation_of_bowl_matches_analytic_mean():
    # z = a r^2; the mean of z over a disk of radius R around a point at distance d is a (d^2 + R^2/2),
    # so the relative elevation is -a R^2 / 2 everywhere away from the edges.
    resolution, radius, a = 5.0, 100.0, 0.002
    rows, cols = np.mgrid[0:200, 0:200].astype(np.float64)
    x, y = (cols - 100) * resolution, (rows - 100) * resolution
    bowl = a * (x ** 2 + y ** 2)
    relative = relative_elevation(bowl, resolution, resolution, radius)
    inner = relative[30:-30, 30:-30]
    np.testing.assert_allclose(inner, -a * radius ** 2 / 2, rtol=0.02)


def test_relative_elevation_of_flat_ground_with_a_mound():
    dem = np.zeros((101, 101), dtype=np.float32)
    dem[50, 50] = 10.0
    relative = relative_elevation(dem, 10.0, 10.0, 30.0)
    assert relative[50, 50] == pytest.approx(10.0 - 10.0 / 29, rel=1e-3)  # 29 pixels in a 3-pixel disk
    assert relative[0, 0] == pytest.approx(0.0, abs=1e-4)


def test_holes_stay_holes_and_do_not_spread_far():
    dem = np.tile(np.arange(80, dtype=np.float32), (80, 1))
    dem[40, 40] = np.nan
    relative = relative_elevation(dem, 10.0, 10.0, 50.0)
    slope = slope_degrees(dem, 10.0, 10.0)
    assert np.isnan(relative[40, 40]) and np.isnan(slope[40, 40])
    assert np.isfinite(relative).sum() == 80 * 80 - 1
    assert np.isfinite(slope).sum() == 80 * 80 - 9  # the 3x3 Horn window around the hole
