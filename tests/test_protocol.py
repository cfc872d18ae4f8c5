"""The scoring protocol: the held-out region is a test set, the best epoch is chosen on validation,
resumed runs keep their best checkpoint and patience, and prediction sees the bands training saw."""

import json
import shutil

import numpy as np
import pytest
import rasterio
import tensorflow as tf
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rts_tf.cli import main
from rts_tf.train import FitConfig, fit

from conftest import fit_arguments

TINY_CONFIG = dict(arch="unet", encoder="resnet18", decoder_filters=[16, 16, 8, 8, 8], batch_size=4,
                   holdout_region="Horton", image_every=0, schedule="constant", augment=False)


class ScriptedValidation(tf.keras.callbacks.Callback):
    """Replaces the validation IoU with a scripted curve (before any other callback reads it), keeps
    every epoch's weights, and can stop the process as a kill would, right before an epoch."""

    def __init__(self, curve, weights, stop_before=None):
        super().__init__()
        self.curve, self.weights, self.stop_before = curve, weights, stop_before

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_before:
            raise RuntimeError("killed")

    def on_epoch_end(self, epoch, logs=None):
        logs["val_iou"] = self.curve[epoch]
        self.weights[epoch + 1] = [w.copy() for w in self.model.get_weights()]


def saved_weights(logdir):
    from rts_tf.models import load_model

    return load_model(logdir / "model.keras").get_weights()


def test_resume_keeps_the_best_checkpoint_and_the_patience(demo_records, tmp_path):
    logdir = tmp_path / "resumed"
    config = FitConfig(records=str(demo_records), logdir=str(logdir), epochs=6, early_stopping=2, **TINY_CONFIG)
    curve = [0.5, 0.9, 0.3, 0.4, 0.95, 0.99]
    weights = {}
    with pytest.raises(RuntimeError, match="killed"):
        fit(config, callbacks=[ScriptedValidation(curve, weights, stop_before=3)])
    assert len(json.loads((logdir / "history.json").read_text())) == 3
    result = fit(config, callbacks=[ScriptedValidation(curve, weights)])
    run = json.loads((logdir / "run.json").read_text())
    # Epoch 4 (0.4) is worse than epoch 2 (0.9): best.h5 must not take it, and with patience 2 the
    # run stops after epoch 4 (epochs 3 and 4 without improvement), as an uninterrupted run would.
    assert result.resumed_from == 3 and run["epochs_run"] == 4 and run["best_epoch"] == 2
    assert run["history"]["val_iou"] == curve[:4]
    for saved, expected in zip(saved_weights(logdir), weights[2]):
        np.testing.assert_array_equal(saved, expected)


def test_the_best_epoch_is_chosen_on_validation_never_on_the_test_region(demo_records, tmp_path):
    logdir = tmp_path / "chosen"
    config = FitConfig(records=str(demo_records), logdir=str(logdir), epochs=3,
                       **{**TINY_CONFIG, "image_every": 5, "image_tiles": 1})
    weights = {}
    fit(config, callbacks=[ScriptedValidation([0.2, 0.1, 0.05], weights)])
    run = json.loads((logdir / "run.json").read_text())
    assert run["best_epoch"] == 1 == int(np.argmax(run["history"]["val_iou"])) + 1
    # The held-out region has its own curves, scored after every epoch, and chose nothing.
    assert len(run["history"]["test_iou"]) == 3 and len(run["history"]["test_best_iou"]) == 3
    assert all(best >= at_half for best, at_half in zip(run["history"]["test_best_iou"], run["history"]["test_iou"]))
    assert run["split"]["test"]["scenes"] and run["split"]["test_region"] == "Horton"
    horton = {s["scene_id"] for s in json.loads((demo_records / "manifest.json").read_text())["scenes"]
              if s["region"] == "Horton"}
    assert set(run["split"]["test"]["scenes"]) == horton
    assert not horton & set(run["split"]["train"]["scenes"] + run["split"]["validation"]["scenes"])
    for saved, expected in zip(saved_weights(logdir), weights[1]):
        np.testing.assert_array_equal(saved, expected)
    assert run["threshold"] == run["history"]["val_best_threshold"][0]
    # Image panels every 5 epochs, and also after the first and the last: a 3-epoch run shows two.
    images = EventAccumulator(str(logdir / "images"), size_guidance={"tensors": 0, "images": 0})
    images.Reload()
    tag = next(t for t in images.Tags()["tensors"] if t.startswith("validation/tile_"))
    assert [event.step for event in images.Tensors(tag)] == [1, 3]


