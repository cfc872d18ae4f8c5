"""Inference: a trained run, its windows through the model, and one streaming blender for evaluate and predict."""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rts_tf.errors import InputError
from rts_tf.bands import BAND_NAMES
from rts_tf.scene import recipe_differences, recipe_settings

# Runs saved before run.json carried the feature recipe: the settings prediction used then.
LEGACY_RECIPE = recipe_settings("dem", 100.0, -1e30, "float32")


@dataclass
class Run:
    """A trained run as inference needs it: the model and what travels with it."""

    path: Path
    model: object
    tile_size: int
    overlap: int
    bands: list[str]
    threshold: float
    recipe: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def load_run(path: str | os.PathLike, trust_model: bool = False, with_model: bool = True) -> Run:
    """Load run.json and model.keras from a run folder, with clear errors for incomplete runs. A
    package of `rts-tf export --format onnx` runs its ONNX model under onnxruntime.

    with_model=False checks the folder and reads run.json only (Run.model is None): for a driver
    whose models are loaded elsewhere (Ray actors), without importing TensorFlow.

    The model is loaded without running code from the file (see ``rts_tf.models.load_model``) and
    must lie inside the run folder; ``trust_model`` also loads HDF5 and SavedModel files and Lambda
    layers, which run the Python code stored in the file, and warns that it does.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: run folder not found")
    run_file = path / "run.json"
    if not run_file.exists():
        raise InputError(f"{path}: no run.json (is the run finished? `rts-tf fit` writes it at the end)")
    try:
        info = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{run_file}: unreadable: {error}") from None
    check_run_info(info, run_file)
    name = info.get("model", "model.keras")
    model_file = path / str(name)
    # A run folder may come from anyone: its model must not be a file elsewhere on this machine.
    if not isinstance(name, str) or not model_file.resolve().is_relative_to(path.resolve()):
        raise InputError(f"{run_file}: \"model\" must name a file inside the run folder, got {name!r}")
    if not model_file.exists():
        raise InputError(f"{path}: no model file {model_file.name}")
    if trust_model:
        import warnings

        warnings.warn(f"{model_file}: loading with --trust-model, which allows HDF5 and SavedModel files and Lambda "
                      "layers: they run the Python code stored in the model file", stacklevel=2)
    exported = info.get("export") if isinstance(info.get("export"), dict) else {}
    try:
        model = None
        if with_model and exported.get("format") == "onnx":  # a package of `rts-tf export`: run its ONNX model
            from rts_tf.export import OnnxModel

            onnx_file = path / str(exported.get("file", "model.onnx"))
            if not onnx_file.resolve().is_relative_to(path.resolve()) or not onnx_file.is_file():
                raise InputError(f"{run_file}: \"export\" names no ONNX file inside the package")
            model = OnnxModel(onnx_file)
        elif with_model:
            from rts_tf.models import load_model

            model = load_model(model_file, trust_model=trust_model)
    except InputError:
        raise
    except Exception as error:  # Keras raises many kinds for broken files
        raise InputError(f"{model_file}: cannot load the model: {str(error).splitlines()[0]}") from None
    tile_size = int(info["tile_size"])
    bands = [band["name"] if isinstance(band, dict) else band for band in info["bands"]]
    channels = model_channels(model)
    if channels is not None and channels != len(bands):
        raise InputError(f"{run_file}: lists {len(bands)} bands but its model {model_file.name} takes {channels} input "
                         "channels; the run folder mixes files of different runs")
    return Run(path, model, tile_size, int(info.get("overlap", tile_size // 4)), bands,
               float(info.get("threshold", 0.5)), dict(info.get("recipe") or LEGACY_RECIPE), info)


# The first and the last rts-tf version whose run.json this code reads (runs carry `rts_tf_version`).
FIRST_RUN_VERSION = (0, 1)


def version_tuple(text: str) -> tuple[int, ...] | None:
    parts = str(text).split("+")[0].split(".")
    try:
        return tuple(int(part) for part in parts[:3])
    except ValueError:
        return None


def check_run_info(info, run_file: Path) -> None:
    """Refuse a run.json this code cannot use, naming the key and the problem (a missing band
    list, a wrong type, a version this code does not know) instead of failing later."""
    if not isinstance(info, dict):
        raise InputError(f"{run_file}: not a run description (expected a JSON object)")
    version = info.get("rts_tf_version")
    if version is not None:
        import rts_tf

        claimed, current = version_tuple(version), version_tuple(rts_tf.__version__)
        if claimed is None or claimed[:2] < FIRST_RUN_VERSION:
            raise InputError(f"{run_file}: written by an unknown rts-tf version {version!r} (this rts-tf "
                             f"{rts_tf.__version__} reads runs of {'.'.join(map(str, FIRST_RUN_VERSION))} and later)")
        if current is not None and claimed[:2] > current[:2]:
            raise InputError(f"{run_file}: written by rts-tf {version}, newer than this rts-tf {rts_tf.__version__}; "
                             "upgrade rts-tf to use this run")
    tile_size = info.get("tile_size")
    if tile_size is None:
        raise InputError(f"{run_file}: no \"tile_size\" (not a run written by `rts-tf fit`?)")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise InputError(f"{run_file}: \"tile_size\" must be a positive whole number, got {tile_size!r}")
    overlap = info.get("overlap", 0)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise InputError(f"{run_file}: \"overlap\" must be a whole number from 0 to below the tile size "
                         f"{tile_size}, got {overlap!r}")
    bands = info.get("bands")
    if bands is None:
        raise InputError(f"{run_file}: no \"bands\": the model's input bands and their order are unknown "
                         "(not a run written by `rts-tf fit`?)")
    names = [band.get("name") if isinstance(band, dict) else band for band in bands] \
        if isinstance(bands, list) else None
    if not names or not all(isinstance(name, str) and name for name in names):
        raise InputError(f"{run_file}: \"bands\" must be a non-empty list of bands with names, got {bands!r:.80}")
    if len(set(names)) != len(names):
        raise InputError(f"{run_file}: \"bands\" names a band twice: {', '.join(names)}")
    threshold = info.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise InputError(f"{run_file}: \"threshold\" must be a number from 0 to 1, got {threshold!r}")
    for key in ("recipe", "export", "normalisation"):
        if info.get(key) is not None and not isinstance(info[key], dict):
            raise InputError(f"{run_file}: \"{key}\" must be a JSON object, got {info[key]!r:.80}")


def model_channels(model) -> int | None:
    """The number of input channels a loaded model takes, when it says."""
    try:
        shape = model.inputs[0].shape if hasattr(model, "inputs") else getattr(model, "input_shape", None)
    except (AttributeError, IndexError, TypeError):
        return None
    try:
        return int(shape[-1]) if shape is not None and shape[-1] is not None else None
    except (TypeError, ValueError, IndexError):
        return None


def manifest_recipe(manifest: dict, regions: Sequence[str] | None = None) -> dict:
    """The feature recipe of records; for records from before manifests carried it, their settings.
    With regions, its `sensors` are those of these regions' scenes: what a model trained on them saw."""
    if manifest.get("recipe"):
        recipe = dict(manifest["recipe"])
    else:
        settings = manifest.get("settings", {})
        recipe = recipe_settings("dem", settings.get("rel_elevation_radius", 100.0), LEGACY_RECIPE["dem_min_valid"],
                                 settings.get("image_dtype", "float16"))
    seen = sorted({scene.get("sensor", "planetscope") for scene in manifest["scenes"]
                   if regions is not None and scene["region"] in regions and scene.get("tiles")})
    return {**recipe, "sensors": seen} if seen else recipe


