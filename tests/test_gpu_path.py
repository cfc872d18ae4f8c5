"""Tests of the GPU path: mixed precision and XLA for every architecture, on real records, on the CPU."""

from __future__ import annotations

import contextlib
import json
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.dataset import make_dataset, normalisation
from rts_tf.errors import InputError
from rts_tf.losses import get_loss
from rts_tf.metrics import segmentation_metrics
from rts_tf.models import ARCHITECTURES, IgnoreAwareNormalization, build_model, load_model
from rts_tf.models.blocks import BilinearUpSampling2D
from rts_tf.settings import FitConfig
from rts_tf.train import check_config

TINY = {
    "unet": {"decoder_filters": (16, 16, 8, 8, 8)},
    "unetpp": {"decoder_filters": (16, 16, 8, 8, 8)},
    # Output stride 8 gives ASPP a 4 x 4 map on 32 px tiles; no dropout, so XLA and TensorFlow see the same step.
    "deeplabv3": {"decoder_filters": 16, "output_stride": 8, "aspp_dropout": 0.0},
    "deeplabv3plus": {"decoder_filters": 16, "low_level_filters": 8, "output_stride": 8, "aspp_dropout": 0.0},
}


@contextlib.contextmanager
def policy(name: str):
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def batch(world_records):
    """One batch of 4 real 32 px tiles (10 bands, ignored pixels) and the records' band statistics."""
    manifest = json.loads((world_records / "manifest.json").read_text())
    regions = list(manifest["regions"])
    images, labels = next(iter(make_dataset(world_records, manifest, regions, 4, training=False)))
    return images.numpy(), labels.numpy(), normalisation(manifest, regions)


def segmenter(arch: str, batch, xla: bool) -> tf.keras.Model:
    """Normalisation + tiny network, compiled as fit compiles (AdamW with weight decay, focal loss, metrics)."""
    images, _, (mean, std) = batch
    tf.keras.utils.set_random_seed(0)
    network = build_model(arch, "resnet18", images.shape[-1], images.shape[1], **TINY[arch])
    inputs = tf.keras.Input(images.shape[1:], name="image")
    model = tf.keras.Model(inputs, network(IgnoreAwareNormalization(mean, std)(inputs)))
    model.compile(tf.keras.optimizers.AdamW(1e-3, weight_decay=1e-4), loss=get_loss("focal"),
                  metrics=segmentation_metrics(), jit_compile=xla)
    return model


def losses_of_steps(model: tf.keras.Model, batch, steps: int = 2) -> list[float]:
    images, labels, _ = batch
    return [float(model.train_on_batch(images, labels, return_dict=True)["loss"]) for _ in range(steps)]


def test_normalisation_standardises_in_float32_then_casts_under_mixed_precision():
    with policy("mixed_float16"):
        layer = IgnoreAwareNormalization([3000.0, 0.5], [1.0, 0.25])
        output = layer(tf.constant([[[[3001.0, 1.0], [0.0, 0.0]]]]))

    assert output.dtype == tf.float16
    # In float16 3001 is 3000 (spacing 2 above 2048): cast first, it would standardise to 0, not 1.
    np.testing.assert_array_equal(output.numpy().astype(np.float32), [[[[1.0, 2.0], [0.0, 0.0]]]])
    assert np.float16(3001.0) == np.float16(3000.0)


def test_bilinear_upsampling_gives_the_stock_layer_values_in_float32_and_float16():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), tf.float32)
    stock = tf.keras.layers.UpSampling2D(2, interpolation="bilinear")(x)

    np.testing.assert_array_equal(BilinearUpSampling2D(2, interpolation="bilinear")(x).numpy(), stock.numpy())
    with policy("mixed_float16"):
        half = BilinearUpSampling2D(2, interpolation="bilinear")(tf.cast(x, tf.float16))
        stock_half = tf.keras.layers.UpSampling2D(2, interpolation="bilinear")(tf.cast(x, tf.float16))
    assert half.dtype == tf.float16 and stock_half.dtype == tf.float32  # the stock layer returns float32
    np.testing.assert_array_equal(half.numpy(), tf.cast(stock_half, tf.float16).numpy())


