"""TFRecord schema: the one declaration of tile features, used to write, parse and describe shards.

Schema 2 stores each source in its natural type: reflectance as uint16 steps of 1e-4 (PlanetScope's
numbers as delivered; other sensors' converted to this one convention, see rts_tf.sensors), TCVIS as uint8, NDVI as int16 in steps of 1e-4, relative elevation and slope as
float16, the label as uint8. A band's value in its unit is `stored * scale + offset`, computed in
float32 by `image_float32` (TensorFlow) and `parts_to_float32` (NumPy) alike, so the records and
the scenes that `predict` stacks give a model bit-identical inputs. Writing needs no TensorFlow:
tf.train.Example messages are built with protobuf and framed as TFRecords here.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rts_tf.bands import BAND_NAMES, REFLECTANCE_BANDS, TCVIS_BANDS, TERRAIN_BANDS
from rts_tf.errors import InputError, disk_problem, output_error

SCHEMA_VERSION = 2
LABEL_VALUES = {"background": 0, "rts": 1, "ignore": 255}
IGNORE = LABEL_VALUES["ignore"]
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = {"none": "", "gzip": "GZIP"}
RAW_ENCODING = "raw bytes in bytes_list (tf.io.decode_raw, row-major, channels last)"


@dataclass(frozen=True)
class ImagePart:
    """One image feature of schema 2: some bands of one source in one stored type."""

    name: str
    dtype: str
    bands: tuple[str, ...]
    scale: float = 1.0
    offset: float = 0.0

    @property
    def key(self) -> str:
        return f"image_{self.name}"

    def store(self, values: np.ndarray) -> np.ndarray:
        """Physical values (NaN-free) -> the stored type: integers rounded to the nearest step and
        clipped to the type's range, floats rounded to the type."""
        kind = np.dtype(self.dtype)
        if kind.kind == "f":
            return values.astype(kind)
        info = np.iinfo(kind)
        if self.scale == 1.0 and self.offset == 0.0:
            steps = np.rint(values)
        else:  # (values - offset) / scale, rounded, in place: the same operations and types, fewer copies
            steps = values - self.offset
            np.divide(steps, self.scale, out=steps)
            np.rint(steps, out=steps)
        return np.clip(steps, info.min, info.max, out=steps).astype(kind)


IMAGE_PARTS = (
    ImagePart("reflectance", "uint16", REFLECTANCE_BANDS, 1e-4),  # surface reflectance x 10000, every sensor
    ImagePart("ndvi", "int16", ("ndvi",), 1e-4),
    ImagePart("tcvis", "uint8", TCVIS_BANDS),
    ImagePart("terrain", "float16", TERRAIN_BANDS),
)



def image_parts_for(bands: Sequence[str] = BAND_NAMES) -> tuple[ImagePart, ...]:
    """The image parts that store a band set: each part with only the set's bands, parts without
    any left out (records of `build-records --bands optical` have no TCVIS or terrain feature)."""
    chosen = set(bands)
    kept = (replace(part, bands=tuple(name for name in part.bands if name in chosen)) for part in IMAGE_PARTS)
    return tuple(part for part in kept if part.bands)


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


def features(tile_size: int, bands: Sequence[str] = BAND_NAMES) -> dict[str, dict[str, Any]]:
    """The features of every tf.train.Example of records holding `bands`, as written into manifest.json."""
    spec = {}
    for part in image_parts_for(bands):
        spec[part.key] = {"dtype": part.dtype, "shape": [tile_size, tile_size, len(part.bands)],
                          "encoding": RAW_ENCODING, "bands": list(part.bands),
                          "scale": [part.scale] * len(part.bands), "offset": [part.offset] * len(part.bands)}
    spec["label"] = {"dtype": "uint8", "shape": [tile_size, tile_size, 1], "encoding": RAW_ENCODING}
    for key, (dtype, encoding) in SCALAR_FEATURES.items():
        spec[key] = {"dtype": dtype, "shape": [], "encoding": encoding}
    return spec


