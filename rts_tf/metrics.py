"""Streaming segmentation metrics over an epoch that exclude ignored pixels (label 255)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rts_tf.records import IGNORE

SWEEP_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist())


def confusion(y_true, y_pred, thresholds) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """True positives, false positives, false negatives at each threshold (vectors)."""
    y_true = tf.reshape(tf.cast(y_true, tf.float32), [-1])
    probability = tf.reshape(tf.cast(y_pred, tf.float32), [-1])
    valid = tf.not_equal(y_true, IGNORE)
    target = tf.boolean_mask(tf.equal(y_true, 1.0), valid)
    probability = tf.boolean_mask(probability, valid)
    predicted = probability[None, :] >= tf.constant(thresholds, tf.float32)[:, None]
    target = tf.broadcast_to(target[None, :], tf.shape(predicted))
    count = lambda mask: tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)
    return count(predicted & target), count(predicted & ~target), count(~predicted & target)


class SegmentationMetric(tf.keras.metrics.Metric):
    """IoU, F1, precision or recall of the slump class at a threshold, accumulated over an epoch."""

    def __init__(self, kind: str = "iou", threshold: float = 0.5, name: str | None = None, **kwargs):
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.threshold = kind, threshold
        self.counts = self.add_weight(name="counts", shape=(3,), initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        tp, fp, fn = confusion(y_true, y_pred, (self.threshold,))
        self.counts.assign_add(tf.concat([tp, fp, fn], axis=0))

    def result(self):
        return score(self.kind, self.counts[0], self.counts[1], self.counts[2])

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "threshold": self.threshold}


class ThresholdSweep(tf.keras.metrics.Metric):
    """The best IoU over a sweep of thresholds (kind='iou'), or the threshold giving it ('threshold')."""

    def __init__(self, kind: str = "iou", thresholds=SWEEP_THRESHOLDS, name: str | None = None, **kwargs):
        super().__init__(name=name or f"best_{kind}", **kwargs)
        self.kind, self.thresholds = kind, tuple(thresholds)
        self.counts = self.add_weight(name="counts", shape=(3, len(self.thresholds)), initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.counts.assign_add(tf.stack(confusion(y_true, y_pred, self.thresholds)))

    def result(self):
        iou = score("iou", self.counts[0], self.counts[1], self.counts[2])
        best = tf.argmax(iou)
        return iou[best] if self.kind == "iou" else tf.gather(tf.constant(self.thresholds, tf.float32), best)

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "thresholds": list(self.thresholds)}


def score(kind: str, tp, fp, fn):
    """IoU, F1, precision or recall from counts (0 when undefined)."""
    divide = tf.math.divide_no_nan
    if kind == "iou":
        return divide(tp, tp + fp + fn)
    if kind == "f1":
        return divide(2 * tp, 2 * tp + fp + fn)
    if kind == "precision":
        return divide(tp, tp + fp)
    if kind == "recall":
        return divide(tp, tp + fn)
    raise ValueError(f"unknown metric kind '{kind}'")


def segmentation_metrics() -> list[tf.keras.metrics.Metric]:
    """The metrics reported per epoch for training and validation."""
    return [SegmentationMetric("iou"), SegmentationMetric("f1"), SegmentationMetric("precision"),
            SegmentationMetric("recall"), ThresholdSweep("iou"), ThresholdSweep("threshold")]
