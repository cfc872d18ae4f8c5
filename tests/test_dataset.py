"""The input pipeline: shapes, dtypes, region selection, oversampling, augmentation, repeatability."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.augment import AugmentSettings, augment
from rts_tf.dataset import make_dataset, normalisation, split_regions, tile_count
from rts_tf.errors import InputError


@pytest.fixture(scope="module")
def manifest(demo_records):
    return json.loads((demo_records / "manifest.json").read_text())


def collect(dataset):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def test_batches_have_the_manifest_shapes_and_dtypes(demo_records, manifest):
    split = split_regions(manifest, holdout_region="Lena")
    assert split.validation == ("Lena",) and "Lena" not in split.train and len(split.train) == 5
    dataset = make_dataset(demo_records, manifest, split.train, 4, training=True, augment_settings=AugmentSettings())
    image, label = next(iter(dataset))
    assert image.shape == (4, 64, 64, 10) and image.dtype == tf.float32
    assert label.shape == (4, 64, 64, 1) and label.dtype == tf.uint8
    tiles, _ = tile_count(manifest, split.train)
    images, _ = collect(dataset)
    assert len(images) == tiles // 4 * 4  # one pass, last partial batch dropped


def test_validation_holds_exactly_the_held_out_region(demo_records, manifest):
    validation = make_dataset(demo_records, manifest, ("Lena",), 3, training=False)
    _, labels = collect(validation)
    assert len(labels) == manifest["regions"]["Lena"]["tiles"]
    assert (labels == 1).sum() == manifest["regions"]["Lena"]["slump_pixels"]


def test_unselected_regions_are_never_read(demo_records, manifest, tmp_path):
    copy = tmp_path / "records"
    shutil.copytree(demo_records, copy)
    for path, info in manifest["shards"].items():
        if info["region"] == "Banks":
            (copy / path).write_bytes(b"garbage")
    images, _ = collect(make_dataset(copy, manifest, ("Lena", "Horton"), 4, training=False))
    assert len(images) == manifest["regions"]["Lena"]["tiles"] + manifest["regions"]["Horton"]["tiles"]
    with pytest.raises(InputError, match="Banks/.*tfrecord.gz: shard is 7 bytes.*truncated"):
        make_dataset(copy, manifest, ("Banks",), 4, training=False)


def test_oversampling_repeats_slump_tiles(demo_records, manifest):
    regions = ("Horton",)
    tiles, slump_tiles = tile_count(manifest, regions)
    once = collect(make_dataset(demo_records, manifest, regions, 1, training=True))[1]
    thrice = collect(make_dataset(demo_records, manifest, regions, 1, training=True, oversample_slumps=3))[1]
    assert len(once) == tiles and len(thrice) == tiles + 2 * slump_tiles
    assert (thrice == 1).any(axis=(1, 2, 3)).sum() == 3 * slump_tiles


def test_unknown_region_lists_the_known_ones(manifest):
    with pytest.raises(InputError, match="Atlantis.*Lena"):
        split_regions(manifest, holdout_region="Atlantis")


def test_normalisation_combines_the_training_regions(manifest):
    mean, std = normalisation(manifest, ["Lena"])
    assert np.allclose(mean, manifest["statistics"]["regions"]["Lena"]["mean"], rtol=1e-5)
    overall_mean, _ = normalisation(manifest, list(manifest["regions"]))
    assert np.allclose(overall_mean, manifest["statistics"]["overall"]["mean"], rtol=1e-5)
    assert (std > 0).all()


def test_augmentation_moves_image_and_label_together_and_keeps_ignore():
    band_names = ["blue", "green", "red", "nir", "ndvi", "tcvis_brightness", "tcvis_greenness", "tcvis_wetness",
                  "relative_elevation", "slope"]
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 10), np.float32)
    image[..., :4] = 0.05
    image[..., 3] = 0.3
    image[10:30, 20:45, 8] = 5.0  # a "slump" in the relative-elevation band
    image[..., 9] = rng.uniform(0, 10, (64, 64))
    label = (image[..., 8:9] > 2.5).astype(np.uint8)
    label[50:, :10] = 255
    image[50:, :10] = 0.0
    settings = AugmentSettings(blur_probability=0.0, noise=0.0)  # keep band 8 crisp for the check
    for seed in range(12):
        out_image, out_label = (t.numpy() for t in augment(tf.constant(image), tf.constant(label),
                                                           tf.constant([seed, 7]), band_names, settings))
        valid = out_label[..., 0] != 255
        # The label still marks exactly where the image's slump band is high (away from blurred edges).
        high = out_image[..., 8] > 4.0
        low = out_image[..., 8] < 1.0
        assert (out_label[..., 0][high & valid] == 1).all() and (out_label[..., 0][low & valid] == 0).all()
        assert (out_image[~valid] == 0).all()
        assert (out_label == 255).sum() >= 100  # the ignored corner survives (rotations only add more)
        assert set(np.unique(out_label)) <= {0, 1, 255}
        ndvi = out_image[..., 4][valid]
        red, nir = out_image[..., 2][valid], out_image[..., 3][valid]
        assert np.allclose(ndvi, (nir - red) / (nir + red), atol=1e-4)


def test_same_seed_same_batches(demo_records, manifest):
    make = lambda seed: collect(make_dataset(demo_records, manifest, ("Kolguev", "Banks"), 2, training=True, seed=seed,
                                             augment_settings=AugmentSettings()))
    first, again, other = make(1), make(1), make(2)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
