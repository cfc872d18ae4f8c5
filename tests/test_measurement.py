"""A transfer score as a measurement: seeds and their spread, one scorer for every number, validation
that can select, tables that are functions of runs, and the same run from the same seed."""

import copy
import csv
import gc
import json
import statistics
import weakref
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from rts_tf.cli import main
from rts_tf.dataset import split_data
from rts_tf.errors import InputError
from rts_tf.train import validation_threshold

from conftest import fit_arguments

WORLD_FIT = ["--arch", "unet", "--encoder", "resnet18", "--decoder-filters", "8,8,8,8,8", "--batch-size", "1",
             "--image-every", "0", "--epochs", "1"]


def without_slumps(manifest: dict, selection) -> dict:
    """A copy of the manifest in which the selected tiles (and whole selected scenes) hold no slump pixel."""
    changed = copy.deepcopy(manifest)
    for scene in changed["scenes"]:
        if scene["scene_id"] not in selection.scenes:
            continue
        kept = selection.positions.get(scene["scene_id"])
        for position in scene["positions"]:
            if kept is None or (position[0], position[1]) in kept:
                position[2] = 0
        if kept is None:
            scene["slump_pixels"] = scene["slump_tiles"] = 0
    return changed


def test_validation_without_slumps_is_drawn_again_or_refused(demo_records):
    manifest = json.loads((demo_records / "manifest.json").read_text())
    for method in ("scenes", "blocks"):
        first = split_data(manifest, "Horton", method=method)
        assert first.validation.slump_pixels(manifest) > 0 and not first.stratified
        # The same draw on these records holds no slump pixel: chosen by hand, it is refused by name.
        with pytest.raises(InputError, match="holds no slump pixel") as refused:
            split_data(without_slumps(manifest, first.validation), "Horton", method=method)
        assert all(scene in str(refused.value) for scene in first.validation.scenes)
    # auto draws again, by slump content, and says how many slump pixels validation holds.
    first = split_data(manifest, "Horton")
    empty = without_slumps(manifest, first.validation)
    again = split_data(empty, "Horton")
    pixels = again.validation.slump_pixels(empty)
    assert again.stratified and pixels > 0 and again.train.slump_pixels(empty) > 0
    assert f"{pixels:,} slump pixels" in again.describe(empty) and "drawn by slump content" in again.describe(empty)
    for scene in again.validation.scenes:  # no tile both trains and validates
        if scene in again.train.positions:
            assert not again.validation.positions[scene] & again.train.positions[scene]
    regions = [r for r in manifest["regions"] if r != "Horton"]
    chosen = split_data(manifest, "Horton", val_regions=[regions[0]])
    with pytest.raises(InputError, match=f"--val-regions {regions[0]} holds no slump pixel"):
        split_data(without_slumps(manifest, chosen.validation), "Horton", val_regions=[regions[0]])


def test_slump_pixels_of_a_selection_are_counted_from_the_manifest(demo_records):
    manifest = json.loads((demo_records / "manifest.json").read_text())
    split = split_data(manifest, "Horton", method="blocks")
    by_hand = sum(p[2] for scene in manifest["scenes"] if scene["scene_id"] in split.validation.positions
                  for p in scene["positions"] if (p[0], p[1]) in split.validation.positions[scene["scene_id"]])
    assert split.validation.slump_pixels(manifest) == by_hand > 0


def test_a_flat_validation_sweep_keeps_one_half_and_says_so():
    with pytest.warns(UserWarning, match="flat"):
        threshold, source = validation_threshold({"best_iou": 0.0, "best_threshold": 0.05, "iou_spread": 0.0})
    assert threshold == 0.5 and "flat" in source and "selected" not in source
    assert validation_threshold({"best_iou": 0.4, "best_threshold": 0.35, "iou_spread": 0.2}) == \
        (0.35, "best threshold of the validation data at the best epoch")


