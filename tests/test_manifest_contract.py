"""The records contract: shards parse with plain TensorFlow and manifest.json alone (no rts_tf import)."""

import json
import subprocess
import sys

import numpy as np
import tensorflow as tf

from conftest import build_arguments


def test_shards_parse_with_plain_tensorflow(world, tmp_path):
    out = tmp_path / "records"
    completed = subprocess.run([sys.executable, "-m", "rts_tf", *build_arguments(world, out)],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    features = manifest["features"]
    spec = {key: tf.io.FixedLenFeature([], tf.int64 if value["dtype"] == "int64" else tf.string)
            for key, value in features.items()}

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, spec)
        for key in ("image", "label"):
            raw = tf.io.decode_raw(example[key], tf.dtypes.as_dtype(features[key]["dtype"]))
            example[key] = tf.reshape(raw, features[key]["shape"])
        return example

    size, bands = manifest["tile_size"], len(manifest["bands"])
    total = 0
    for scene in manifest["scenes"]:
        paths = [str(out / path) for path in scene["shards"]]
        tiles = list(tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
                     .map(parse).as_numpy_iterator())
        assert len(tiles) == scene["tiles"] > 0
        for tile in tiles:
            assert tile["image"].shape == (size, size, bands) and tile["image"].dtype == np.float16
            assert tile["label"].shape == (size, size, 1)
            assert set(np.unique(tile["label"])) <= set(manifest["label_values"].values())
            assert tile["scene_id"].decode() == scene["scene_id"] and tile["region"].decode() == scene["region"]
            assert 0 <= tile["row"] < scene["height"] and 0 <= tile["col"] < scene["width"]
        total += len(tiles)
    assert total == sum(info["tiles"] for info in manifest["shards"].values())
