"""Model step, DeepLabv3 and DeepLabv3+ decoders (Chen et al. 2017, 2018) on the encoder features.

The graphs are segmentation-models-pytorch 0.6.0's ``DeepLabV3`` and ``DeepLabV3Plus``, which
Nitze et al. (2021) used, with the same trainable parameters. ``build_model`` builds their encoder
at output stride 16 by default (8 on request) with dilated last stages (see ``encoders.py``), so
ASPP runs on P5 at 1/16 (a 16 x 16 map on 256 px tiles) and the whole pretrained backbone is used.

ASPP rates: Chen et al.'s (6, 12, 18) belong to a 33 x 33 map (513 px crops at output stride 16;
at 8 they double them for a 65 x 65 map, the same ratio). ``aspp_rates`` scales them to the map in
use: ``round(r * size / 33)``, at least 1 and at most ``size - 1`` (a rate of ``size`` or more puts
every tap but the centre outside the map, so the branch would be a 1x1 convolution, the degenerate
case Chen et al. warn about), then made distinct by raising each to one above its predecessor. At
256 px this gives (3, 6, 9) at output stride 16 and (6, 12, 17) at 8; at 513 px and 16 it gives
the paper's (6, 12, 18). A map under 4 x 4 cannot hold three distinct rates: ``ValueError``.

ASPP: a 1x1 conv-BN-ReLU, three dilated 3x3 conv-BN-ReLU (separable in DeepLabv3+) and an
image-pooling branch (spatial mean, 1x1 conv-BN-ReLU, bilinear upsampling back to the feature
size, which is static because the tile size is fixed per model), concatenated and projected by a
1x1 conv-BN-ReLU with dropout 0.5 (smp's default).

* DeepLabv3: ASPP, one 3x3 conv-BN-ReLU, a 1x1 convolution to logits, bilinear upsampling by the
  output stride to the input size, float32 sigmoid.
* DeepLabv3+: ASPP and a separable 3x3 conv-BN-ReLU, upsampled (bilinear) to P2 (1/4),
  concatenated with P2 projected to ``low_level_filters`` (48) channels by a 1x1 conv-BN-ReLU, one
  separable 3x3 conv-BN-ReLU, a 1x1 convolution to logits, bilinear upsampling by 4, float32
  sigmoid.

Ops: Conv2D (dilated: one native op when oneDNN is on, see ``blocks.AtrousConv2D``; otherwise
SpaceToBatchND + Conv2D + BatchToSpaceND), DepthwiseConv2dNative (separable convolutions),
FusedBatchNormV3, Relu, Mean, ConcatV2, dropout, ResizeBilinear (gradient ResizeBilinearGrad).
"""

from __future__ import annotations

import math

import tensorflow as tf

from rts_tf.models.blocks import conv_bn_relu, segmentation_head, upsample

layers = tf.keras.layers
CHEN_RATES = (6, 12, 18)  # Chen et al. (2017) at output stride 16 ...
CHEN_FEATURE_SIZE = 33  # ... on 513 px crops: a 33 x 33 map


def aspp_rates(feature_size: int, reference: tuple[int, ...] = CHEN_RATES) -> tuple[int, ...]:
    """ASPP rates for a ``feature_size`` map: Chen et al.'s scaled to it (see the module docstring)."""
    top = int(feature_size) - 1
    if top < len(reference):
        raise ValueError(
            f"ASPP needs a feature map of at least {len(reference) + 1} x {len(reference) + 1} for "
            f"{len(reference)} distinct dilation rates, got {feature_size} x {feature_size}: use larger tiles "
            "or output stride 8"
        )
    rates = []
    for rate in reference:
        scaled = min(max(1, math.floor(rate * feature_size / CHEN_FEATURE_SIZE + 0.5)), top)
        rates.append(max(scaled, rates[-1] + 1) if rates else scaled)
    # Raising a rate above a clamped one can pass the top; pull the tail back below it, keeping them distinct.
    for index in range(len(rates) - 1, -1, -1):
        rates[index] = min(rates[index], top - (len(rates) - 1 - index))
    return tuple(rates)


