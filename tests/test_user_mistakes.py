"""User mistakes end in one `Error:` line without a traceback; a build that writes nothing useful says so."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box

from conftest import ORIGIN_B, SCENE_A, SCENE_B, build_arguments, fit_arguments, hills
from helpers import ORIGIN, write_dem, write_polygons
from rts_tf.bands import BANDS
from rts_tf.cli import main


def run(arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def replace(arguments, option, value):
    arguments = list(arguments)
    arguments[arguments.index(option) + 1] = str(value)
    return arguments


def assert_fails(result, *words):
    """A non-zero exit with one `Error:` line holding every word, and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: "), result.output
    for word in words:
        assert str(word) in message[0], message[0]
    return message[0]


def make_run(folder, tile_size, holdout_region):
    """A finished run as `evaluate` reads it: a real (1x1 convolution) model.keras and run.json."""
    import tensorflow as tf

    inputs = tf.keras.Input((tile_size, tile_size, len(BANDS)))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    folder.mkdir(parents=True)
    model.save(str(folder / "model.keras"))
    (folder / "run.json").write_text(json.dumps({
        "complete": True, "model": "model.keras", "tile_size": tile_size, "bands": BANDS, "threshold": 0.5,
        "holdout_region": holdout_region}))
    return folder


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "world", 32, "Beta")


# --- fit options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--steps-per-epoch", 0), ("--steps-per-epoch", -3), ("--global-batch-size", 0),
    ("--schedule-step-epochs", 0), ("--schedule-decay", 0), ("--weight-decay", -0.1),
    ("--early-stopping", -1), ("--image-every", -1), ("--image-tiles", 0), ("--logical-cpus", -2)])
def test_impossible_fit_options(world_records, tmp_path, option, value):
    logdir = tmp_path / "run"
    assert_fails(run(fit_arguments(world_records, logdir, "--epochs", "1", option, value)), option, value)
    assert not logdir.exists()


# --- damaged manifests -----------------------------------------------------------------------------

def edited(key, value):
    return lambda manifest: {**manifest, key: value}


def edited_scene(key, value):
    def edit(manifest):
        manifest["scenes"][0][key] = value
        return manifest
    return edit


def without_region_statistics(manifest):
    manifest["statistics"]["regions"].pop("Beta")
    return manifest


def with_image_shape(manifest):
    manifest["features"]["image_reflectance"]["shape"] = [64, 64, 4]
    return manifest


BROKEN_MANIFESTS = {
    "a number": ("1", ["not a records manifest", "JSON object", "1 (an integer)"]),
    "a list": ("[]", ["not a records manifest", "JSON object", "a list"]),
    "a string": ('"records"', ["JSON object", "a string"]),
    "schema_version a string": (edited("schema_version", "two"), ["schema_version", "an integer", "two"]),
    "schema_version null": (edited("schema_version", None), ["schema_version", "null"]),
    "scenes an object": (edited("scenes", {}), ["scenes", "a list", "an object"]),
    "scenes a string": (edited("scenes", "A"), ["scenes", "a list"]),
    "shards a list": (edited("shards", []), ["shards", "an object", "a list"]),
    "tile_size a string": (edited("tile_size", "32"), ["tile_size", "an integer", "a string"]),
    "tile_size a fraction": (edited("tile_size", 32.5), ["tile_size", "an integer"]),
    "tile_size true": (edited("tile_size", True), ["tile_size", "an integer"]),
    "overlap too large": (edited("overlap", 40), ["overlap", "tile_size"]),
    "bands a string": (edited("bands", "blue"), ["bands", "a list"]),
    "features a list": (edited("features", []), ["features", "an object"]),
    "compression unknown": (edited("compression", "ZIP"), ["compression", "ZIP"]),
    "statistics missing": (lambda manifest: {k: v for k, v in manifest.items() if k != "statistics"},
                           ["lacks", "statistics"]),
    "a scene's tiles a string": (edited_scene("tiles", "many"), ["scenes[0].tiles", "an integer"]),
    "a scene's shards a string": (edited_scene("shards", "x.tfrecord.gz"), ["scenes[0].shards", "a list"]),
    "a scene's shard unlisted": (edited_scene("shards", ["Nowhere/x.tfrecord.gz"]),
                                 ["scenes[0].shards", "Nowhere/x.tfrecord.gz", "not in 'shards'"]),
    "a scene without region": (lambda m: {**m, "scenes": [{k: v for k, v in m["scenes"][0].items() if k != "region"},
                                                          *m["scenes"][1:]]},
                               ["scenes[0]", "lacks", "region"]),
    "region statistics missing": (without_region_statistics, ["statistics.regions", "Beta"]),
    "image shape not the tile": (with_image_shape, ["features.image_reflectance.shape", "[32, 32, 4]"]),
}


