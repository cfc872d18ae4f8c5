"""`rts-tf export` and portable models: ONNX and SavedModel packages with a model card, plain Keras
loading of model.keras, and `predict --run PACKAGE`."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tensorflow as tf
from click.testing import CliRunner

import rts_tf
from rts_tf.bands import BANDS
from rts_tf.cli import main
from rts_tf.models import IgnoreAwareNormalization
from test_predict import SCENE, predict_arguments, scene_world  # noqa: F401  (the predict test's scene)

MEAN = [0.03, 0.05, 0.04, 0.25, 0.7, 120.0, 150.0, 110.0, 0.0, 3.0]
STD = [0.01, 0.01, 0.01, 0.05, 0.1, 20.0, 20.0, 20.0, 2.0, 2.0]


def small_segmenter(tile_size: int = 32) -> tf.keras.Model:
    """A real rts-tf style model, small enough to convert in seconds: the normalisation layer, a
    strided convolution with batch normalisation, bilinear upsampling and a sigmoid."""
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((tile_size, tile_size, len(BANDS)), name="image")
    x = IgnoreAwareNormalization(MEAN, STD, name="normalise")(inputs)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = tf.keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    x = tf.keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(x)
    model = tf.keras.Model(inputs, x, name="rts_small")
    batch_norm = model.layers[3]
    batch_norm.set_weights([np.full(8, 1.5, np.float32), np.full(8, 0.1, np.float32),
                            np.full(8, 0.2, np.float32), np.full(8, 2.0, np.float32)])
    return model


def write_run(folder: Path, model: tf.keras.Model) -> Path:
    """A run folder as `rts-tf fit` writes it: model.keras, saved_model/, run.json, and a crossval.csv above it."""
    folder.mkdir(parents=True)
    model.save(str(folder / "model.keras"))
    model.export(str(folder / "saved_model"))
    (folder / "run.json").write_text(json.dumps({
        "complete": True, "rts_tf_version": rts_tf.__version__, "model": "model.keras", "saved_model": "saved_model",
        "arch": "small", "encoder": "conv", "tile_size": 32, "overlap": 8, "bands": BANDS,
        "normalisation": {"mean": MEAN, "std": STD}, "threshold": 0.45,
        "threshold_source": "best threshold of the validation data at the best epoch",
        "regions": {"train": ["Alpha"], "validation": ["Alpha"], "test": ["Beta"]}, "holdout_region": "Beta",
        "split": {"train": {"scenes": ["20190801_200000_1001"]}, "validation": {"scenes": ["20190801_200000_1001"]},
                  "test": {"scenes": ["20190805_201500_1002"]}},
        "recipe": {"terrain": "dem", "rel_elevation_radius": 100.0, "dem_min_valid": -1e30,
                   "image_dtype": "float32", "sensors": ["planetscope"]},
        "best_epoch": 3, "metrics": {"iou": 0.41}}))
    (folder.parent / "crossval.csv").write_text(f"region,model,iou,run\nBeta,small conv,0.37,{folder}\n")
    records = folder.parent / "records"  # the records' manifest gives the training scenes' pixel size
    records.mkdir()
    (records / "manifest.json").write_text(json.dumps({"scenes": [
        {"scene_id": "20190801_200000_1001", "sensor": "planetscope", "transform": [3.0, 0, 560000, 0, -3.0, 7700000]},
        {"scene_id": "20190805_201500_1002", "sensor": "sentinel2-l2a", "transform": [10.0, 0, 5e5, 0, -10.0, 7e6]}]}))
    info = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**info, "records": str(records)}))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("export") / "small" / "Beta", small_segmenter())


def tiles(count: int = 3) -> np.ndarray:
    """Tiles with band values around the training statistics and ignored (all-zero) pixels."""
    rng = np.random.default_rng(5)
    batch = (np.array(MEAN) + np.array(STD) * rng.normal(0, 1.5, (count, 32, 32, len(BANDS)))).astype(np.float32)
    batch[0, :6] = 0
    return batch


def test_onnx_package_gives_keras_probabilities_and_a_model_card(run, tmp_path):
    import onnxruntime

    out = tmp_path / "package"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.keras", "model.onnx", "run.json"]
    keras = rts_tf.load_model(run / "model.keras")(tiles(), training=False).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    onnx = session.run(None, {"image": tiles()})[0]
    assert keras.std() > 0.05  # the tiles give varied probabilities, the ignored rows included
    np.testing.assert_allclose(onnx, keras, atol=1e-4)
    card = json.loads((out / "model.json").read_text())
    assert card["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert card["keras_sha256"] == hashlib.sha256((out / "model.keras").read_bytes()).hexdigest()
    assert [(b["index"], b["name"], b["unit"]) for b in card["input"]["bands"]] == \
           [(i, b["name"], b["unit"]) for i, b in enumerate(BANDS)]
    assert card["input"]["shape"] == [None, 32, 32, 10] and card["tile_size"] == 32
    assert card["normalisation"]["mean"] == MEAN and card["normalisation"]["std"] == STD
    assert card["normalisation"]["inside_the_model"] is True
    assert card["threshold"] == 0.45 and "validation" in card["threshold_source"]
    assert card["training"]["regions"]["train"] == ["Alpha"]
    assert card["training"]["scenes"]["train"] == ["20190801_200000_1001"]
    assert card["crossval"] == [{"region": "Beta", "model": "small conv", "iou": "0.37"}]
    assert card["sensors"] == ["planetscope"]
    assert card["pixel_size_m"] == {"planetscope": [3.0]}  # of the training scenes only


def test_saved_model_package_agrees_with_keras(run, tmp_path):
    out = tmp_path / "package"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "savedmodel", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = tf.saved_model.load(str(out / "saved_model"))  # kept: its functions need its variables
    served = saved.serve(tf.constant(tiles())).numpy()
    keras = rts_tf.load_model(out / "model.keras")(tiles(), training=False).numpy()
    np.testing.assert_allclose(served, keras, atol=1e-6)
    card = json.loads((out / "model.json").read_text())
    assert card["format"] == "savedmodel" and card["model"] == "saved_model" and len(card["sha256"]) == 64


def test_model_keras_loads_with_plain_keras_after_import_rts_tf(run, tmp_path):
    """A fresh interpreter (nothing of rts-tf's models imported yet): `import rts_tf` is enough for
    tf.keras.models.load_model in safe mode, and the model agrees with the run's SavedModel."""
    np.save(tmp_path / "tiles.npy", tiles())
    script = f"""
import numpy as np, rts_tf, tensorflow as tf
model = tf.keras.models.load_model({str(run / 'model.keras')!r}, safe_mode=True)
x = np.load({str(tmp_path / 'tiles.npy')!r})
saved = tf.saved_model.load({str(run / 'saved_model')!r})
served = saved.serve(tf.constant(x)).numpy()
print(type(model.layers[1]).__name__, float(np.abs(model(x, training=False).numpy() - served).max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(rts_tf.__file__).parents[1]), "TF_CPP_MIN_LOG_LEVEL": "3",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    name, difference = done.stdout.split()[-2:]
    assert name == "IgnoreAwareNormalization" and float(difference) < 1e-6


def test_predict_accepts_an_onnx_package(run, scene_world, tmp_path):  # noqa: F811
    package = tmp_path / "package"
    assert CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(package)]).exit_code == 0
    scene_world["runs"]["small"], scene_world["runs"]["package"] = run, package
    for name in ("small", "package"):
        result = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / f"{name}_maps", name))
        assert result.exit_code == 0, result.output
    probabilities = []
    for name in ("small", "package"):
        with rasterio.open(tmp_path / f"{name}_maps" / SCENE / f"{SCENE}_probability.tif") as dataset:
            probabilities.append(dataset.read(1))
            assert dataset.tags()["RTS_THRESHOLD"] == "0.45"
    valid = probabilities[0] != -1
    assert probabilities[0][valid].std() > 0.01
    np.testing.assert_allclose(probabilities[1], probabilities[0], atol=1e-4)
    (package / "model.onnx").unlink()  # a package that lost its model: one line, nothing written
    broken = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / "broken", "package"))
    assert broken.exit_code != 0 and "Traceback" not in broken.output, broken.output
    assert str(package / "run.json") in broken.output and "no ONNX file" in broken.output
    assert not (tmp_path / "broken").exists()


def test_bad_export_input(run, tmp_path):
    runner = CliRunner()

    def fails(arguments, *words):
        result = runner.invoke(main, ["export", *arguments])
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        for word in words:
            assert str(word) in result.output, result.output

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    fails(["--run", str(run), "--format", "onnx", "--out", str(taken)], taken, "already exists")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    fails(["--run", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(tmp_path / "a")], "run folder not found")
    fails(["--run", str(run), "--format", "tflite", "--out", str(tmp_path / "b")], "--format")
    package = tmp_path / "package"
    assert runner.invoke(main, ["export", "--run", str(run), "--format", "savedmodel", "--out", str(package)]).exit_code == 0
    fails(["--run", str(package), "--format", "onnx", "--out", str(tmp_path / "c")], "already an exported package")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_a_unet_resnet18_exports_to_onnx_with_keras_probabilities(tmp_path):
    """The architecture `fit` builds (normalisation + segmentation-models encoder + UNet decoder)
    through tf2onnx: about 30 s on two cores."""
    from rts_tf.settings import FitConfig
    from rts_tf.train import build_segmenter

    tf.keras.utils.set_random_seed(0)
    model = build_segmenter(FitConfig(arch="unet", encoder="resnet18", decoder_filters=[16, 16, 8, 8, 8]),
                            [band["name"] for band in BANDS], 32, MEAN, STD)
    run = write_run(tmp_path / "unet" / "Beta", model)
    out = tmp_path / "package"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from rts_tf.export import OnnxModel

    np.testing.assert_allclose(OnnxModel(out / "model.onnx")(tiles()), model(tiles(), training=False).numpy(),
                               atol=1e-4)
