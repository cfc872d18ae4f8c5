"""`rts-tf predict`: seamless full coverage, exact grids, polygons, ensembles, and bad input."""

import json
import shutil

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import tensorflow as tf
from click.testing import CliRunner

from helpers import write_dem, write_scene, write_tcvis
from rts_tf.cli import main
from rts_tf.bands import BAND_NAMES, BANDS

SCENE = "20210720_190000_1020"


def make_run(folder, model, tile_size=32, bands=BANDS, threshold=0.5):
    """A run folder as `rts-tf fit` leaves it: model.keras and run.json."""
    folder.mkdir(parents=True)
    model.save(str(folder / "model.keras"))
    (folder / "run.json").write_text(json.dumps({"complete": True, "model": "model.keras", "tile_size": tile_size,
                                                 "bands": bands, "threshold": threshold}))
    return folder


def pixel_model(kernel, bias, tile_size=32):
    """A real Keras model: sigmoid of a 1x1 convolution of the 10 bands."""
    inputs = tf.keras.Input((tile_size, tile_size, len(BANDS)))
    layer = tf.keras.layers.Conv2D(1, 1, activation="sigmoid", name="probability")
    model = tf.keras.Model(inputs, layer(inputs))
    layer.set_weights([np.asarray(kernel, np.float32).reshape(1, 1, len(BANDS), 1), np.array([bias], np.float32)])
    return model


def textured_model(seed):
    """Random weights on reflectance and NDVI, centred on the fixture's typical values: the output
    follows the scene's pixel texture without saturating."""
    kernel = np.zeros(len(BANDS))
    kernel[:5] = np.random.default_rng(seed).normal(0, 40, 5)
    typical = np.array([0.03, 0.05, 0.04, 0.25, 0.72])
    return pixel_model(kernel, -float(kernel[:5] @ typical))


@pytest.fixture(scope="module")
def scene_world(tmp_path_factory):
    """A 100 x 90 px scene (not a multiple of the tile) with a bright-red square slump and a nodata strip."""
    root = tmp_path_factory.mktemp("predict")
    folder = write_scene(root / "scenes", SCENE, size=100, nodata_border=6)
    sr_path = next(folder.glob("*SR.tif"))
    with rasterio.open(sr_path) as dataset:
        profile, data = dataset.profile, dataset.read()
    data = data[:, :, :90]
    data[2, 40:60, 30:50] = 1500  # red reflectance 0.15 in a 20 x 20 px square
    profile.update(width=90)
    with rasterio.open(sr_path, "w", **profile) as dataset:
        dataset.write(data)
    udm2 = next(folder.glob("*udm2.tif"))
    with rasterio.open(udm2) as dataset:
        profile, data = dataset.profile, dataset.read()[:, :, :90]
    profile.update(width=90)
    with rasterio.open(udm2, "w", **profile) as dataset:
        dataset.write(data)
    write_dem(root / "dem.tif", lambda x, y: 0.05 * x, size=100)
    write_tcvis(root / "tcvis.tif", size=100)
    red = np.zeros(len(BANDS))
    red[BAND_NAMES.index("red")] = 200.0
    runs = {
        "constant": make_run(root / "constant", pixel_model(np.zeros(len(BANDS)), np.log(0.3 / 0.7))),
        "red": make_run(root / "red", pixel_model(red, -200.0 * 0.1)),
        "random_a": make_run(root / "random_a", textured_model(1)),
        "random_b": make_run(root / "random_b", textured_model(2)),
    }
    return {"root": root, "scene": folder, "runs": runs}


def predict_arguments(world, out, *runs, extra=()):
    arguments = ["predict", "--scene", str(world["scene"]), "--dem", str(world["root"] / "dem.tif"),
                 "--tcvis", str(world["root"] / "tcvis.tif"), "--out", str(out), "--min-area", "0"]
    for run in runs:
        arguments += ["--run", str(world["runs"][run])]
    return arguments + list(extra)


def read(out, kind):
    with rasterio.open(out / SCENE / f"{SCENE}_{kind}.tif") as dataset:
        return dataset.read(1), dataset.profile, dataset


def test_constant_model_covers_every_pixel_without_seams(scene_world, tmp_path):
    result = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / "out", "constant"))
    assert result.exit_code == 0, result.output
    probability, profile, _ = read(tmp_path / "out", "probability")
    valid = probability != -1
    assert valid[6:].all() and not valid[:6].any()  # every usable pixel is covered; nodata stays nodata
    np.testing.assert_allclose(probability[valid], 0.3, atol=1e-6)


