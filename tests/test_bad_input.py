"""Bad input to build-records: one-line errors naming the file, non-zero exit, nothing half-written."""

import shutil

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from shapely.geometry import LineString, box

from conftest import SCENE_A, build_arguments
from helpers import ORIGIN, write_polygons, write_raster, write_tcvis
from rts_tf.cli import main


def run(arguments):
    return CliRunner().invoke(main, arguments)


def replace(arguments, option, value):
    arguments = list(arguments)
    arguments[arguments.index(option) + 1] = str(value)
    return arguments


def assert_fails(result, *words, out=None):
    assert result.exit_code != 0, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: "), result.output
    for word in words:
        assert str(word) in message[0], message[0]
    assert "Traceback" not in result.output
    if out is not None:
        assert not out.exists() or not any(out.rglob("*.tfrecord*")), "half-written output"


@pytest.fixture
def copy_world(world, tmp_path):
    """A private copy of the world's scenes, to break."""
    scenes = tmp_path / "scenes"
    shutil.copytree(world["scenes"], scenes)
    return {**world, "scenes": scenes}


def test_missing_path(world, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    for option in ("--scenes", "--labels", "--dem", "--tcvis", "--sites"):
        assert_fails(run(replace(build_arguments(world, out), option, missing)), missing, out=out)


def test_file_that_is_not_a_raster(world, tmp_path):
    fake = tmp_path / "dem.tif"
    fake.write_text("this is not a GeoTIFF")
    out = tmp_path / "out"
    assert_fails(run(replace(build_arguments(world, out), "--dem", fake)), fake, "not a readable raster", out=out)


def test_truncated_raster(copy_world, tmp_path):
    sr = next((copy_world["scenes"] / SCENE_A).glob("*SR.tif"))
    sr.write_bytes(sr.read_bytes()[: sr.stat().st_size // 2])
    out = tmp_path / "out"
    assert_fails(run(build_arguments(copy_world, out)), sr.name, out=out)


@pytest.mark.parametrize("which, bands, expected", [("SR", 3, "4 bands"), ("udm2", 4, "8 bands")])
def test_wrong_band_counts_of_scene_files(copy_world, tmp_path, which, bands, expected):
    path = next((copy_world["scenes"] / SCENE_A).glob(f"*{which}.tif"))
    with rasterio.open(path) as dataset:
        profile, data = dataset.profile, dataset.read()
    write_raster(path, data[:bands], profile["crs"], profile["transform"], nodata=profile["nodata"])
    out = tmp_path / "out"
    assert_fails(run(build_arguments(copy_world, out)), path, expected, out=out)


def test_tcvis_not_three_bands(world, tmp_path):
    tcvis = write_tcvis(tmp_path / "tcvis4.tif", bands=4)
    out = tmp_path / "out"
    assert_fails(run(replace(build_arguments(world, out), "--tcvis", tcvis)), tcvis, "3 bands", out=out)


def test_scene_without_crs(copy_world, tmp_path):
    path = next((copy_world["scenes"] / SCENE_A).glob("*SR.tif"))
    with rasterio.open(path) as dataset:
        profile, data = dataset.profile, dataset.read()
    write_raster(path, data, None, profile["transform"], nodata=0)
    out = tmp_path / "out"
    assert_fails(run(build_arguments(copy_world, out)), path, "no CRS", out=out)


def test_dem_or_tcvis_not_overlapping_a_scene(world, tmp_path):
    far = (ORIGIN[0] + 50000, ORIGIN[1])
    far_dem = write_raster(tmp_path / "far_dem.tif", np.zeros((10, 10), np.float32), "EPSG:3413",
                           rasterio.transform.from_origin(-2000000, 0, 10, 10), nodata=-9999)
    far_tcvis = write_tcvis(tmp_path / "far_tcvis.tif", origin=far)
    out = tmp_path / "out"
    assert_fails(run(replace(build_arguments(world, out), "--dem", far_dem)), far_dem, "does not overlap", out=out)
    assert_fails(run(replace(build_arguments(world, out), "--tcvis", far_tcvis)), far_tcvis, "does not overlap",
                 out=out)


def test_label_files_without_polygons_crs_or_fields(world, tmp_path):
    out = tmp_path / "out"
    lines = write_polygons(tmp_path / "lines.gpkg", [LineString([(ORIGIN[0], ORIGIN[1]), (ORIGIN[0] + 9, ORIGIN[1])])],
                           {"region": ["R"]})
    assert_fails(run(replace(build_arguments(world, out), "--labels", lines)), lines, "no polygons", out=out)
    square = box(ORIGIN[0], ORIGIN[1] - 50, ORIGIN[0] + 50, ORIGIN[1])
    no_crs = write_polygons(tmp_path / "nocrs.shp", [square], {"region": ["R"]}, crs=None)  # no .prj
    assert_fails(run(replace(build_arguments(world, out), "--labels", no_crs)), no_crs, "no CRS", out=out)
    # GeoJSON is WGS84 by definition: UTM metres in it are not degrees.
    wrong_crs = write_polygons(tmp_path / "utm.geojson", [square], {"region": ["R"]}, crs=None, driver="GeoJSON")
    assert_fails(run(replace(build_arguments(world, out), "--labels", wrong_crs)), wrong_crs, "CRS", out=out)
    no_region = write_polygons(tmp_path / "noregion.gpkg", [square], {"image_id": [SCENE_A]})
    arguments = replace(build_arguments(world, out), "--labels", no_region)
    index = arguments.index("--sites")
    del arguments[index:index + 2]
    assert_fails(run(arguments), no_region, "region", out=out)
    sites_without_region = write_polygons(tmp_path / "sites.gpkg", [square], {"site": ["x"]})
    assert_fails(run(replace(build_arguments(world, out), "--sites", sites_without_region)),
                 sites_without_region, "region", out=out)


def test_overlap_not_smaller_than_tile_size(world, tmp_path):
    out = tmp_path / "out"
    assert_fails(run(replace(build_arguments(world, out), "--overlap", 32)), "--overlap", out=out)
    assert not out.exists()


def test_existing_output_with_other_settings_needs_overwrite(world, world_records, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world_records, out)
    before = sorted(p.name for p in out.rglob("*"))
    result = run(replace(build_arguments(world, out), "--overlap", 4))
    assert_fails(result, out, "different settings", "overlap", "--overwrite")
    assert sorted(p.name for p in out.rglob("*")) == before
    result = run(replace(build_arguments(world, out), "--overlap", 4) + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert "2 built" in result.output


def test_unknown_config_key(world, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("tile-size: 32\ntile_sise: 64\n")
    result = run(["build-records", "--config", str(config)])
    assert result.exit_code != 0 and "tile_sise" in result.output and str(config) in result.output


def test_dem_with_nan_and_nodata_holes_is_ignored_not_a_crash(world, tmp_path):
    dem = tmp_path / "dem"
    shutil.copytree(world["dem"], dem)
    for path in dem.iterdir():
        with rasterio.open(path, "r+") as dataset:
            data = dataset.read(1)
            data[5:15, 5:40] = np.nan
            data[20:30, 20:30] = -9999
            dataset.write(data, 1)
    out = tmp_path / "out"
    result = run(replace(build_arguments(world, out), "--dem", dem))
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists() and "ignored pixels" in result.output
