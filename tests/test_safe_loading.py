"""Loading a run never runs code from its model file: hostile runs are refused, --trust-model opts in."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from rts_tf.bands import BANDS
from rts_tf.cli import main
from rts_tf.errors import InputError
from rts_tf.inference import load_run
from test_predict import SCENE, make_run, pixel_model, scene_world  # noqa: F401 (scene_world is a fixture)


def write_run(folder: Path, model_file: str = "model.keras") -> Path:
    """run.json of a finished run whose model is `model_file` (any format, written by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"complete": True, "model": model_file, "tile_size": 32,
                                                 "bands": BANDS, "threshold": 0.5}))
    return folder


def hostile_model(marker: Path) -> tf.keras.Model:
    """A working pixel model with a Lambda layer whose function creates `marker` whenever it runs."""
    inputs = tf.keras.Input((32, 32, len(BANDS)))
    probability = pixel_model(np.zeros(len(BANDS)), 0.0)(inputs)
    # Stored as bytecode (with the marker path as a default): whoever rebuilds the model runs it.
    touch = tf.keras.layers.Lambda(lambda x, marker=str(marker): (open(marker, "w").close(), x)[1], name="touch")
    model = tf.keras.Model(inputs, touch(probability))
    marker.unlink()  # building the model called the function once
    return model


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Three run folders whose model file runs code when loaded: (a) HDF5, (b) HDF5 named model.keras,
    (c) a real .keras archive with a Lambda layer. All create the same marker file."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "marker"
    model = hostile_model(marker)
    model.save(str(write_run(root / "hdf5", "model.h5") / "model.h5"), save_format="h5")
    (write_run(root / "renamed") / "model.keras").write_bytes((root / "hdf5" / "model.h5").read_bytes())
    model.save(str(write_run(root / "lambda") / "model.keras"))
    assert not marker.exists()
    return {"root": root, "marker": marker, "runs": {name: root / name for name in ("hdf5", "renamed", "lambda")}}


def predict_arguments(world, out, run, *extra):
    return ["predict", "--scene", str(world["scene"]), "--dem", str(world["root"] / "dem.tif"), "--tcvis",
            str(world["root"] / "tcvis.tif"), "--out", str(out), "--min-area", "0", "--run", str(run), *extra]


def assert_one_line_error(result, *words):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert str(word) in result.output, result.output


@pytest.mark.parametrize("name, reason", [("hdf5", "not a .keras model archive"),
                                          ("renamed", "not a .keras model archive"),
                                          ("lambda", "Lambda layer")])
def test_hostile_runs_are_refused_by_predict_and_evaluate(hostile, scene_world, tmp_path, name, reason):
    run = hostile["runs"][name]
    model_file = run / json.loads((run / "run.json").read_text())["model"]
    runner = CliRunner()
    result = runner.invoke(main, predict_arguments(scene_world, tmp_path / "out", run))
    assert_one_line_error(result, model_file, reason, "--trust-model")
    result = runner.invoke(main, ["evaluate", "--run", str(run), "--records", str(tmp_path / "records")])
    assert_one_line_error(result, model_file, reason, "--trust-model")
    with pytest.raises(InputError, match=reason):
        load_run(run)
    assert not hostile["marker"].exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["hdf5", "renamed", "lambda"])
def test_trust_model_loads_them_and_they_really_run_code(hostile, name):
    """What the refusal prevents: with --trust-model each hostile file runs its code when loaded."""
    try:
        with pytest.warns(UserWarning, match="--trust-model.*run the Python code"):
            run = load_run(hostile["runs"][name], trust_model=True)
        assert hostile["marker"].exists()
        assert run.model.predict_on_batch(np.zeros((1, 32, 32, len(BANDS)), np.float32)).shape == (1, 32, 32, 1)
    finally:
        hostile["marker"].unlink(missing_ok=True)