def test_one_scorer_for_the_curves_and_evaluate(tiny_run, demo_records, tmp_path):
    """The per-epoch test curve at the best epoch is evaluate's score of the saved model at 0.5;
    transfer <= oracle and paper-style <= oracle; other regions are labelled for what they are."""
    from rts_tf.evaluate import evaluate

    run = json.loads((tiny_run / "run.json").read_text())
    best = run["best_epoch"]
    at_half = evaluate(str(tiny_run), str(demo_records), threshold=0.5, out=str(tmp_path / "half"))
    assert at_half["regions"]["Horton"]["iou"] == pytest.approx(run["history"]["test_iou"][best - 1], abs=1e-6)
    transfer = evaluate(str(tiny_run), str(demo_records), out=str(tmp_path / "transfer"))["regions"]["Horton"]
    assert transfer["kind"] == "held-out (transfer)"
    assert transfer["paper_max_iou"] == max(run["history"]["test_iou"])
    assert transfer["oracle_iou"] >= transfer["iou"] and transfer["oracle_iou"] >= transfer["paper_max_iou"]
    assert transfer["oracle_iou"] >= max(run["history"]["test_best_iou"])
    every = evaluate(str(tiny_run), str(demo_records), region="all", out=str(tmp_path / "all"))
    kinds = {name: metrics["kind"] for name, metrics in every["regions"].items()}
    assert kinds["Horton"] == "held-out (transfer)"
    assert {kinds[r] for r in run["regions"]["train"]} == {"training data"}
    table = (tmp_path / "all" / "metrics.md").read_text()
    assert "| training data |" in table and "oracle IoU" in table and "| at |" not in table


def test_the_cached_call_of_a_model_does_not_keep_it_alive():
    from rts_tf.inference import _FORWARD, forward

    inputs = tf.keras.Input((8, 8, 1))
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1)(inputs))
    np.testing.assert_allclose(forward(model)(np.ones((1, 8, 8, 1), np.float32)),
                               model(np.ones((1, 8, 8, 1), np.float32)).numpy())
    assert model in _FORWARD
    alive = weakref.ref(model)
    del model, inputs
    gc.collect()
    # Nothing the cache holds keeps the model: it is gone, and its entry with it.
    assert alive() is None and all(key is not None for key in _FORWARD.keys())


