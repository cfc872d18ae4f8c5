"""TFRecord schema: the one declaration of tile features, used to write, parse and describe shards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rts_tf.errors import InputError, disk_problem, output_error

SCHEMA_VERSION = 1
LABEL_VALUES = {"background": 0, "rts": 1, "ignore": 255}
IGNORE = LABEL_VALUES["ignore"]
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = {"gzip": "GZIP", "none": ""}

# Feature key -> (dtype, encoding). Image and label shapes depend on the build, see features().
SCALAR_FEATURES = {
    "scene_id": ("string", "bytes_list"),
    "region": ("string", "bytes_list"),
    "site": ("string", "bytes_list"),
    "row": ("int64", "int64_list"),
    "col": ("int64", "int64_list"),
    "slump_pixels": ("int64", "int64_list"),
    "ignored_pixels": ("int64", "int64_list"),
}


def features(tile_size: int, num_bands: int, image_dtype: str) -> dict[str, dict[str, Any]]:
    """The features of every tf.train.Example, as written into manifest.json."""
    spec = {
        "image": {"dtype": image_dtype, "shape": [tile_size, tile_size, num_bands],
                  "encoding": "raw bytes in bytes_list (tf.io.decode_raw, row-major, channels last)"},
        "label": {"dtype": "uint8", "shape": [tile_size, tile_size, 1],
                  "encoding": "raw bytes in bytes_list (tf.io.decode_raw, row-major, channels last)"},
    }
    for key, (dtype, encoding) in SCALAR_FEATURES.items():
        spec[key] = {"dtype": dtype, "shape": [], "encoding": encoding}
    return spec


def shard_suffix(compression: str) -> str:
    return ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"


def encode_example(image: np.ndarray, label: np.ndarray, image_dtype: str, **scalars) -> bytes:
    """Serialise one tile (image HxWxC, label HxW) and its scalar features to tf.train.Example bytes."""
    import tensorflow as tf

    def bytes_feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    feature = {
        "image": bytes_feature(np.ascontiguousarray(image, dtype=image_dtype).tobytes()),
        "label": bytes_feature(np.ascontiguousarray(label, dtype=np.uint8).tobytes()),
    }
    for key, (dtype, _) in SCALAR_FEATURES.items():
        value = scalars[key]
        if dtype == "string":
            feature[key] = bytes_feature(str(value).encode("utf-8"))
        else:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def decode_example(serialized, manifest: dict, keep_dtype: bool = False, keys=None):
    """Parse tf.train.Example bytes into a dict of tensors: image (H,W,C, float32 or as stored when
    keep_dtype), label (H,W,1 uint8) and the scalar features (only `keys` when given). Works inside
    tf.data pipelines."""
    import tensorflow as tf

    spec = {key: value for key, value in manifest["features"].items() if keys is None or key in keys}
    # Everything but int64 scalars travels as bytes: strings and the raw image and label arrays.
    parse_spec = {key: tf.io.FixedLenFeature([], tf.int64 if value["dtype"] == "int64" else tf.string)
                  for key, value in spec.items()}
    parsed = tf.io.parse_single_example(serialized, parse_spec)
    sample = dict(parsed)
    for key in ("image", "label"):
        if key not in spec:
            continue
        raw = tf.io.decode_raw(parsed[key], tf.dtypes.as_dtype(spec[key]["dtype"]))
        sample[key] = tf.reshape(raw, spec[key]["shape"])
    if not keep_dtype and "image" in sample:
        sample["image"] = tf.cast(sample["image"], tf.float32)
    return sample


class ShardWriter:
    """Write a TFRecord shard under a temporary name; rename it into place on close.

    A full, read-only or forbidden disk becomes a one-line InputError naming the shard, with the
    temporary file removed.
    """

    def __init__(self, path: Path, compression: str, compression_level: int | None):
        import tensorflow as tf

        self.path = Path(path)
        self.temporary = self.path.with_name(self.path.name + ".tmp")
        self._writer = None
        self.count = 0
        with self._disk_errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            options = tf.io.TFRecordOptions(compression_type=compression,
                                            compression_level=compression_level if compression else None)
            self._writer = tf.io.TFRecordWriter(str(self.temporary), options)

    @contextlib.contextmanager
    def _disk_errors(self):
        try:
            yield
        except Exception as error:
            if disk_problem(error) is None:
                raise
            self.abort()
            raise output_error(self.path, error) from None

    def write(self, example: bytes) -> None:
        with self._disk_errors():
            self._writer.write(example)
        self.count += 1

    def close(self) -> dict[str, Any]:
        """Finish the shard and return its size and sha256."""
        with self._disk_errors():
            self._writer.close()
            os.replace(self.temporary, self.path)
        return {"tiles": self.count, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # closing flushes; on a full disk that fails too, and the file goes anyway
            pass
        self.temporary.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically; a full or read-only disk is a one-line InputError and leaves
    no temporary file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if disk_problem(error) is None:
            raise
        raise output_error(path, error) from None


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load DIR/manifest.json with one-line errors for a missing folder, an unreadable file, or a
    manifest that lacks a key the readers need or holds a value of the wrong JSON type."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: records folder not found")
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise InputError(f"{path}: no manifest (build records with `rts-tf build-records` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable manifest: {error}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a records manifest: expected a JSON object, found {_json_kind(manifest)}")
    missing = [key for key in ("schema_version", "tile_size", "overlap", "compression", "bands", "features",
                               "label_values", "regions", "scenes", "shards", "statistics") if key not in manifest]
    if missing:
        raise InputError(f"{path}: manifest lacks {', '.join(missing)}")
    version = manifest["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{path}: invalid manifest: schema_version must be an integer of at least 1, "
                         f"got {_json_kind(version)}")
    if version > SCHEMA_VERSION:
        raise InputError(f"{path}: schema version {version} is newer than this rts-tf "
                         f"understands ({SCHEMA_VERSION}); upgrade rts-tf")
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{path}: invalid manifest: {problem} (rebuild the records with `rts-tf build-records`)")
    return manifest


# JSON types by the words a message uses for them (JSON's true and false are not numbers).
_JSON_TYPES = {"an integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
               "a number": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
               "a string": lambda value: isinstance(value, str),
               "a list": lambda value: isinstance(value, list),
               "an object": lambda value: isinstance(value, dict)}


def _json_kind(value: Any) -> str:
    """How a message names a JSON value: `"two" (a string)`, `a list`, `null`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kind = next(name for name, test in _JSON_TYPES.items() if test(value))
    return kind if isinstance(value, (list, dict)) else f"{json.dumps(value)[:40]} ({kind})"


# The dtypes a feature of a tf.train.Example can declare (strings; raw bytes of these numbers).
_FEATURE_DTYPES = ("string", "int64", "uint8", "uint16", "int16", "int32", "float16", "float32", "float64")


def _manifest_problem(manifest: dict) -> str | None:
    """The first thing in a manifest (a JSON object of schema 1 with every top-level key) that
    inspect, fit or evaluate could not use, or None: every key they read, its JSON type, and that
    shapes, shard lists and band statistics agree with each other."""
    def check(value, kind: str, where: str) -> None:
        if not _JSON_TYPES[kind](value):
            raise ValueError(f"{where} must be {kind}, got {_json_kind(value)}")

    def check_object(value, spec: dict[str, str], where: str) -> None:
        check(value, "an object", where)
        missing = [key for key in spec if key not in value]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        for key, kind in spec.items():
            check(value[key], kind, f"{where}.{key}" if where else key)

    def check_numbers(value, kind: str, length: int, where: str) -> None:
        check(value, "a list", where)
        if len(value) != length:
            raise ValueError(f"{where} must hold {length} numbers, got {len(value)}")
        for index, item in enumerate(value):
            check(item, kind, f"{where}[{index}]")

    try:
        check_object(manifest, {"tile_size": "an integer", "overlap": "an integer", "compression": "a string",
                                "bands": "a list", "features": "an object", "label_values": "an object",
                                "regions": "an object", "scenes": "a list", "shards": "an object",
                                "statistics": "an object"}, "")
        size, bands = manifest["tile_size"], manifest["bands"]
        if size < 1:
            raise ValueError(f"tile_size must be positive, got {size}")
        if not 0 <= manifest["overlap"] < size:
            raise ValueError(f"overlap must be at least 0 and smaller than tile_size ({size}), "
                             f"got {manifest['overlap']}")
        if manifest["compression"] not in COMPRESSIONS.values():
            raise ValueError(f"compression must be \"GZIP\" or \"\", got {_json_kind(manifest['compression'])}")
        for index, band in enumerate(bands):
            check_object(band, {"name": "a string", "unit": "a string"}, f"bands[{index}]")
        features_ = manifest["features"]
        missing = [key for key in ("image", "label") if key not in features_]
        if missing:
            raise ValueError(f"features lacks {', '.join(missing)}")
        for key, spec in features_.items():
            check_object(spec, {"dtype": "a string", "shape": "a list"}, f"features.{key}")
            if spec["dtype"] not in _FEATURE_DTYPES:
                raise ValueError(f"features.{key}.dtype must be one of {', '.join(_FEATURE_DTYPES)}, "
                                 f"got {_json_kind(spec['dtype'])}")
        for key, channels in (("image", len(bands)), ("label", 1)):
            if features_[key]["dtype"] == "string":
                raise ValueError(f"features.{key}.dtype must be a number type, got \"string\"")
            if features_[key]["shape"] != [size, size, channels]:
                raise ValueError(f"features.{key}.shape must be {[size, size, channels]} (tile_size, tile_size, "
                                 f"{'bands' if key == 'image' else '1'}), got {features_[key]['shape']}")
        for path, info in manifest["shards"].items():
            check_object(info, {"tiles": "an integer", "bytes": "an integer", "sha256": "a string",
                                "region": "a string"}, f"shards[{json.dumps(path)}]")
        for index, scene in enumerate(manifest["scenes"]):
            where = f"scenes[{index}]"
            check_object(scene, {"scene_id": "a string", "region": "a string", "width": "an integer",
                                 "height": "an integer", "transform": "a list", "tiles": "an integer",
                                 "slump_tiles": "an integer", "slump_pixels": "an integer",
                                 "ignored_pixels": "an integer", "shards": "a list"}, where)
            check_numbers(scene["transform"][:6], "a number", 6, f"{where}.transform")
            for number, path in enumerate(scene["shards"]):
                check(path, "a string", f"{where}.shards[{number}]")
                if path not in manifest["shards"]:
                    raise ValueError(f"{where}.shards names {path}, which is not in 'shards'")
            check(scene.get("positions", []), "a list", f"{where}.positions")
            for number, position in enumerate(scene.get("positions", [])):
                if not isinstance(position, list) or len(position) < 2 or \
                        not all(_JSON_TYPES["an integer"](value) for value in position):
                    raise ValueError(f"{where}.positions[{number}] must be [row, col, ...] integers, "
                                     f"got {json.dumps(position)[:40]}")
        statistics = manifest["statistics"]
        check_object(statistics, {"overall": "an object", "regions": "an object"}, "statistics")
        missing = [region for region in manifest["regions"] if region not in statistics["regions"]]
        if missing:
            raise ValueError(f"statistics.regions lacks {', '.join(missing)}")
        for name, stats in [("overall", statistics["overall"]),
                            *((f"regions.{region}", stats) for region, stats in statistics["regions"].items())]:
            where = f"statistics.{name}"
            sums = ("mean", "std", "min", "max", "sum", "sum_squares")
            check_object(stats, {"count": "an integer", **{key: "a list" for key in sums}}, where)
            for key in sums:
                check_numbers(stats[key], "a number", len(bands), f"{where}.{key}")
    except ValueError as problem:
        return str(problem)
    return None


