"""Training monitoring: Keras callbacks for the epoch log, learning rate, image panels and HParams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from rts_tf.records import IGNORE, write_json
from rts_tf.visualize import band_panels, error_map, grey, label_colour, side_by_side

# After the band panels of the run's band set (true colour and NIR false colour where it has those bands).
PANELS = ("label", "probability", "errors (TP white, FP red, FN blue)")


class EpochLog(tf.keras.callbacks.Callback):
    """Every finished epoch's logs in a JSON file, so that a resumed run's history is whole."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.epochs = json.loads(self.path.read_text()) if self.path.exists() else []
        self.first_epoch = None  # where Keras (re)started: > 0 after BackupAndRestore resumed

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch, logs or {})

    def record(self, epoch: int, values: dict) -> None:
        """Keep an epoch's values (replacing a re-run epoch's) and save the log."""
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1]
        self.epochs.append({"epoch": epoch + 1, **{k: float(v) for k, v in values.items()}})
        write_json(self.path, self.epochs, unique=True)

    def truncate(self, epochs: int) -> None:
        """Forget epochs after the first `epochs` (those a resumed run trains again: a kill after the
        log was written but before the epoch's backup leaves one such)."""
        if any(e["epoch"] > epochs for e in self.epochs):
            self.epochs = [e for e in self.epochs if e["epoch"] <= epochs]
            write_json(self.path, self.epochs, unique=True)

    def history(self) -> dict[str, list[float]]:
        keys = sorted({k for e in self.epochs for k in e if k != "epoch"})
        return {k: [e.get(k, float("nan")) for e in self.epochs] for k in keys}

    def best(self, key: str) -> float | None:
        """The highest value of a logged metric over the finished epochs, or None before any."""
        values = [e[key] for e in self.epochs if key in e]
        return max(values) if values else None


class ResumableEarlyStopping(tf.keras.callbacks.EarlyStopping):
    """Early stopping whose patience and best value continue from a resumed run's history
    (Keras' own starts again from nothing at every `fit`)."""

    def __init__(self, epoch_log: EpochLog, **kwargs):
        super().__init__(**kwargs)
        self.epoch_log = epoch_log

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        values = [e[self.monitor] for e in self.epoch_log.epochs if self.monitor in e]
        if values:
            best = int(np.argmax(values) if self.monitor_op == np.greater else np.argmin(values))
            self.best, self.wait = values[best], len(values) - 1 - best


class TestCurves(tf.keras.callbacks.Callback):
    """After every epoch, score the held-out (test) region for TensorBoard's `test` run and for
    run.json, with the scorer of `evaluate` (tiles blended into scene mosaics, overlapping tiles
    counted once): IoU, F1, precision and recall at the paper's fixed threshold 0.5, and the best
    IoU over the threshold sweep (`best_iou`). Nothing is added to the epoch logs, so no callback
    that chooses can read it. Only the chief scores (no collective op: the other workers of a
    multi-worker run never join it)."""

    def __init__(self, records: str, manifest: dict, scenes, bands: list[str], logdir: Path, path: Path,
                 batch_size: int, enabled: bool = True, inference: "LocalCopy | None" = None):
        super().__init__()
        self.inference = inference
        self.records, self.manifest, self.scenes = str(records), manifest, list(scenes)
        self.bands, self.batch_size, self.enabled = bands, batch_size, enabled
        self.logdir = Path(logdir)
        self.log = EpochLog(path)  # its own file, never the epoch logs the other callbacks read
        self.writer = None

    def on_epoch_end(self, epoch, logs=None):
        if not self.enabled:
            return
        from rts_tf.evaluate import score_scenes
        from rts_tf.inference import Run

        model = self.inference(self.model) if self.inference else self.model
        run = Run(self.logdir, model, self.manifest["tile_size"], self.manifest["overlap"], self.bands, 0.5)
        counts = score_scenes(self.records, self.manifest, self.scenes, [run], PAPER_THRESHOLD, objects=False,
                              batch_size=self.batch_size)
        metrics = counts.metrics()
        results = {key: metrics[key] for key in ("iou", "f1", "precision", "recall", "best_iou", "best_threshold")}
        self.log.record(epoch, results)
        self.writer = self.writer or tf.summary.create_file_writer(str(self.logdir))
        with self.writer.as_default():
            for key, value in results.items():
                tf.summary.scalar(f"epoch_{key}", value, step=epoch,
                                  description="held-out (test) region, scene mosaics: for the curves only, never "
                                              "for choices")
        self.writer.flush()

    def history(self) -> dict[str, list[float]]:
        return self.log.history()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()