def test_same_seed_same_run_and_runtime_options_do_not_make_another_run(world_records, tmp_path):
    from rts_tf.models import load_model

    runs = []
    for name in ("first", "second"):
        logdir = tmp_path / name
        result = CliRunner().invoke(main, ["fit", "--records", str(world_records), "--logdir", str(logdir),
                                           "--holdout-region", "Beta", *WORLD_FIT])
        assert result.exit_code == 0, result.output
        runs.append(logdir)
    first, second = (json.loads((logdir / "run.json").read_text()) for logdir in runs)
    assert first["history"] == second["history"] and first["threshold"] == second["threshold"]
    for a, b in zip(load_model(runs[0] / "model.keras").get_weights(), load_model(runs[1] / "model.keras").get_weights()):
        np.testing.assert_array_equal(a, b)
    # Runtime options may change: the finished run is the same run.
    again = CliRunner().invoke(main, ["fit", "--records", str(world_records), "--logdir", str(runs[0]),
                                      "--holdout-region", "Beta", *WORLD_FIT, "--image-every", "3",
                                      "--no-deterministic", "--logical-cpus", "0"])
    assert again.exit_code == 0 and "already complete" in again.output
    # Records rebuilt with other content at the same path make another run.
    manifest = json.loads((world_records / "manifest.json").read_text())
    copied = tmp_path / "records"
    import shutil

    shutil.copytree(world_records, copied)
    path = next(iter(manifest["shards"]))
    manifest["shards"][path]["sha256"] = "0" * 64
    (copied / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(runs[0], tmp_path / "moved")
    other = CliRunner().invoke(main, ["fit", "--records", str(copied), "--logdir", str(tmp_path / "moved"),
                                      "--holdout-region", "Beta", *WORLD_FIT])
    assert other.exit_code != 0 and "another configuration (records content)" in other.output


def test_crossval_over_seeds_gives_mean_sd_and_an_ensemble_and_reads_no_foreign_score(world_records, tmp_path):
    logdir = tmp_path / "cv"
    arguments = ["crossval", "--records", str(world_records), "--logdir", str(logdir), "--regions", "Beta",
                 "--seeds", "2", *WORLD_FIT]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((logdir / "crossval.csv").open()))
    assert [row["seed"] for row in rows] == ["0", "1", "mean", "ensemble"]
    runs, mean, ensemble = rows[:2], rows[2], rows[3]
    assert [Path(row["run"]).name for row in runs] == ["seed0", "seed1"]
    ious = [float(row["iou"]) for row in runs]
    assert float(mean["iou"]) == pytest.approx(sum(ious) / 2)
    assert float(mean["iou_sd"]) == pytest.approx(statistics.stdev(ious)) and mean["n"] == "2"
    for row in runs:
        info = json.loads((Path(row["run"]) / "run.json").read_text())
        assert int(row["seed"]) == info["config"]["seed"]
        assert float(row["oracle_iou"]) >= float(row["iou"]) and float(row["oracle_iou"]) >= float(row["paper_max_iou"])
    # The ensemble: both seeds' mean probability, scored once.
    from rts_tf.evaluate import evaluate

    by_hand = evaluate([row["run"] for row in runs], str(world_records), region="Beta", out=str(tmp_path / "ens"))
    assert float(ensemble["iou"]) == pytest.approx(by_hand["overall"]["iou"]) and ensemble["n"] == "2"
    table = (logdir / "crossval.md").read_text()
    assert f"{statistics.mean(ious):.3f} ± {statistics.stdev(ious):.3f}" in table and "Seed ensemble" in table
    # A score evaluate wrote by hand (all regions, another threshold) is never read back as the cell's.
    for extra in (["--region", "all"], ["--threshold", "0.2"]):
        hand = CliRunner().invoke(main, ["evaluate", "--run", runs[0]["run"], "--records", str(world_records), *extra])
        assert hand.exit_code == 0, hand.output
    cached = Path(runs[0]["run"]) / "crossval" / "metrics.json"
    stale = json.loads(cached.read_text())
    stale["key"], stale["regions"]["Beta"]["iou"] = "another run", 0.987
    cached.write_text(json.dumps(stale))
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 0 and "0 runs trained, 2 already complete" in again.output
    assert list(csv.DictReader((logdir / "crossval.csv").open())) == rows


from test_predict import make_run, pixel_model, predict_arguments, scene_world  # noqa: E402,F401


def test_predict_warns_about_a_run_selected_on_nothing_and_a_scene_mapped_as_slump(scene_world, tmp_path):
    from rts_tf.bands import BANDS

    run = make_run(tmp_path / "nothing", pixel_model(np.zeros(len(BANDS)), np.log(0.3 / 0.7)))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "metrics": {"iou": 0.0}}))
    world = {**scene_world, "runs": {**scene_world["runs"], "nothing": run}}
    quiet = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / "quiet", "constant"))
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    # The constant model gives 0.3 everywhere: at threshold 0.2 every valid pixel is a slump.
    result = CliRunner().invoke(main, predict_arguments(world, tmp_path / "out", "nothing",
                                                        extra=["--threshold", "0.2"]))
    assert result.exit_code == 0, result.output
    assert "its best validation IoU is 0" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["scenes"][0]
    # 90 x 100 px of 3 m with a 6-row nodata strip: 94 x 90 valid pixels.
    assert summary["valid_km2"] == pytest.approx(94 * 90 * 9 / 1e6)
    assert "over half of the scene's 7.6 ha of valid pixels" in result.output
