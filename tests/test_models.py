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

    model = tiny_model("deeplabv3")  # rates (1, 2, 3) on the 4 x 4 map of a 64 px tile at output stride 16
    assert {type(model.get_layer(f"aspp_rate{rate}_conv")) for rate in (2, 3)} == {AtrousConv2D}
    encoder = model.get_layer("encoder_resnet18")
    assert type(encoder.get_layer("stage4_unit1_conv2")) is AtrousConv2D  # the dilated stage 5 too


def test_runs_saved_before_atrous_layers_still_load(tmp_path, monkeypatch):
    # Earlier versions built DeepLab's dilated convolutions as plain Conv2D layers. A run folder holds
    # model.keras (the layer classes are in its config) and weight-only checkpoints (best.h5, last.h5,
    # matched by layer order and names): both must load into or next to today's models.
    import rts_tf.models.blocks as blocks

    tf.keras.utils.set_random_seed(5)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "AtrousConv2D", tf.keras.layers.Conv2D)
        old = tiny_model("deeplabv3")
    assert type(old.get_layer("aspp_rate3_conv")) is tf.keras.layers.Conv2D
    assert type(old.get_layer("encoder_resnet18").get_layer("stage4_unit1_conv2")) is tf.keras.layers.Conv2D
    old.save(tmp_path / "model.keras")
    old.save_weights(str(tmp_path / "last.h5"))
    batch = random_batch()
    expected = old(batch, training=False).numpy()

    restored = load_model(tmp_path / "model.keras")
    new = tiny_model("deeplabv3")
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


# The literature's graphs: segmentation-models-pytorch (smp) 0.6.0, which Nitze et al. (2021) trained.
#
# Trainable parameters of smp's models with its defaults (encoder_weights=None, in_channels=10, classes=1),
# computed once with `benchmarks/smp_parameter_counts.py` (torch 2.13.0+cpu, smp 0.6.0, in the venv of
# ../shared/bench/keras_vs_pytorch_step/setup_torchvenv.sh) and copied here; the tests do not need PyTorch.
# smp's DeepLab counts are the same at output stride 16 and 8.
SMP_ENCODER_PARAMETERS = {"resnet34": 21_306_624, "resnet50": 23_529_984}
SMP_DECODER_AND_HEAD_PARAMETERS = {  # decoder + segmentation head
    ("resnet34", "unet"): 3_151_552 + 145,
    ("resnet34", "unetpp"): 4_793_792 + 145,
    ("resnet34", "deeplabv3"): 4_722_176 + 257,
    ("resnet34", "deeplabv3plus"): 1_152_528 + 257,
    ("resnet50", "unet"): 9_012_928 + 145,
    ("resnet50", "unetpp"): 25_477_568 + 145,
    ("resnet50", "deeplabv3"): 16_125_440 + 257,
    ("resnet50", "deeplabv3plus"): 3_169_296 + 257,
}
# smp's feature strides (downsampling of the encoder's 5 feature maps) at each output stride.
SMP_FEATURE_STRIDES = {32: (2, 4, 8, 16, 32), 16: (2, 4, 8, 16, 16), 8: (2, 4, 8, 8, 8)}
# The decoders match smp exactly. The encoders come from segmentation-models (Keras: qubvel's
# classification_models), not torchvision: its ResNet-34 has a 1x1 projection shortcut in the first unit of
# stage 1 (+4,096), and its ResNets are pre-activation ones (an input BatchNormalization on the bands, BN before
# each convolution, a final BN), whose BN layers sit on other channel counts: -1,654 (ResNet-34) and -7,542
# (ResNet-50) trainable parameters. All other convolutions are equal.
KERAS_ENCODER_DIFFERENCE = {"resnet34": 4_096 - 1_654, "resnet50": -7_542}
ENCODER_CHANNELS = {"resnet34": (64, 64, 128, 256, 512), "resnet50": (64, 256, 512, 1024, 2048)}  # P1..P5


def trainable_parameters(model: tf.keras.Model) -> int:
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


