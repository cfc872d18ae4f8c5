"""Tests of rts_tf.models: every architecture on two encoders, feature scales, ImageNet adapter, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.models import ARCHITECTURES, ENCODERS, build_encoder, build_model, load_model
from rts_tf.models.encoders import imagenet_weights_file, keras_cache_dir

NUM_BANDS = 10
TILE_SIZE = 64
TINY_OPTIONS = {
    "unet": {"decoder_filters": (32, 16, 16, 8, 8)},
    "unetpp": {"decoder_filters": (32, 16, 16, 8, 8)},
    "deeplabv3": {"decoder_filters": 16},
    "deeplabv3plus": {"decoder_filters": 16, "low_level_filters": 8},
}


def tiny_model(arch: str, encoder: str = "resnet18", **options) -> tf.keras.Model:
    return build_model(arch, encoder, NUM_BANDS, TILE_SIZE, **{**TINY_OPTIONS[arch], **options})


def random_batch(batch_size: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch_size, TILE_SIZE, TILE_SIZE, NUM_BANDS)).astype("float32")


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnetb0"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_maps_ten_bands_to_a_float32_probability(arch, encoder):
    model = tiny_model(arch, encoder)

    assert model.input_shape == (None, TILE_SIZE, TILE_SIZE, NUM_BANDS)
    assert model.output_shape == (None, TILE_SIZE, TILE_SIZE, 1)
    probability = model(random_batch(), training=False)
    assert probability.dtype == tf.float32
    assert probability.shape == (2, TILE_SIZE, TILE_SIZE, 1)
    values = probability.numpy()
    assert np.all((values >= 0) & (values <= 1))
    assert values.std() > 0  # not a constant map
    assert model.get_layer(f"encoder_{encoder}") is not None


def test_unet_plus_plus_deep_supervision_averages_four_heads():
    model = tiny_model("unetpp", deep_supervision=True)

    heads = [model.get_layer(f"probability{column}") for column in range(1, 5)]
    assert model.output_shape == (None, TILE_SIZE, TILE_SIZE, 1)
    assert model.output.dtype == tf.float32
    head_model = tf.keras.Model(model.input, [head.output for head in heads])
    batch = random_batch()
    expected = np.mean([head.numpy() for head in head_model(batch, training=False)], axis=0)
    np.testing.assert_allclose(model(batch, training=False).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unet_plus_plus_heads_output_stacks_the_mean_and_the_four_heads_and_shares_its_weights(tmp_path):
    tf.keras.utils.set_random_seed(2)
    with_heads = tiny_model("unetpp", deep_supervision=True, heads_output=True)
    mean_only = tiny_model("unetpp", deep_supervision=True)

    assert with_heads.output_shape == (None, TILE_SIZE, TILE_SIZE, 5)
    assert with_heads.output.dtype == tf.float32
    assert [layer.name for layer in with_heads.layers if layer.weights] == [
        layer.name for layer in mean_only.layers if layer.weights]
    with_heads.save_weights(str(tmp_path / "heads.h5"))
    mean_only.load_weights(str(tmp_path / "heads.h5"))

    batch = random_batch()
    stacked = with_heads(batch, training=False).numpy()
    mean = mean_only(batch, training=False).numpy()
    np.testing.assert_allclose(stacked[..., :1], stacked[..., 1:].mean(axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, stacked[..., :1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, stacked[..., 1:].mean(axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert stacked[..., 1:].std(axis=-1).max() > 0  # four different heads


def test_unet_plus_plus_with_heads_fits_a_step_with_the_focal_loss_and_the_metrics():
    from rts_tf.losses import get_loss
    from rts_tf.metrics import segmentation_metrics

    tf.keras.utils.set_random_seed(4)
    model = build_model("unetpp", "resnet18", NUM_BANDS, TILE_SIZE, decoder_filters=(16, 16, 8, 8, 8),
                        deep_supervision=True, heads_output=True)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=get_loss("focal"), metrics=segmentation_metrics())
    images = random_batch(batch_size=2, seed=4)
    labels = (np.random.default_rng(4).random((2, TILE_SIZE, TILE_SIZE, 1)) < 0.3).astype("uint8")
    labels[:, :8] = 255

    history = model.fit(images, labels, batch_size=2, epochs=1, verbose=0).history

    assert sorted(history) == ["best_iou", "best_threshold", "f1", "iou", "iou_spread", "loss", "precision", "recall"]
    assert all(np.isfinite(values[0]) for values in history.values())


def test_heads_output_is_for_unet_plus_plus_with_deep_supervision():
    with pytest.raises(ValueError, match="heads_output needs deep_supervision"):
        tiny_model("unetpp", heads_output=True)
    with pytest.raises(ValueError, match="'unet' has no option heads_output"):
        tiny_model("unet", heads_output=True)
    assert tiny_model("unet", heads_output=False).output_shape == (None, TILE_SIZE, TILE_SIZE, 1)


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    tf.keras.utils.set_random_seed(1)
    model = tiny_model("unet")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    images = random_batch(batch_size=4, seed=1)
    labels = (images[..., :1] > 0.5).astype("float32")  # the mask is readable from band 0

    history = model.fit(images, labels, batch_size=4, epochs=6, verbose=0)

    losses = history.history["loss"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "efficientnetb0", "densenet121", "mobilenetv2", "vgg16"])
def test_encoder_features_sit_at_powers_of_two(encoder):
    features = build_encoder(encoder, (TILE_SIZE, TILE_SIZE, NUM_BANDS)).output

    assert sorted(features) == ["P1", "P2", "P3", "P4", "P5"]
    for level in range(1, 6):
        size = TILE_SIZE // 2**level
        assert tuple(features[f"P{level}"].shape[1:3]) == (size, size)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_gives_power_of_two_features_at_96_px(encoder):
    tf.keras.backend.clear_session()
    features = build_encoder(encoder, (96, 96, NUM_BANDS)).output

    for level in range(1, 6):
        assert tuple(features[f"P{level}"].shape[1:3]) == (96 // 2**level,) * 2


def test_mixed_float16_models_compute_in_float16_and_return_float32():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for arch in sorted(ARCHITECTURES):
            model = tiny_model(arch)
            probability = model(random_batch(), training=False)

            assert probability.dtype == tf.float32, arch
            assert model.get_layer("encoder_resnet18").output["P5"].dtype == tf.float16, arch
            assert np.all(np.isfinite(probability.numpy())), arch
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_a_saved_model_loads_back_with_the_same_output(tmp_path):
    model = tiny_model("deeplabv3plus", "efficientnetb0")  # EfficientNet has custom layers
    model.save(tmp_path / "model.keras")

    restored = load_model(tmp_path / "model.keras")

    batch = random_batch()
    np.testing.assert_allclose(restored(batch).numpy(), model(batch).numpy(), atol=1e-6)


def test_dilated_convolutions_are_one_native_op_with_conv2d_results():
    from rts_tf.models.blocks import AtrousConv2D, onednn_enabled

    inputs = tf.constant(random_batch()[:, :8, :8])  # ASPP's case: rates up to and beyond the map size
    for rate in (3, 6, 9):
        atrous = AtrousConv2D(4, 3, padding="same", dilation_rate=rate, use_bias=False)
        plain = tf.keras.layers.Conv2D(4, 3, padding="same", dilation_rate=rate, use_bias=False)
        atrous.build(inputs.shape), plain.build(inputs.shape)
        plain.set_weights(atrous.get_weights())
        results = []
        for layer in (atrous, plain):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                outputs = layer(inputs)
                loss = tf.reduce_sum(outputs * outputs)
            results.append([outputs, *tape.gradient(loss, [inputs, layer.kernel])])
        for fast, reference in zip(*results):
            np.testing.assert_allclose(fast.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)
        graph = tf.function(atrous).get_concrete_function(inputs).graph
        op_types = {op.type for op in graph.get_operations()}
        assert ("SpaceToBatchND" not in op_types) == onednn_enabled(), (rate, op_types)

    model = tiny_model("deeplabv3")
    assert {type(model.get_layer(f"aspp_rate{rate}_conv")) for rate in (3, 6, 9)} == {AtrousConv2D}


def test_runs_saved_before_atrous_layers_still_load(tmp_path, monkeypatch):
    # Earlier versions built DeepLab's dilated convolutions as plain Conv2D layers. A run folder holds
    # model.keras (the layer classes are in its config) and weight-only checkpoints (best.h5, last.h5,
    # matched by layer order and names): both must load into or next to today's models.
    import rts_tf.models.blocks as blocks

    tf.keras.utils.set_random_seed(5)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "AtrousConv2D", tf.keras.layers.Conv2D)
        old = tiny_model("deeplabv3plus")
    assert type(old.get_layer("aspp_rate9_conv")) is tf.keras.layers.Conv2D
    old.save(tmp_path / "model.keras")
    old.save_weights(str(tmp_path / "last.h5"))
    batch = random_batch()
    expected = old(batch, training=False).numpy()

    restored = load_model(tmp_path / "model.keras")
    new = tiny_model("deeplabv3plus")
    new.load_weights(str(tmp_path / "last.h5"))

    np.testing.assert_allclose(restored(batch, training=False).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(new(batch, training=False).numpy(), expected, atol=1e-5)


# ImageNet weights: an adapter from 3 to N bands, tested offline with a stand-in weight file.


def first_layer_of_type(model: tf.keras.Model, layer_type: type) -> tf.keras.layers.Layer:
    return next(layer for layer in model.layers if type(layer) is layer_type)


@pytest.fixture()
def stand_in_imagenet_file(tmp_path, monkeypatch):
    """A random 3-band resnet18 saved under the ImageNet file name in a temporary Keras cache."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    file_name, url, path = imagenet_weights_file("resnet18", TILE_SIZE)
    assert file_name == "resnet18_imagenet_1000_no_top.h5"
    assert url == "https://github.com/qubvel/classification_models/releases/download/0.0.1/" + file_name
    assert path == tmp_path / "keras" / "models" / file_name
    tf.keras.utils.set_random_seed(3)
    rgb_encoder = build_encoder("resnet18", (TILE_SIZE, TILE_SIZE, 3))
    input_bn = first_layer_of_type(rgb_encoder, tf.keras.layers.BatchNormalization)
    # distinct betas and ImageNet-like pixel statistics: beta, moving mean, moving variance
    statistics = ([0.1, 0.2, 0.3], [124, 117, 104], [3400, 3300, 3500])
    input_bn.set_weights([np.array(values, "float32") for values in statistics])
    path.parent.mkdir(parents=True)
    rgb_encoder.save_weights(str(path))
    return rgb_encoder, path


def assert_adapted(rgb_encoder: tf.keras.Model, encoder: tf.keras.Model, rgb_bands=(2, 1, 0)) -> None:
    num_bands = encoder.input_shape[-1]
    rgb_conv = first_layer_of_type(rgb_encoder, tf.keras.layers.Conv2D).get_weights()[0]
    conv = first_layer_of_type(encoder, tf.keras.layers.Conv2D).get_weights()[0]
    scale = 3 / num_bands
    for channel, band in enumerate(rgb_bands):  # ImageNet channel 0 is red, the band at rgb_bands[0]
        np.testing.assert_allclose(conv[:, :, band], rgb_conv[:, :, channel] * scale, rtol=1e-6)
    others = [band for band in range(num_bands) if band not in rgb_bands]
    for band in others:
        np.testing.assert_allclose(conv[:, :, band], rgb_conv.mean(axis=2) * scale, rtol=1e-5, atol=1e-7)

    rgb_bn = first_layer_of_type(rgb_encoder, tf.keras.layers.BatchNormalization)
    bn = first_layer_of_type(encoder, tf.keras.layers.BatchNormalization)
    beta, moving_mean, moving_variance = bn.get_weights()  # the input BN of resnets has no gamma
    np.testing.assert_allclose(beta[list(rgb_bands)], [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(beta[others], 0.2, rtol=1e-6)
    assert np.all(moving_mean == 0) and np.all(moving_variance == 1)

    adapted = {id(layer) for layer in (rgb_bn, first_layer_of_type(rgb_encoder, tf.keras.layers.Conv2D))}
    for rgb_layer, layer in zip(rgb_encoder.layers, encoder.layers):
        if id(rgb_layer) in adapted:
            continue
        for rgb_value, value in zip(rgb_layer.get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(value, rgb_value)


def test_imagenet_weights_are_adapted_to_ten_bands(stand_in_imagenet_file, monkeypatch):
    rgb_encoder, _ = stand_in_imagenet_file
    monkeypatch.setattr(tf.keras.utils, "get_file", lambda *args, **kwargs: pytest.fail("tried to download"))

    encoder = build_encoder("resnet18", (TILE_SIZE, TILE_SIZE, NUM_BANDS), weights="imagenet")

    assert_adapted(rgb_encoder, encoder)


def test_pretrained_weights_from_an_explicit_path_reach_three_bands_in_b_g_r_order(
    stand_in_imagenet_file, tmp_path, monkeypatch
):
    rgb_encoder, path = stand_in_imagenet_file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))

    encoder = build_encoder("resnet18", (TILE_SIZE, TILE_SIZE, 3), weights=str(path))

    assert_adapted(rgb_encoder, encoder)  # bands B, G, R receive ImageNet channels B, G, R


def test_imagenet_weights_offline_fail_at_once_saying_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(tf.keras.utils, "get_file", lambda *args, **kwargs: pytest.fail("tried to download"))

    with pytest.raises(ValueError) as error:
        build_model("unet", "resnet18", NUM_BANDS, TILE_SIZE, encoder_weights="imagenet")

    message = str(error.value)
    assert "\n" not in message
    url = "https://github.com/qubvel/classification_models/releases/download/0.0.1/resnet18_imagenet_1000_no_top.h5"
    assert url in message
    assert str(tmp_path / "models" / "resnet18_imagenet_1000_no_top.h5") in message
    assert keras_cache_dir() == tmp_path / "models"


def test_efficientnet_imagenet_file_is_named_after_the_efficientnet_release():
    file_name, url, _ = imagenet_weights_file("efficientnetb0", TILE_SIZE)

    assert file_name == "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5"
    assert url == "https://github.com/Callidior/keras-applications/releases/download/efficientnet/" + file_name


# Bad input


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="unknown architecture 'segformer'.*unet, unetpp, deeplabv3, deeplabv3plus"):
        build_model("segformer", "resnet18", NUM_BANDS, TILE_SIZE)


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(ValueError, match="unknown encoder 'resnet19'.*efficientnetb0.*resnet18, resnet34"):
        build_model("unet", "resnet19", NUM_BANDS, TILE_SIZE)


