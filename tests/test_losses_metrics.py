"""Losses, metrics and scoring give ignored pixels no weight and match hand-computed values."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rts_tf.losses import LOSSES, get_loss
from rts_tf.metrics import SegmentationMetric, ThresholdSweep, segmentation_metrics
from rts_tf.scoring import SWEEP, best_of_sweep, scores


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


def valid_targets_and_probabilities():
    """The valid pixels of case(): targets and probabilities clipped as the losses clip them, float64."""
    label, probability = case()
    valid = label != 255
    t, p = (label[valid] == 1).astype(np.float64), probability[valid].astype(np.float64)
    return t, np.clip(p, 1e-6, 1 - 1e-6)


def test_focal_matches_hand_computation():
    t, p = valid_targets_and_probabilities()
    p_t = np.where(t == 1, p, 1 - p)
    alpha_t = np.where(t == 1, 0.25, 0.75)
    expected = np.mean(-alpha_t * (1 - p_t) ** 2 * np.log(p_t))
    assert get_loss("focal")(*case()).numpy()[0] == pytest.approx(expected, rel=1e-5)


def test_dice_and_jaccard_match_hand_computation():
    t, p = valid_targets_and_probabilities()
    intersection, union = np.sum(t * p), np.sum(t) + np.sum(p) - np.sum(t * p)
    assert get_loss("dice")(*case()).numpy()[0] == pytest.approx(
        1 - (2 * intersection + 1) / (np.sum(t) + np.sum(p) + 1), rel=1e-5)
    assert get_loss("jaccard")(*case()).numpy()[0] == pytest.approx(1 - (intersection + 1) / (union + 1), rel=1e-5)


# A 2x2 tile, labels [1, 0, 255, 1], probabilities [0.8, 0.3, 0.9, 0.6]: valid pixels
# (t=1, p=0.8), (t=0, p=0.3), (t=1, p=0.6); the values below were worked out by hand.
FOUR_PIXELS = {
    # -alpha_t (1 - p_t)^2 log(p_t), alpha_t 0.25 for t=1 and 0.75 for t=0:
    # 0.25*0.04*0.2231436 + 0.75*0.09*0.3566749 + 0.25*0.16*0.5108256
    # = 0.0022314 + 0.0240756 + 0.0204330 = 0.0467400, / 3
    "focal": 0.0155800,
    # sum t*p = 1.4, sum t = 2, sum p = 1.7: 1 - (2*1.4 + 1) / (2 + 1.7 + 1) = 0.9 / 4.7
    "dice": 0.1914894,
    # intersection 1.4, union 2 + 1.7 - 1.4 = 2.3: 1 - (1.4 + 1) / (2.3 + 1) = 0.9 / 3.3
    "jaccard": 0.2727273,
    # -(log 0.8 + log 0.7 + log 0.6) / 3 = (0.2231436 + 0.3566749 + 0.5108256) / 3
    "bce": 0.3635480,
    # bce + dice
    "bce_dice": 0.5550374,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_of_four_pixels_equal_values_worked_out_by_hand(name):
    label = np.array([1, 0, 255, 1], np.uint8).reshape(1, 2, 2, 1)
    probability = np.array([0.8, 0.3, 0.9, 0.6], np.float32).reshape(1, 2, 2, 1)
    assert get_loss(name)(label, probability).numpy()[0] == pytest.approx(FOUR_PIXELS[name], rel=1e-6)


def heads_case(seed: int = 0):
    """Labels (2, 16, 16, 1) with ignored pixels and a (2, 16, 16, 5) prediction: a mean and four heads."""
    rng = np.random.default_rng(seed)
    label = (rng.random((2, 16, 16, 1)) < 0.3).astype(np.uint8)
    label[rng.random(label.shape) < 0.2] = 255
    heads = rng.random((2, 16, 16, 4)).astype(np.float32)
    return label, np.concatenate([heads.mean(axis=-1, keepdims=True), heads], axis=-1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_on_heads_is_the_mean_of_each_heads_loss(name):
    label, prediction = heads_case()
    loss = get_loss(name)
    each_head = [loss(label, prediction[..., head:head + 1]).numpy() for head in range(1, 5)]
    on_heads = loss(label, prediction).numpy()
    assert on_heads.shape == (2,)
    np.testing.assert_allclose(on_heads, np.mean(each_head, axis=0), rtol=1e-6)
    on_mean = loss(label, prediction[..., :1]).numpy()
    assert not np.allclose(on_heads, on_mean)  # the heads are trained, not their mean


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


def numpy_metrics(label: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """The six per-epoch metrics computed with numpy and rts_tf.scoring from the valid pixels."""
    valid = label != 255
    truth, p = label[valid] == 1, probability[valid]
    count = lambda above: (np.sum(above & truth), np.sum(above & ~truth), np.sum(~above & truth))
    values = scores(*count(p >= 0.5))
    sweep = np.array([count(p >= threshold) for threshold in SWEEP]).T
    values["best_iou"], values["best_threshold"] = best_of_sweep(*sweep)
    ious = scores(*sweep)["iou"]
    values["iou_spread"] = float(np.max(ious) - np.min(ious))
    return values


def test_metrics_on_a_random_batch_equal_numpy_and_read_only_channel_zero():
    rng = np.random.default_rng(1)
    label = (rng.random((2, 64, 64, 1)) < 0.3).astype(np.uint8)
    label[rng.random(label.shape) < 0.2] = 255
    probability = (rng.random(label.shape) ** 2).astype(np.float32)
    probability[0, :8] = np.round(probability[0, :8] * 20) / 20  # values on the thresholds count as positive
    expected = numpy_metrics(label, probability)
    heads = np.concatenate([probability, rng.random((2, 64, 64, 4)).astype(np.float32)], axis=-1)
    for prediction in (probability, heads):
        metrics = segmentation_metrics()
        assert [metric.name for metric in metrics] == ["iou", "f1", "precision", "recall", "best_iou",
                                                       "best_threshold", "iou_spread"]
        for metric in metrics:
            metric.update_state(label, prediction)
            assert float(metric.result()) == pytest.approx(expected[metric.name], rel=1e-6), metric.name


def test_metrics_rebuild_from_their_config():
    label, probability = case()
    for metric in segmentation_metrics() + [SegmentationMetric("f1", threshold=0.3, name="f1_at_0.3")]:
        copy = type(metric).from_config(metric.get_config())
        assert copy.name == metric.name and copy.get_config() == metric.get_config()
        for each in (metric, copy):
            each.update_state(label, probability)
        assert float(copy.result()) == float(metric.result())


def test_unknown_metric_kinds_raise():
    with pytest.raises(ValueError, match="unknown metric kind 'dice'"):
        SegmentationMetric("dice")
    with pytest.raises(ValueError, match="unknown sweep kind 'f1'"):
        ThresholdSweep("f1")


# Scoring


def test_sweep_is_nineteen_thresholds_from_0_05_to_0_95():
    assert SWEEP == tuple(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist())
    assert len(SWEEP) == 19 and all(type(threshold) is float for threshold in SWEEP)


def test_scores_of_counts_and_of_count_arrays():
    assert scores(3, 1, 2) == {"iou": 0.5, "f1": pytest.approx(2 / 3), "precision": 0.75, "recall": 0.6}
    assert scores(0, 0, 0) == {"iou": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    values = scores(np.array([3, 0]), np.array([1, 0]), np.array([2, 4]))
    np.testing.assert_allclose(values["iou"], [0.5, 0.0])
    np.testing.assert_allclose(values["precision"], [0.75, 0.0])
    np.testing.assert_allclose(values["recall"], [0.6, 0.0])


def test_best_of_sweep_takes_the_lowest_threshold_of_a_tie():
    tp, fp, fn = np.zeros(19), np.zeros(19), np.ones(19)
    tp[[4, 7]], fn[[4, 7]] = 3, 1  # IoU 0.75 at 0.25 and at 0.40
    assert best_of_sweep(tp, fp, fn) == (0.75, 0.25)
    assert best_of_sweep(np.zeros(19), np.zeros(19), np.zeros(19)) == (0.0, 0.05)
    with pytest.raises(ValueError, match="19 thresholds"):
        best_of_sweep(np.ones(3), np.ones(3), np.ones(3))


def test_threshold_sweep_metric_breaks_a_tie_like_scoring():
    label = np.array([1, 1, 0, 0], np.uint8).reshape(1, 2, 2, 1)
    probability = np.array([0.9, 0.9, 0.1, 0.1], np.float32).reshape(1, 2, 2, 1)  # IoU 1 from 0.15 to 0.9
    threshold = ThresholdSweep("threshold")
    threshold.update_state(label, probability)
    assert float(threshold.result()) == pytest.approx(0.15)


@pytest.mark.slow
def test_metrics_and_loss_under_mirrored_strategy_on_two_logical_cpus():
    # Logical devices must be configured before TensorFlow initialises, hence a fresh process.
    script = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from rts_tf.losses import get_loss
        from rts_tf.metrics import segmentation_metrics
        from rts_tf.scoring import SWEEP, best_of_sweep, scores
        rng = np.random.default_rng(0)
        images = rng.normal(size=(4, 8, 8, 2)).astype("float32")
        labels = (rng.random((4, 8, 8, 1)) < 0.4).astype("uint8")
        labels[rng.random(labels.shape) < 0.2] = 255
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inputs = tf.keras.Input((8, 8, 2))
            model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
            model.compile(optimizer="adam", loss=get_loss("focal"), metrics=segmentation_metrics())
        history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0).history
        assert sorted(history) == ["best_iou", "best_threshold", "f1", "iou", "iou_spread", "loss", "precision", "recall"]
        assert np.isfinite(history["loss"][0])
        result = model.evaluate(images, labels, batch_size=4, return_dict=True, verbose=0)
        probability = model.predict(images, verbose=0)
        valid, truth = labels != 255, labels == 1
        above = probability >= 0.5
        expected = scores(np.sum(above & truth & valid), np.sum(above & ~truth & valid), np.sum(~above & truth & valid))
        sweep = [[np.sum((probability >= t) & truth & valid) for t in SWEEP],
                 [np.sum((probability >= t) & ~truth & valid) for t in SWEEP],
                 [np.sum((probability < t) & truth & valid) for t in SWEEP]]
        expected["best_iou"], expected["best_threshold"] = best_of_sweep(*np.array(sweep))
        for name, value in expected.items():
            assert abs(result[name] - value) < 1e-6, (name, result[name], value)
        print("replicas", strategy.num_replicas_in_sync, sorted(result))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout
