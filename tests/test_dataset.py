"""The input pipeline: shapes, dtypes, region selection, oversampling, augmentation, repeatability."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.augment import AugmentSettings, augment_batch, random_choices
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
    assert split.test_region == "Lena" and "Lena" not in split.train_regions
    assert len(split.train_regions) == len(manifest["regions"]) - 1
    dataset = make_dataset(demo_records, manifest, split.train, 4, training=True, augment_settings=AugmentSettings())
    image, label = next(iter(dataset))
    assert image.shape == (4, 64, 64, 10) and image.dtype == tf.float32
    assert label.shape == (4, 64, 64, 1) and label.dtype == tf.uint8
    assert dataset.element_spec[0].shape == (4, 64, 64, 10) and dataset.element_spec[1].shape == (4, 64, 64, 1)
    tiles, _ = split.train.tile_count(manifest)
    images, _ = collect(dataset)
    assert len(images) == tiles // 4 * 4  # one pass, last partial batch dropped


def test_pipeline_images_equal_the_numpy_decoding_bit_for_bit(demo_records, manifest):
    """The pipeline converts stored parts to float32 in one XLA kernel; predict stacks scenes with
    NumPy (parts_to_float32): both must give the same bits, tile for tile."""
    from rts_tf.records import decode_example, parts_to_float32

    region = "Lena"
    shards = [str(demo_records / path) for scene in manifest["scenes"] if scene["region"] == region
              for path in scene["shards"]]
    stored = tf.data.TFRecordDataset(shards, compression_type=manifest["compression"]).map(
        lambda s: decode_example(s, manifest, keep_dtype=True, keys=["image"])["image"])
    expected = {parts_to_float32({key: part.numpy() for key, part in parts.items()}, manifest["features"]).tobytes()
                for parts in stored}
    images, _ = collect(make_dataset(demo_records, manifest, [region], 3, training=False))
    assert len(images) == len(expected) > 3  # a partial last batch too (another compiled shape)
    assert {image.tobytes() for image in images} == expected


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


NO_AUGMENTATION = dict(flips=False, rotate90=False, max_rotation_degrees=0.0, blur_probability=0.0, brightness=0.0,
                       contrast=0.0, noise=0.0)


def only(**changes):
    """Augmentation settings with every transform off but the ones given."""
    return AugmentSettings(**{**NO_AUGMENTATION, **changes})


@pytest.fixture(params=["host", "device"])
def way(request):
    """Where augmentation runs: the tf.data pipeline's ops or the training step's (XLA-ready) ops;
    every augmentation test holds for both."""
    return request.param


def augment(images, labels, seeds, settings, centre=None, way="host", xla=False):
    """augment_batch on NumPy arrays (seeds (B, 2)), back to NumPy; with xla compiled as the
    training step is under --xla."""
    def run(images, labels, seeds):
        return augment_batch(images, labels, seeds, BAND_NAMES, settings,
                             None if centre is None else tf.constant(centre, tf.float32), device=way == "device")

    image, label = (tf.function(run, jit_compile=True) if xla else run)(
        tf.constant(images, tf.float32), tf.constant(labels, tf.uint8), tf.constant(seeds, tf.int64))
    return image.numpy(), label.numpy()


def tile_seeds(count, key=7):
    return np.stack([np.arange(count), np.full(count, key)], axis=1)


def gradient_tiles(count, size=32):
    """`count` copies of a tile whose pixels and bands all differ (no flip or turn maps it onto
    itself), with a slump rectangle; every pixel valid."""
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    image = np.stack([0.05 + 0.001 * rows + 0.0001 * cols + 0.01 * band for band in range(10)], axis=-1)
    label = np.zeros((size, size, 1), np.uint8)
    label[4:12, 6:20] = 1
    return np.repeat(image[None], count, 0), np.repeat(label[None], count, 0)


def constant_tiles(count, size=16):
    """Tiles of one value per band (NDVI consistent with red and NIR), every pixel valid."""
    values = np.array([0.04, 0.06, 0.05, 0.30, 0.25 / 0.35, 120, 140, 110, 2.0, 4.0], np.float32)
    return np.broadcast_to(values, (count, size, size, 10)).copy(), np.zeros((count, size, size, 1), np.uint8)


def test_flips_and_quarter_turns_move_image_and_label_together_exactly(way):
    images, labels = gradient_tiles(16)
    out, out_labels = augment(images, labels, tile_seeds(16), only(flips=True, rotate90=True),
                              centre=np.linspace(0.05, 5, 10), way=way)
    seen = set()
    for tile in range(16):
        moved = lambda array, turns, flip: np.rot90(array[:, ::-1] if flip else array, turns)
        matches = [(turns, flip) for turns in range(4) for flip in (False, True)
                   if np.array_equal(out_labels[tile], moved(labels[tile], turns, flip))
                   and np.allclose(out[tile], moved(images[tile], turns, flip), rtol=0, atol=1e-6)]
        assert len(matches) == 1, tile  # exactly one of the eight: pixels stay on the grid, nothing blurs
        seen.update(matches)
    assert len(seen) >= 4  # the tiles of one batch get different transforms


def test_rotations_fill_uncovered_corners_with_ignore_and_zero(way):
    size, count = 64, 12
    images, labels = gradient_tiles(count, size)
    seeds, settings = tile_seeds(count), only(max_rotation_degrees=10.0)
    out, out_labels = augment(images, labels, seeds, settings, centre=images[0, 0, 0], way=way)
    angles = random_choices(tf.constant(seeds), settings)["angle"].numpy()
    assert (np.abs(angles) <= np.radians(10)).all() and len(set(angles.tolist())) == count
    middle = (size - 1) / 2
    rows, cols = np.mgrid[:size, :size] - middle
    for tile, angle in enumerate(angles):
        # Nearest neighbour: a pixel is uncovered where the position it samples rounds to outside
        # the tile (as many pixels for -angle as for angle).
        x = np.round(np.cos(angle) * cols - np.sin(angle) * rows + middle)
        y = np.round(np.sin(angle) * cols + np.cos(angle) * rows + middle)
        outside = (x < 0) | (x > size - 1) | (y < 0) | (y > size - 1)
        ignored = out_labels[tile, ..., 0] == 255
        assert abs(int(ignored.sum()) - int(outside.sum())) <= 4, (tile, np.degrees(angle))
        assert not ignored[16:48, 16:48].any() and (out[tile][ignored] == 0).all()
        if abs(angle) > np.radians(2):
            assert ignored[0, 0] and ignored[0, -1] and ignored[-1, 0] and ignored[-1, -1]
    assert sum((out_labels[tile] == 255).sum() > 50 for tile in range(count)) >= count // 2


def test_augmentation_moves_image_and_label_together_and_keeps_ignore(way):
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
    out_images, out_labels = augment(np.repeat(image[None], 12, 0), np.repeat(label[None], 12, 0),
                                     tile_seeds(12), settings, way=way)
    for out_image, out_label in zip(out_images, out_labels):
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


def test_a_tiles_augmentation_is_a_function_of_its_seed_alone(way):
    images, labels = gradient_tiles(6)
    seeds, settings = tile_seeds(6), AugmentSettings(blur_probability=0.5)
    first, again = augment(images, labels, seeds, settings, way=way), augment(images, labels, seeds, settings, way=way)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    for tile in range(6):  # the same alone as in its batch
        alone = augment(images[tile:tile + 1], labels[tile:tile + 1], seeds[tile:tile + 1], settings, way=way)
        np.testing.assert_allclose(alone[0][0], first[0][tile], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(alone[1][0], first[1][tile])
    assert all(not np.array_equal(first[0][0], first[0][tile]) for tile in range(1, 6))
    other = augment(images, labels, tile_seeds(6, key=8), settings, way=way)
    assert not np.array_equal(first[0], other[0])


def test_brightness_scales_the_reflectance_bands_and_leaves_ndvi(way):
    images, labels = constant_tiles(8)
    seeds, settings = tile_seeds(8), only(brightness=0.1)
    gain = random_choices(tf.constant(seeds), settings)["gain"].numpy()
    assert ((gain >= 0.9) & (gain <= 1.1)).all() and len(set(gain.tolist())) == 8
    out, _ = augment(images, labels, seeds, settings, centre=images[0, 0, 0] * 0.9, way=way)
    # red 0.05 and NIR 0.30 become 0.05 g and 0.30 g; NDVI stays 0.25 / 0.35; the rest is untouched.
    np.testing.assert_allclose(out[:, 0, 0, 2], 0.05 * gain, rtol=1e-5)
    np.testing.assert_allclose(out[..., :4], images[..., :4] * gain[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(out[..., 4], 0.25 / 0.35, rtol=1e-5)
    np.testing.assert_allclose(out[..., 5:], images[..., 5:], rtol=1e-6)


def test_contrast_turns_about_the_mean_of_the_valid_pixels(way):
    images, labels = constant_tiles(4)
    images[:, :, :8, :4] *= 0.5  # the left half darker
    labels[:, :, 12:] = 255  # an ignored stripe, holding garbage: not in the mean
    images[:, :, 12:] = 7.0
    seeds, settings = tile_seeds(4), only(contrast=0.1, brightness=0.1)
    choices = random_choices(tf.constant(seeds), settings)
    contrast, gain = (choices[name].numpy()[:, None, None, None] for name in ("contrast", "gain"))
    out, _ = augment(images, labels, seeds, settings, way=way)
    bright = constant_tiles(1)[0][0, 0, 0, :4]
    mean = bright * (8 * 0.5 + 4 * 1.0) / 12  # columns 0-7 at half, 8-11 at full value
    expected = ((images[..., :12, :4] - mean) * contrast + mean) * gain
    np.testing.assert_allclose(out[..., :12, :4], expected, rtol=1e-5)
    red, nir = expected[..., 2], expected[..., 3]
    np.testing.assert_allclose(out[..., :12, 4], (nir - red) / (nir + red), rtol=1e-5)
    assert (out[..., 12:, :] == 0).all()


def test_noise_is_per_pixel_and_band_with_the_set_strength(way):
    images, labels = constant_tiles(4, size=64)
    out, _ = augment(images, labels, tile_seeds(4), only(noise=0.02), way=way)
    change = out[..., :4] / images[..., :4] - 1
    assert abs(change.std() - 0.02) < 0.001 and abs(change.mean()) < 0.001
    assert np.abs(change).max() <= 0.02 * 3 ** 0.5 + 1e-6
    assert abs(np.corrcoef(change[..., 2].ravel(), change[..., 3].ravel())[0, 1]) < 0.05
    np.testing.assert_allclose(out[..., 4], (out[..., 3] - out[..., 2]) / (out[..., 3] + out[..., 2]), rtol=1e-5)
    np.testing.assert_array_equal(out[..., 5:], images[..., 5:])


def test_blur_is_a_gaussian_with_each_tiles_sigma(way):
    images, labels = constant_tiles(8)
    images[:, 8, 8, 8] += 1.0  # one bright pixel in relative elevation
    seeds, settings = tile_seeds(8), only(blur_probability=0.5, max_blur_sigma=1.0)
    sigma = random_choices(tf.constant(seeds), settings)["blur_sigma"].numpy()
    assert 0 < (sigma > 0).sum() < 8 and ((sigma == 0) | ((sigma >= 0.4) & (sigma <= 1.0))).all()
    out, _ = augment(images, labels, seeds, settings, way=way)
    for tile, s in enumerate(sigma):
        if s == 0:
            np.testing.assert_array_equal(out[tile], images[tile])
            continue
        kernel = np.exp(-np.arange(-2, 3) ** 2 / (2 * s ** 2))
        kernel /= kernel.sum()
        np.testing.assert_allclose(out[tile, 6:11, 6:11, 8] - 2.0, np.outer(kernel, kernel), atol=1e-5)
        np.testing.assert_allclose(out[tile, ..., 5], 120, rtol=1e-6)  # constant bands stay constant


def test_ignored_pixels_do_not_leak_into_valid_ones_through_augmentation(way):
    """Half-ignored tiles: whatever their ignored half held, the valid half comes out the same."""
    rng = np.random.default_rng(1)
    centre = np.array([0.04, 0.06, 0.05, 0.25, 0.6, 120, 140, 110, 0.0, 4.0], np.float32)
    image = (centre * rng.uniform(0.8, 1.2, (6, 64, 64, 10))).astype(np.float32)
    label = np.zeros((6, 64, 64, 1), np.uint8)
    label[:, :, 32:] = 255
    zeros, garbage = image.copy(), image.copy()
    zeros[:, :, 32:] = 0.0  # as records store ignored pixels
    garbage[:, :, 32:] = rng.uniform(-500, 500, (6, 64, 32, 10))
    garbage[:, 5, 40] = np.nan
    garbage[:, 6, 40] = np.inf
    settings = AugmentSettings(blur_probability=1.0)
    (first, first_label), (second, second_label) = (augment(x, label, tile_seeds(6, 3), settings, centre, way=way)
                                                    for x in (zeros, garbage))
    np.testing.assert_array_equal(first_label, second_label)
    valid = first_label[..., 0] != 255
    np.testing.assert_allclose(first[valid], second[valid], rtol=0, atol=1e-5)
    assert (first[~valid] == 0).all() and (second[~valid] == 0).all()
    # Near the ignored half, blur and rotation mix in the band means, not zeros: the valid pixels
    # next to it stay at the scale of the means (TCVIS about 120, not pulled towards 0).
    assert first[valid][:, 5].min() > 0.5 * centre[5]


def test_the_training_step_augments_as_the_pipeline_does_also_under_xla():
    """--augment-on device: the same tiles as the host for the same seeds, every transform on, tiles
    with ignored parts, also compiled with XLA (as under --xla); labels exactly, images to float
    tolerance."""
    rng = np.random.default_rng(4)
    centre = np.array([0.04, 0.06, 0.05, 0.25, 0.6, 120, 140, 110, 0.0, 4.0], np.float32)
    images = (centre * rng.uniform(0.7, 1.3, (8, 64, 64, 10))).astype(np.float32)
    labels = (rng.uniform(size=(8, 64, 64, 1)) > 0.8).astype(np.uint8)
    labels[:, 40:, :12] = 255
    images[:, 40:, :12] = 0.0
    settings = AugmentSettings(blur_probability=0.5)
    seeds = tile_seeds(8, 11)
    sigma = random_choices(tf.constant(seeds), settings)["blur_sigma"].numpy()
    assert 0 < (sigma > 0).sum() < 8  # blurred and unblurred tiles in the batch
    host = augment(images, labels, seeds, settings, centre)
    for xla in (False, True):
        device = augment(images, labels, seeds, settings, centre, way="device", xla=xla)
        np.testing.assert_array_equal(device[1], host[1])
        scale = np.maximum(np.abs(host[0]).max(axis=(0, 1, 2)), 1.0)  # per band: TCVIS about 100
        assert (np.abs(device[0] - host[0]) / scale).max() < 1e-5, (xla, (np.abs(device[0] - host[0]) / scale).max())
    assert (host[1] == 255).sum() > (labels == 255).sum()  # the rotations did uncover corners


def test_device_augmentation_batches_carry_the_hosts_seeds(demo_records, manifest):
    """With augment_on device the pipeline hands out (image, label, seeds) unaugmented; augmenting
    them with those seeds gives exactly the host pipeline's batches."""
    make = lambda way: make_dataset(demo_records, manifest, ("Kolguev", "Banks"), 4, training=True, seed=3,
                                    augment_settings=AugmentSettings(), mean=np.full(10, 0.5, np.float32),
                                    epochs=(0, 1), augment_on=way)
    host = list(make("host").take(3))
    device = list(make("device").take(3))
    for (image, label), (raw, raw_label, seeds) in zip(host, device):
        assert seeds.dtype == tf.int64 and seeds.shape == (4, 2)
        again = augment_batch(raw, raw_label, seeds, BAND_NAMES, AugmentSettings(), tf.fill([10], 0.5))
        np.testing.assert_array_equal(again[0].numpy(), image.numpy())
        np.testing.assert_array_equal(again[1].numpy(), label.numpy())


def test_same_seed_same_batches(demo_records, manifest):
    make = lambda seed: collect(make_dataset(demo_records, manifest, ("Kolguev", "Banks"), 2, training=True, seed=seed,
                                             augment_settings=AugmentSettings()))
    first, again, other = make(1), make(1), make(2)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_the_model_normalises_ignored_pixels_to_zero():
    from rts_tf.models import IgnoreAwareNormalization

    layer = IgnoreAwareNormalization([1.0, 100.0], [0.5, 10.0])
    pixels = tf.constant([[[[2.0, 110.0], [0.0, 0.0], [0.0, 90.0]]]])
    np.testing.assert_allclose(layer(pixels).numpy()[0, 0], [[2.0, 1.0], [0.0, 0.0], [-2.0, -1.0]])
