"""Losses and metrics give ignored pixels no weight and match hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from rts_tf.losses import LOSSES, get_loss
from rts_tf.metrics import SegmentationMetric, ThresholdSweep


def case():
    label = np.array([[1, 1, 0, 0], [1, 0, 0, 255], [0, 0, 255, 255], [0, 1, 0, 0]], np.uint8)[None, ..., None]
    probability = np.array([[0.9, 0.6, 0.2, 0.7], [0.4, 0.1, 0.3, 0.9], [0.0, 0.2, 0.8, 0.1], [0.1, 0.3, 0.6, 0.05]],
                           np.float32)[None, ..., None]
    return label, probability


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_ignore_ignored_pixels(name):
    label, probability = case()
    loss = get_loss(name)
    changed = probability.copy()
    changed[label == 255] = 1 - changed[label == 255]
    assert np.allclose(loss(label, probability).numpy(), loss(label, changed).numpy(), atol=1e-6)
    perfect = (label == 1).astype(np.float32)
    worst = 1 - perfect
    assert loss(label, perfect).numpy()[0] < loss(label, probability).numpy()[0] < loss(label, worst).numpy()[0]
    assert loss(label, probability).shape == (1,)


def test_binary_cross_entropy_matches_hand_computation():
    label, probability = case()
    valid = label != 255
    t, p = (label[valid] == 1).astype(np.float64), probability[valid].astype(np.float64)
    p = np.clip(p, 1e-6, 1 - 1e-6)
    expected = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    assert get_loss("bce")(label, probability).numpy()[0] == pytest.approx(expected, rel=1e-4)


def test_metrics_at_half_and_over_the_sweep():
    label, probability = case()
    valid = label != 255
    predicted, truth = probability[valid] >= 0.5, label[valid] == 1
    tp, fp, fn = (predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()
    values = {}
    for kind in ("iou", "f1", "precision", "recall"):
        metric = SegmentationMetric(kind)
        metric.update_state(label, probability)
        values[kind] = float(metric.result())
    assert values["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert values["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert values["precision"] == pytest.approx(tp / (tp + fp)) and values["recall"] == pytest.approx(tp / (tp + fn))
    best, threshold = ThresholdSweep("iou"), ThresholdSweep("threshold")
    for metric in (best, threshold):
        metric.update_state(label, probability)
    ious = {t: ((probability[valid] >= t) & truth).sum() / (((probability[valid] >= t) | truth).sum())
            for t in np.round(np.arange(0.05, 0.96, 0.05), 2)}
    assert float(best.result()) == pytest.approx(max(ious.values()))
    assert float(threshold.result()) == pytest.approx(max(ious, key=ious.get))


def test_metrics_accumulate_over_batches():
    label, probability = case()
    metric = SegmentationMetric("iou")
    metric.update_state(label, probability)
    metric.update_state(label, probability)
    single = SegmentationMetric("iou")
    single.update_state(np.concatenate([label, label]), np.concatenate([probability, probability]))
    assert float(metric.result()) == pytest.approx(float(single.result()))
    metric.reset_state()
    assert float(metric.result()) == 0.0