def test_training_never_reads_the_held_out_shards(demo_records, tmp_path):
    """Held-out shards replaced by garbage of the same size: a fit without test curves never opens
    them (it succeeds); evaluate, which scores them, fails and names the shard."""
    records = tmp_path / "records"
    shutil.copytree(demo_records, records)
    manifest = json.loads((records / "manifest.json").read_text())
    held_out = [path for path, info in manifest["shards"].items() if info["region"] == "Horton"]
    for path in held_out:
        size = (records / path).stat().st_size
        (records / path).write_bytes(b"\0" * size)
    logdir = tmp_path / "isolated"
    result = CliRunner().invoke(main, fit_arguments(records, logdir, "--epochs", "1", "--no-test-curves",
                                                    "--image-every", "1"))
    assert result.exit_code == 0, result.output
    assert "validation: an edge strip of tiles" in result.output
    scored = CliRunner().invoke(main, ["evaluate", "--run", str(logdir), "--records", str(records), "--verify"])
    assert scored.exit_code != 0 and "Horton/" in scored.output and "checksum" in scored.output


def test_validating_on_the_training_data_must_be_asked_for(demo_records, tmp_path):
    refused = CliRunner().invoke(main, ["fit", "--records", str(demo_records), "--logdir", str(tmp_path / "same"),
                                        "--train-regions", "Lena,Banks", "--val-regions", "Lena", "--epochs", "1"])
    assert refused.exit_code != 0 and "--validate-on-training-data" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "same").exists()


@pytest.fixture(scope="module")
def radius_run(tmp_path_factory):
    """Demo records built with a non-default relative-elevation radius, and a tiny model fitted on them."""
    root = tmp_path_factory.mktemp("recipe")
    runner = CliRunner()
    data = root / "data"
    assert runner.invoke(main, ["demo-data", str(data), "--scene-size", "160"]).exit_code == 0
    sources = ["--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis")]
    built = runner.invoke(main, ["build-records", "--scenes", str(data / "scenes"), "--labels",
                                 str(data / "labels.gpkg"), "--sites", str(data / "sites.geojson"), *sources,
                                 "--out", str(root / "records"), "--tile-size", "64", "--overlap", "8",
                                 "--rel-elevation-radius", "30"])
    assert built.exit_code == 0, built.output
    fitted = runner.invoke(main, fit_arguments(root / "records", root / "run", "--epochs", "1", "--holdout-region",
                                               "Banks", "--no-augment", "--image-every", "0"))
    assert fitted.exit_code == 0, fitted.output
    return {"root": root, "data": data, "records": root / "records", "run": root / "run", "sources": sources}