def test_outputs_have_exactly_the_scene_grid_and_are_cloud_optimised(scene_world, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, predict_arguments(scene_world, out, "red"))
    assert result.exit_code == 0, result.output
    with rasterio.open(next(scene_world["scene"].glob("*SR.tif"))) as scene:
        for kind in ("probability", "mask"):
            with rasterio.open(out / SCENE / f"{SCENE}_{kind}.tif") as dataset:
                assert dataset.crs == scene.crs and dataset.transform == scene.transform
                assert (dataset.width, dataset.height) == (scene.width, scene.height) == (90, 100)
                assert dataset.profile["tiled"] and dataset.compression is not None
                assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    if shutil.which("gdalinfo"):
        import subprocess

        info = subprocess.run(["gdalinfo", str(out / SCENE / f"{SCENE}_probability.tif")], capture_output=True,
                              text=True).stdout
        assert "Size is 90, 100" in info and "LAYOUT=COG" in info


def test_polygons_reopen_and_their_areas_match_the_mask(scene_world, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, predict_arguments(scene_world, out, "red"))
    assert result.exit_code == 0, result.output
    mask, _, _ = read(out, "mask")
    assert (mask == 1).sum() == 400 and (mask[40:60, 30:50] == 1).all()
    meta, _, geometry, fields = pyogrio.raw.read(out / SCENE / f"{SCENE}_polygons.gpkg")
    columns = dict(zip(meta["fields"], fields))
    assert len(geometry) == 1 and columns["area_m2"][0] == pytest.approx(400 * 9.0)
    assert shapely.from_wkb(geometry[0]).area == pytest.approx(400 * 9.0)
    assert columns["scene_id"][0] == SCENE and columns["image_date"][0] == np.datetime64("2021-07-20")  # a DATE
    assert 0.5 < columns["mean_probability"][0] <= columns["max_probability"][0] <= 1.0
    merged_meta, _, merged, _ = pyogrio.raw.read(out / "rts_polygons.gpkg", layer="detections")
    assert "4326" in merged_meta["crs"] and len(merged) == 1
    lon, lat = shapely.from_wkb(merged[0]).centroid.coords[0]
    assert -140 < lon < -130 and 69 < lat < 70.5


def test_ensemble_is_the_mean_of_its_runs(scene_world, tmp_path):
    runner = CliRunner()
    for name, runs in (("a", ["random_a"]), ("b", ["random_b"]), ("ab", ["random_a", "random_b"])):
        result = runner.invoke(main, predict_arguments(scene_world, tmp_path / name, *runs))
        assert result.exit_code == 0, result.output
    a, b, ab = (read(tmp_path / name, "probability")[0] for name in ("a", "b", "ab"))
    valid = a != -1
    assert a[valid].std() > 0.01  # the models see the scene's texture
    np.testing.assert_allclose(ab[valid], (a[valid] + b[valid]) / 2, atol=1e-5)


def test_flip_augmentation_of_a_pixelwise_model_changes_nothing(scene_world, tmp_path):
    runner = CliRunner()
    plain = runner.invoke(main, predict_arguments(scene_world, tmp_path / "plain", "random_a"))
    flipped = runner.invoke(main, predict_arguments(scene_world, tmp_path / "tta", "random_a", extra=["--tta"]))
    assert plain.exit_code == 0 and flipped.exit_code == 0, flipped.output
    np.testing.assert_allclose(read(tmp_path / "plain", "probability")[0], read(tmp_path / "tta", "probability")[0],
                               atol=1e-5)


def test_reading_rows_in_groups_of_windows_changes_nothing(scene_world, tmp_path, monkeypatch):
    import rts_tf.predict

    runner = CliRunner()
    rows = runner.invoke(main, predict_arguments(scene_world, tmp_path / "rows", "random_a", extra=["--batch-size", "4"]))
    monkeypatch.setattr(rts_tf.predict, "WINDOWS_PER_READ", 1)  # one read per window: 4 groups in each row
    single = runner.invoke(main, predict_arguments(scene_world, tmp_path / "single", "random_a",
                                                   extra=["--batch-size", "1"]))
    assert rows.exit_code == 0 and single.exit_code == 0, single.output
    np.testing.assert_allclose(read(tmp_path / "rows", "probability")[0], read(tmp_path / "single", "probability")[0],
                               atol=1e-5)
    np.testing.assert_array_equal(read(tmp_path / "rows", "mask")[0], read(tmp_path / "single", "mask")[0])


