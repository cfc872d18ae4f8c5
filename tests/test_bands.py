"""Band sets: records of a subset of the ten bands, runs on a subset, predict without the sources a
model does not use, and the band-ablation table of crossval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tensorflow as tf
from click.testing import CliRunner

from conftest import SCENE_B, build_arguments
from rts_tf.bands import BAND_NAMES, BANDS, parse_bands
from rts_tf.cli import main
from rts_tf.records import decode_example, read_manifest
from rts_tf.tiling import tile_offsets

OPTICAL_TERRAIN = ["blue", "green", "red", "nir", "ndvi", "relative_elevation", "slope"]
RUN_BANDS = ["blue", "green", "red", "nir", "ndvi", "slope"]  # fit --bands optical,slope of those records
TINY_FIT = ["--arch", "unet", "--encoder", "resnet18", "--decoder-filters", "8,8,8,8,8", "--epochs", "1",
            "--batch-size", "1", "--image-every", "0", "--no-test-curves"]


def without(arguments: list[str], option: str) -> list[str]:
    """Command-line arguments without one option and its value."""
    index = arguments.index(option)
    return arguments[:index] + arguments[index + 2:]


def tiles_of(records: Path) -> dict[tuple[str, int, int], dict]:
    manifest = read_manifest(records)
    paths = [str(records / path) for path in manifest["shards"]]
    dataset = tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
    return {(t["scene_id"].decode(), int(t["row"]), int(t["col"])): t
            for t in dataset.map(lambda s: decode_example(s, manifest)).as_numpy_iterator()}


@pytest.fixture(scope="module")
def optical_terrain(world, tmp_path_factory):
    """Records of optical+terrain bands built without --tcvis, and a one-epoch run on a subset of
    them (fit --bands optical,slope)."""
    root = tmp_path_factory.mktemp("bands")
    arguments = without(build_arguments(world, root / "records"), "--tcvis") + ["--bands", "optical+terrain"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    run = root / "run"
    result = CliRunner().invoke(main, ["fit", "--records", str(root / "records"), "--logdir", str(run),
                                       "--bands", "optical,slope", *TINY_FIT])
    assert result.exit_code == 0, result.output
    return {"records": root / "records", "run": run, "root": root}


def test_parse_bands_names_groups_and_order():
    assert parse_bands("optical+terrain") == OPTICAL_TERRAIN
    assert parse_bands("slope, red,optical") == ["blue", "green", "red", "nir", "ndvi", "slope"]
    assert parse_bands("all") == BAND_NAMES
    assert parse_bands("all", available=["red", "slope"]) == ["red", "slope"]
    with pytest.raises(ValueError, match="unknown band or group 'tcvi'"):
        parse_bands("optical+tcvi")


def test_records_of_a_band_subset_hold_the_same_values(optical_terrain, world_records):
    """Records built without TCVIS hold the seven bands, bit for bit those of the ten-band records
    of the same inputs, and their statistics are those bands' statistics."""
    records = optical_terrain["records"]
    manifest = read_manifest(records)
    assert [band["name"] for band in manifest["bands"]] == OPTICAL_TERRAIN
    assert "image_tcvis" not in manifest["features"]
    assert manifest["features"]["image_terrain"]["bands"] == ["relative_elevation", "slope"]
    assert manifest["settings"]["bands"] == OPTICAL_TERRAIN
    assert manifest["recipe"]["terrain"] == "dem"
    subset, full = tiles_of(records), tiles_of(world_records)
    # The world's TCVIS covers both scenes: the same pixels are valid, so the same tiles are kept.
    assert sorted(subset) == sorted(full) and len(subset) > 4
    indexes = [BAND_NAMES.index(name) for name in OPTICAL_TERRAIN]
    for key, tile in subset.items():
        np.testing.assert_array_equal(tile["label"], full[key]["label"])
        np.testing.assert_array_equal(tile["image"], full[key]["image"][..., indexes])
    full_stats = read_manifest(world_records)["statistics"]["regions"]
    for region, stats in manifest["statistics"]["regions"].items():
        assert stats["count"] == full_stats[region]["count"]
        np.testing.assert_allclose(stats["sum"], np.array(full_stats[region]["sum"])[indexes], rtol=1e-12)