def test_a_model_saved_with_the_stock_upsampling_layer_still_loads(tmp_path):
    """Archives written before BilinearUpSampling2D name Keras' UpSampling2D: same model, same output."""
    model = build_model("unet", "resnet18", 10, 32, **TINY["unet"])
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as new, zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for member in new.namelist():
            data = new.read(member)
            if member == "config.json":
                config = json.loads(data)

                def to_stock(node):
                    if isinstance(node, dict):
                        if node.get("class_name") == "BilinearUpSampling2D":
                            node.update(module="keras.layers", class_name="UpSampling2D", registered_name=None)
                        for value in node.values():
                            to_stock(value)
                    elif isinstance(node, list):
                        for value in node:
                            to_stock(value)

                to_stock(config)
                data = json.dumps(config).encode()
            old.writestr(member, data)

    old = load_model(tmp_path / "old.keras")
    upsampling = [layer for layer in old.submodules if isinstance(layer, tf.keras.layers.UpSampling2D)]
    assert len(upsampling) == 5 and not any(isinstance(layer, BilinearUpSampling2D) for layer in upsampling)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 10)).astype("float32")
    np.testing.assert_array_equal(old(x).numpy(), model(x).numpy())
    np.testing.assert_array_equal(load_model(tmp_path / "new.keras")(x).numpy(), model(x).numpy())


def test_adamw_weight_decay_survives_the_loss_scale_optimizer():
    with policy("mixed_float16"):
        model = tf.keras.Sequential([tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="ones",
                                                           input_shape=(1,))])
        model.compile(tf.keras.optimizers.AdamW(0.1, weight_decay=0.5), loss="mse")
        assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        weights = []
        for _ in range(3):
            # Input 0: zero gradient, so a step is the decay alone: w - lr * wd * w = 0.95 w.
            model.train_on_batch(np.zeros((1, 1), "float32"), np.zeros((1, 1), "float32"))
            weights.append(float(model.get_weights()[0][0, 0]))
    # (Dynamic loss scaling may skip a step while it lowers the scale: compare the last two.)
    assert weights[-1] / weights[-2] == pytest.approx(0.95, rel=1e-6)
    assert weights[-1] < 0.951


def test_xla_over_logical_cpus_is_refused():
    with pytest.raises(InputError, match="--xla cannot run over 2 logical CPU devices"):
        check_config(FitConfig(records="records", logdir="run", xla=True, logical_cpus=2))


# Float16 runs emulated on CPUs (DeepLab's dilated float16 convolutions take minutes): UNet by default, all slow.
@pytest.mark.parametrize("arch", [arch if arch == "unet" else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in sorted(ARCHITECTURES)])
def test_every_architecture_trains_in_mixed_precision(arch, batch):
    with policy("mixed_float16"):
        model = segmenter(arch, batch, xla=False)
        losses = losses_of_steps(model, batch)
        network = model.layers[2]

        assert model.output.dtype == tf.float32
        assert network.get_layer("encoder_resnet18").output["P5"].dtype == tf.float16
        assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        assert np.all(np.isfinite(losses)) and 0 < losses[0] < 1
        probability = model.predict(batch[0], verbose=0)
    assert probability.dtype == np.float32 and np.all((probability >= 0) & (probability <= 1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_compiles_its_whole_train_step_with_xla(arch, batch):
    """jit_compile=True compiles the whole step or fails (an op without an XLA kernel is an error)."""
    eager = losses_of_steps(segmenter(arch, batch, xla=False), batch, steps=3)
    compiled = losses_of_steps(segmenter(arch, batch, xla=True), batch, steps=3)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)  # same weights, same batch: the same loss
    # Later steps drift by rounding (Adam's first steps move every weight by about the learning rate,
    # whatever the size of its gradient): measured up to 0.3% at the third step.
    np.testing.assert_allclose(compiled, eager, rtol=1e-2)
    with policy("mixed_float16"):
        mixed = losses_of_steps(segmenter(arch, batch, xla=True), batch, steps=3)
    assert mixed[0] == pytest.approx(eager[0], rel=5e-3)  # float16 activations: measured 0.02-0.14%
    assert np.all(np.isfinite(mixed))