def atrous_spatial_pyramid_pooling(
    x: tf.Tensor,
    filters: int,
    atrous_rates: tuple[int, ...],
    dropout: float = 0.5,
    separable: bool = False,
    name: str = "aspp",
) -> tf.Tensor:
    """ASPP: 1x1 conv, one dilated 3x3 conv per rate and image pooling, concatenated and projected."""
    height, width = (int(size) for size in x.shape[1:3])
    branches = [conv_bn_relu(x, filters, name=f"{name}_1x1", kernel_size=1)]
    for rate in atrous_rates:
        if separable:
            branches.append(separable_conv_bn_relu(x, filters, name=f"{name}_rate{rate}", dilation_rate=int(rate)))
        else:
            branches.append(conv_bn_relu(x, filters, name=f"{name}_rate{rate}", dilation_rate=int(rate)))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pooling")(x)
    pooled = conv_bn_relu(pooled, filters, name=f"{name}_pooling", kernel_size=1)
    branches.append(upsample(pooled, (height, width), name=f"{name}_pooling_upsample"))
    x = layers.Concatenate(name=f"{name}_concat")(branches)
    x = conv_bn_relu(x, filters, name=f"{name}_projection", kernel_size=1)
    return layers.Dropout(dropout, name=f"{name}_dropout")(x)


def separable_conv_bn_relu(x: tf.Tensor, filters: int, name: str, dilation_rate: int = 1) -> tf.Tensor:
    """Depthwise 3x3 (dilated) and pointwise 1x1 convolution without bias, BatchNormalization, ReLU (smp's)."""
    x = layers.SeparableConv2D(filters, 3, padding="same", dilation_rate=dilation_rate, use_bias=False,
                               depthwise_initializer="he_normal", pointwise_initializer="he_normal",
                               name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def deeplab_v3_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: int = 256,
    atrous_rates: tuple[int, ...] | None = None,
    aspp_dropout: float = 0.5,
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a DeepLabv3 head on the features.

    ``decoder_filters`` is the width of ASPP and of the head; ``atrous_rates`` default to
    ``aspp_rates`` of the size of P5 (the encoder output, at its output stride).
    """
    x, rates, stride = _aspp_input(features, atrous_rates)
    filters = _check_filters(decoder_filters, "decoder_filters")
    x = atrous_spatial_pyramid_pooling(x, filters, rates, dropout=aspp_dropout)
    x = conv_bn_relu(x, filters, name="decoder")
    return segmentation_head(x, name="probability", upsample_factor=stride, kernel_size=1)


def deeplab_v3_plus_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: int = 256,
    low_level_filters: int = 48,
    atrous_rates: tuple[int, ...] | None = None,
    aspp_dropout: float = 0.5,
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a DeepLabv3+ decoder on the features.

    Options as in ``deeplab_v3_decoder``; ``low_level_filters`` is the width of the P2 skip.
    """
    x, rates, stride = _aspp_input(features, atrous_rates)
    filters = _check_filters(decoder_filters, "decoder_filters")
    low_level = conv_bn_relu(
        features["P2"], _check_filters(low_level_filters, "low_level_filters"), name="low_level", kernel_size=1
    )
    x = atrous_spatial_pyramid_pooling(x, filters, rates, dropout=aspp_dropout, separable=True)
    x = separable_conv_bn_relu(x, filters, name="aspp_separable")
    x = upsample(x, stride // 4, name="aspp_upsample")
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    x = separable_conv_bn_relu(x, filters, name="decoder")
    return segmentation_head(x, name="probability", upsample_factor=4, kernel_size=1)


def _aspp_input(
    features: dict[str, tf.Tensor], atrous_rates: tuple[int, ...] | None
) -> tuple[tf.Tensor, tuple[int, ...], int]:
    """P5, its ASPP rates and its downsampling (P1 is always at 1/2)."""
    x = features["P5"]
    size = int(x.shape[1])
    stride = 2 * int(features["P1"].shape[1]) // size
    if atrous_rates is None:
        return x, aspp_rates(size), stride
    rates = tuple(int(rate) for rate in atrous_rates)
    if not rates or min(rates) < 1 or max(rates) >= size:
        raise ValueError(
            f"atrous_rates must be positive integers below the size of the ASPP input ({size} x {size}: a larger "
            f"rate makes its branch a 1x1 convolution), got {atrous_rates!r}"
        )
    return x, rates, stride


def _check_filters(value: int, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} of a DeepLab decoder must be one positive number of filters, got {value!r}")
    return value