def test_bad_predict_input(scene_world, tmp_path):
    runner = CliRunner()

    def fails(arguments, *words):
        result = runner.invoke(main, arguments)
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output and result.output.startswith("Error")
        for word in words:
            assert str(word) in result.output, result.output

    empty = tmp_path / "empty_run"
    empty.mkdir()
    scene_world["runs"]["empty"] = empty
    fails(predict_arguments(scene_world, tmp_path / "o1", "empty"), empty, "run.json")
    no_model = tmp_path / "no_model"
    shutil.copytree(scene_world["runs"]["red"], no_model)
    (no_model / "model.keras").unlink()
    scene_world["runs"]["no_model"] = no_model
    fails(predict_arguments(scene_world, tmp_path / "o2", "no_model"), "no model file")
    scene_world["runs"]["swir"] = make_run(tmp_path / "swir", pixel_model(np.zeros(len(BANDS)), 0.0),
                                           bands=BANDS[:9] + [{"name": "swir", "unit": "reflectance"}])
    fails(predict_arguments(scene_world, tmp_path / "o3", "swir"), "swir")
    fails(predict_arguments(scene_world, tmp_path / "o4", "red", extra=["--threshold", "1.5"]), "--threshold")
    far_tcvis = write_tcvis(tmp_path / "far.tif", origin=(700000.0, 7600000.0))
    arguments = predict_arguments(scene_world, tmp_path / "o5", "red")
    arguments[arguments.index("--tcvis") + 1] = str(far_tcvis)
    fails(arguments, far_tcvis, "does not overlap")
    degrees = tmp_path / "degrees"
    shutil.copytree(scene_world["scene"], degrees / SCENE)
    sr = next((degrees / SCENE).glob("*SR.tif"))
    with rasterio.open(sr) as dataset:
        profile, data = dataset.profile, dataset.read()
    profile.update(crs="EPSG:4326", transform=rasterio.transform.from_origin(-133, 69.5, 0.0001, 0.0001))
    with rasterio.open(sr, "w", **profile) as dataset:
        dataset.write(data)
    arguments = predict_arguments(scene_world, tmp_path / "o6", "red")
    arguments[arguments.index("--scene") + 1] = str(degrees)
    fails(arguments, sr, "metre")
    out = tmp_path / "o7"
    assert runner.invoke(main, predict_arguments(scene_world, out, "constant")).exit_code == 0
    before = read(out, "probability")[0]
    fails(predict_arguments(scene_world, out, "red"), out, "--overwrite")
    np.testing.assert_array_equal(read(out, "probability")[0], before)
    assert runner.invoke(main, predict_arguments(scene_world, out, "red", extra=["--overwrite"])).exit_code == 0


def test_a_rerun_skips_complete_scenes_and_redoes_unfinished_ones(scene_world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    assert runner.invoke(main, predict_arguments(scene_world, out, "red")).exit_code == 0
    probability = out / SCENE / f"{SCENE}_probability.tif"
    written = probability.stat().st_mtime_ns
    again = runner.invoke(main, predict_arguments(scene_world, out, "red"))
    assert again.exit_code == 0 and "(0 now, 1 already complete)" in again.output, again.output
    assert probability.stat().st_mtime_ns == written
    assert len(pyogrio.raw.read(out / "rts_polygons.gpkg")[2]) == 1  # the merged file still holds the scene
    # Without its completion marker (an attempt killed after its maps) a scene is predicted again,
    # and temporaries of dead attempts are removed.
    (out / SCENE / f"{SCENE}_complete.json").unlink()
    (out / SCENE / ".probability.0123456789ab.staging.tif").write_bytes(b"left by a killed attempt")
    redone = runner.invoke(main, predict_arguments(scene_world, out, "red"))
    assert redone.exit_code == 0 and "already complete" not in redone.output, redone.output
    assert probability.stat().st_mtime_ns != written and not list(out.rglob("*staging*"))
    other = runner.invoke(main, predict_arguments(scene_world, out, "red", extra=["--threshold", "0.7"]))
    assert other.exit_code != 0 and "threshold" in other.output and "--overwrite" in other.output
