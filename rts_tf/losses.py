"""Losses for binary segmentation that give ignored pixels (label 255) zero weight.

Each loss returns one value per tile (the mean over its valid pixels, or a per-tile overlap
score), so Keras reduces it correctly across replicas under a distribution strategy.
"""

from __future__ import annotations

import tensorflow as tf

from rts_tf.records import IGNORE

EPSILON = 1e-6


def _prepare(y_true, y_pred):
    """Targets (1 slump, 0 not), weights (0 where ignored) and clipped probabilities, (B, N)."""
    y_true = tf.cast(y_true, tf.float32)
    batch = tf.shape(y_true)[0]
    weight = tf.reshape(tf.cast(tf.not_equal(y_true, IGNORE), tf.float32), [batch, -1])
    target = tf.reshape(tf.cast(tf.equal(y_true, 1.0), tf.float32), [batch, -1])
    probability = tf.clip_by_value(tf.reshape(tf.cast(y_pred, tf.float32), [batch, -1]), EPSILON, 1 - EPSILON)
    return target, weight, probability


def _masked_mean(values, weight):
    return tf.reduce_sum(values * weight, axis=1) / tf.maximum(tf.reduce_sum(weight, axis=1), 1.0)


def binary_crossentropy(y_true, y_pred):
    target, weight, p = _prepare(y_true, y_pred)
    return _masked_mean(-(target * tf.math.log(p) + (1 - target) * tf.math.log(1 - p)), weight)


def focal(y_true, y_pred, gamma: float = 2.0, alpha: float = 0.25):
    """Focal loss (Lin et al. 2017), the loss of Nitze et al. (2021)."""
    target, weight, p = _prepare(y_true, y_pred)
    p_true = target * p + (1 - target) * (1 - p)
    alpha_true = target * alpha + (1 - target) * (1 - alpha)
    return _masked_mean(-alpha_true * tf.pow(1 - p_true, gamma) * tf.math.log(p_true), weight)


def dice(y_true, y_pred, smooth: float = 1.0):
    """1 - soft Dice over a tile's valid pixels."""
    target, weight, p = _prepare(y_true, y_pred)
    intersection = tf.reduce_sum(target * p * weight, axis=1)
    total = tf.reduce_sum((target + p) * weight, axis=1)
    return 1 - (2 * intersection + smooth) / (total + smooth)


def jaccard(y_true, y_pred, smooth: float = 1.0):
    """1 - soft IoU (Jaccard) over a tile's valid pixels."""
    target, weight, p = _prepare(y_true, y_pred)
    intersection = tf.reduce_sum(target * p * weight, axis=1)
    union = tf.reduce_sum((target + p) * weight, axis=1) - intersection
    return 1 - (intersection + smooth) / (union + smooth)


def bce_dice(y_true, y_pred):
    return binary_crossentropy(y_true, y_pred) + dice(y_true, y_pred)


LOSSES = {"focal": focal, "dice": dice, "jaccard": jaccard, "bce": binary_crossentropy, "bce_dice": bce_dice}


def get_loss(name: str):
    """The loss function of a name; ValueError listing the choices."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
