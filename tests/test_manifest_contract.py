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
        for key, feature in features.items():
            if feature["dtype"] not in ("string", "int64"):
                raw = tf.io.decode_raw(example[key], tf.dtypes.as_dtype(feature["dtype"]))
                example[key] = tf.reshape(raw, feature["shape"])
        # Schema 2: image parts by source, each with its bands, scale and offset.
        channels = {}
        for key, feature in features.items():
            for index, name in enumerate(feature.get("bands", [])):
                channels[name] = tf.cast(example[key][..., index], tf.float32) * feature["scale"][index] + \
                    feature["offset"][index]
        example["image"] = tf.stack([channels[band["name"]] for band in manifest["bands"]], axis=-1)
        return example

    size, bands = manifest["tile_size"], len(manifest["bands"])
    total = 0
    for scene in manifest["scenes"]:
        paths = [str(out / path) for path in scene["shards"]]
        tiles = list(tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
                     .map(parse).as_numpy_iterator())
        assert len(tiles) == scene["tiles"] > 0
        for tile in tiles:
            assert tile["image"].shape == (size, size, bands) and tile["image"].dtype == np.float32
            valid = tile["label"][..., 0] != 255
            names = [band["name"] for band in manifest["bands"]]
            reflectance = tile["image"][..., :4][valid]
            assert 0 < reflectance.min() and reflectance.max() < 1  # reflectance, not DN
            red, nir, ndvi = (tile["image"][..., names.index(n)][valid] for n in ("red", "nir", "ndvi"))
            np.testing.assert_allclose(ndvi, (nir - red) / (nir + red), atol=6e-5)  # NDVI steps of 1e-4
            assert (tile["image"][~valid] == 0).all()
            assert tile["label"].shape == (size, size, 1)
            assert set(np.unique(tile["label"])) <= set(manifest["label_values"].values())
            assert tile["scene_id"].decode() == scene["scene_id"] and tile["region"].decode() == scene["region"]
            assert 0 <= tile["row"] < scene["height"] and 0 <= tile["col"] < scene["width"]
        total += len(tiles)
    assert total == sum(info["tiles"] for info in manifest["shards"].values())
