"""Model step, decoder building blocks shared by UNet, UNet++ and DeepLabv3(+).

Every upsampling here is bilinear (``UpSampling2D(interpolation="bilinear")``, the TensorFlow ops
``ResizeBilinear`` and ``ResizeBilinearGrad``), which XLA compiles; nearest-neighbour upsampling
is avoided because XLA has no kernel for its gradient ``ResizeNearestNeighborGrad``. The other
ops are Conv2D, BatchNormalization (``FusedBatchNormV3``), ReLU, Concatenate and, in DeepLab's
image pooling, a spatial mean.
"""

from __future__ import annotations

import tensorflow as tf

layers = tf.keras.layers


def conv_bn_relu(x: tf.Tensor, filters: int, name: str, kernel_size: int = 3, dilation_rate: int = 1) -> tf.Tensor:
    """Convolution (no bias), BatchNormalization and ReLU."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def upsample(x: tf.Tensor, factor: int | tuple[int, int], name: str) -> tf.Tensor:
    """Bilinear upsampling by an integer ``factor`` (or per-axis factors)."""
    return layers.UpSampling2D(size=factor, interpolation="bilinear", name=name)(x)


def decoder_block(x: tf.Tensor, skips: list[tf.Tensor], filters: int, name: str) -> tf.Tensor:
    """Upsample ``x`` by 2, concatenate the ``skips`` of that size, then two 3x3 conv-BN-ReLU."""
    x = upsample(x, 2, name=f"{name}_upsample")
    if skips:
        x = layers.Concatenate(name=f"{name}_concat")([x, *skips])
    x = conv_bn_relu(x, filters, name=f"{name}_1")
    return conv_bn_relu(x, filters, name=f"{name}_2")


def segmentation_head(x: tf.Tensor, name: str, upsample_factor: int = 1) -> tf.Tensor:
    """One-channel 3x3 convolution to logits, bilinear upsampling, float32 sigmoid probability.

    The sigmoid layer is called ``name``; it runs in float32 so the output stays a float32 probability under the
    ``mixed_float16`` policy.
    """
    x = layers.Conv2D(1, 3, padding="same", name=f"{name}_logits")(x)
    if upsample_factor > 1:
        x = upsample(x, upsample_factor, name=f"{name}_upsample")
    return layers.Activation("sigmoid", dtype="float32", name=name)(x)


def check_decoder_filters(decoder_filters: tuple[int, ...], length: int, architecture: str) -> tuple[int, ...]:
    """Return ``decoder_filters`` as a tuple of ``length`` positive ints or raise ``ValueError``."""
    filters = tuple(int(value) for value in decoder_filters)
    if len(filters) != length or min(filters) < 1:
        raise ValueError(
            f"{architecture} decoder_filters must be {length} positive numbers of filters "
            f"(from the deepest stage to full resolution), got {tuple(decoder_filters)}"
        )
    return filters