def image_parts(manifest: dict) -> list[tuple[str, dict]]:
    """The image features of records as (key, spec), each spec with its bands, scale and offset:
    schema 2's parts, or schema 1's single `image` feature of every band."""
    specs = manifest["features"]
    if "image" in specs:  # (a band view of schema-1 records names the image's bands itself, see select_bands)
        names = specs["image"].get("bands") or [band["name"] for band in manifest["bands"]]
        return [("image", {**specs["image"], "bands": names, "scale": [1.0] * len(names),
                           "offset": [0.0] * len(names)})]
    return [(key, spec) for key, spec in specs.items() if "bands" in spec]


def _band_order(parts: list[tuple[str, dict]], band_names: list[str]) -> list[int]:
    stored = [name for _, spec in parts for name in spec["bands"]]
    return [stored.index(name) for name in band_names]


def parts_to_float32(parts: dict[str, np.ndarray], manifest_features: dict | None = None,
                     band_names: list[str] = BAND_NAMES) -> np.ndarray:
    """Stored image parts (..., n) -> float32 bands (..., len(band_names)) in physical units. Without
    manifest_features the parts are those that store band_names (image_parts_for)."""
    if manifest_features is None:
        steps, order = _float32_steps(tuple(band_names))  # the same steps, planned once per band set
    else:
        steps, order = _plan_float32(manifest_features, band_names)
    channels = []
    for key, scale, offset in steps:
        values = parts[key].astype(np.float32)
        if scale is not None:
            values *= scale
        if offset is not None:
            values += offset
        channels.append(values)
    stacked = np.concatenate(channels, axis=-1)
    return stacked if order is None else stacked[..., order]


def _plan_float32(specs: dict, band_names: Sequence[str]) -> tuple[list[tuple], list[int] | None]:
    """parts_to_float32's steps: (key, float32 scale or None, float32 offset or None) per image
    part, and the band order to gather (None: already in order)."""
    ordered = [(key, specs[key]) for key in specs if "bands" in specs[key]]
    steps = [(key, np.asarray(spec["scale"], np.float32) if any(s != 1.0 for s in spec["scale"]) else None,
              np.asarray(spec["offset"], np.float32) if any(o != 0.0 for o in spec["offset"]) else None)
             for key, spec in ordered]
    order = _band_order(ordered, list(band_names))
    stored = sum(len(spec["bands"]) for _, spec in ordered)
    return steps, None if order == list(range(stored)) else order


@functools.lru_cache(maxsize=16)
def _float32_steps(band_names: tuple[str, ...]) -> tuple[list[tuple], list[int] | None]:
    return _plan_float32(features(1, band_names), band_names)


def image_float32(parts: dict, manifest: dict):
    """Stored image parts (tensors of any leading shape) -> float32 image in the band order of
    `manifest["bands"]`, in physical units. Works inside tf.data pipelines."""
    import tensorflow as tf

    specs = image_parts(manifest)
    channels = []
    for key, spec in specs:
        values = tf.cast(parts[key], tf.float32)
        if any(s != 1.0 for s in spec["scale"]):
            values = values * tf.constant(spec["scale"], tf.float32)
        if any(o != 0.0 for o in spec["offset"]):
            values = values + tf.constant(spec["offset"], tf.float32)
        channels.append(values)
    stacked = channels[0] if len(channels) == 1 else tf.concat(channels, axis=-1)
    order = _band_order(specs, [band["name"] for band in manifest["bands"]])
    return stacked if order == list(range(len(order))) else tf.gather(stacked, order, axis=-1)