def choose_threshold(runs: Sequence[Run], threshold: float | None = None) -> tuple[float, str]:
    """The probability threshold for masks and scores, and where it comes from.

    One policy for `evaluate` and `predict`: a threshold given by the user; else the one run's
    threshold, selected on its validation data; an ensemble uses its runs' threshold when they
    share one, else 0.5 (an average of thresholds chosen for other models means nothing).
    """
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"--threshold must be between 0 and 1, got {threshold}")
        return float(threshold), "given with --threshold"
    values = sorted({run.threshold for run in runs})
    without = [run for run in runs if "threshold" not in run.info]
    if without:  # a hand-made or damaged run.json: 0.5, and no claim about validation data
        return 0.5, (f"0.5 ({without[0].path / 'run.json'} has no threshold)" if len(runs) == 1 else
                     f"0.5 ({len(without)} of the ensemble's run.json files have no threshold)")
    if len(runs) == 1:
        return values[0], f"selected on the validation data of {runs[0].path}"
    if len(values) == 1:
        return values[0], "selected on the validation data of every run of the ensemble"
    return 0.5, "0.5: the runs' validation thresholds differ (give --threshold to choose another)"


def run_bands(runs: Sequence[Run]) -> list[str]:
    """The bands the runs need together, in the canonical order: what a scene stack must make for them."""
    needed = {name for run in runs for name in run.bands}
    return [name for name in BAND_NAMES if name in needed]


