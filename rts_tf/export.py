"""Export: a trained run as a portable inference package (ONNX or SavedModel) with a model card."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rts_tf.errors import InputError
from rts_tf.inference import load_run

FORMATS = ("onnx", "savedmodel")
CARD_NAME = "model.json"
ONNX_NAME = "model.onnx"
SAVED_MODEL_NAME = "saved_model"
ONNX_OPSET = 17  # onnxruntime 1.14 and later run it
# run.json keys an exported package keeps: everything prediction reads, nothing about the training machine.
RUN_KEYS = ("rts_tf_version", "git_commit", "arch", "encoder", "tile_size", "overlap", "bands", "normalisation",
            "label_values", "threshold", "threshold_source", "recipe", "build_settings", "regions", "holdout_region",
            "best_epoch", "metrics")


@dataclass
class ExportResult:
    out: str
    format: str
    model: str
    card: str
    sha256: str

    def lines(self) -> list[str]:
        return [f"exported {self.format}: {self.model} (sha256 {self.sha256[:16]}...)",
                f"model card: {self.card}",
                f"predict with it: rts-tf predict --run {self.out} ..."]


class OnnxModel:
    """An exported ONNX model under onnxruntime, called like the Keras model's traced forward pass:
    a float32 batch (N, tile, tile, bands) in, probabilities (N, tile, tile, 1) out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise InputError(f"{path}: an ONNX package needs onnxruntime: pip install 'rts-tf[export]'") from None
        options = onnxruntime.SessionOptions()
        # Ray gives an actor OMP_NUM_THREADS = its CPUs; onnxruntime would otherwise take every core.
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def sha256(path: Path) -> str:
    """The SHA-256 of a file, or of a folder's files (their relative names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def training_scenes(info: dict) -> dict[str, list[str]]:
    """The scenes of each part of the run's split, as run.json records them."""
    split = info.get("split") or {}
    return {part: list((split.get(part) or {}).get("scenes", [])) for part in ("train", "validation", "test")}


def pixel_sizes(info: dict, scenes: list[str]) -> dict[str, list[float]]:
    """The pixel sizes (m) of the training scenes by sensor, from the records' manifest when it is
    still there (else empty)."""
    manifest = Path(str(info.get("records", ""))) / "manifest.json"
    try:
        found = json.loads(manifest.read_text())["scenes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    sizes: dict[str, set] = {}
    for scene in found:
        if not scenes or scene.get("scene_id") in scenes:
            sizes.setdefault(scene.get("sensor", "planetscope"), set()).add(round(abs(float(scene["transform"][0])), 6))
    return {sensor: sorted(values) for sensor, values in sorted(sizes.items())}


def crossval_scores(run: Path) -> list[dict]:
    """The rows of a crossval.csv that name this run (`rts-tf crossval` puts runs at LOGDIR/<arch>_<encoder>/<region>)."""
    rows = []
    for folder in (run.parent, run.parent.parent):
        table = folder / "crossval.csv"
        if not table.is_file():
            continue
        with open(table, newline="") as stream:
            for row in csv.DictReader(stream):
                if row.get("run") and Path(row["run"]).resolve() == run.resolve():
                    rows.append({key: value for key, value in row.items() if key != "run"})
    return rows


def model_card(info: dict, run: Path, fmt: str, model_file: str, digest: str, keras_digest: str) -> dict:
    """What a user of the exported model must know: inputs (bands in order, units, normalisation),
    output, pixel size, tile size, sensors, training data, scores, threshold and checksums."""
    scenes = training_scenes(info)
    bands = info["bands"]
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    return {
        "name": f"rts-tf {info.get('arch', '?')}-{info.get('encoder', '?')}",
        "format": fmt,
        "model": model_file,
        "sha256": digest,
        "keras_model": "model.keras",
        "keras_sha256": keras_digest,
        "rts_tf_version": info.get("rts_tf_version"),
        "source_run": str(run.resolve()),
        "input": {"name": "image", "dtype": "float32", "layout": "NHWC",
                  "shape": [None, info["tile_size"], info["tile_size"], len(bands)],
                  "bands": [{"index": index, "name": band["name"], "unit": band.get("unit", "")}
                            for index, band in enumerate(bands)],
                  "ignored_pixels": "0 in every band (cloud, nodata, outside the DEM); the model maps them to "
                                    "the training mean"},
        "normalisation": {"inside_the_model": True, "formula": "(x - mean) / std per band",
                          **(info.get("normalisation") or {})},
        "output": {"name": "probability", "dtype": "float32", "shape": [None, info["tile_size"], info["tile_size"], 1],
                   "meaning": "probability that the pixel is a retrogressive thaw slump (sigmoid)"},
        "tile_size": info["tile_size"],
        "overlap": info.get("overlap"),
        "pixel_size_m": pixel_sizes(info, scenes["train"]),
        "sensors": (info.get("recipe") or {}).get("sensors", []),
        "feature_recipe": info.get("recipe"),
        "training": {"regions": info.get("regions"), "scenes": scenes, "holdout_region": info.get("holdout_region"),
                     "best_epoch": info.get("best_epoch"), "validation_metrics": info.get("metrics")},
        "evaluation": metrics,
        "crossval": crossval_scores(run),
        "threshold": info.get("threshold", 0.5),
        "threshold_source": info.get("threshold_source", "best threshold of the validation data at the best epoch"),
    }


def convert_onnx(model, tile_size: int, bands: int, path: Path) -> None:
    """The Keras model as ONNX (opset ONNX_OPSET, any batch size) through tf2onnx."""
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError:
        raise InputError("--format onnx needs tf2onnx and onnx: pip install 'rts-tf[export]'") from None
    signature = [tf.TensorSpec((None, tile_size, tile_size, bands), tf.float32, name="image")]
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=ONNX_OPSET, output_path=str(path))


def export(run: str | os.PathLike, fmt: str, out: str | os.PathLike, trust_model: bool = False) -> ExportResult:
    """Write OUT/: the inference model (normalisation inside) as ONNX or SavedModel, model.keras,
    run.json (what `rts-tf predict --run OUT` needs) and model.json (the model card). Built under
    a temporary name beside OUT, then renamed; an existing OUT is refused."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; remove it or choose another --out")
    loaded = load_run(run, trust_model=trust_model)
    info = loaded.info
    if "export" in info:
        raise InputError(f"{run}: is already an exported package; export the training run")
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        staging.mkdir(parents=True)
        keras_file = loaded.path / str(info.get("model", "model.keras"))
        shutil.copyfile(keras_file, staging / "model.keras")
        if fmt == "onnx":
            convert_onnx(loaded.model, loaded.tile_size, len(loaded.bands), staging / ONNX_NAME)
            model_file = ONNX_NAME
        else:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every signature of the export
                loaded.model.export(str(staging / SAVED_MODEL_NAME))
            model_file = SAVED_MODEL_NAME
        digest = sha256(staging / model_file)
        card = model_card(info, loaded.path, fmt, model_file, digest, sha256(staging / "model.keras"))
        package = {key: info[key] for key in RUN_KEYS if key in info}
        package.update(complete=True, model="model.keras", export={"format": fmt, "file": model_file,
                                                                   "sha256": digest,
                                                                   "source_run": str(loaded.path.resolve())})
        (staging / "run.json").write_text(json.dumps(package, indent=1) + "\n")
        (staging / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
        os.replace(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            from rts_tf.errors import disk_problem, output_error

            if disk_problem(error, out) is not None:
                raise output_error(out, error) from None
        raise
    return ExportResult(str(out), fmt, str(out / model_file), str(out / CARD_NAME), digest)
