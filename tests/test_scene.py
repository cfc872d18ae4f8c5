"""The scene stack: bands, NDVI, validity, and points landing on the right pixel after alignment."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin, rowcol
from rasterio.warp import transform

from helpers import ORIGIN, SCENE_CRS, scene_bounds_in, write_dem, write_raster, write_scene, write_tcvis
from rts_tf.rasters import RasterSource
from rts_tf.bands import BAND_NAMES
from rts_tf.scene import SceneStack, Terrain, find_scenes


def stack_for(folder, dem_paths, tcvis_paths, **terrain):
    scene = find_scenes([folder])[0]
    return SceneStack(scene, RasterSource(tcvis_paths, "TCVIS", 3),
                      Terrain(RasterSource(dem_paths, "DEM", 1), **terrain))


def test_bands_ndvi_and_validity(tmp_path):
    scene = write_scene(tmp_path / "scenes", "20200710_190000_1010", size=48, nodata_border=5)
    with rasterio.open(next(scene.glob("*SR.tif")), "r+") as dataset:
        sr = dataset.read()
        sr[2, 20, 20] = sr[3, 20, 20] = 0  # red + nir = 0: NDVI must not divide by zero
        dataset.write(sr)
    udm2_path = next(scene.glob("*udm2.tif"))
    with rasterio.open(udm2_path, "r+") as dataset:
        udm2 = dataset.read()
        udm2[5, 30:34, 30:34], udm2[0, 30:34, 30:34] = 1, 0  # cloud
        udm2[3, 10:12, 30:34] = 1  # light haze stays usable
        dataset.write(udm2)
    write_dem(tmp_path / "dem.tif", lambda x, y: 0.1 * x, size=48)
    write_tcvis(tmp_path / "tcvis.tif", size=48)
    with stack_for(scene, [tmp_path / "dem.tif"], [tmp_path / "tcvis.tif"]) as stack:
        image, valid = stack.read(0, 0, 48, 48)
    assert image.shape == (48, 48, len(BAND_NAMES)) and image.dtype == np.float32
    band = {name: image[..., i] for i, name in enumerate(BAND_NAMES)}
    blue, red, nir = sr[0] / 1e4, sr[2] / 1e4, sr[3] / 1e4
    inside = valid.copy()
    np.testing.assert_allclose(band["blue"][inside], blue[inside], rtol=1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected_ndvi = np.where(red + nir > 0, (nir - red) / (nir + red), 0.0)
    np.testing.assert_allclose(band["ndvi"][inside], expected_ndvi[inside], atol=5.01e-5)  # NDVI in steps of 1e-4
    assert band["ndvi"][20, 20] == 0.0 and valid[20, 20]
    assert not valid[:5].any() and not valid[30:34, 30:34].any() and valid[10:12, 30:34].all()
    assert (image[~valid] == 0).all()
    np.testing.assert_allclose(band["tcvis_brightness"][valid], 110, atol=0.01)
    assert band["slope"][valid].mean() == pytest.approx(np.degrees(np.arctan(0.1)), abs=0.05)


def test_window_past_the_scene_edge_is_padded_invalid(tmp_path):
    scene = write_scene(tmp_path / "scenes", "20200710_190000_1011", size=40)
    write_dem(tmp_path / "dem.tif", lambda x, y: 0 * x, size=40)
    write_tcvis(tmp_path / "tcvis.tif", size=40)
    with stack_for(scene, [tmp_path / "dem.tif"], [tmp_path / "tcvis.tif"]) as stack:
        image, valid = stack.read(24, 24, 32, 32)
    assert valid[:16, :16].all() and not valid[16:].any() and not valid[:, 16:].any()
    assert (image[16:] == 0).all()


def test_points_in_3413_and_4326_land_on_the_right_scene_pixel(tmp_path):
    size = 64
    scene = write_scene(tmp_path / "scenes", "20200710_190000_1012", size=size)
    # A marker at a known UTM point, placed in a DEM (EPSG:3413, 10 m) and a TCVIS (EPSG:4326, ~30 m).
    target_x, target_y = ORIGIN[0] + 100.5, ORIGIN[1] - 80.5
    (dem_x,), (dem_y,) = transform(SCENE_CRS, "EPSG:3413", [target_x], [target_y])
    left, bottom, right, top = scene_bounds_in("EPSG:3413", size)
    dem_transform = from_origin(dem_x - 10 * np.ceil((dem_x - left) / 10) - 5,
                                dem_y + 10 * np.ceil((top - dem_y) / 10) + 5, 10, 10)
    width, height = int((right - dem_transform.c) / 10) + 2, int((dem_transform.f - bottom) / 10) + 2
    dem = np.zeros((height, width), dtype=np.float32)
    dem[rowcol(dem_transform, dem_x, dem_y)] = 50.0
    write_raster(tmp_path / "dem.tif", dem, "EPSG:3413", dem_transform, nodata=-9999)
    (lon,), (lat,) = transform(SCENE_CRS, "EPSG:4326", [target_x], [target_y])
    step_y = 0.00027
    step_x = step_y / np.cos(np.radians(lat))
    tcvis_transform = from_origin(lon - 20.5 * step_x, lat + 20.5 * step_y, step_x, step_y)
    tcvis = np.full((3, 41, 41), 100, dtype=np.uint8)
    tcvis[:, 20, 20] = 250
    write_raster(tmp_path / "tcvis.tif", tcvis, "EPSG:4326", tcvis_transform)

    with stack_for(scene, [tmp_path / "dem.tif"], [tmp_path / "tcvis.tif"]) as stack:
        image, valid = stack.read(0, 0, size, size)
        scene_transform = stack.grid.transform
    expected = np.array(rowcol(scene_transform, target_x, target_y))
    relative = image[..., BAND_NAMES.index("relative_elevation")]
    peak = np.array(np.unravel_index(np.argmax(relative), relative.shape))
    assert np.abs(peak - expected).max() <= 1, (peak, expected)
    brightness = image[..., BAND_NAMES.index("tcvis_brightness")] - 100
    rows, cols = np.nonzero(brightness > 0)
    weights = brightness[rows, cols]
    centroid = np.array([np.average(rows, weights=weights), np.average(cols, weights=weights)])
    assert np.abs(centroid - expected).max() <= 1.0, (centroid, expected)


def test_partial_dem_and_dem_holes_become_invalid(tmp_path):
    scene = write_scene(tmp_path / "scenes", "20200710_190000_1013", size=64)
    dem_path = write_dem(tmp_path / "dem.tif", lambda x, y: 0.05 * x, size=64)
    with rasterio.open(dem_path, "r+") as dataset:
        dem = dataset.read(1)
        dem[: dem.shape[0] // 2] = -9999  # nodata over the northern half
        dem[-12:-8, 10:14] = np.nan  # and a NaN hole
        dataset.write(dem, 1)
    write_tcvis(tmp_path / "tcvis.tif", size=64)
    with stack_for(scene, [dem_path], [tmp_path / "tcvis.tif"]) as stack:
        image, valid = stack.read(0, 0, 64, 64)
        scene_transform = stack.grid.transform
    with rasterio.open(dem_path) as dataset:
        half, dem_transform = dataset.height // 2, dataset.transform
    # Where does each scene pixel centre fall in the DEM? Well inside the nodata half: invalid;
    # three DEM pixels or more away from it: valid.
    rows, cols = np.mgrid[0:64, 0:64]
    x, y = scene_transform @ (cols + 0.5, rows + 0.5)
    dem_x, dem_y = transform(SCENE_CRS, "EPSG:3413", x.ravel(), y.ravel())
    dem_rows = np.array(rowcol(dem_transform, dem_x, dem_y)[0]).reshape(64, 64)
    assert (dem_rows < half - 2).any() and (dem_rows > half + 3).any()
    assert not valid[dem_rows < half - 2].any()
    hole_free = (dem_rows > half + 3) & (dem_rows < dem.shape[0] - 16)
    assert valid[hole_free].all()
    assert np.isfinite(image).all() and (image[~valid] == 0).all()


def test_precomputed_terrain_replaces_the_dem(tmp_path):
    scene = write_scene(tmp_path / "scenes", "20200710_190000_1014", size=32)
    write_tcvis(tmp_path / "tcvis.tif", size=32)
    rel = write_dem(tmp_path / "rel.tif", lambda x, y: 0 * x + 1.5, size=32)
    slope = write_dem(tmp_path / "slope.tif", lambda x, y: 0 * x + 12.0, size=32)
    folder = find_scenes([scene])[0]
    terrain = Terrain(None, RasterSource([rel], "relative elevation", 1), RasterSource([slope], "slope", 1))
    with SceneStack(folder, RasterSource([tmp_path / "tcvis.tif"], "TCVIS", 3), terrain) as stack:
        image, valid = stack.read(0, 0, 32, 32)
    assert valid.all()
    np.testing.assert_allclose(image[..., BAND_NAMES.index("relative_elevation")], 1.5, atol=1e-4)
    np.testing.assert_allclose(image[..., BAND_NAMES.index("slope")], 12.0, atol=1e-4)


def test_dem_values_below_the_floor_are_nodata_even_when_undeclared(tmp_path):
    """ArcticDEM's -9999 in a file that declares no nodata: the pixels it reaches are invalid,
    and the rest keep the relative elevation of the valid DEM (here a plane: 0 away from holes)."""
    scene = write_scene(tmp_path / "scenes", "20200711_190000_1011", size=48)
    dem_path = write_dem(tmp_path / "dem.tif", lambda x, y: 50 + 0.1 * (x - ORIGIN[0]), size=48, nodata=None)
    with rasterio.open(dem_path, "r+") as dataset:
        dem = dataset.read(1)
        hole_row, hole_col = dem.shape[0] // 2, dem.shape[1] // 2
        dem[hole_row - 3:hole_row + 3, hole_col - 3:hole_col + 3] = -9999.0
        dataset.write(dem, 1)
        assert dataset.nodata is None
        # The scene pixel at the hole's centre.
        x, y = dataset.xy(hole_row, hole_col)
    ux, uy = transform("EPSG:3413", SCENE_CRS, [x], [y])
    row, col = rowcol(from_origin(ORIGIN[0], ORIGIN[1], 3.0, 3.0), ux[0], uy[0])
    tcvis = write_tcvis(tmp_path / "t.tif", size=48)
    with stack_for(scene, [dem_path], [tcvis]) as stack:
        image, valid = stack.read(0, 0, 48, 48)
    assert not valid[row, col] and (image[row, col] == 0).all()
    relative = image[..., BAND_NAMES.index("relative_elevation")][valid]
    assert valid.sum() > 0.5 * valid.size and np.abs(relative).max() < 1.0  # no -9999 pulled into any mean
    with stack_for(scene, [dem_path], [tcvis], dem_min_valid=-1e9) as stack:
        _, all_valid = stack.read(0, 0, 48, 48)
    assert all_valid[row, col]  # told otherwise, -9999 is an elevation