def test_band_subset_from_records_to_predict(optical_terrain, world, tmp_path):
    """A run of optical+terrain records predicts without --tcvis: its probability GeoTIFF on the
    scene grid equals the run's tiles of the records blended as evaluate blends them."""
    from rts_tf.evaluate import blend_records_scene
    from rts_tf.inference import load_run
    from rts_tf.records import select_bands
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", "--run", str(optical_terrain["run"]), "--scene",
                                       str(world["scenes"] / SCENE_B), "--dem", str(world["dem"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = optical_terrain["records"]
    manifest = select_bands(read_manifest(records), RUN_BANDS)
    scene = next(s for s in manifest["scenes"] if s["scene_id"] == SCENE_B)
    run = load_run(optical_terrain["run"])
    expected = np.concatenate([strip for _, strip, _ in blend_records_scene(str(records), manifest, scene, [run])])
    with rasterio.open(out / SCENE_B / f"{SCENE_B}_probability.tif") as dataset:
        assert (dataset.width, dataset.height) == (scene["width"], scene["height"])
        assert list(dataset.transform)[:6] == scene["transform"]
        probability = dataset.read(1)
    assert expected.shape == probability.shape == (64, 64)
    # predict covers the windows that build-records dropped (mostly ignored pixels) too: compare elsewhere.
    kept = {(row, col) for row, col, _ in scene["positions"]}
    compared = np.ones((64, 64), dtype=bool)
    for row in tile_offsets(64, 32, 8):
        for col in tile_offsets(64, 32, 8):
            if (row, col) not in kept:
                compared[row:row + 32, col:col + 32] = False
    assert compared.sum() >= 3000
    np.testing.assert_allclose(probability[compared], expected[compared], atol=1e-6)


def test_predict_asks_for_tcvis_only_when_the_run_needs_it(optical_terrain, world, tmp_path):
    """A run of the ten bands without --tcvis: a one-line error naming the option and the bands; nothing written."""
    inputs = tf.keras.Input((32, 32, len(BANDS)))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    run = tmp_path / "ten"
    run.mkdir()
    model.save(str(run / "model.keras"))
    (run / "run.json").write_text(json.dumps({"complete": True, "model": "model.keras", "tile_size": 32,
                                              "bands": BANDS, "threshold": 0.5}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", "--run", str(run), "--scene", str(world["scenes"]),
                                       "--dem", str(world["dem"]), "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # a ClickException, no traceback
    assert result.output.strip() == ("Error: give --tcvis: the bands tcvis_brightness, tcvis_greenness, "
                                     "tcvis_wetness are made from it")
    assert not out.exists()
    # A run without terrain bands would need no DEM either: the optical,slope run does.
    result = CliRunner().invoke(main, ["predict", "--run", str(optical_terrain["run"]), "--scene",
                                       str(world["scenes"]), "--out", str(out)])
    assert result.exit_code != 0
    assert result.output.strip() == "Error: give --dem (or --rel-elevation and --slope): the band slope is made from it"


def test_build_records_needs_a_source_only_for_its_bands(world, tmp_path):
    out = tmp_path / "records"
    arguments = without(build_arguments(world, out), "--tcvis")
    result = CliRunner().invoke(main, arguments)  # the ten bands: TCVIS needed
    assert result.exit_code != 0
    assert result.output.strip() == ("Error: give --tcvis: the bands tcvis_brightness, tcvis_greenness, "
                                     "tcvis_wetness are made from it")
    assert not (out / "manifest.json").exists()
    result = CliRunner().invoke(main, arguments + ["--bands", "optical+tcvi"])
    assert result.exit_code != 0 and "unknown band or group 'tcvi'" in result.output


def test_fit_on_a_subset_of_the_records_bands(optical_terrain, world_records):
    """fit --bands optical,slope: a 6-channel model, run.json lists the six bands and their
    normalisation is the training regions' statistics of those bands. evaluate reads only them,
    from the seven-band records or the ten-band ones alike (same values, same scores)."""
    from rts_tf.models import load_model

    run = optical_terrain["run"]
    info = json.loads((run / "run.json").read_text())
    assert [band["name"] for band in info["bands"]] == RUN_BANDS
    assert load_model(run / "model.keras").input_shape == (None, 32, 32, 6)
    stats = read_manifest(optical_terrain["records"])["statistics"]["regions"]
    indexes = [OPTICAL_TERRAIN.index(name) for name in RUN_BANDS]
    count = sum(stats[region]["count"] for region in info["regions"]["train"])
    mean = sum(np.array(stats[region]["sum"])[indexes] for region in info["regions"]["train"]) / count
    np.testing.assert_allclose(info["normalisation"]["mean"], mean, rtol=1e-6)
    scores = []
    for records, out in ((optical_terrain["records"], "seven"), (world_records, "ten")):
        result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--records", str(records), "--region", "all",
                                           "--out", str(optical_terrain["root"] / out)])
        assert result.exit_code == 0, result.output
        scores.append(json.loads((optical_terrain["root"] / out / "metrics.json").read_text())["overall"])
    assert scores[0]["scenes"] == 2 and scores[0]["slump_pixels"] > 0
    assert {key: scores[0][key] for key in ("iou", "f1", "best_iou", "slump_pixels")} == \
        {key: scores[1][key] for key in ("iou", "f1", "best_iou", "slump_pixels")}


def test_fit_refuses_bands_the_records_lack(optical_terrain, tmp_path):
    result = CliRunner().invoke(main, ["fit", "--records", str(optical_terrain["records"]), "--logdir",
                                       str(tmp_path / "run"), "--bands", "optical+tcvis", *TINY_FIT])
    assert result.exit_code != 0
    assert "the records hold no tcvis_brightness, tcvis_greenness, tcvis_wetness" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # one tiny run and its scoring: over half a minute on two cores
def test_crossval_band_ablation_table(world_records, tmp_path):
    """--band-set makes each band set a column beside the model, its runs trained on those bands
    (one band set and one held-out region here, to keep it to one tiny run)."""
    logdir = tmp_path / "cv"
    result = CliRunner().invoke(main, ["crossval", "--records", str(world_records), "--arch", "unet", "--encoder",
                                       "resnet18", "--logdir", str(logdir), "--epochs", "1", "--batch-size", "1",
                                       "--decoder-filters", "8,8,8,8,8", "--image-every", "0", "--regions", "Alpha",
                                       "--band-set", "opt=optical,slope"])
    assert result.exit_code == 0, result.output
    table = (logdir / "crossval.md").read_text()
    assert "| held-out region | unet resnet18 [opt] | mean over columns |" in table
    assert "opt = blue,green,red,nir,ndvi,slope" in table
    rows = [row for row in csv.DictReader((logdir / "crossval.csv").open()) if row["seed"] != "mean"]
    assert [(row["region"], row["band_set"], row["bands"]) for row in rows] == [("Alpha", "opt", ",".join(RUN_BANDS))]
    for row in rows:
        run = json.loads((Path(row["run"]) / "run.json").read_text())
        assert ",".join(band["name"] for band in run["bands"]) == row["bands"]
        assert Path(row["run"]) == logdir / "unet_resnet18" / row["band_set"] / "Alpha"
