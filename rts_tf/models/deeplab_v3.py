"""Model step, DeepLabv3 and DeepLabv3+ decoders (Chen et al. 2017, 2018) on the encoder features.

Atrous spatial pyramid pooling (ASPP) runs on P5 (1/32, the backbone output) by default, so the
whole pretrained backbone is used; segmentation-models backbones cannot be re-strided to the
paper's output stride 16 without backbone-specific surgery. Its dilation rates are the paper's
(6, 12, 18) at output stride 16, halved to (3, 6, 9) at 1/32. ``aspp_feature="P4"`` runs ASPP on
P4 (1/16) with rates (6, 12, 18) instead, at the cost of skipping the last backbone stage.

ASPP: a 1x1 conv-BN-ReLU, three dilated 3x3 conv-BN-ReLU and an image-pooling branch (spatial mean,
1x1 conv-BN-ReLU, bilinear upsampling back to the feature size, which is static because the tile
size is fixed per model), concatenated and projected by a 1x1 conv-BN-ReLU with dropout.

* DeepLabv3: ASPP, one 3x3 conv-BN-ReLU, a 3x3 convolution to logits, bilinear upsampling by 32
  (16 from P4) to the input size, float32 sigmoid.
* DeepLabv3+: ASPP upsampled (bilinear) to P2 (1/4), concatenated with P2 projected to
  ``low_level_filters`` channels by a 1x1 conv-BN-ReLU, two 3x3 conv-BN-ReLU, a 3x3 convolution to
  logits, bilinear upsampling by 4, float32 sigmoid.

Ops: Conv2D (dilated: one native op when oneDNN is on, see ``blocks.AtrousConv2D``; otherwise
SpaceToBatchND + Conv2D + BatchToSpaceND), FusedBatchNormV3, Relu, Mean, ConcatV2, dropout,
ResizeBilinear (gradient ResizeBilinearGrad), all compiled by XLA.
"""

from __future__ import annotations

import tensorflow as tf

from rts_tf.models.blocks import conv_bn_relu, segmentation_head, upsample

layers = tf.keras.layers
_ASPP_FEATURES = {"P4": (6, 12, 18), "P5": (3, 6, 9)}


def atrous_spatial_pyramid_pooling(
    x: tf.Tensor,
    filters: int,
    atrous_rates: tuple[int, ...],
    dropout: float = 0.1,
    name: str = "aspp",
) -> tf.Tensor:
    """ASPP: 1x1 conv, one dilated 3x3 conv per rate and image pooling, concatenated and projected."""
    height, width = (int(size) for size in x.shape[1:3])
    branches = [conv_bn_relu(x, filters, name=f"{name}_1x1", kernel_size=1)]
    for rate in atrous_rates:
        branches.append(conv_bn_relu(x, filters, name=f"{name}_rate{rate}", dilation_rate=int(rate)))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pooling")(x)
    pooled = conv_bn_relu(pooled, filters, name=f"{name}_pooling", kernel_size=1)
    branches.append(upsample(pooled, (height, width), name=f"{name}_pooling_upsample"))
    x = layers.Concatenate(name=f"{name}_concat")(branches)
    x = conv_bn_relu(x, filters, name=f"{name}_projection", kernel_size=1)
    return layers.Dropout(dropout, name=f"{name}_dropout")(x)


def deeplab_v3_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: int = 256,
    aspp_feature: str = "P5",
    atrous_rates: tuple[int, ...] | None = None,
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a DeepLabv3 head on the features.

    ``decoder_filters`` is the width of ASPP and of the head; ``aspp_feature`` is "P5" or "P4";
    ``atrous_rates`` default to (3, 6, 9) on P5 and (6, 12, 18) on P4.
    """
    x, rates, stride = _aspp_input(features, aspp_feature, atrous_rates)
    filters = _check_filters(decoder_filters, "decoder_filters")
    x = atrous_spatial_pyramid_pooling(x, filters, rates)
    x = conv_bn_relu(x, filters, name="decoder")
    return segmentation_head(x, name="probability", upsample_factor=stride)


def deeplab_v3_plus_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: int = 256,
    low_level_filters: int = 48,
    aspp_feature: str = "P5",
    atrous_rates: tuple[int, ...] | None = None,
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a DeepLabv3+ decoder on the features.

    Options as in ``deeplab_v3_decoder``; ``low_level_filters`` is the width of the P2 skip.
    """
    x, rates, stride = _aspp_input(features, aspp_feature, atrous_rates)
    filters = _check_filters(decoder_filters, "decoder_filters")
    low_level = conv_bn_relu(
        features["P2"], _check_filters(low_level_filters, "low_level_filters"), name="low_level", kernel_size=1
    )
    x = atrous_spatial_pyramid_pooling(x, filters, rates)
    x = upsample(x, stride // 4, name="aspp_upsample")
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    x = conv_bn_relu(x, filters, name="decoder_1")
    x = conv_bn_relu(x, filters, name="decoder_2")
    return segmentation_head(x, name="probability", upsample_factor=4)


def _aspp_input(
    features: dict[str, tf.Tensor], aspp_feature: str, atrous_rates: tuple[int, ...] | None
) -> tuple[tf.Tensor, tuple[int, ...], int]:
    if aspp_feature not in _ASPP_FEATURES:
        raise ValueError(f"aspp_feature must be one of {', '.join(_ASPP_FEATURES)}, got {aspp_feature!r}")
    rates = tuple(int(rate) for rate in (atrous_rates or _ASPP_FEATURES[aspp_feature]))
    if not rates or min(rates) < 1:
        raise ValueError(f"atrous_rates must be positive integers, got {atrous_rates!r}")
    return features[aspp_feature], rates, 2 ** int(aspp_feature[1:])


def _check_filters(value: int, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} of a DeepLab decoder must be one positive number of filters, got {value!r}")
    return value