def test_trust_model_on_the_command_line_warns_on_stderr(hostile, scene_world, tmp_path):
    """The real program (not CliRunner, whose warnings pytest captures): the warning reaches the user."""
    marker = hostile["marker"]
    try:
        done = subprocess.run([sys.executable, "-m", "rts_tf", *predict_arguments(
            scene_world, tmp_path / "out", hostile["runs"]["hdf5"], "--trust-model")], capture_output=True, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "--trust-model" in done.stderr and "run the Python code stored in the model file" in done.stderr
        assert marker.exists() and (tmp_path / "out" / SCENE / f"{SCENE}_probability.tif").exists()
    finally:
        marker.unlink(missing_ok=True)


def edit_config(source: Path, target: Path, change) -> Path:
    """A copy of the .keras archive `source` whose config.json went through `change` (a function)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            new.writestr(item, data)
    return target


def layers_of(config: dict) -> list:
    return config["config"]["layers"]


def test_archives_naming_other_modules_or_tensorflow_functions_are_refused(tmp_path):
    safe = make_run(tmp_path / "safe", pixel_model(np.zeros(len(BANDS)), 0.0))

    def foreign_module(config):
        convolution = next(layer for layer in layers_of(config) if layer["class_name"] == "Conv2D")
        convolution["module"], convolution["class_name"], convolution["registered_name"] = "os", "system", "system"

    write_run(tmp_path / "module")
    edit_config(safe / "model.keras", tmp_path / "module" / "model.keras", foreign_module)
    with pytest.raises(InputError, match="names the Python module 'os'"):
        load_run(tmp_path / "module")

    inputs = tf.keras.Input((32, 32, len(BANDS)))
    ops = tf.keras.Model(inputs, tf.math.sigmoid(tf.reduce_mean(inputs, axis=-1, keepdims=True)))
    make_run(tmp_path / "ops", ops)
    with pytest.raises(InputError, match="TensorFlow functions named in the file"):
        load_run(tmp_path / "ops")


def test_a_lambda_disguised_as_an_encoder_function_never_runs_its_own_code(hostile, tmp_path):
    """The encoders' Lambda layers get their function from classification_models, never from the file."""

    def disguise(config):
        touch = next(layer for layer in layers_of(config) if layer["class_name"] == "Lambda")["config"]
        touch["module"] = "classification_models.models._common_blocks"
        touch["arguments"] = {"start": 0, "stop": 1, "axis": 3}  # slice_tensor's: keeps the one channel

    write_run(tmp_path / "disguised")
    edit_config(hostile["runs"]["lambda"] / "model.keras", tmp_path / "disguised" / "model.keras", disguise)
    run = load_run(tmp_path / "disguised")
    probability = run.model.predict_on_batch(np.zeros((1, 32, 32, len(BANDS)), np.float32))
    np.testing.assert_allclose(probability, 0.5)
    assert not hostile["marker"].exists()


@pytest.mark.parametrize("model", ["../elsewhere/model.keras", "absolute", "link"])
def test_the_model_must_lie_inside_the_run_folder(tmp_path, model):
    elsewhere = make_run(tmp_path / "elsewhere", pixel_model(np.zeros(len(BANDS)), 0.0))  # a valid model
    run = write_run(tmp_path / "run")
    if model == "absolute":
        model = str(elsewhere / "model.keras")
    elif model == "link":
        (run / "model.keras").symlink_to(elsewhere / "model.keras")
        model = "model.keras"
    write_run(run, model)
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--records", str(tmp_path / "records")])
    assert_one_line_error(result, run / "run.json", "must name a file inside the run folder")


def test_a_normal_run_still_predicts(scene_world, tmp_path):
    red = np.zeros(len(BANDS))
    red[[band["name"] for band in BANDS].index("red")] = 200.0
    run = make_run(tmp_path / "run", pixel_model(red, -20.0))
    result = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / "out", run))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / SCENE / f"{SCENE}_mask.tif").exists()


def group_convolution_model(tile_size: int = 32) -> tf.keras.Model:
    """The ResNeXt encoders' grouped convolution: Lambda layers calling classification_models' slice_tensor."""
    from classification_models.models._common_blocks import GroupConv2D

    inputs = tf.keras.Input((tile_size, tile_size, len(BANDS)))
    grouped = GroupConv2D(4, (3, 3), groups=2, padding="same", backend=tf.keras.backend, layers=tf.keras.layers,
                          models=tf.keras.models, utils=tf.keras.utils)(inputs)
    return tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(grouped))


@pytest.mark.parametrize("arch, encoder", [("unet", "efficientnetb0"), ("deeplabv3", "seresnet18"), (None, "grouped")])
def test_runs_of_the_package_round_trip_in_safe_mode(tmp_path, arch, encoder):
    """Swish, FixedDropout (EfficientNet), IgnoreAwareNormalization and the SE/ResNeXt Lambda layers load safely."""
    from rts_tf.settings import FitConfig
    from rts_tf.train import build_segmenter

    names = [band["name"] for band in BANDS]
    rng = np.random.default_rng(0)
    if arch is None:
        model = group_convolution_model()
    else:
        # DeepLab at output stride 8: a 32 px tile at 16 leaves ASPP a 2 x 2 map, too small for three rates
        model = build_segmenter(FitConfig(arch=arch, encoder=encoder, output_stride=8), names, 32,
                                rng.normal(size=len(BANDS)), rng.uniform(0.5, 2.0, size=len(BANDS)))
    make_run(tmp_path / "run", model)
    images = rng.normal(size=(2, 32, 32, len(BANDS))).astype(np.float32)
    run = load_run(tmp_path / "run")
    np.testing.assert_allclose(run.model.predict_on_batch(images), model.predict_on_batch(images), atol=1e-6)
    classes = {layer.__class__.__name__ for layer in run.model.submodules}
    if encoder == "efficientnetb0":
        assert {"FixedDropout", "IgnoreAwareNormalization"} <= classes
    else:
        assert "Lambda" in classes