class LocalCopy(tf.keras.callbacks.Callback):
    """A model built outside any strategy that takes the trained model's weights after every
    epoch, for the chief of a multi-worker run to predict with alone. Every worker runs this
    callback: reading the weights (BatchNorm's moving statistics are synchronised on read) is a
    collective op that all workers must join; the prediction itself then needs none."""

    def __init__(self, copy: tf.keras.Model):
        super().__init__()
        self.copy = copy

    def on_epoch_end(self, epoch, logs=None):
        self.copy.set_weights(self.model.get_weights())

    def __call__(self, model: tf.keras.Model) -> tf.keras.Model:
        return self.copy


# The fixed threshold of Nitze et al. (2021) for the paper-style per-epoch score.
PAPER_THRESHOLD = 0.5


class BestCheckpoint(tf.keras.callbacks.Callback):
    """The weights of every epoch whose validation IoU beats all earlier ones, each in a file named
    by its epoch (`best-epoch0003.h5`), so that a kill at any point leaves the file of the epoch the
    history calls best: files of a newer best are removed only once the epoch's backup exists
    (`CheckpointCleanup`, after BackupAndRestore), and a resumed run first removes the files of
    epochs it will train again."""

    PATTERN = "best-epoch*.h5"

    def __init__(self, folder: Path, epoch_log: EpochLog, monitor: str = "val_iou"):
        super().__init__()
        self.folder, self.epoch_log, self.monitor = Path(folder), epoch_log, monitor

    @staticmethod
    def path(folder: Path, epoch: int) -> Path:
        """The file of 1-based `epoch`."""
        return Path(folder) / f"best-epoch{epoch:04d}.h5"

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or np.isnan(value):
            return
        earlier = [e[self.monitor] for e in self.epoch_log.epochs if e["epoch"] < epoch + 1 and self.monitor in e]
        if not earlier or value > max(earlier):
            target = self.path(self.folder, epoch + 1)
            temporary = target.with_name("tmp-" + target.name)
            self.model.save_weights(str(temporary))
            temporary.replace(target)


def best_epoch(epochs: list[dict], monitor: str = "val_iou") -> int | None:
    """The 1-based epoch with the highest monitored value (the first of equals), or None."""
    values = [(e[monitor], -e["epoch"]) for e in epochs if monitor in e and not np.isnan(e[monitor])]
    return -max(values)[1] if values else None


def prune_checkpoints(folder: Path, keep: int | None, after: int | None = None) -> None:
    """Remove best-epoch files other than epoch `keep`'s; with `after`, only those of later epochs."""
    for path in Path(folder).glob("tmp-" + BestCheckpoint.PATTERN):
        path.unlink(missing_ok=True)  # a save that a kill interrupted
    for path in Path(folder).glob(BestCheckpoint.PATTERN):
        number = int(path.stem[len("best-epoch"):])
        if number != keep and (after is None or number > after):
            path.unlink(missing_ok=True)


class CheckpointCleanup(tf.keras.callbacks.Callback):
    """After BackupAndRestore has saved an epoch: the best-epoch files that no resume can need go."""

    def __init__(self, folder: Path, epoch_log: EpochLog, monitor: str = "val_iou"):
        super().__init__()
        self.folder, self.epoch_log, self.monitor = Path(folder), epoch_log, monitor

    def on_epoch_end(self, epoch, logs=None):
        prune_checkpoints(self.folder, best_epoch(self.epoch_log.epochs, self.monitor))