def select_bands(manifest: dict, bands: Sequence[str], where: str = "records") -> dict:
    """A view of a manifest that reads only `bands` (a subset of its bands, kept in the records'
    order): its `bands`, its per-band statistics, and only the image features that hold them.
    Everything that reads records through a manifest (the input pipeline, normalisation, the
    scorer) then sees these bands alone. InputError names bands the records lack."""
    names = [band["name"] for band in manifest["bands"]]
    missing = [name for name in bands if name not in names]
    if missing:
        raise InputError(f"{where}: the records hold no {', '.join(missing)} (their bands: {', '.join(names)}); "
                         "choose bands among them or build records with them (build-records --bands)")
    indexes = [index for index, name in enumerate(names) if name in set(bands)]
    if len(indexes) == len(names):
        return manifest
    chosen = [names[index] for index in indexes]
    specs = dict(manifest["features"])
    if "image" in specs:  # schema 1: one image of every band, decoded whole, then gathered
        specs["image"] = {**specs["image"], "bands": names}
    else:
        for key, spec in manifest["features"].items():
            if "bands" in spec and not set(spec["bands"]) & set(chosen):
                del specs[key]

    def subset(stats: dict) -> dict:
        return {key: [value[index] for index in indexes] if isinstance(value, list) else value
                for key, value in stats.items()}

    statistics = manifest["statistics"]
    return {**manifest, "bands": [manifest["bands"][index] for index in indexes], "features": specs,
            "statistics": {**statistics, "overall": subset(statistics["overall"]),
                           "regions": {name: subset(stats) for name, stats in statistics["regions"].items()},
                           "sensors": {name: subset(stats) for name, stats in statistics.get("sensors", {}).items()}}}


def shard_suffix(compression: str) -> str:
    return ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"


_EXAMPLE = None


def example_class():
    """The tf.train.Example message (and its Features, Feature, BytesList, Int64List), declared in
    a private protobuf pool with TensorFlow's field numbers: writing records needs no TensorFlow."""
    global _EXAMPLE
    if _EXAMPLE is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        field = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(name="rts_tf_example.proto", package="rts_tf", syntax="proto3")

        def message(name: str, *fields: tuple, nested=None):
            result = proto.message_type.add(name=name) if nested is None else nested.nested_type.add(name=name)
            for field_name, number, kind, label, type_name in fields:
                result.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name)
            return result

        repeated, optional = field.LABEL_REPEATED, field.LABEL_OPTIONAL
        message("BytesList", ("value", 1, field.TYPE_BYTES, repeated, None))
        message("Int64List", ("value", 1, field.TYPE_INT64, repeated, None))
        message("Feature", ("bytes_list", 1, field.TYPE_MESSAGE, optional, ".rts_tf.BytesList"),
                ("int64_list", 3, field.TYPE_MESSAGE, optional, ".rts_tf.Int64List"))
        features_ = message("Features", ("feature", 1, field.TYPE_MESSAGE, repeated, ".rts_tf.Features.FeatureEntry"))
        entry = message("FeatureEntry", ("key", 1, field.TYPE_STRING, optional, None),
                        ("value", 2, field.TYPE_MESSAGE, optional, ".rts_tf.Feature"), nested=features_)
        entry.options.map_entry = True
        message("Example", ("features", 1, field.TYPE_MESSAGE, optional, ".rts_tf.Features"))
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        _EXAMPLE = message_factory.GetMessageClass(pool.FindMessageTypeByName("rts_tf.Example"))
    return _EXAMPLE


def encode_example(parts: dict[str, np.ndarray], label: np.ndarray, **scalars) -> bytes:
    """Serialise one tile (image parts HxWxn in their stored types, label HxW) and its scalar
    features to tf.train.Example bytes."""
    example = example_class()()
    feature = example.features.feature
    for part in IMAGE_PARTS:
        if part.key not in parts:  # records of a band set without this source
            continue
        feature[part.key].bytes_list.value.append(np.ascontiguousarray(parts[part.key], dtype=part.dtype).tobytes())
    feature["label"].bytes_list.value.append(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    for key, (dtype, _) in SCALAR_FEATURES.items():
        value = scalars[key]
        if dtype == "string":
            feature[key].bytes_list.value.append(str(value).encode("utf-8"))
        else:
            feature[key].int64_list.value.append(int(value))
    return example.SerializeToString()


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload_length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field (wire type 2) whose payload follows."""
    return bytes([tag << 3 | 2]) + _varint(payload_length)


class ExampleEncoder:
    """encode_example's bytes, built as pieces without protobuf objects or copies of the tiles.

    A tile's arrays are copied once (to bytes, in C order) and the framing is written around them;
    ShardWriter.write takes the pieces as they are. The order of the feature map's entries is the
    one protobuf (upb) serialises them in: learnt once from encode_example for the same keys, and
    the first tile is encoded both ways and compared, so the bytes are encode_example's (if they
    ever differ, this encoder hands encode_example's bytes on from then on).
    """

    def __init__(self):
        self._order: list[str] | None = None
        self._checked = False
        self._fallback = False

    def encode(self, parts: dict[str, np.ndarray], label: np.ndarray, **scalars) -> list[bytes]:
        """The serialised tf.train.Example of one tile as a list of byte strings (join them for the message)."""
        if self._fallback:
            return [encode_example(parts, label, **scalars)]
        values: dict[str, tuple[bool, Any]] = {}  # key -> (is bytes, payload)
        for part in IMAGE_PARTS:
            if part.key in parts:
                values[part.key] = (True, _raw_bytes(parts[part.key], part.dtype))
        values["label"] = (True, _raw_bytes(label, "uint8"))
        for key, (dtype, _) in SCALAR_FEATURES.items():
            value = scalars[key]
            values[key] = (True, str(value).encode("utf-8")) if dtype == "string" else (False, int(value))
        if self._order is None:
            self._order = _map_order(list(values))
        pieces: list[bytes] = []
        entries = []  # (entry head, payload) in serialisation order
        for key in self._order:
            is_bytes, value = values[key]
            if is_bytes:
                inner = _field(1, len(value))  # BytesList.value
                feature_head = _field(1, len(inner) + len(value))  # Feature.bytes_list
                payload_length = len(inner) + len(value)
            else:
                number = _varint(value) if value >= 0 else _varint(value & 0xFFFFFFFFFFFFFFFF)
                inner = _field(1, len(number)) + number  # Int64List.value, packed
                feature_head = _field(3, len(inner))  # Feature.int64_list
                payload_length = len(inner)
                value = b""
            key_bytes = key.encode("utf-8")
            feature_length = len(feature_head) + payload_length
            head = (_field(1, len(key_bytes)) + key_bytes + _field(2, feature_length) + feature_head + inner)
            entry_length = len(head) + len(value)
            entries.append((_field(1, entry_length) + head, value))
        features_length = sum(len(head) + len(value) for head, value in entries)
        pieces.append(_field(1, features_length))  # Example.features
        for head, value in entries:
            pieces.append(head)
            if len(value):
                pieces.append(value)
        if not self._checked:
            self._checked = True
            expected = encode_example(parts, label, **scalars)
            if b"".join(pieces) != expected:
                self._fallback = True
                return [expected]
        return pieces


def _raw_bytes(array: np.ndarray, dtype: str) -> np.ndarray:
    """An array's values in C order and the given type, copied once, as a read-only byte buffer
    (a tile is a strided view of its block: ndarray.tobytes copies such views element by element,
    many times slower)."""
    view = np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)
    view.flags.writeable = False  # a view of its own: the caller's array keeps its flags
    return view


def _map_order(keys: list[str]) -> list[str]:
    """The order in which protobuf serialises a feature map filled with these keys in this order."""
    example = example_class()()
    for key in keys:
        example.features.feature[key].int64_list.value.append(0)
    features_ = example.features.SerializeToString()
    order, position = [], 0
    while position < len(features_):
        position += 1  # the entry's tag
        length, position = _read_varint(features_, position)
        entry = features_[position:position + length]
        key_length, start = _read_varint(entry, 1)
        order.append(entry[start:start + key_length].decode("utf-8"))
        position += length
    return order


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def decode_example(serialized, manifest: dict, keep_dtype: bool = False, keys=None):
    """Parse tf.train.Example bytes into a dict of tensors: image (H,W,C float32 in physical units;
    with keep_dtype the dict of stored parts, for `image_float32` later), label (H,W,1 uint8) and
    the scalar features (only `keys` when given; "image" stands for every image part). Reads
    schema 1 and 2 alike. Works inside tf.data pipelines."""
    import tensorflow as tf

    parts = image_parts(manifest)
    wanted = None if keys is None else set(keys) | ({key for key, _ in parts} if "image" in keys else set())
    spec = {key: value for key, value in manifest["features"].items() if wanted is None or key in wanted}
    # Everything but int64 scalars travels as bytes: strings and the raw image and label arrays.
    parse_spec = {key: tf.io.FixedLenFeature([], tf.int64 if value["dtype"] == "int64" else tf.string)
                  for key, value in spec.items()}
    parsed = tf.io.parse_single_example(serialized, parse_spec)
    sample = {key: value for key, value in parsed.items() if key not in dict(parts)}

    def raw(key):
        return tf.reshape(tf.io.decode_raw(parsed[key], tf.dtypes.as_dtype(spec[key]["dtype"])), spec[key]["shape"])

    if "label" in spec:
        sample["label"] = raw("label")
    if all(key in spec for key, _ in parts):
        stored = {key: raw(key) for key, _ in parts}
        sample["image"] = stored if keep_dtype else image_float32(stored, manifest)
    return sample


def _masked_crc(*pieces: bytes) -> int:
    """TFRecord's masked CRC-32C of the concatenated pieces."""
    import google_crc32c

    crc = 0
    for piece in pieces:
        crc = google_crc32c.extend(crc, piece)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


class ShardWriter:
    """Write a TFRecord shard under a temporary name; rename it into place on close.

    Records are framed as TensorFlow frames them (length, masked CRC-32C of the length, data,
    masked CRC-32C of the data); GZIP shards are one gzip stream, as tf.io.TFRecordWriter writes
    them. A full, read-only or forbidden disk becomes a one-line InputError naming the shard, with
    the temporary file removed.
    """

    def __init__(self, path: Path, compression: str, compression_level: int | None):
        self.path = Path(path)
        # A name of this attempt's own: an engine may run a scene twice at once (a retried task).
        self.temporary = self.path.with_name(f"{self.path.name}.{attempt_id()}.tmp")
        self._file = self._stream = None
        self.count = 0
        with self._disk_errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = _HashingFile(open(self.temporary, "wb"))
            self._stream = gzip.GzipFile(fileobj=self._file, mode="wb", mtime=0,
                                         compresslevel=9 if compression_level is None else compression_level) \
                if compression == "GZIP" else self._file

    @contextlib.contextmanager
    def _disk_errors(self):
        try:
            yield
        except Exception as error:
            if disk_problem(error) is None:
                raise
            self.abort()
            raise output_error(self.path, error) from None

    def write(self, example: bytes | Sequence[bytes]) -> None:
        """Append one record: a serialised example, or its pieces (ExampleEncoder.encode) in order."""
        pieces = [example] if isinstance(example, (bytes, bytearray, memoryview)) else example
        length = struct.pack("<Q", sum(len(piece) for piece in pieces))  # pieces are bytes or uint8 arrays
        with self._disk_errors():
            self._stream.write(length + struct.pack("<I", _masked_crc(length)))
            for piece in pieces:
                self._stream.write(piece)
            self._stream.write(struct.pack("<I", _masked_crc(*pieces)))
        self.count += 1

    def close(self) -> dict[str, Any]:
        """Finish the shard and return its size and sha256."""
        with self._disk_errors():
            if self._stream is not self._file:
                self._stream.close()
            self._file.close()
            os.replace(self.temporary, self.path)
        return {"tiles": self.count, "bytes": self._file.size, "sha256": self._file.digest.hexdigest()}

    def abort(self) -> None:
        for handle in (self._stream, self._file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # closing flushes; on a full disk that fails too, and the file goes anyway
                pass
        self.temporary.unlink(missing_ok=True)


class _HashingFile:
    """A binary file that keeps the sha256 and size of what is written to it (no second read)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def attempt_id() -> str:
    """A short random name for one attempt at a job, for its temporary files (`<name>.<id>.tmp`)."""
    return uuid.uuid4().hex[:12]


def write_json(path: Path, data: Any, unique: bool = False) -> None:
    """Write JSON atomically (temporary name, then rename); see write_text for unique."""
    write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n", unique=unique)


def write_text(path: Path, text: str, unique: bool = False) -> None:
    """Write a text file atomically; a full or read-only disk is a one-line InputError and leaves
    no temporary file. unique: the temporary name is this attempt's own (`<name>.<id>.tmp`), for
    files that two attempts at one job may write at once."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{attempt_id()}.tmp" if unique else path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if disk_problem(error) is None:
            raise
        raise output_error(path, error) from None


def records_fingerprint(manifest: dict) -> str:
    """A checksum of what records hold (bands, tiling, every shard's sha256), whatever their path:
    records rebuilt with other content at the same path get another fingerprint."""
    content = {"bands": manifest.get("bands"), "tile_size": manifest.get("tile_size"),
               "overlap": manifest.get("overlap"),
               "shards": {path: info.get("sha256") for path, info in sorted(manifest.get("shards", {}).items())}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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
    """The first thing in a manifest (a JSON object of schema 1 or 2 with every top-level key) that
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
        if "label" not in features_:
            raise ValueError("features lacks label")
        for key, spec in features_.items():
            check_object(spec, {"dtype": "a string", "shape": "a list"}, f"features.{key}")
            if spec["dtype"] not in _FEATURE_DTYPES:
                raise ValueError(f"features.{key}.dtype must be one of {', '.join(_FEATURE_DTYPES)}, "
                                 f"got {_json_kind(spec['dtype'])}")
        if "image" not in features_:  # schema 2: image parts, each naming its bands
            for key, spec in features_.items():
                if "bands" in spec:
                    check(spec["bands"], "a list", f"features.{key}.bands")
                    for name in ("scale", "offset"):
                        check_numbers(spec.get(name), "a number", len(spec["bands"]), f"features.{key}.{name}")
        names = [band["name"] for band in bands]
        parts = [(key, spec) for key, spec in features_.items() if "bands" in spec] if "image" not in features_ \
            else [("image", {**features_["image"], "bands": names})]
        stored = [name for _, spec in parts for name in spec["bands"]]
        if sorted(stored) != sorted(names):
            raise ValueError(f"the image features hold the bands {stored}, not the bands {names}")
        for key, spec in [*parts, ("label", {**features_["label"], "bands": [None]})]:
            if spec["dtype"] == "string":
                raise ValueError(f"features.{key}.dtype must be a number type, got \"string\"")
            if spec["shape"] != [size, size, len(spec["bands"])]:
                raise ValueError(f"features.{key}.shape must be {[size, size, len(spec['bands'])]} (tile_size, "
                                 f"tile_size, {'1' if key == 'label' else 'its bands'}), got {spec['shape']}")
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
        # Per sensor since sensor profiles (optional: older manifests have none).
        check(statistics.get("sensors", {}), "an object", "statistics.sensors")
        for name, stats in [("overall", statistics["overall"]),
                            *((f"regions.{region}", stats) for region, stats in statistics["regions"].items()),
                            *((f"sensors.{sensor}", stats) for sensor, stats in statistics.get("sensors", {}).items())]:
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