def test_predict_gives_the_probabilities_evaluate_scores(radius_run, tmp_path):
    """The same windows and blending: predict's GeoTIFF equals evaluate's blend of the records."""
    from rts_tf.evaluate import blend_records_scene
    from rts_tf.inference import load_run
    from rts_tf.records import decode_example, read_manifest
    from rts_tf.tiling import tile_offsets

    run = json.loads((radius_run["run"] / "run.json").read_text())
    assert run["recipe"]["rel_elevation_radius"] == 30.0 and run["recipe"]["image_encoding"]["reflectance"] == {
        "dtype": "uint16", "bands": ["blue", "green", "red", "nir"], "scale": 1e-4, "offset": 0.0}
    manifest = read_manifest(radius_run["records"])
    scene = next(s for s in manifest["scenes"] if s["region"] == "Banks")
    out = tmp_path / "maps"
    result = CliRunner().invoke(main, ["predict", "--run", str(radius_run["run"]), "--scene",
                                       str(radius_run["data"] / "scenes" / scene["scene_id"]),
                                       *radius_run["sources"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    with rasterio.open(out / scene["scene_id"] / f"{scene['scene_id']}_probability.tif") as dataset:
        predicted = dataset.read(1)
    blended = np.zeros_like(predicted)
    label = np.full(predicted.shape, 255, np.uint8)
    for first, strip, strip_label in blend_records_scene(radius_run["records"], manifest, scene,
                                                         [load_run(radius_run["run"])]):
        blended[first:first + len(strip)], label[first:first + len(strip)] = strip, strip_label
    # Compare where every window covering a pixel is in the records (build drops mostly-ignored tiles).
    paths = [str(radius_run["records"] / p) for p in scene["shards"]]
    kept = {(int(t["row"]), int(t["col"])) for t in tf.data.TFRecordDataset(paths, compression_type=manifest["compression"]).map(
        lambda s: decode_example(s, manifest, keys=("row", "col"))).as_numpy_iterator()}
    whole = np.ones(predicted.shape, bool)
    for row in tile_offsets(scene["height"], 64, 8):
        for col in tile_offsets(scene["width"], 64, 8):
            if (row, col) not in kept:
                whole[row:row + 64, col:col + 64] = False
    compared = whole & (label != 255)
    assert compared.sum() > 0.2 * predicted.size
    np.testing.assert_allclose(predicted[compared], blended[compared], rtol=0, atol=1e-5)
    assert (predicted[label != 255] >= 0).all()  # nothing the records call valid is nodata in the map


def test_predict_refuses_other_band_settings_unless_told(radius_run, tmp_path):
    scene = next(p for p in (radius_run["data"] / "scenes").iterdir())
    arguments = ["predict", "--run", str(radius_run["run"]), "--scene", str(scene), *radius_run["sources"]]
    other = CliRunner().invoke(main, [*arguments, "--out", str(tmp_path / "a"), "--rel-elevation-radius", "100"])
    assert other.exit_code != 0 and "relative-elevation radius 100.0 m, the run's records 30.0 m" in other.output
    allowed = CliRunner().invoke(main, [*arguments, "--out", str(tmp_path / "b"), "--rel-elevation-radius", "100",
                                        "--allow-feature-mismatch"])
    assert allowed.exit_code == 0, allowed.output


RESUME_SCRIPT = r"""
import json, sys
import h5py, numpy as np, tensorflow as tf
from rts_tf.train import FitConfig, fit

records, out = sys.argv[1], sys.argv[2]
base = dict(records=records, arch="unet", encoder="resnet18", decoder_filters=[16, 16, 8, 8, 8], batch_size=4,
            holdout_region="Horton", image_every=0, epochs=3, oversample_slumps=2, augment=True, test_curves=False)


class Kill(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("killed")


fit(FitConfig(logdir=out + "/straight", **base))
try:
    fit(FitConfig(logdir=out + "/resumed", **base), callbacks=[Kill()])
except RuntimeError:
    pass
resumed = fit(FitConfig(logdir=out + "/resumed", **base))


def weights(path):
    with h5py.File(path) as handle:
        arrays = {}
        handle.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
        return arrays


straight, again = weights(out + "/straight/checkpoints/last.h5"), weights(out + "/resumed/checkpoints/last.h5")
print(json.dumps({"resumed_from": resumed.resumed_from, "arrays": len(straight),
                  "identical": sorted(straight) == sorted(again) and all(np.array_equal(straight[k], again[k])
                                                                         for k in straight)}))
"""


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(demo_records, tmp_path):
    """The shuffle and augmentation stream is a function of (seed, epoch): killed after epoch 2 and
    resumed, a run ends with exactly the weights of a run that was never interrupted."""
    import os
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(demo_records), str(tmp_path)],
                               capture_output=True, text=True, env={**os.environ, "TF_DETERMINISTIC_OPS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 2 and result["arrays"] > 20 and result["identical"]
