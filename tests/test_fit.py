"""`rts-tf fit`: a real (tiny) Keras fit on demo records, saved runs, TensorBoard, strategies, resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rts_tf.cli import main
from rts_tf.dataset import make_dataset

from conftest import fit_arguments

def test_fit_lowers_the_loss_and_writes_a_self_contained_run(tiny_run, demo_records):
    run = json.loads((tiny_run / "run.json").read_text())
    losses = run["history"]["loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert run["complete"] and run["arch"] == "unet" and run["encoder"] == "resnet18" and run["tile_size"] == 64
    assert [b["name"] for b in run["bands"]][:4] == ["blue", "green", "red", "nir"]
    assert len(run["normalisation"]["mean"]) == 10 and run["regions"]["test"] == ["Horton"]
    assert "Horton" not in run["regions"]["train"] and run["replicas"] == 1
    assert set(run["metrics"]) >= {"iou", "f1", "precision", "recall", "best_iou", "best_threshold", "loss"}
    # The run's metrics are the validation metrics of its best epoch.
    best = run["best_epoch"] - 1
    assert run["metrics"]["iou"] == run["history"]["val_iou"][best] == max(run["history"]["val_iou"])
    config = (tiny_run / "config.yaml").read_text()
    assert "holdout_region: Horton" in config
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip()
    assert run["git_commit"] == (commit or "unknown")


def test_saved_model_reloads_and_predicts_identically(tiny_run, demo_records):
    from rts_tf.models import load_model

    manifest = json.loads((demo_records / "manifest.json").read_text())
    images, labels = next(iter(make_dataset(demo_records, manifest, ("Horton",), 6, training=False)))
    model = load_model(tiny_run / "model.keras")
    probability = model.predict(images, verbose=0)
    assert probability.shape == (6, 64, 64, 1) and probability.dtype == np.float32
    assert ((probability >= 0) & (probability <= 1)).all()
    exported = tf.saved_model.load(str(tiny_run / "saved_model"))
    served = exported.serve(images).numpy()
    np.testing.assert_allclose(served, probability, atol=1e-5)
    again = load_model(tiny_run / "model.keras").predict(images, verbose=0)
    np.testing.assert_array_equal(again, probability)
    # The model normalises inside: raw physical values go in, as written in the records.
    assert model.layers[1].name == "normalise"


def test_tensorboard_holds_scalars_images_and_hparams(tiny_run):
    train = EventAccumulator(str(tiny_run / "train"))
    train.Reload()
    validation = EventAccumulator(str(tiny_run / "validation"))
    validation.Reload()
    for events in (train, validation):
        tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])
        assert {"epoch_loss", "epoch_iou", "epoch_f1", "epoch_best_iou"} <= tags, tags
    assert "epoch_learning_rate" in set(train.Tags()["scalars"]) | set(train.Tags()["tensors"])
    images = EventAccumulator(str(tiny_run / "images"), size_guidance={"images": 0, "tensors": 0})
    images.Reload()
    image_tags = images.Tags()["tensors"] + images.Tags()["images"]
    assert any(tag.startswith("validation/tile_") for tag in image_tags)
    top = EventAccumulator(str(tiny_run), size_guidance={"tensors": 0})
    top.Reload()
    plugins = top.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins


def test_rerunning_a_finished_run_does_nothing(tiny_run, demo_records):
    result = CliRunner().invoke(main, fit_arguments(demo_records, tiny_run, "--epochs", "4", "--no-augment",
                                                    "--learning-rate", "0.003"))
    assert result.exit_code == 0 and "already complete" in result.output


def run_cli(arguments, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "rts_tf", *arguments], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_fit_under_mirrored_strategy_on_two_logical_cpus(demo_records, tmp_path):
    logdir = tmp_path / "mirrored"
    completed = run_cli(fit_arguments(demo_records, logdir, "--epochs", "1", "--logical-cpus", "2",
                                      "--image-every", "0"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    run = json.loads((logdir / "run.json").read_text())
    assert run["replicas"] == 2 and run["global_batch_size"] == 8
    assert run["config"]["augment_on"] == "device"  # each replica augments its half of the batch in its step
    # The same run with augmentation in tf.data: the same tiles (to float tolerance), so the same training.
    completed = run_cli(fit_arguments(demo_records, tmp_path / "host", "--epochs", "1", "--logical-cpus", "2",
                                      "--image-every", "0", "--augment-on", "host"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    host = json.loads((tmp_path / "host" / "run.json").read_text())
    np.testing.assert_allclose(host["history"]["loss"], run["history"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(host["history"]["val_loss"], run["history"]["val_loss"], rtol=1e-3)
    completed = run_cli(fit_arguments(demo_records, tmp_path / "odd", "--epochs", "1", "--logical-cpus", "2",
                                      "--global-batch-size", "7"))
    assert completed.returncode != 0 and "not divisible by the 2 replicas" in completed.stderr


def test_killed_fit_resumes_at_the_next_epoch(demo_records, tmp_path):
    logdir = tmp_path / "killed"
    arguments = fit_arguments(demo_records, logdir, "--epochs", "4", "--image-every", "0")
    process = subprocess.Popen([sys.executable, "-m", "rts_tf", *arguments], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    history = logdir / "history.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if history.exists() and len(json.loads(history.read_text() or "[]")) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(json.loads(history.read_text()))
    assert 2 <= finished < 4, "the run ended before it could be killed"
    completed = run_cli(arguments)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # An epoch counts as done once its backup is written, the last thing after it: a kill between
    # the history entry and the backup re-runs that epoch.
    assert any(f"resumed after epoch {epoch}" in completed.stdout for epoch in (finished - 1, finished))
    run = json.loads((logdir / "run.json").read_text())
    assert run["epochs_run"] == 4 and len(run["history"]["loss"]) == 4
    assert [e["epoch"] for e in json.loads(history.read_text())] == [1, 2, 3, 4]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_fit_with_two_local_workers(demo_records, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    logdir = tmp_path / "multiworker"
    # The default --image-every: the chief's image panels and test curves call the model itself,
    # never a collective op (`predict`, `evaluate`) that the other worker would not join.
    arguments = fit_arguments(demo_records, logdir, "--epochs", "1")
    workers = [subprocess.Popen([sys.executable, "-m", "rts_tf", *arguments], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                            "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    run = json.loads((logdir / "run.json").read_text())
    assert run["replicas"] == 2 and run["epochs_run"] == 1
    assert len(run["history"]["test_iou"]) == 1 and any((logdir / "images").iterdir())


def test_bad_fit_input(demo_records, tmp_path):
    runner = CliRunner()

    def fails(arguments, *words):
        result = runner.invoke(main, arguments)
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
        for word in words:
            assert word in result.output, result.output

    fails(fit_arguments(tmp_path / "none", tmp_path / "r1"), "records folder not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    fails(fit_arguments(broken, tmp_path / "r2"), "unreadable manifest")
    fails(fit_arguments(demo_records, tmp_path / "r3") + ["--holdout-region", "Atlantis"], "Atlantis", "Lena")
    fails(fit_arguments(demo_records, tmp_path / "r4") + ["--encoder", "resnet9000"], "resnet9000", "resnet34")
    fails(fit_arguments(demo_records, tmp_path / "r5") + ["--arch", "segformer"], "segformer", "unetpp")
    listed = tmp_path / "lists.yaml"  # YAML lists reach list options intact (then the records are missing)
    listed.write_text("decoder-filters: [64, 32, 16, 16, 8]\ntrain-regions: [Lena, Banks]\n")
    fails(["fit", "--config", str(listed), "--records", str(tmp_path / "none"), "--logdir", str(tmp_path / "r0")],
          "records folder not found")
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 1\nlearning_rat: 0.1\n")
    fails(["fit", "--config", str(config)], "learning_rat", str(config))
    import shutil

    copy = tmp_path / "records"
    shutil.copytree(demo_records, copy)
    shard = sorted(copy.rglob("*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    fails(fit_arguments(copy, tmp_path / "r6") + ["--holdout-region", shard.parent.name], shard.name)
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    os.environ["KERAS_HOME"], previous = str(keras_home), os.environ.get("KERAS_HOME")
    try:
        fails(fit_arguments(demo_records, tmp_path / "r7") + ["--encoder-weights", "imagenet"], "imagenet",
              str(keras_home))
    finally:
        if previous is None:
            del os.environ["KERAS_HOME"]
        else:
            os.environ["KERAS_HOME"] = previous


def test_fit_with_mixed_precision_saves_a_float32_model(demo_records, tmp_path):
    logdir = tmp_path / "mixed"
    result = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--mixed-precision",
                                                    "--image-every", "0"))
    assert result.exit_code == 0, result.output
    from rts_tf.models import load_model

    model = load_model(logdir / "model.keras")
    assert model.output.dtype == tf.float32
    # The saved model is rebuilt in float32 with the trained weights: prediction needs no policy.
    assert all(layer.compute_dtype == "float32" for layer in model.layers[2].submodules
               if isinstance(layer, tf.keras.layers.Layer))
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # the policy is restored afterwards
    history = json.loads((logdir / "history.json").read_text())
    assert np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0


@pytest.mark.slow
def test_fit_with_xla(demo_records, tmp_path):
    logdir = tmp_path / "xla"
    result = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--xla", "--image-every", "0"))
    assert result.exit_code == 0, result.output
    config = json.loads((logdir / "run.json").read_text())["config"]
    assert config["xla"] is True and config["augment_on"] == "device"  # augmentation compiled into the step