class TrainingDone(tf.keras.callbacks.Callback):
    """Marks the end of training (all epochs, or stopped early) before BackupAndRestore deletes its
    backup at the end of `fit`: a run killed while saving its model then saves it again on re-run,
    instead of training from nothing."""

    def __init__(self, path: Path, epoch_log: EpochLog):
        super().__init__()
        self.path, self.epoch_log = Path(path), epoch_log

    def on_train_end(self, logs=None):
        write_json(self.path, {"epochs_run": len(self.epoch_log.epochs)})


class LearningRateLogger(tf.keras.callbacks.Callback):
    """Adds the optimiser's current learning rate to the epoch logs (TensorBoard shows it)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        rate = self.model.optimizer.learning_rate
        if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(self.model.optimizer.iterations)
        logs["learning_rate"] = float(tf.keras.backend.get_value(rate))


class ImagePanels(tf.keras.callbacks.Callback):
    """After the first epoch, every N epochs and after the last, TensorBoard images of fixed
    validation tiles: true colour and NIR false colour (those the run's bands allow, else its first
    band in grey), label, predicted probability and the error map."""

    def __init__(self, validation: tf.data.Dataset, band_names: list[str], logdir: Path, every: int, tiles: int,
                 inference: "LocalCopy | None" = None):
        super().__init__()
        self.inference = inference
        self.band_names, self.every = band_names, every
        self.logdir = Path(logdir)
        images, labels = [], []
        for image, label in validation.unbatch():
            label = label.numpy()
            # Prefer tiles with slumps; fill up with the first others.
            if (label == 1).any() or len(images) < tiles // 2:
                images.append(image.numpy())
                labels.append(label[..., 0])
            if len(images) >= tiles:
                break
        self.images, self.labels = np.array(images), np.array(labels)
        self.writer = None
        self.written = self.last = None  # the last epoch whose panels were written, the last epoch

    def on_epoch_end(self, epoch, logs=None):
        self.last = epoch
        last = epoch + 1 == self.params.get("epochs")
        if len(self.images) and (epoch == 0 or last or (epoch + 1) % self.every == 0):
            self.write(epoch)

    def write(self, epoch: int) -> None:
        self.written = epoch
        self.writer = self.writer or tf.summary.create_file_writer(str(self.logdir))
        # The model's own call, not `predict`: predict gathers across the workers of a multi-worker
        # run, and only the chief writes panels.
        from rts_tf.inference import forward

        model = self.inference(self.model) if self.inference else self.model
        probabilities = forward(model)(self.images)[..., 0]
        with self.writer.as_default():
            for index, (image, label, probability) in enumerate(zip(self.images, self.labels, probabilities)):
                valid = label != IGNORE
                bands = band_panels(image, self.band_names, valid, auxiliary=False)
                panels = side_by_side([
                    *(rgb for _, rgb in bands),
                    label_colour(label), grey(probability, valid, 0.0, 1.0), error_map(label, probability)])
                tf.summary.image(f"validation/tile_{index}", panels[None], step=epoch + 1,
                                 description=" | ".join([*(title for title, _ in bands), *PANELS]))
        self.writer.flush()

    def on_train_end(self, logs=None):
        # A run stopped early also gets the panels of its last epoch.
        if len(self.images) and self.last is not None and self.written != self.last:
            self.write(self.last)
        if self.writer is not None:
            self.writer.close()


HPARAM_METRICS = [hp.Metric("epoch_iou", group="validation", display_name="IoU (val)"),
                  hp.Metric("epoch_f1", group="validation", display_name="F1 (val)"),
                  hp.Metric("epoch_best_iou", group="validation", display_name="best-threshold IoU (val)"),
                  hp.Metric("epoch_loss", group="validation", display_name="loss (val)"),
                  hp.Metric("epoch_iou", group="train", display_name="IoU (train)"),
                  hp.Metric("epoch_iou", group="test", display_name="IoU (held-out test region)")]


def hparams_callback(logdir: Path, hparams: dict, trial_id: str) -> tf.keras.callbacks.Callback:
    """The HParams dashboard entry of a run; runs under one parent folder form one table."""
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams_config(hparams=[hp.HParam(name) for name in hparams], metrics=HPARAM_METRICS)
    return hp.KerasCallback(str(logdir), hparams, trial_id=trial_id)
