"""Model step, UNet decoder (Ronneberger et al. 2015) on the encoder features P1..P5.

Starting from P5 (1/32), each of five stages upsamples by 2 (bilinear), concatenates the encoder
feature of that size (P4, P3, P2, P1; none at full resolution) and applies two 3x3
conv-BN-ReLU, as segmentation-models' UNet does. A 3x3 convolution and a float32 sigmoid give the
probability. Ops: Conv2D, FusedBatchNormV3, Relu, ConcatV2, ResizeBilinear (gradient
ResizeBilinearGrad), all compiled by XLA.
"""

from __future__ import annotations

import tensorflow as tf

from rts_tf.models.blocks import check_decoder_filters, decoder_block, segmentation_head


def unet_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16),
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a UNet decoder on the features ``P1``..``P5``.

    ``decoder_filters`` are the widths of the five stages, from 1/16 to full resolution.
    """
    filters = check_decoder_filters(decoder_filters, 5, "unet")
    skips = [features["P4"], features["P3"], features["P2"], features["P1"], None]
    x = features["P5"]
    for stage, (skip, stage_filters) in enumerate(zip(skips, filters), start=1):
        x = decoder_block(x, [skip] if skip is not None else [], stage_filters, name=f"decoder_stage{stage}")
    return segmentation_head(x, name="probability")