def verify_shard(directory: Path, relative_path: str, expected: dict, full: bool = True) -> str | None:
    """None when the shard exists with the expected size (and, when full, sha256), else what is wrong.

    A full check is done once per process for a file of unchanged size and modification time.
    """
    path = Path(directory) / relative_path
    if not path.exists():
        return f"{path}: shard missing"
    info = path.stat()
    if info.st_size != expected["bytes"]:
        return f"{path}: shard is {info.st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
    if not full:
        return None
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns, expected["sha256"])
    if key not in _VERIFIED:
        if sha256_file(path) != expected["sha256"]:
            return f"{path}: shard checksum does not match the manifest"
        _VERIFIED.add(key)
    return None


_VERIFIED: set[tuple] = set()


class BandStatistics:
    """Running per-band count, sum, sum of squares, min and max over valid pixels (float64)."""

    def __init__(self, num_bands: int):
        self.count = 0
        self.sum = np.zeros(num_bands)
        self.sum_squares = np.zeros(num_bands)
        self.minimum = np.full(num_bands, np.inf)
        self.maximum = np.full(num_bands, -np.inf)

    def update(self, pixels: np.ndarray) -> None:
        """Add pixels of shape (n, bands)."""
        if len(pixels) == 0:
            return
        pixels = pixels.astype(np.float64)
        self.count += len(pixels)
        self.sum += pixels.sum(axis=0)
        self.sum_squares += np.square(pixels).sum(axis=0)
        self.minimum = np.minimum(self.minimum, pixels.min(axis=0))
        self.maximum = np.maximum(self.maximum, pixels.max(axis=0))

    def merge(self, other: "BandStatistics") -> None:
        self.count += other.count
        self.sum += other.sum
        self.sum_squares += other.sum_squares
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)

    def to_dict(self) -> dict[str, Any]:
        count = max(self.count, 1)
        mean = self.sum / count
        variance = np.maximum(self.sum_squares / count - mean ** 2, 0.0)
        finite = self.count > 0
        return {"count": int(self.count), "mean": mean.tolist(), "std": np.sqrt(variance).tolist(),
                "min": self.minimum.tolist() if finite else [0.0] * len(mean),
                "max": self.maximum.tolist() if finite else [0.0] * len(mean),
                "sum": self.sum.tolist(), "sum_squares": self.sum_squares.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BandStatistics":
        stats = cls(len(data["sum"]))
        stats.count = data["count"]
        stats.sum = np.array(data["sum"], dtype=np.float64)
        stats.sum_squares = np.array(data["sum_squares"], dtype=np.float64)
        if stats.count:
            stats.minimum = np.array(data["min"], dtype=np.float64)
            stats.maximum = np.array(data["max"], dtype=np.float64)
        return stats
