"""Training step: per-epoch segmentation metrics, Keras' own metrics with ignored pixels (label 255) weighted 0.

Each metric turns a label into the target ``label == 1`` and the sample weight ``label != 255``,
reads only channel 0 of the prediction (the probability; a UNet++ trained with its heads puts
the mean of its heads there and the heads after it) and hands them to a Keras metric:
``BinaryIoU`` (iou), ``Precision``, ``Recall``, ``F1Score`` (f1) and, for the threshold sweep,
``TruePositives``, ``FalsePositives`` and ``FalseNegatives`` with the thresholds of
``scoring.SWEEP``, from which the best IoU and its threshold follow with ``scoring.scores``.

A pixel is positive when its probability is at least the threshold (``p >= t``), as in
``predict`` and ``evaluate`` and in ``BinaryIoU``; Keras' confusion metrics and ``F1Score`` count
``p > t`` instead, so they are given the float32 just below each threshold, which counts exactly
the same pixels for float32 probabilities. On random probabilities (2x64x64, ignored pixels)
every metric equals the former hand-written one to float32 rounding; without that shift the
sweep would differ wherever a probability equals a threshold.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rts_tf.records import IGNORE
from rts_tf.scoring import SWEEP, scores

KINDS = ("iou", "f1", "precision", "recall")
# Every metric and its counters are float32 whatever the global policy. Under ``mixed_float16`` a
# metric without a dtype takes the policy and keeps its counters in AutoCastVariables, and reading
# one of those in ``result()`` under MirroredStrategy fails ("call variable.read_value() inside
# variable_sync_on_read_context is not supported"): a mixed-precision fit on several GPUs stopped
# at its first step.
FLOAT32 = tf.float32


def keras_threshold(threshold: float) -> float:
    """The threshold for a Keras metric counting ``p > t`` so that it counts ``p >= threshold``."""
    return float(np.nextafter(np.float32(threshold), np.float32(0)))


def metric_inputs(y_true, y_pred) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(target, probability, weight): (N, 1) target and channel-0 probability, (N,) weight 0 where ignored."""
    label = tf.reshape(tf.cast(y_true, tf.float32), [-1, 1])
    probability = tf.reshape(tf.cast(y_pred[..., :1], tf.float32), [-1, 1])
    weight = tf.cast(tf.not_equal(label[:, 0], IGNORE), tf.float32)
    return tf.cast(tf.equal(label, 1.0), tf.float32), probability, weight


def keras_metric(kind: str, threshold: float) -> tf.keras.metrics.Metric:
    """The Keras metric computing ``kind`` at ``threshold`` from (target, probability, weight)."""
    if kind == "iou":
        return tf.keras.metrics.BinaryIoU(target_class_ids=[1], threshold=threshold, dtype=FLOAT32)
    if kind == "precision":
        return tf.keras.metrics.Precision(thresholds=keras_threshold(threshold), dtype=FLOAT32)
    if kind == "recall":
        return tf.keras.metrics.Recall(thresholds=keras_threshold(threshold), dtype=FLOAT32)
    if kind == "f1":
        # F1Score takes (samples, classes), hence the (N, 1) inputs, and creates its variables on its
        # first update, inside the distributed and compiled train step; building it here creates
        # them with the metric, under the strategy's scope like every other metric variable.
        f1 = tf.keras.metrics.F1Score(average="micro", threshold=keras_threshold(threshold), dtype=FLOAT32)
        f1.build((None, 1), (None, 1))
        return f1
    raise ValueError(f"unknown metric kind '{kind}'; choose one of: {', '.join(KINDS)}")


class SegmentationMetric(tf.keras.metrics.Metric):
    """IoU, F1, precision or recall of the slump class at a threshold, accumulated over an epoch."""

    def __init__(self, kind: str = "iou", threshold: float = 0.5, name: str | None = None, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.threshold = kind, threshold
        self.keras_metric = keras_metric(kind, threshold)

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate a batch; the label's ignore value is the only weighting (``sample_weight`` is not used)."""
        self.keras_metric.update_state(*metric_inputs(y_true, y_pred))

    def result(self):
        return self.keras_metric.result()

    def reset_state(self):
        self.keras_metric.reset_state()

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "threshold": self.threshold}


class ThresholdSweep(tf.keras.metrics.Metric):
    """The best IoU over a sweep of thresholds (kind='iou'), the threshold giving it ('threshold'),
    or the best minus the worst IoU of the sweep ('spread': 0 when no threshold is better than another).

    A tie goes to the lowest threshold, as in ``scoring.best_of_sweep``.
    """

    NAMES = {"iou": "best_iou", "threshold": "best_threshold", "spread": "iou_spread"}

    def __init__(self, kind: str = "iou", thresholds=SWEEP, name: str | None = None, **kwargs):
        if kind not in self.NAMES:
            raise ValueError(f"unknown sweep kind '{kind}'; choose one of: {', '.join(self.NAMES)}")
        kwargs.setdefault("dtype", FLOAT32)
        super().__init__(name=name or self.NAMES[kind], **kwargs)
        self.kind, self.thresholds = kind, tuple(float(t) for t in thresholds)
        shifted = [keras_threshold(t) for t in self.thresholds]
        self.true_positives = tf.keras.metrics.TruePositives(shifted, dtype=FLOAT32)
        self.false_positives = tf.keras.metrics.FalsePositives(shifted, dtype=FLOAT32)
        self.false_negatives = tf.keras.metrics.FalseNegatives(shifted, dtype=FLOAT32)

    def counters(self) -> tuple[tf.keras.metrics.Metric, ...]:
        return self.true_positives, self.false_positives, self.false_negatives

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Accumulate a batch; the label's ignore value is the only weighting (``sample_weight`` is not used)."""
        inputs = metric_inputs(y_true, y_pred)
        for counter in self.counters():
            counter.update_state(*inputs)

    def result(self):
        tp, fp, fn = (tf.reshape(counter.result(), [-1]) for counter in self.counters())
        iou = scores(tp, fp, fn, divide=tf.math.divide_no_nan)["iou"]
        # The lowest index among the maxima: tf.argmax does not promise which of tied maxima it returns.
        if self.kind == "spread":
            return tf.reduce_max(iou) - tf.reduce_min(iou)
        best = tf.reduce_min(tf.where(tf.equal(iou, tf.reduce_max(iou)), tf.range(tf.size(iou)), tf.size(iou)))
        return iou[best] if self.kind == "iou" else tf.gather(tf.constant(self.thresholds, tf.float32), best)

    def reset_state(self):
        for counter in self.counters():
            counter.reset_state()

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "thresholds": list(self.thresholds)}


def segmentation_metrics() -> list[tf.keras.metrics.Metric]:
    """The metrics reported per epoch for training and validation."""
    return [SegmentationMetric("iou"), SegmentationMetric("f1"), SegmentationMetric("precision"),
            SegmentationMetric("recall"), ThresholdSweep("iou"), ThresholdSweep("threshold"),
            ThresholdSweep("spread")]
