"""TFRecord schema: the one declaration of tile features, used to write, parse and describe shards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rts_tf.errors import InputError

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
    """Write a TFRecord shard under a temporary name; rename it into place on close."""

    def __init__(self, path: Path, compression: str, compression_level: int | None):
        import tensorflow as tf

        self.path = Path(path)
        self.temporary = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = tf.io.TFRecordOptions(compression_type=compression,
                                        compression_level=compression_level if compression else None)
        self._writer = tf.io.TFRecordWriter(str(self.temporary), options)
        self.count = 0

    def write(self, example: bytes) -> None:
        self._writer.write(example)
        self.count += 1

    def close(self) -> dict[str, Any]:
        """Finish the shard and return its size and sha256."""
        self._writer.close()
        os.replace(self.temporary, self.path)
        return {"tiles": self.count, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        self._writer.close()
        self.temporary.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(temporary, path)


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load DIR/manifest.json with clear errors for a missing folder or an unreadable file."""
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
    missing = [key for key in ("schema_version", "tile_size", "bands", "features", "scenes", "shards")
               if key not in manifest]
    if missing:
        raise InputError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise InputError(f"{path}: schema version {manifest['schema_version']} is newer than this rts-tf "
                         f"understands ({SCHEMA_VERSION}); upgrade rts-tf")
    return manifest


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