def assert_smp_model(model: tf.keras.Model, arch: str, encoder: str, output_stride: int) -> None:
    features = model.get_layer(f"encoder_{encoder}").output
    strides = tuple(TILE_SIZE // int(features[f"P{level}"].shape[1]) for level in range(1, 6))
    assert strides == SMP_FEATURE_STRIDES[output_stride]
    assert tuple(int(features[f"P{level}"].shape[-1]) for level in range(1, 6)) == ENCODER_CHANNELS[encoder]
    smp = SMP_ENCODER_PARAMETERS[encoder] + SMP_DECODER_AND_HEAD_PARAMETERS[(encoder, arch)]
    assert trainable_parameters(model.get_layer(f"encoder_{encoder}")) == (
        SMP_ENCODER_PARAMETERS[encoder] + KERAS_ENCODER_DIFFERENCE[encoder])
    assert trainable_parameters(model) == smp + KERAS_ENCODER_DIFFERENCE[encoder]
    assert abs(trainable_parameters(model) / smp - 1) < 0.001


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_resnet34_models_have_smp_parameters_and_feature_strides(arch):
    tf.keras.backend.clear_session()
    model = build_model(arch, "resnet34", NUM_BANDS, TILE_SIZE)

    assert_smp_model(model, arch, "resnet34", 16 if arch.startswith("deeplab") else 32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_resnet50_models_have_smp_parameters_and_feature_strides(arch):
    tf.keras.backend.clear_session()
    model = build_model(arch, "resnet50", NUM_BANDS, TILE_SIZE)

    assert_smp_model(model, arch, "resnet50", 16 if arch.startswith("deeplab") else 32)


def test_resnet50_decoders_have_smp_parameters():
    # The decoders alone on ResNet-50's features (fast); the slow test above builds the whole models.
    for arch, decoder in ARCHITECTURES.items():
        output_stride = 16 if arch.startswith("deeplab") else 32
        inputs = {level: tf.keras.Input((TILE_SIZE // stride, TILE_SIZE // stride, channels))
                  for level, stride, channels in zip(("P1", "P2", "P3", "P4", "P5"), SMP_FEATURE_STRIDES[output_stride],
                                                     ENCODER_CHANNELS["resnet50"])}
        model = tf.keras.Model(inputs, decoder(inputs))

        assert trainable_parameters(model) == SMP_DECODER_AND_HEAD_PARAMETERS[("resnet50", arch)], arch
        assert model.output_shape == (None, TILE_SIZE, TILE_SIZE, 1), arch


def test_resnet50_encoder_dilated_to_output_stride_16_has_smp_parameters():
    encoder = build_encoder("resnet50", (TILE_SIZE, TILE_SIZE, NUM_BANDS), output_stride=16)

    assert trainable_parameters(encoder) == SMP_ENCODER_PARAMETERS["resnet50"] + KERAS_ENCODER_DIFFERENCE["resnet50"]
    assert tuple(TILE_SIZE // int(encoder.output[f"P{level}"].shape[1]) for level in range(1, 6)) == (
        SMP_FEATURE_STRIDES[16])


def test_aspp_rates_scale_chen_et_al_to_the_map_and_never_degenerate():
    from rts_tf.models.deeplab_v3 import aspp_rates

    assert aspp_rates(33) == (6, 12, 18)  # Chen et al.: 513 px crops at output stride 16
    assert aspp_rates(16) == (3, 6, 9)  # 256 px tiles at output stride 16
    assert aspp_rates(32) == (6, 12, 17)  # 256 px at 8: round(18 * 32 / 33) = round(17.45)
    assert aspp_rates(8) == (1, 3, 4)  # 64 px at 8: 1.45, 2.91, 4.36
    assert aspp_rates(4) == (1, 2, 3)  # 64 px at 16: 0.73, 1.45, 2.18 rounded to 1, 1, 2, then made distinct
    for size in range(4, 80):
        rates = aspp_rates(size)
        assert len(set(rates)) == 3 and sorted(rates) == list(rates), size
        assert 1 <= min(rates) and max(rates) < size, size  # every branch sees more than its centre tap
    with pytest.raises(ValueError, match="at least 4 x 4 .* got 2 x 2: use larger tiles or output stride 8"):
        build_model("deeplabv3", "resnet18", NUM_BANDS, 32, decoder_filters=8)
    with pytest.raises(ValueError, match="below the size of the ASPP input \\(4 x 4"):
        tiny_model("deeplabv3", atrous_rates=(1, 2, 4))


def test_deeplab_output_stride_8_dilates_stages_4_and_5_with_the_same_weights():
    tf.keras.backend.clear_session()
    model = tiny_model("deeplabv3plus", output_stride=8)
    tf.keras.backend.clear_session()
    stride_16 = tiny_model("deeplabv3plus")

    features = model.get_layer("encoder_resnet18").output
    assert tuple(TILE_SIZE // int(features[f"P{level}"].shape[1]) for level in range(1, 6)) == SMP_FEATURE_STRIDES[8]
    assert [model.get_layer(f"aspp_rate{rate}_conv").dilation_rate for rate in (1, 3, 4)] == [(1, 1), (3, 3), (4, 4)]
    assert type(model.get_layer("aspp_rate3_conv")) is tf.keras.layers.SeparableConv2D  # v3+: separable ASPP
    assert trainable_parameters(model) == trainable_parameters(stride_16)
    probability = model(random_batch(), training=False)
    assert probability.shape == (2, TILE_SIZE, TILE_SIZE, 1)
    with pytest.raises(ValueError, match="output_stride of deeplabv3 must be 16 or 8, got 32"):
        tiny_model("deeplabv3", output_stride=32)
    with pytest.raises(ValueError, match="'unetpp' has no option output_stride"):
        tiny_model("unetpp", output_stride=16)
    with pytest.raises(ValueError, match="'deeplabv3' has no option deep_supervision; its options are: .*output_stride"):
        tiny_model("deeplabv3", deep_supervision=True)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_a_dilated_encoder_keeps_the_weights_and_the_features_above_its_output_stride(output_stride):
    from rts_tf.models.encoders import _backbone, _dilated

    tf.keras.utils.set_random_seed(6)
    backbone = _backbone("resnet18", (TILE_SIZE, TILE_SIZE, NUM_BANDS))
    dilated = _dilated(backbone, "resnet18", output_stride)

    assert [layer.name for layer in dilated.layers] == [layer.name for layer in backbone.layers]
    for weight, copy in zip(backbone.get_weights(), dilated.get_weights()):
        np.testing.assert_array_equal(copy, weight)
    # stage n of the ResNet is `stage<n-1>`; its first unit downsampled with stride 2
    for stage, rate in {16: {4: 2}, 8: {3: 2, 4: 4}}[output_stride].items():
        first = dilated.get_layer(f"stage{stage}_unit1_conv1")
        padding = first.inbound_nodes[0].inbound_layers  # a ZeroPadding2D (the encoder's convolutions pad "valid")
        assert (first.strides, first.dilation_rate, padding.padding) == ((1, 1), (rate, rate), ((rate, rate),) * 2)
        assert dilated.get_layer(f"stage{stage}_unit2_conv2").dilation_rate == (rate, rate)
        assert dilated.get_layer(f"stage{stage}_unit1_sc").strides == (1, 1)  # the 1x1 shortcut
    assert backbone.get_layer("stage4_unit1_conv1").strides == (2, 2)
    # Above the output stride nothing changed: the same features, bit for bit.
    probe = random_batch(seed=6)
    unchanged = ["relu0", "stage2_unit1_relu1", "stage3_unit1_relu1"]
    unchanged += ["stage4_unit1_relu1"] if output_stride == 16 else []
    before = tf.keras.Model(backbone.input, [backbone.get_layer(name).output for name in unchanged])(probe)
    after = tf.keras.Model(dilated.input, [dilated.get_layer(name).output for name in unchanged])(probe)
    for name, expected, value in zip(unchanged, before, after):
        np.testing.assert_array_equal(value.numpy(), expected.numpy(), err_msg=name)
    assert dilated.output.shape[1] == TILE_SIZE // output_stride


def test_unet_plus_plus_inner_nodes_have_the_encoder_width_and_the_heads_are_1x1():
    # As smp's UnetPlusPlus: the last node of each level has the decoder width, inner nodes the encoder's
    # (resnet18: 64 at 1/2 and 1/4, 128 at 1/8).
    tf.keras.backend.clear_session()
    model = tiny_model("unetpp", deep_supervision=True)  # decoder_filters (32, 16, 16, 8, 8)
    tf.keras.backend.clear_session()
    plain = tiny_model("unetpp")

    widths = {f"x{level}{column}": model.get_layer(f"decoder_x{level}{column}_2_conv").filters
              for column in range(1, 5) for level in range(5 - column)}
    assert widths == {"x31": 32, "x22": 16, "x13": 16, "x04": 8,  # last nodes: decoder_filters
                      "x21": 128, "x11": 64, "x12": 64, "x01": 64, "x02": 64, "x03": 64}  # inner: P3, P2, P1
    assert model.get_layer("decoder_full_resolution_2_conv").filters == 8
    for column in (1, 2, 3):  # Zhou et al.'s 1x1 heads on X(0, 1..3), then upsampled from 1/2
        assert tuple(model.get_layer(f"probability{column}_logits").kernel.shape) == (1, 1, 64, 1)
    assert tuple(model.get_layer("probability4_logits").kernel.shape) == (3, 3, 8, 1)  # the plain model's head
    assert trainable_parameters(model) - trainable_parameters(plain) == 3 * (64 + 1)


@pytest.fixture()
def stand_in_vgg16_file(tmp_path):
    """A random 3-band VGG16 encoder's weights: the file stands in for the ImageNet file, which takes B, G, R."""
    tf.keras.utils.set_random_seed(7)
    bgr_encoder = build_encoder("vgg16", (TILE_SIZE, TILE_SIZE, 3))
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    bgr_encoder.save_weights(str(path))
    return bgr_encoder, path


def test_vgg_pretrained_filters_take_b_g_r_and_reach_the_bands_of_those_names(stand_in_vgg16_file):
    from rts_tf.models.encoders import pretrained_channel_order

    assert [name for name in ENCODERS if pretrained_channel_order(name) == "BGR"] == ["vgg16", "vgg19"]
    bgr_encoder, path = stand_in_vgg16_file
    bgr = bgr_encoder.get_layer("block1_conv1").get_weights()[0]  # input channels: B, G, R

    # rts-tf bands B, G, R, NIR, ...: R at 2, G at 1, B at 0, the default rgb_bands (2, 1, 0)
    encoder = build_encoder("vgg16", (TILE_SIZE, TILE_SIZE, NUM_BANDS), weights=str(path))
    kernel = encoder.get_layer("block1_conv1").get_weights()[0]
    for channel, band in enumerate((0, 1, 2)):  # ImageNet-VGG channel 0 is blue: band 0
        np.testing.assert_allclose(kernel[:, :, band], bgr[:, :, channel] * 3 / NUM_BANDS, rtol=1e-6)
    for band in range(3, NUM_BANDS):
        np.testing.assert_allclose(kernel[:, :, band], bgr.mean(axis=2) * 3 / NUM_BANDS, rtol=1e-5, atol=1e-7)

    # Another band order: R, G, B at 5, 7, 3 (blue at 3 gets channel 0), at output stride 16 (DeepLab).
    encoder = build_encoder("vgg16", (TILE_SIZE, TILE_SIZE, NUM_BANDS), weights=str(path), rgb_bands=(5, 7, 3),
                            output_stride=16)
    kernel = encoder.get_layer("block1_conv1").get_weights()[0]
    for channel, band in enumerate((3, 7, 5)):
        np.testing.assert_allclose(kernel[:, :, band], bgr[:, :, channel] * 3 / NUM_BANDS, rtol=1e-6)
    assert encoder.get_layer("block5_pool").strides == (1, 1)  # the last pool no longer downsamples
    np.testing.assert_array_equal(encoder.get_layer("block5_conv3").get_weights()[0],
                                  bgr_encoder.get_layer("block5_conv3").get_weights()[0])


def test_fit_builds_deeplab_at_the_configured_output_stride_and_ignores_it_for_unet():
    from rts_tf.bands import BAND_NAMES
    from rts_tf.train import FitConfig, build_segmenter

    def strides(model, encoder="resnet18"):
        features = model.get_layer(f"{model.layers[-1].name}").get_layer(f"encoder_{encoder}").output
        return tuple(TILE_SIZE // int(features[f"P{level}"].shape[1]) for level in range(1, 6))

    tf.keras.backend.clear_session()
    mean, std = np.zeros(len(BAND_NAMES)), np.ones(len(BAND_NAMES))
    deeplab = build_segmenter(FitConfig(arch="deeplabv3", encoder="resnet18", output_stride=8),
                              list(BAND_NAMES), TILE_SIZE, mean, std)
    assert strides(deeplab) == SMP_FEATURE_STRIDES[8]
    unet_config = FitConfig(arch="unet", encoder="resnet18", decoder_filters=[16, 8, 8, 8, 8], output_stride=8)
    unet = build_segmenter(unet_config, list(BAND_NAMES), TILE_SIZE, mean, std)
    assert strides(unet) == SMP_FEATURE_STRIDES[32]
    from rts_tf.errors import InputError
    with pytest.raises(InputError, match="output_stride of deeplabv3plus must be 16 or 8, got 4"):
        build_segmenter(FitConfig(arch="deeplabv3plus", encoder="resnet18", output_stride=4), list(BAND_NAMES),
                        TILE_SIZE, mean, std)


def test_fit_command_line_takes_output_stride_16_or_8():
    from click.testing import CliRunner

    from rts_tf.cli import main

    fit = main.get_command(None, "fit")
    parsed = {value: fit.make_context("fit", ["--output-stride", value]).params["output_stride"] for value in ("16", "8")}
    assert parsed == {"16": 16, "8": 8}
    assert fit.make_context("fit", []).params["output_stride"] is None  # FitConfig's default (16) applies
    result = CliRunner().invoke(main, ["fit", "--output-stride", "32", "--records", "r", "--logdir", "l"])
    assert result.exit_code == 2 and "'32' is not one of '16', '8'" in result.output