def check_recipes(runs: Sequence[Run]) -> dict:
    """The feature recipe shared by the runs of an ensemble, with `bands`: the band set a scene stack
    must make for them (`run_bands`); refuse runs whose bands were made differently."""
    for run in runs:
        missing = [name for name in run.bands if name not in BAND_NAMES]
        if missing:
            raise InputError(f"{run.path}: the model needs bands the scene stack does not make: {', '.join(missing)}")
    first = runs[0]
    for run in runs[1:]:
        if run.tile_size != first.tile_size:
            raise InputError("the runs of an ensemble must share one tile size")
        differs = recipe_differences(run.recipe, first.recipe, run_bands(runs))  # the sensors trained on may differ
        if differs:
            raise InputError(f"{run.path}: its records were built with other feature settings than {first.path} "
                             f"({', '.join(differs)}); an ensemble needs one recipe")
    return {**first.recipe, "bands": run_bands(runs)}


def window_weights(size: int, floor: float = 1e-3) -> np.ndarray:
    """A 2-D blending window (squared sine in each direction) so that overlapping predictions fade
    into each other without seams; a small floor keeps scene edges covered."""
    ramp = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.maximum(np.outer(ramp, ramp), floor).astype(np.float32)


_FORWARD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def forward(model):
    """The model's inference call on a batch (NumPy in, NumPy out) as one traced graph, kept per
    model. Same results as `model.predict_on_batch`, bit for bit, without its per-call set-up
    (about 6 ms a call, and 15% of a UNet-resnet34 batch of 8 on CPU)."""
    if not hasattr(model, "trainable_weights"):  # not Keras: an exported model, already NumPy in and out
        return model
    call = _FORWARD.get(model)
    if call is None:
        import tensorflow as tf

        # The cached call reaches the model through a weak reference: a value that held the model
        # itself would keep its key alive, and every model ever used (a crossval grid) with it.
        reference = weakref.ref(model)
        traced = tf.function(lambda batch: reference()(batch, training=False), reduce_retracing=True)
        call = _FORWARD[model] = lambda batch: np.asarray(traced(batch))
    return call


def predict_tiles(runs: Sequence[Run], tiles: np.ndarray, batch_size: int, flips: bool = False,
                  band_names: Sequence[str] = BAND_NAMES) -> np.ndarray:
    """Mean probability of the runs (and of flipped copies with flips) for tiles (N, T, T, bands).

    Tiles hold the bands `band_names` in that order (float32, as records decode; a scene stack
    makes the runs' bands in the canonical order); each run gets its own bands.
    """
    band_names = list(band_names)
    total = np.zeros(tiles.shape[:3], dtype=np.float32)
    variants = [(False, False), (True, False), (False, True), (True, True)] if flips else [(False, False)]
    for run in runs:
        indexes = [band_names.index(name) for name in run.bands]
        chosen = tiles if indexes == list(range(tiles.shape[-1])) else tiles[..., indexes]
        chosen = chosen.astype(np.float32, copy=False)
        for flip_rows, flip_cols in variants:
            batch = chosen[:, ::-1] if flip_rows else chosen
            batch = batch[:, :, ::-1] if flip_cols else batch
            batch = np.ascontiguousarray(batch) if flip_rows or flip_cols else batch
            # One traced call per chunk: Keras' predict() sets up a data pipeline on every call.
            call = forward(run.model)
            probability = np.concatenate([call(batch[i:i + batch_size])
                                          for i in range(0, len(batch), batch_size)])[..., 0]
            probability = probability[:, ::-1] if flip_rows else probability
            total += probability[:, :, ::-1] if flip_cols else probability
    return total / (len(runs) * len(variants))


class StripBlender:
    """Blend overlapping window probabilities into a scene, handing out rows as they become final.

    Windows are added with their top-left offset; `pop(row)` returns the rows above `row` (which
    no later window may touch) and forgets them, so memory holds only the rows that windows still
    overlap. A uint8 value per pixel (a label, a validity flag) can travel along; overlapping
    windows carry the same value for a pixel, so it is assigned, not blended.
    """

    def __init__(self, height: int, width: int, size: int, fill: int = 0):
        self.height, self.width, self.size, self.fill = height, width, size, fill
        self.weights = window_weights(size)
        self.top = 0
        self.sums = np.zeros((0, width + size), dtype=np.float32)
        self.norms = np.zeros((0, width + size), dtype=np.float32)
        self.values = np.zeros((0, width + size), dtype=np.uint8)

    def add(self, row: int, col: int, probability: np.ndarray, values: np.ndarray | None = None) -> None:
        if row < self.top:
            raise ValueError(f"window at row {row} added after rows up to {self.top} were handed out")
        start, stop = row - self.top, row - self.top + self.size
        if stop > len(self.sums):
            grow = stop - len(self.sums)
            self.sums = np.concatenate([self.sums, np.zeros((grow, self.sums.shape[1]), np.float32)])
            self.norms = np.concatenate([self.norms, np.zeros((grow, self.norms.shape[1]), np.float32)])
            self.values = np.concatenate([self.values, np.full((grow, self.values.shape[1]), self.fill, np.uint8)])
        self.sums[start:stop, col:col + self.size] += probability * self.weights
        self.norms[start:stop, col:col + self.size] += self.weights
        if values is not None:
            self.values[start:stop, col:col + self.size] = values

    def pop(self, row: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(first row, probability, values, covered) of the final rows from the last pop up to `row`."""
        stop = min(row, self.height) - self.top
        first = self.top
        rows = max(min(stop, len(self.sums)), 0)
        sums, norms = self.sums[:rows, :self.width], self.norms[:rows, :self.width]
        covered = norms > 0
        probability = np.divide(sums, norms, out=np.zeros_like(sums), where=covered)
        values = self.values[:rows, :self.width].copy()
        if rows < stop:  # rows no window reached
            missing = stop - rows
            probability = np.concatenate([probability, np.zeros((missing, self.width), np.float32)])
            values = np.concatenate([values, np.full((missing, self.width), self.fill, np.uint8)])
            covered = np.concatenate([covered, np.zeros((missing, self.width), bool)])
        self.sums, self.norms = self.sums[rows:].copy(), self.norms[rows:].copy()
        self.values = self.values[rows:].copy()
        self.top = first + max(stop, 0)
        return first, probability, values, covered