@pytest.fixture(scope="module")
def broken_records(world_records, tmp_path_factory):
    """Copies of world_records whose manifest.json is valid JSON but not a usable manifest."""
    root = tmp_path_factory.mktemp("broken")
    manifest = json.loads((world_records / "manifest.json").read_text())
    folders = {}
    for name, (edit, _) in BROKEN_MANIFESTS.items():
        folder = root / name.replace(" ", "_").replace("'", "")
        shutil.copytree(world_records, folder)
        text = edit if isinstance(edit, str) else json.dumps(edit(json.loads(json.dumps(manifest))))
        (folder / "manifest.json").write_text(text)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("command", ["inspect", "fit", "evaluate"])
@pytest.mark.parametrize("case", list(BROKEN_MANIFESTS))
def test_damaged_manifest_is_one_line_error(broken_records, world_run, tmp_path, command, case):
    records = broken_records[case]
    arguments = {"inspect": ["inspect", records, "--samples", "0"],
                 "fit": ["fit", "--records", records, "--logdir", tmp_path / "run", "--arch", "unet",
                         "--encoder", "resnet18", "--epochs", "1", "--batch-size", "2"],
                 "evaluate": ["evaluate", "--run", world_run, "--records", records, "--out", tmp_path / "scores"]}
    assert_fails(run(arguments[command]), records / "manifest.json", *BROKEN_MANIFESTS[case][1])
    assert not (tmp_path / "run").exists() and not (tmp_path / "scores").exists()


# --- builds that would write nothing useful ----------------------------------------------------------

def nodata_dem(path, origin=ORIGIN):
    return write_dem(path, lambda x, y: np.full(np.shape(x), -9999.0), origin=origin)


def test_tile_size_not_a_multiple_of_32(world, tmp_path):
    out = tmp_path / "out"
    for size in (100, 48, 16):
        message = assert_fails(run(replace(build_arguments(world, out), "--tile-size", size)),
                               "--tile-size", "multiple of 32", size)
        assert "encoder" in message
    assert not out.exists()


def test_dem_all_nodata_fails_naming_the_dem(world, tmp_path):
    dem = tmp_path / "dem"
    nodata_dem(dem / "a_dem.tif")
    nodata_dem(dem / "b_dem.tif", ORIGIN_B)
    out = tmp_path / "out"
    message = assert_fails(run(replace(build_arguments(world, out), "--dem", dem)), out, "no tiles written",
                           "--max-ignored", SCENE_A, SCENE_B, dem / "a_dem.tif", dem / "b_dem.tif", "DEM")
    assert "no valid value" in message
    # Nothing half-made is left (no manifest, settings or empty shards); building again fails the same way.
    assert not out.exists()
    again = run(replace(build_arguments(world, out), "--dem", dem))
    assert assert_fails(again) == message and not out.exists()


def test_everything_ignored_without_an_empty_source_names_max_ignored(world, tmp_path):
    # Every input covers the scenes, but a 96 px tile over a 64 px scene is more than half padding.
    out = tmp_path / "out"
    arguments = replace(build_arguments(world, out), "--tile-size", 96)
    message = assert_fails(run(arguments), out, "no tiles written", "--max-ignored 50%")
    assert "no valid value" not in message


