"""Polygons from mask rasters: strips give the same polygons and statistics as the whole raster."""

import numpy as np
import pytest
from rasterio.transform import from_origin

from helpers import SCENE_CRS, write_raster
from rts_tf.vectorize import polygons_from_rasters


@pytest.fixture
def rasters(tmp_path):
    rng = np.random.default_rng(4)
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[2:30, 5:9] = 1  # a tall bar crossing several strips
    mask[10, 20] = mask[11, 21] = mask[12, 22] = 1  # touching only diagonally, across strip edges
    mask[20:25, 30:45] = 1
    mask[20:25, 44:50] = 1  # runs into the right edge
    mask[35:38, 10:14] = 1
    mask[38:40, 10:14] = 255  # touches nodata
    mask[0:3, 40:48] = 1  # touches the top edge
    mask[15, 2] = 1  # a single pixel (below min_area when asked)
    probability = np.where(mask == 1, rng.uniform(0.5, 1.0, mask.shape), rng.uniform(0, 0.5, mask.shape))
    transform = from_origin(560000, 7700000, 3, 3)
    return (write_raster(tmp_path / "p.tif", probability.astype(np.float32), SCENE_CRS, transform),
            write_raster(tmp_path / "m.tif", mask, SCENE_CRS, transform), mask, probability)


def summary(polygons):
    rows = zip(polygons.attributes["area_m2"], polygons.attributes["mean_probability"],
               polygons.attributes["max_probability"], polygons.attributes["touches_nodata"], polygons.geometries)
    return sorted((round(a, 6), round(m, 6), round(x, 6), t, round(g.centroid.x, 3), round(g.centroid.y, 3), g.area)
                  for a, m, x, t, g in rows)


@pytest.mark.parametrize("strip_rows", [1, 3, 4, 7])
def test_strips_equal_the_whole_raster(rasters, strip_rows):
    probability_path, mask_path, mask, probability = rasters
    whole = polygons_from_rasters(probability_path, mask_path, 255, min_area=0, strip_rows=1000)
    strips = polygons_from_rasters(probability_path, mask_path, 255, min_area=0, strip_rows=strip_rows)
    assert summary(strips) == summary(whole)


def test_components_statistics_and_flags(rasters):
    probability_path, mask_path, mask, probability = rasters
    polygons = polygons_from_rasters(probability_path, mask_path, 255, min_area=0, strip_rows=3)
    assert len(polygons) == 6  # the diagonal chain is one component; the two touching blocks are one
    assert sum(polygons.attributes["area_m2"]) == pytest.approx((mask == 1).sum() * 9)
    for geometry, area in zip(polygons.geometries, polygons.attributes["area_m2"]):
        assert geometry.area == pytest.approx(area)
    bar = next(i for i, a in enumerate(polygons.attributes["area_m2"]) if a == 28 * 4 * 9)
    assert polygons.attributes["mean_probability"][bar] == pytest.approx(probability[2:30, 5:9].mean(), rel=1e-5)
    assert polygons.attributes["max_probability"][bar] == pytest.approx(probability[2:30, 5:9].max(), rel=1e-6)
    assert sorted(polygons.attributes["touches_nodata"]) == [0, 0, 0, 1, 1, 1]
    kept = polygons_from_rasters(probability_path, mask_path, 255, min_area=10, drop_touching=True, strip_rows=3)
    assert len(kept) == 2  # the bar and the diagonal chain; the single pixel is 9 m2
