"""Training step: losses for binary segmentation that give ignored pixels (label 255) zero weight.

Each loss returns one value per tile, the mean over the tile's valid pixels (cross-entropy,
focal) or a per-tile overlap score (Dice, Jaccard), so Keras reduces it correctly across
replicas under a distribution strategy.

A prediction of more than one channel comes from a UNet++ trained with its deep-supervision
heads (channel 0 the mean of the heads, channels 1.. the heads): every loss is then the mean of
each head's own loss, as in Zhou et al. (2018), and channel 0 is left to the metrics.

The cross-entropy and focal terms of a pixel are Keras' own (``tf.keras.losses.binary_crossentropy``
and ``binary_focal_crossentropy`` with class balancing) on probabilities clipped to [1e-6, 1 - 1e-6];
they differ from -log(p_t) only by the 1e-7 Keras adds inside the logarithm (under 1e-5 relative on
random tiles, 6e-4 on one with 16 confidently wrong pixels). Only the reduction is ours: Keras'
``BinaryFocalCrossentropy`` with sample weight 0 on ignored pixels reduces with
SUM_OVER_BATCH_SIZE, dividing by every pixel of the batch instead of the valid ones. On a random
64x64 tile whose right half is ignored it gives 0.1887 where the mean over the valid pixels is
0.3775 (exactly half), and on a batch of that tile and a fully valid one 0.2722 against 0.3665:
the loss scale would follow the ignored fraction and a tile would weigh by its valid pixels.
"""

from __future__ import annotations

import tensorflow as tf

from rts_tf.records import IGNORE

EPSILON = 1e-6


def _prepare(y_true, y_pred):
    """Targets (1 slump, 0 not) and weights (0 where ignored), (B, N, 1); clipped probabilities (B, N, heads).

    The probabilities are the one channel of a (B, H, W, 1) prediction, or channels 1.. (the
    heads) of a (B, H, W, 1 + heads) one.
    """
    y_true = tf.cast(y_true, tf.float32)
    batch = tf.shape(y_true)[0]
    label = tf.reshape(y_true, [batch, -1, 1])
    weight = tf.cast(tf.not_equal(label, IGNORE), tf.float32)
    target = tf.cast(tf.equal(label, 1.0), tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    channels = y_pred.shape[-1] if y_pred.shape.rank == 4 else 1
    if channels is None:
        raise ValueError("a loss needs the number of channels of the prediction to be known")
    heads = y_pred[..., 1:] if channels > 1 else y_pred
    probability = tf.reshape(heads, [batch, -1, max(channels - 1, 1)])
    return target, weight, tf.clip_by_value(probability, EPSILON, 1 - EPSILON)


def _per_tile(per_head):
    """The mean over heads of (B, heads) values: one value per tile."""
    return tf.reduce_mean(per_head, axis=-1)


def _masked_mean(values, weight):
    """Mean over each tile's valid pixels of (B, N, heads) values: (B, heads)."""
    return tf.reduce_sum(values * weight, axis=1) / tf.maximum(tf.reduce_sum(weight, axis=1), 1.0)


def binary_crossentropy(y_true, y_pred):
    """Binary cross-entropy, the mean over a tile's valid pixels."""
    target, weight, p = _prepare(y_true, y_pred)
    # The trailing axis of one lets Keras' mean over its last axis keep every pixel and head.
    values = tf.keras.losses.binary_crossentropy(target[..., None], p[..., None])
    return _per_tile(_masked_mean(values, weight))


def focal(y_true, y_pred, gamma: float = 2.0, alpha: float = 0.25):
    """Focal loss (Lin et al. 2017), the loss of Nitze et al. (2021): -alpha_t (1 - p_t)^gamma log(p_t)."""
    target, weight, p = _prepare(y_true, y_pred)
    values = tf.keras.losses.binary_focal_crossentropy(target[..., None], p[..., None], apply_class_balancing=True,
                                                       alpha=alpha, gamma=gamma)
    return _per_tile(_masked_mean(values, weight))


def dice(y_true, y_pred, smooth: float = 1.0):
    """1 - soft Dice over a tile's valid pixels."""
    target, weight, p = _prepare(y_true, y_pred)
    intersection = tf.reduce_sum(target * p * weight, axis=1)
    total = tf.reduce_sum((target + p) * weight, axis=1)
    return _per_tile(1 - (2 * intersection + smooth) / (total + smooth))


def jaccard(y_true, y_pred, smooth: float = 1.0):
    """1 - soft IoU (Jaccard) over a tile's valid pixels."""
    target, weight, p = _prepare(y_true, y_pred)
    intersection = tf.reduce_sum(target * p * weight, axis=1)
    union = tf.reduce_sum((target + p) * weight, axis=1) - intersection
    return _per_tile(1 - (intersection + smooth) / (union + smooth))


def bce_dice(y_true, y_pred):
    return binary_crossentropy(y_true, y_pred) + dice(y_true, y_pred)


LOSSES = {"focal": focal, "dice": dice, "jaccard": jaccard, "bce": binary_crossentropy, "bce_dice": bce_dice}


def get_loss(name: str):
    """The loss function of a name; ValueError listing the choices."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