def test_one_empty_scene_is_a_warning(world, tmp_path):
    dem = tmp_path / "dem"
    write_dem(dem / "a_dem.tif", hills)
    nodata_dem(dem / "b_dem.tif", ORIGIN_B)
    out = tmp_path / "out"
    result = run(replace(build_arguments(world, out), "--dem", dem))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert SCENE_B in warnings[0] and str(dem / "b_dem.tif") in warnings[0] and "no tiles" in warnings[0]
    assert SCENE_A not in warnings[0]
    scenes = {s["scene_id"]: s for s in json.loads((out / "manifest.json").read_text())["scenes"]}
    assert scenes[SCENE_A]["tiles"] > 0 and scenes[SCENE_B]["tiles"] == 0


def test_labels_on_no_scene_are_refused_unless_allowed(world, tmp_path):
    far = [box(ORIGIN[0] + 20000, ORIGIN[1] - 100, ORIGIN[0] + 20100, ORIGIN[1]),
           box(ORIGIN[0] + 30000, ORIGIN[1] - 100, ORIGIN[0] + 30100, ORIGIN[1]),
           box(ORIGIN[0] + 40000, ORIGIN[1] - 100, ORIGIN[0] + 40100, ORIGIN[1])]
    labels = write_polygons(tmp_path / "far.gpkg", far, {"label": ["RTS"] * 3})
    out = tmp_path / "out"
    # Refused: the records would hold background only, which looks like any other build.
    assert_fails(run(replace(build_arguments(world, out), "--labels", labels)), labels,
                 "none of its 3 slump polygon(s) lies on any of the 2 scene(s)", "--allow-no-labels")
    assert not out.exists()
    # Negatives only, on purpose: built, with a warning.
    result = run(replace(build_arguments(world, out), "--labels", labels) + ["--allow-no-labels"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert str(labels) in warnings[0] and "3 slump polygon(s)" in warnings[0] and "3 matched no scene" in warnings[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"]["unmatched"]["count"] == 3 and sum(s["slump_tiles"] for s in manifest["scenes"]) == 0

    # The world's own labels reach tiles: no warning.
    normal = run(build_arguments(world, tmp_path / "normal"))
    assert normal.exit_code == 0 and "warning:" not in normal.output, normal.output


# --- damaged shards: every one named ---------------------------------------------------------------

def damage(records, paths):
    for path in paths:
        data = (records / path).read_bytes()
        (records / path).write_bytes(data[:len(data) // 2])


def test_fit_and_evaluate_name_every_damaged_shard(demo_records, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(demo_records, records)
    manifest = json.loads((records / "manifest.json").read_text())
    held_out = sorted(path for path, info in manifest["shards"].items() if info["region"] == "Horton")
    assert len(held_out) == 2
    damage(records, held_out)
    named = [str(records / path) for path in held_out]
    assert_fails(run(fit_arguments(records, tmp_path / "run", "--epochs", "1")), *named, "truncated")
    scored = make_run(tmp_path / "scored", 64, "Horton")
    assert_fails(run(["evaluate", "--run", scored, "--records", records]), *named, "truncated")
    inspected = run(["inspect", records, "--samples", "0"])  # a report, then the error line
    assert inspected.exit_code != 0 and all(name in inspected.output for name in named), inspected.output


def test_fit_names_damaged_shards_of_training_and_test_data_together(demo_records, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(demo_records, records)
    manifest = json.loads((records / "manifest.json").read_text())
    chosen = [min(path for path, info in manifest["shards"].items() if info["region"] == region)
              for region in ("Lena", "Horton")]
    damage(records, chosen)
    assert_fails(run(fit_arguments(records, tmp_path / "run", "--epochs", "1")),
                 *[str(records / path) for path in chosen])