@pytest.mark.parametrize(
    ("arguments", "options", "match"),
    [
        ({"tile_size": 100}, {}, "tile_size must be a multiple of 32"),
        ({}, {"deep_supervision": True}, "'unet' has no option deep_supervision; its options are: decoder_filters"),
        ({}, {"decoder_filters": (16, 8)}, "unet decoder_filters must be 5 positive numbers"),
        ({"encoder_weights": "imagenet21k"}, {}, "expected None, 'imagenet' or the path of an existing .h5"),
        ({"encoder_weights": "imagenet", "rgb_bands": (0, 1, 1)}, {}, "rgb_bands must be three different band indexes"),
    ],
)
def test_bad_options_raise_value_errors(arguments, options, match):
    defaults = {"arch": "unet", "encoder": "resnet18", "num_bands": NUM_BANDS, "tile_size": TILE_SIZE}
    with pytest.raises(ValueError, match=match):
        build_model(**{**defaults, **arguments}, **options)


def test_deeplab_filters_are_one_number():
    with pytest.raises(ValueError, match="decoder_filters of a DeepLab decoder must be one positive number"):
        build_model("deeplabv3", "resnet18", NUM_BANDS, TILE_SIZE, decoder_filters=(256, 128))


@pytest.mark.slow
def test_models_train_under_mirrored_strategy_on_two_logical_cpus():
    # Logical devices must be configured before TensorFlow initialises, hence a fresh process.
    script = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from rts_tf.models import ARCHITECTURES, build_model
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        images = np.random.default_rng(0).normal(size=(4, 64, 64, 10)).astype("float32")
        labels = (images[..., :1] > 0).astype("float32")
        for arch in ARCHITECTURES:
            options = {"decoder_filters": (16, 8, 8, 8, 8)} if arch.startswith("unet") else {"decoder_filters": 8}
            with strategy.scope():
                model = build_model(arch, "resnet18", 10, 64, **options)
                model.compile(optimizer="adam", loss="binary_crossentropy")
            history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
            assert np.isfinite(history.history["loss"][0]), arch
        print("replicas", strategy.num_replicas_in_sync)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout
