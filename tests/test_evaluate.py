"""Evaluation: object-level and boundary metrics on hand-made cases, and `rts-tf evaluate` on a real run."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from rts_tf.cli import main
from rts_tf.evaluate import Counts, boundary_overlap, match_objects, score_scene


def blank():
    return np.zeros((40, 60), dtype=bool)


def test_a_slightly_shifted_slump_matches():
    truth, predicted = blank(), blank()
    truth[5:15, 5:15] = True
    predicted[6:16, 5:15] = True  # IoU 90/110
    assert match_objects(truth, predicted) == (1, 1, 1)


def test_a_split_slump_does_not_match():
    truth, predicted = blank(), blank()
    truth[5:15, 5:15] = True
    predicted[5:15, 5:9] = predicted[5:15, 11:15] = True  # two halves, each IoU 0.4
    assert match_objects(truth, predicted) == (1, 2, 0)


def test_merged_slumps_do_not_match():
    truth, predicted = blank(), blank()
    truth[5:15, 5:15] = truth[5:15, 17:27] = True
    predicted[5:15, 5:27] = True  # one blob over both and the gap: each IoU 100/220
    assert match_objects(truth, predicted) == (2, 1, 0)


def test_missed_and_false_slumps_count_against_recall_and_precision():
    truth, predicted = blank(), blank()
    truth[5:15, 5:15] = truth[25:35, 40:50] = True  # the second is missed
    predicted[5:15, 5:15] = predicted[25:30, 5:10] = True  # the second is false
    counts = Counts()
    label = truth.astype(np.uint8)
    counts.add(score_scene(label, predicted.astype(np.float32)))
    metrics = counts.metrics()
    assert (metrics["true_objects"], metrics["predicted_objects"]) == (2, 2)
    assert metrics["object_precision"] == metrics["object_recall"] == metrics["object_f1"] == 0.5
    assert metrics["iou"] == pytest.approx(100 / (100 + 25 + 100))


def test_predicted_specks_under_the_minimum_size_are_not_objects():
    truth, predicted = blank(), blank()
    truth[5:15, 5:15] = True
    predicted[5:15, 5:15] = True
    predicted[30:33, 40:44] = True  # a 12-pixel speck: 108 m2 at 3 m
    predicted[30:32, 50:55] = True  # a 10-pixel speck: 90 m2
    assert match_objects(truth, predicted) == (1, 3, 1)
    assert match_objects(truth, predicted, min_pixels=12) == (1, 2, 1)
    assert match_objects(truth, predicted, min_pixels=13) == (1, 1, 1)
    counts = score_scene(truth.astype(np.uint8), predicted.astype(np.float32), min_pixels=13)
    assert counts.fp == 22  # pixel metrics still count every pixel


def test_ignored_pixels_are_excluded_everywhere():
    truth = blank()
    truth[5:15, 5:15] = True
    label = truth.astype(np.uint8)
    label[:, 30:] = 255
    probability = truth.astype(np.float32)
    probability[20:30, 35:45] = 1.0  # a "slump" under a cloud
    metrics = score_scene(label, probability)
    assert metrics.fp == 0 and metrics.predicted_objects == 1 and metrics.matched_objects == 1


def test_boundary_iou():
    truth = blank()
    truth[5:25, 5:25] = True
    assert boundary_overlap(truth, truth, np.ones_like(truth)) == (144.0, 144.0)  # 2 px band: 20x20 minus 16x16
    shifted = np.roll(truth, 4, axis=1)
    intersection, union = boundary_overlap(truth, shifted, np.ones_like(truth))
    assert 0 < intersection / union < 1
    assert boundary_overlap(truth, blank(), np.ones_like(truth))[0] == 0


def test_evaluate_a_trained_run_on_scene_mosaics(tiny_run, demo_records, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--run", str(tiny_run), "--records", str(demo_records),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| Horton |" in result.output and "paper-style max IoU" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    run = json.loads((tiny_run / "run.json").read_text())
    assert list(metrics["regions"]) == ["Horton"]
    horton = metrics["regions"]["Horton"]
    assert horton["scenes"] == 2
    # Transfer scores use the threshold chosen on validation; the paper-style number is the best
    # per-epoch IoU on the held-out region, read from the test curves.
    assert metrics["threshold"] == run["threshold"] and "validation data" in metrics["threshold_source"]
    assert horton["paper_max_iou"] == max(run["history"]["test_iou"]) == metrics["paper_style"]["max_iou"]
    # The transfer IoU by hand: the blended scenes, thresholded, counted over valid pixels.
    from rts_tf.evaluate import blend_records_scene
    from rts_tf.inference import load_run

    manifest = json.loads((demo_records / "manifest.json").read_text())
    model = load_run(tiny_run)
    tp = fp = fn = 0
    for scene in (s for s in manifest["scenes"] if s["region"] == "Horton"):
        for _, strip, label in blend_records_scene(demo_records, manifest, scene, [model]):
            valid, predicted = label != 255, strip >= run["threshold"]
            tp += np.sum(valid & predicted & (label == 1))
            fp += np.sum(valid & predicted & (label == 0))
            fn += np.sum(valid & ~predicted & (label == 1))
    assert horton["iou"] == pytest.approx(tp / (tp + fp + fn)) and horton["slump_pixels"] == tp + fn
    # Overlapping tiles count once: the slump pixels are those of the scene mosaics, not of the tiles.
    manifest = json.loads((demo_records / "manifest.json").read_text())
    distinct = 0
    for scene in (s for s in manifest["scenes"] if s["region"] == "Horton"):
        mosaic = np.zeros((scene["height"] + 64, scene["width"] + 64), dtype=bool)
        paths = [str(demo_records / p) for p in scene["shards"]]
        from rts_tf.records import decode_example

        for tile in tf.data.TFRecordDataset(paths, compression_type=manifest["compression"]).map(
                lambda s: decode_example(s, manifest)).as_numpy_iterator():
            mosaic[tile["row"]:tile["row"] + 64, tile["col"]:tile["col"] + 64] |= tile["label"][..., 0] == 1
        distinct += int(mosaic.sum())
    assert horton["slump_pixels"] == distinct < manifest["regions"]["Horton"]["slump_pixels"]
    assert (tmp_path / "metrics.md").read_text().startswith("| region |")
    every = CliRunner().invoke(main, ["evaluate", "--run", str(tiny_run), "--records", str(demo_records),
                                      "--out", str(tmp_path / "all"), "--region", "all"])
    assert every.exit_code == 0 and len(json.loads((tmp_path / "all" / "metrics.json").read_text())["regions"]) == 7
    specks = CliRunner().invoke(main, ["evaluate", "--run", str(tiny_run), "--records", str(demo_records),
                                       "--out", str(tmp_path / "specks"), "--min-area", "0"])
    assert specks.exit_code == 0 and metrics["min_area_m2"] == 100
    unfiltered = json.loads((tmp_path / "specks" / "metrics.json").read_text())["regions"]["Horton"]
    assert unfiltered["predicted_objects"] >= horton["predicted_objects"] and unfiltered["iou"] == horton["iou"]
    missing = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path), "--records", str(demo_records)])
    assert missing.exit_code != 0 and "run.json" in missing.output
