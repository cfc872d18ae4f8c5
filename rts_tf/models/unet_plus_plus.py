"""Model step, UNet++ nested decoder (Zhou et al. 2018) on the encoder features P1..P5.

Node X(i, j) sits at level i (the resolution of P(i+1): level 0 is 1/2, level 4 is P5 at 1/32)
and column j. Column 0 holds the encoder features; every other node upsamples X(i+1, j-1) by 2
(bilinear), concatenates it with all earlier nodes of its level X(i, 0..j-1) (the dense skip
connections) and applies two 3x3 conv-BN-ReLU. The node widths are those of
segmentation-models-pytorch's ``UnetPlusPlus`` (the graph Nitze et al. 2021 trained): the last
node of each level, X(3, 1), X(2, 2), X(1, 3), X(0, 4), has the decoder width of its level
(``decoder_filters``, 256/128/64/32 from 1/16 to 1/2), every inner node the width of its level's
encoder feature (for ResNet-34 128, 64, 64 at 1/8, 1/4, 1/2; for ResNet-50 512, 256, 64). A
full-resolution stage (upsample by 2, two conv-BN-ReLU of ``decoder_filters[4]``) and a 3x3
convolution with a float32 sigmoid turn X(0, 4) into the probability.

Deep supervision (``deep_supervision=True``, Zhou et al.'s): X(0, 1), X(0, 2) and X(0, 3) each get a
1x1 convolution to logits, bilinear upsampling by 2 and a sigmoid; the fourth head is the
probability above (from X(0, 4)). The model's probability is the mean of the four heads (the
paper's "accurate mode"), and that (H, W, 1) mean is the output by default, for inference and for
the saved model. Zhou et al. train each head with its own loss: ``heads_output=True`` returns the
(H, W, 5) float32 stack [mean, head 1, ..., head 4] instead. Every loss in ``rts_tf.losses``
averages the losses of channels 1..4 of such an output, and every metric in ``rts_tf.metrics``
reads channel 0, so ``model.fit`` needs nothing else. The two variants have the same layers with
weights, in the same order, so weights saved from one load into the other. (smp's UnetPlusPlus
has no deep supervision; the three 1x1 heads add 3 x (width of X(0, j) + 1) parameters.)

Ops: Conv2D, FusedBatchNormV3, Relu, ConcatV2, ResizeBilinear (gradient ResizeBilinearGrad) and,
with deep supervision, an element-wise mean (and a concatenation for the heads), all compiled by XLA.
"""

from __future__ import annotations

import tensorflow as tf

from rts_tf.models.blocks import check_decoder_filters, decoder_block, segmentation_head


def unet_plus_plus_decoder(
    features: dict[str, tf.Tensor],
    decoder_filters: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16),
    deep_supervision: bool = False,
    heads_output: bool = False,
) -> tf.Tensor:
    """Return the (H, W, 1) float32 probability of a UNet++ decoder on the features ``P1``..``P5``.

    ``decoder_filters`` are the widths of the last node of each level, at 1/16, 1/8, 1/4, 1/2, and of
    the full-resolution stage; inner nodes have their level's encoder width. With
    ``deep_supervision`` the probability is the mean of four heads; ``heads_output`` then returns
    (H, W, 5): the mean followed by the four heads, for training each head.
    """
    filters = check_decoder_filters(decoder_filters, 5, "unetpp")
    if heads_output and not deep_supervision:
        raise ValueError("unetpp heads_output needs deep_supervision: without it there is one head")
    depth = 4
    # nodes[i][j] is X(i, j); level i has the resolution of P(i+1).
    nodes = [[features[f"P{level + 1}"]] for level in range(depth + 1)]
    for column in range(1, depth + 1):
        for level in range(depth + 1 - column):
            last = level + column == depth  # the last node of its level: the decoder width, else the encoder's
            width = filters[depth - 1 - level] if last else int(features[f"P{level + 1}"].shape[-1])
            nodes[level].append(
                decoder_block(nodes[level + 1][column - 1], nodes[level][:column], width,
                              name=f"decoder_x{level}{column}")
            )
    x = decoder_block(nodes[0][depth], [], filters[depth], name="decoder_full_resolution")
    if not deep_supervision:
        return segmentation_head(x, name="probability")
    probabilities = [
        segmentation_head(nodes[0][column], name=f"probability{column}", upsample_factor=2, kernel_size=1)
        for column in range(1, depth)
    ]
    probabilities.append(segmentation_head(x, name=f"probability{depth}"))
    mean = tf.keras.layers.Average(dtype="float32", name="probability")(probabilities)
    if not heads_output:
        return mean
    return tf.keras.layers.Concatenate(dtype="float32", name="probability_and_heads")([mean, *probabilities])
