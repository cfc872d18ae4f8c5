"""The input pipeline: shapes, dtypes, region selection, oversampling, augmentation, repeatability."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.augment import AugmentSettings, augment
from rts_tf.bands import BAND_NAMES
from rts_tf.dataset import Selection, grid_positions, make_dataset, normalisation, split_data
from rts_tf.errors import InputError


@pytest.fixture(scope="module")
def manifest(demo_records):
    return json.loads((demo_records / "manifest.json").read_text())


def collect(dataset):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def test_batches_have_the_manifest_shapes_and_dtypes(demo_records, manifest):
    split = split_data(manifest, holdout_region="Lena", method="scenes")
    assert split.test_region == "Lena" and "Lena" not in split.train_regions and len(split.train_regions) == 5
    dataset = make_dataset(demo_records, manifest, split.train, 4, training=True, augment_settings=AugmentSettings())
    image, label = next(iter(dataset))
    assert image.shape == (4, 64, 64, 10) and image.dtype == tf.float32
    assert label.shape == (4, 64, 64, 1) and label.dtype == tf.uint8
    tiles, _ = split.train.tile_count(manifest)
    images, _ = collect(dataset)
    assert len(images) == tiles // 4 * 4  # one pass, last partial batch dropped


def scene_regions(manifest):
    return {s["scene_id"]: s["region"] for s in manifest["scenes"]}


def test_the_held_out_region_is_only_the_test_set(manifest):
    regions = scene_regions(manifest)
    for method in ("scenes", "blocks"):
        split = split_data(manifest, holdout_region="Lena", method=method)
        assert {regions[s] for s in split.test.scenes} == {"Lena"}
        assert "Lena" not in {regions[s] for s in split.train.scenes + split.validation.scenes}
        shards = split.summary(manifest)
        lena = [p for p, info in manifest["shards"].items() if info["region"] == "Lena"]
        assert shards["test"]["shards"] == sorted(lena)
        assert not set(lena) & set(shards["train"]["shards"] + shards["validation"]["shards"])


def test_scene_split_draws_whole_scenes_per_region_repeatably(manifest):
    regions = scene_regions(manifest)
    split = split_data(manifest, holdout_region="Herschel", method="scenes", seed=3)
    assert split_data(manifest, holdout_region="Herschel", method="scenes", seed=3) == split
    assert not set(split.train.scenes) & set(split.validation.scenes)
    # round(0.15 x 2) = 0 -> at least one of each two-scene region; one-scene regions only train.
    per_region = {}
    for scene in manifest["scenes"]:
        per_region.setdefault(scene["region"], []).append(scene["scene_id"])
    expected = sum(1 for region, ids in per_region.items() if region != "Herschel" and len(ids) >= 2)
    assert len(split.validation.scenes) == expected
    assert all(len(per_region[regions[s]]) >= 2 for s in split.validation.scenes)


def test_block_split_leaves_a_buffer_so_no_pixel_is_in_both(manifest):
    split = split_data(manifest, holdout_region="Lena", method="blocks", seed=1)
    size = manifest["tile_size"]
    assert split.method == "blocks" and split.validation.positions
    for scene in manifest["scenes"]:
        validation = split.validation.positions.get(scene["scene_id"], frozenset())
        train = split.train.positions.get(scene["scene_id"])
        if not validation:
            continue
        covered = np.zeros((scene["height"] + size, scene["width"] + size), dtype=np.uint8)
        for row, col in validation:
            covered[row:row + size, col:col + size] |= 1
        for row, col in train:
            covered[row:row + size, col:col + size] |= 2
        assert not (covered == 3).any(), scene["scene_id"]
        # One edge line of the scene's tiles validates (round(0.15 x 3 or 4 lines) = 1); left out
        # are only tiles that share pixels with it.
        kept = {tuple(p[:2]) for p in scene["positions"]}
        assert validation | train <= kept and len(kept) == scene["tiles"]
        assert len({r for r, _ in validation}) == 1 or len({c for _, c in validation}) == 1
        for row, col in kept - validation - train:
            assert any(abs(row - r) < size and abs(col - c) < size for r, c in validation)
        assert set(grid_positions(manifest, scene)) >= kept


def test_block_split_datasets_read_only_their_tiles(demo_records, manifest):
    split = split_data(manifest, holdout_region="Lena", method="blocks", seed=1)
    scene = next(iter(split.validation.positions))

    def positions(selection):
        dataset = make_dataset(demo_records, manifest, selection, 1, training=False)
        return dataset

    only = Selection((scene,), {scene: split.validation.positions[scene]})
    kept = manifest_positions(demo_records, manifest, scene)
    assert kept == {tuple(p[:2]) for p in next(s for s in manifest["scenes"] if s["scene_id"] == scene)["positions"]}
    _, labels = collect(positions(only))
    assert len(labels) == len(kept & split.validation.positions[scene]) == only.tile_count(manifest)[0] > 0


def manifest_positions(records, manifest, scene_id):
    from rts_tf.records import decode_example

    scene = next(s for s in manifest["scenes"] if s["scene_id"] == scene_id)
    dataset = tf.data.TFRecordDataset([str(records / p) for p in scene["shards"]], compression_type=manifest["compression"])
    return {(int(s["row"]), int(s["col"])) for s in dataset.map(
        lambda s: decode_example(s, manifest, keys=("row", "col"))).as_numpy_iterator()}


def test_auto_takes_blocks_when_whole_scenes_would_take_too_much(manifest):
    # The demo has one or two scenes a region: whole scenes would validate on about half the data.
    assert split_data(manifest, holdout_region="Lena").method == "blocks"


def test_training_on_the_validation_data_needs_the_explicit_flag(manifest):
    with pytest.raises(InputError, match="both train and validate.*--validate-on-training-data"):
        split_data(manifest, train_regions=["Lena", "Horton"], val_regions=["Lena"])
    split = split_data(manifest, train_regions=["Lena", "Horton"], validate_on_training_data=True)
    assert split.train == split.validation and split.method == "training data"
    with pytest.raises(InputError, match="held-out region 'Lena' is the test set"):
        split_data(manifest, holdout_region="Lena", val_regions=["Lena"])
    regions = split_data(manifest, holdout_region="Lena", val_regions=["Horton"])
    assert regions.validation_regions == ("Horton",) and "Horton" not in regions.train_regions


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
    with pytest.raises(InputError, match="Banks/.*tfrecord: shard is 7 bytes.*truncated"):
        make_dataset(copy, manifest, ("Banks",), 4, training=False)


def test_oversampling_repeats_slump_tiles(demo_records, manifest):
    regions = ("Horton",)
    tiles, slump_tiles = Selection(tuple(s["scene_id"] for s in manifest["scenes"]
                                         if s["region"] in regions)).tile_count(manifest)
    once = collect(make_dataset(demo_records, manifest, regions, 1, training=True))[1]
    thrice = collect(make_dataset(demo_records, manifest, regions, 1, training=True, oversample_slumps=3))[1]
    assert len(once) == tiles and len(thrice) == tiles + 2 * slump_tiles
    assert (thrice == 1).any(axis=(1, 2, 3)).sum() == 3 * slump_tiles


def test_unknown_region_lists_the_known_ones(manifest):
    with pytest.raises(InputError, match="Atlantis.*Lena"):
        split_data(manifest, holdout_region="Atlantis")


def test_normalisation_combines_the_training_regions(manifest):
    mean, std = normalisation(manifest, ["Lena"])
    assert np.allclose(mean, manifest["statistics"]["regions"]["Lena"]["mean"], rtol=1e-5)
    overall_mean, _ = normalisation(manifest, list(manifest["regions"]))
    assert np.allclose(overall_mean, manifest["statistics"]["overall"]["mean"], rtol=1e-5)
    assert (std > 0).all()


def test_augmentation_moves_image_and_label_together_and_keeps_ignore():
    band_names = BAND_NAMES
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


def test_ignored_pixels_do_not_leak_into_valid_ones_through_augmentation():
    """A half-ignored tile: whatever its ignored half held, the valid half comes out the same."""
    band_names = BAND_NAMES
    rng = np.random.default_rng(1)
    centre = np.array([0.04, 0.06, 0.05, 0.25, 0.6, 120, 140, 110, 0.0, 4.0], np.float32)
    image = (centre * rng.uniform(0.8, 1.2, (64, 64, 10))).astype(np.float32)
    label = np.zeros((64, 64, 1), np.uint8)
    label[:, 32:] = 255
    zeros, garbage = image.copy(), image.copy()
    zeros[:, 32:] = 0.0  # as records store ignored pixels
    garbage[:, 32:] = rng.uniform(-500, 500, (64, 32, 10))
    for seed in range(6):
        outputs = [augment(tf.constant(x), tf.constant(label), tf.constant([seed, 3]), band_names, AugmentSettings(
            blur_probability=1.0), tf.constant(centre)) for x in (zeros, garbage)]
        (first, first_label), (second, second_label) = [(a.numpy(), b.numpy()) for a, b in outputs]
        np.testing.assert_array_equal(first_label, second_label)
        valid = first_label[..., 0] != 255
        np.testing.assert_allclose(first[valid], second[valid], rtol=0, atol=1e-5)
        assert (first[~valid] == 0).all()
    # Near the ignored half, blur and rotation mix in the band means, not zeros: the valid pixels
    # next to it stay at the scale of the means (TCVIS about 120, not pulled towards 0).
    assert first[valid][:, 5].min() > 0.5 * centre[5]


def test_the_model_normalises_ignored_pixels_to_zero():
    from rts_tf.models import IgnoreAwareNormalization

    layer = IgnoreAwareNormalization([1.0, 100.0], [0.5, 10.0])
    pixels = tf.constant([[[[2.0, 110.0], [0.0, 0.0], [0.0, 90.0]]]])
    np.testing.assert_allclose(layer(pixels).numpy()[0, 0], [[2.0, 1.0], [0.0, 0.0], [-2.0, -1.0]])
