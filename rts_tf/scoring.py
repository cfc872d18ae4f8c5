"""Scoring step: the threshold sweep and the IoU, F1, precision and recall formulas of training and evaluation."""

from __future__ import annotations

from typing import Callable

import numpy as np

# Probability thresholds of the sweep that picks a run's threshold: 0.05, 0.10, ..., 0.95.
SWEEP: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(1, 20))


def divide_no_nan(numerator, denominator):
    """numerator / denominator elementwise, 0.0 where the denominator is 0 (a float for scalar input)."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    quotient = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=quotient, where=denominator != 0)
    return quotient[()]


def scores(tp, fp, fn, divide: Callable = divide_no_nan) -> dict:
    """IoU, F1, precision and recall of the slump class from pixel counts, 0.0 where undefined.

    Counts may be numbers or arrays (elementwise). ``divide`` lets TensorFlow code use the same
    formulas with ``tf.math.divide_no_nan``.
    """
    return {
        "iou": divide(tp, tp + fp + fn),
        "f1": divide(2 * tp, 2 * tp + fp + fn),
        "precision": divide(tp, tp + fp),
        "recall": divide(tp, tp + fn),
    }


def best_of_sweep(tp, fp, fn) -> tuple[float, float]:
    """(best IoU, its threshold) from count vectors over ``SWEEP``; a tie goes to the lowest threshold."""
    iou = np.asarray(scores(tp, fp, fn)["iou"], np.float64)
    if iou.shape != (len(SWEEP),):
        raise ValueError(f"expected counts for the {len(SWEEP)} thresholds of SWEEP, got shape {iou.shape}")
    best = int(np.argmax(iou))
    return float(iou[best]), SWEEP[best]
