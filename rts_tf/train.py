"""Training: records -> tf.data -> Keras model under a tf.distribute strategy -> a self-contained run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import rts_tf
from rts_tf.errors import InputError
from rts_tf.records import read_manifest, records_fingerprint, select_bands, write_json, write_text
from rts_tf.settings import RUNTIME_OPTIONS, SCHEDULES, VAL_SPLITS, FitConfig

RUN_NAME = "run.json"
CONFIG_NAME = "config.yaml"
IDENTITY_NAME = "identity.json"
MODEL_NAME = "model.keras"
TRAINED_NAME = "trained.json"  # in checkpoints/: training ended, the model is still to be saved
@dataclass
class FitResult:
    """What a run produced."""

    logdir: str
    epochs_run: int
    best_epoch: int
    metrics: dict[str, float]
    resumed_from: int = 0
    skipped: bool = False
    seconds: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)
    split: str = ""

    def lines(self) -> list[str]:
        if self.skipped:
            return [f"run {self.logdir} is already complete (use --overwrite to train again)"]
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items())
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        return [f"run: {self.logdir} ({self.epochs_run} epochs in {self.seconds:.0f} s{resumed})",
                self.split,
                f"best epoch {self.best_epoch} (on validation): {metrics}",
                f"model: {Path(self.logdir) / MODEL_NAME}",
                f"TensorBoard: tensorboard --logdir {self.logdir}"]


def check_config(config: FitConfig) -> None:
    """Reject impossible settings before anything is built."""
    from rts_tf.losses import LOSSES
    from rts_tf.models import ARCHITECTURES, ENCODERS

    if not config.records:
        raise InputError("give --records")
    if not config.logdir:
        raise InputError("give --logdir")
    if config.arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture '{config.arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    if config.encoder not in ENCODERS:
        raise InputError(f"unknown encoder '{config.encoder}'; choose one of: {', '.join(ENCODERS)}")
    if config.loss not in LOSSES:
        raise InputError(f"unknown loss '{config.loss}'; choose one of: {', '.join(LOSSES)}")
    if config.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule '{config.schedule}'; choose one of: {', '.join(SCHEDULES)}")
    for name in ("epochs", "batch_size", "oversample_slumps", "shuffle_buffer", "schedule_step_epochs", "image_tiles"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    for name in ("early_stopping", "image_every", "logical_cpus"):
        if getattr(config, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(config, name)}")
    # Left out (None) they mean one pass over the data and batch size times replicas.
    for name in ("steps_per_epoch", "global_batch_size"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1 (or left out), "
                             f"got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.weight_decay < 0:
        raise InputError(f"--weight-decay must be at least 0, got {config.weight_decay}")
    if config.schedule_decay <= 0:
        raise InputError(f"--schedule-decay must be positive, got {config.schedule_decay}")
    if config.augment_on not in ("device", "host"):
        raise InputError(f"--augment-on must be device or host, got {config.augment_on}")
    if config.val_split not in VAL_SPLITS:
        raise InputError(f"unknown --val-split '{config.val_split}'; choose one of: {', '.join(VAL_SPLITS)}")
    if config.bn_momentum is not None and not 0.0 <= config.bn_momentum < 1.0:
        raise InputError(f"--bn-momentum must be at least 0 and below 1, got {config.bn_momentum}")
    if not 0.0 < config.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    if config.xla and config.logical_cpus > 1:
        # TensorFlow runs XLA-compiled steps on CPU:0 only, which cannot reach the other replicas' variables.
        raise InputError(f"--xla cannot run over {config.logical_cpus} logical CPU devices (TensorFlow's XLA "
                         "compiles for CPU:0 only); drop --xla or --logical-cpus (on GPUs both work)")


def make_strategy(config: FitConfig):
    """Default strategy on one device; MirroredStrategy over several; MultiWorkerMirroredStrategy
    when TF_CONFIG is set. logical_cpus splits the CPU (for machines without GPUs, and tests)."""
    import tensorflow as tf

    if config.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] *
                                                       config.logical_cpus)
        except RuntimeError:
            pass  # already initialised with this split (a second run in the same process)
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.devices:
        return tf.distribute.MirroredStrategy(config.devices)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if config.logical_cpus > 1:
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def is_chief(strategy) -> bool:
    """True except on the non-chief workers of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                              and "chief" not in resolver.cluster_spec().as_dict())


def build_segmenter(config: FitConfig, bands: list[str], tile_size: int, mean, std, heads: bool = False,
                    augment: bool = False):
    """The model saved with a run: normalisation layer (the manifest's statistics; ignored pixels
    become 0) + network. With heads, a deep-supervision UNet++ also outputs each head (training).
    augment: an AugmentingModel, whose training step augments its batches about the band means
    (the same layers and weights)."""
    import tensorflow as tf

    from rts_tf.bands import rgb_indexes
    from rts_tf.models import DILATED_ARCHITECTURES, IgnoreAwareNormalization, build_model

    options = {}
    if config.decoder_filters:
        options["decoder_filters"] = tuple(config.decoder_filters)
    if config.deep_supervision:
        options["deep_supervision"] = True
        options["heads_output"] = heads
    if config.arch in DILATED_ARCHITECTURES:  # the other architectures downsample 32 times: no output stride
        options["output_stride"] = config.output_stride
    try:
        if config.encoder_weights:  # the pretrained R, G, B filters go to the bands of those names
            options["rgb_bands"] = rgb_indexes(bands)
        network = build_model(config.arch, config.encoder, len(bands), tile_size, config.encoder_weights, **options)
    except ValueError as error:
        raise InputError(str(error)) from None
    if config.bn_momentum is not None:
        # Short runs: at 0.99 the moving statistics that inference uses trail the weights by about
        # a hundred steps, and validation scores a model that does not exist.
        for layer in network.submodules:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                layer.momentum = config.bn_momentum
    inputs = tf.keras.Input((tile_size, tile_size, len(bands)), name="image", dtype="float32")
    normalised = IgnoreAwareNormalization(mean, std, name="normalise")(inputs)
    name = f"rts_{config.arch}_{config.encoder}"
    if augment:
        from rts_tf.augment import AugmentingModel, AugmentSettings

        return AugmentingModel(inputs, network(normalised), name=name, band_names=bands, settings=AugmentSettings(),
                               centre=mean)
    return tf.keras.Model(inputs, network(normalised), name=name)


def learning_rate(config: FitConfig, steps_per_epoch: int):
    import tensorflow as tf

    total = max(config.epochs * steps_per_epoch, 1)
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "step":
        step = config.schedule_step_epochs * steps_per_epoch
        return tf.keras.optimizers.schedules.ExponentialDecay(config.learning_rate, step, config.schedule_decay,
                                                              staircase=True)
    if config.schedule == "exponential":
        return tf.keras.optimizers.schedules.ExponentialDecay(config.learning_rate, total, config.schedule_decay)
    return tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, total)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(rts_tf.__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Everything fit (and evaluate) writes into a run folder: --overwrite removes these and nothing else.
RUN_FILES = (CONFIG_NAME, CONFIG_NAME + ".tmp", IDENTITY_NAME, RUN_NAME, RUN_NAME + ".tmp", "history.json", "history.json.tmp",
             "test_history.json", "test_history.json.tmp", MODEL_NAME, f"tmp-{MODEL_NAME}", "metrics.json",
             "metrics.json.tmp", "metrics.md")
RUN_FOLDERS = ("checkpoints", "backup", "saved_model", "saved_model.tmp", "train", "validation", "test", "images",
               "crossval")


def run_identity(config: FitConfig, manifest: dict) -> dict:
    """What makes a run this run: every setting that changes what is trained (not how it is run,
    see settings.RUNTIME_OPTIONS) and the records' content by checksum (not their path)."""
    identity = {key: value for key, value in asdict(config).items() if key not in RUNTIME_OPTIONS}
    return {**identity, "records": records_fingerprint(manifest)}


def check_run_folder(config: FitConfig, manifest: dict, overwrite: bool) -> str:
    """What to do with --logdir, deciding without changing anything: 'new', 'resume', 'complete'
    or 'replace'. A non-empty folder that holds no run is refused, with or without --overwrite.
    A run resumes when its identity (`run_identity`) is the same; runtime options may differ."""
    logdir = Path(config.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise InputError(f"{logdir}: exists and is not a folder")
    if not logdir.exists() or not any(logdir.iterdir()):
        return "new"
    saved = logdir / CONFIG_NAME
    if not saved.exists() and not (logdir / RUN_NAME).exists():
        raise InputError(f"{logdir}: folder is not empty and holds no rts-tf run (no {CONFIG_NAME}); choose a new "
                         "or empty --logdir (nothing was changed)")
    if overwrite:
        return "replace"
    wanted = run_identity(config, manifest)
    try:
        previous = json.loads((logdir / IDENTITY_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        try:  # a run from before identity.json: its configuration, records by path
            previous = yaml.safe_load(saved.read_text()) if saved.exists() else None
        except (OSError, yaml.YAMLError):
            previous = None
        if isinstance(previous, dict):
            same_records = Path(str(config.records)).resolve() == Path(str(previous.get("records", ""))).resolve()
            previous = {k: v for k, v in previous.items() if k not in RUNTIME_OPTIONS}
            previous["records"] = wanted["records"] if same_records else None
    if previous == wanted:
        run = logdir / RUN_NAME
        complete = run.exists() and json.loads(run.read_text()).get("complete", False)
        return "complete" if complete else "resume"
    if not run_started(logdir):
        return "replace"  # the configuration of a run that never finished an epoch
    previous = previous if isinstance(previous, dict) else {}
    differs = sorted(k for k in wanted if previous.get(k) != wanted[k])
    named = ", ".join("records content" if k == "records" else k for k in differs)
    raise InputError(f"{logdir}: holds a run with another configuration ({named}); "
                     "use --overwrite or another --logdir")


def run_started(logdir: Path) -> bool:
    """True when a run folder holds a finished epoch (or a finished run)."""
    try:
        epochs = json.loads((logdir / "history.json").read_text())
    except (OSError, json.JSONDecodeError):
        epochs = []
    return bool(epochs) or (logdir / RUN_NAME).exists()


def start_run_folder(config: FitConfig, manifest: dict, mode: str) -> Path:
    """Create or clear the run folder (only the files a run writes) and save the configuration
    (config.yaml, the latest runtime options included) and the run's identity."""
    logdir = Path(config.logdir)
    if mode == "replace":
        remove_run_files(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # Every worker of a multi-worker run writes them: each under a temporary name of its own.
    write_text(logdir / CONFIG_NAME, yaml.safe_dump(asdict(config), sort_keys=False), unique=True)
    if mode != "resume" or not (logdir / IDENTITY_NAME).exists():
        write_json(logdir / IDENTITY_NAME, run_identity(config, manifest), unique=True)
    return logdir


def remove_run_files(logdir: Path) -> None:
    """Delete what fit and evaluate write in a run folder, by name; other files stay."""
    for name in RUN_FILES:
        (logdir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (logdir / name).is_dir():
            shutil.rmtree(logdir / name)
    for events in logdir.glob("events.out.tfevents.*"):
        events.unlink()


def fit(config: FitConfig, overwrite: bool = False, callbacks=(), verify: bool = False) -> FitResult:
    """Train a model on records and write a self-contained run folder (model.keras, run.json,
    saved_model/, TensorBoard logs, checkpoints). Re-running resumes an interrupted run.

    The held-out region (--holdout-region) is a test set: the checkpoint, early stopping and the
    threshold are chosen on validation data drawn from the training regions (see
    dataset.split_data); the held-out region is only scored for TensorBoard's `test` curves.
    `callbacks` run first at every step (tests use them to script or interrupt a run).
    The run folder is locked for the run (rts_tf.locks): a second fit into it refuses at once.
    """
    from rts_tf.locks import folder_lock, is_chief_task

    check_config(config)
    # The workers of one multi-worker run share its folder: the chief holds the lock.
    with folder_lock(config.logdir, "--logdir") if is_chief_task() else contextlib.nullcontext():
        return train_run(config, overwrite, callbacks, verify)


def train_run(config: FitConfig, overwrite: bool, callbacks, verify: bool) -> FitResult:
    """fit() once its run folder is locked."""
    started = time.perf_counter()
    config, manifest = choose_bands(config, read_manifest(config.records))
    from rts_tf.dataset import check_shards, make_dataset, normalisation, split_data

    if not any(scene["tiles"] for scene in manifest["scenes"]):
        raise InputError(f"{config.records}: the records hold no tiles")
    split = split_data(manifest, config.holdout_region, config.train_regions, config.val_regions, config.val_split,
                       config.val_fraction, config.seed, config.validate_on_training_data)
    # Every shard the run will read is checked at once, so that all damaged ones are named together.
    check_shards(manifest, sorted({*split.train.shards(manifest), *split.validation.shards(manifest),
                                   *(split.test.shards(manifest) if split.test and config.test_curves else [])}),
                 config.records, verify)
    # Nothing is written before the configuration, the data and the model have been checked.
    mode = check_run_folder(config, manifest, overwrite)
    logdir = Path(config.logdir)
    if mode == "complete":
        run = json.loads((logdir / RUN_NAME).read_text())
        return FitResult(str(logdir), run["epochs_run"], run["best_epoch"], run["metrics"], skipped=True,
                         split=run.get("split", {}).get("description", ""))

    import tensorflow as tf

    from rts_tf.losses import get_loss
    from rts_tf.metrics import segmentation_metrics

    # Same seed, same machine: the same weights and scores, bit for bit (--no-deterministic: faster
    # on GPUs, whose fastest kernels may add in any order). Not under --xla: TensorFlow refuses to
    # compile MaxPool's gradient with op determinism on ("no deterministic XLA implementation").
    set_determinism(config.deterministic and not config.xla)
    tf.keras.utils.set_random_seed(config.seed)
    strategy = make_strategy(config)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    if config.global_batch_size is not None:
        if config.global_batch_size % replicas:
            raise InputError(f"--global-batch-size {config.global_batch_size} is not divisible by the "
                             f"{replicas} replicas")
        global_batch = config.global_batch_size
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tile_size, bands = manifest["tile_size"], [b["name"] for b in manifest["bands"]]
        mean, std = normalisation(manifest, split.train_regions)
        train_tiles, train_slumps = split.train.tile_count(manifest)
        if not split.validation.tile_count(manifest)[0]:
            raise InputError(f"{config.records}: the validation data ({split.describe()}) holds no tiles; "
                             "give --val-regions or another --val-split")
        epoch_tiles = train_tiles + (config.oversample_slumps - 1) * train_slumps
        steps = config.steps_per_epoch or max(epoch_tiles // global_batch, 1)
        if epoch_tiles < global_batch:
            raise InputError(f"{config.records}: {epoch_tiles} training tiles are fewer than one global batch "
                             f"({global_batch}); lower --batch-size")
        exact = exact_epochs(config, manifest)
        first_epoch = resume_epoch(logdir / "backup") if mode == "resume" else 0
        train = training_data(config, manifest, split.train, global_batch, mean,
                              (first_epoch, config.epochs) if exact else None, verify)
        validation = make_dataset(config.records, manifest, split.validation, global_batch, training=False,
                                  verify=verify, pad_batches=replicas > 1)
        validation = validation.with_options(distribute_options())

        with strategy.scope():
            model = build_segmenter(config, bands, tile_size, mean, std, heads=True,
                                    augment=config.augment and config.augment_on == "device")
            optimizer = tf.keras.optimizers.AdamW(learning_rate(config, steps), weight_decay=config.weight_decay)
            model.compile(optimizer=optimizer, loss=get_loss(config.loss), metrics=segmentation_metrics(),
                          jit_compile=config.xla)

        start_run_folder(config, manifest, mode)
        chief = is_chief(strategy)
        writable = logdir if chief else Path(tempfile_dir(logdir))
        checkpoints = writable / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        hparams = {"arch": config.arch, "encoder": config.encoder, "holdout_region": config.holdout_region or "",
                   "learning_rate": config.learning_rate, "loss": config.loss, "batch_size": global_batch}
        from rts_tf.monitor import BestCheckpoint, CheckpointCleanup, EpochLog, ImagePanels, LearningRateLogger, \
            LocalCopy, ResumableEarlyStopping, TestCurves, TrainingDone, best_epoch, hparams_callback, \
            prune_checkpoints

        history_log = EpochLog(writable / "history.json")
        # The chief's own inference (test curves, image panels) on a copy of the model made outside
        # a multi-worker strategy: a call of the distributed model runs collective ops that the
        # other workers never join. Elsewhere the model itself is called.
        inference = LocalCopy(build_segmenter(config, bands, tile_size, mean, std, heads=True)) \
            if os.environ.get("TF_CONFIG") else None
        test_curves = None
        if split.test is not None and config.test_curves:
            test_curves = TestCurves(config.records, manifest, split.test.scenes, bands, writable / "test",
                                     writable / "test_history.json", global_batch, enabled=chief,
                                     inference=inference)
        trained = checkpoints / TRAINED_NAME
        done = mode == "resume" and trained.exists()
        if not done:
            # Epochs after the backup's are trained again: a kill between an epoch's log and its
            # backup must not leave that epoch's values (or its best checkpoint) behind.
            for log in (history_log, test_curves.log if test_curves else None):
                if log is not None:
                    log.truncate(first_epoch)
            prune_checkpoints(checkpoints, best_epoch(history_log.epochs), after=first_epoch)
            trained.unlink(missing_ok=True)
            keras_callbacks = [
                *callbacks,
                LearningRateLogger(),
                history_log,
                tf.keras.callbacks.TensorBoard(str(writable), histogram_freq=0, write_graph=False,
                                               profile_batch=(2, 4) if config.profile else 0),
                BestCheckpoint(checkpoints, history_log),
                tf.keras.callbacks.ModelCheckpoint(str(checkpoints / "last.h5"), save_weights_only=True),
                hparams_callback(writable, hparams, logdir.name),
                *([inference] if inference is not None else []),  # on every worker, before the chief's use
            ]
            if config.image_every > 0 and chief:
                keras_callbacks.append(ImagePanels(validation, bands, writable / "images", config.image_every,
                                                   config.image_tiles, inference=inference))
            if config.early_stopping > 0:
                keras_callbacks.append(ResumableEarlyStopping(history_log, monitor="val_iou", mode="max",
                                                              patience=config.early_stopping))
            if test_curves is not None:
                keras_callbacks.append(test_curves)
            keras_callbacks.append(TrainingDone(trained, history_log))
            # Then the backup: an epoch counts as done for a resume only once everything above is
            # written; last, the best-epoch files that no resume can need any more are removed.
            keras_callbacks.append(tf.keras.callbacks.BackupAndRestore(str(logdir / "backup")))
            keras_callbacks.append(CheckpointCleanup(checkpoints, history_log))
            # The epoch stream is one iterator over all epochs with exactly `steps` batches each; without
            # exact counts a finite dataset is re-iterated each epoch, and --steps-per-epoch repeats it.
            try:
                model.fit(train, validation_data=validation, epochs=config.epochs,
                          steps_per_epoch=config.steps_per_epoch or (steps if exact else None),
                          callbacks=keras_callbacks, verbose=2)
            except tf.errors.DataLossError as error:
                raise damaged_shard_error(config, manifest, split, error) from None

        history = history_log.history()
        if test_curves is not None:
            history.update({f"test_{key}": values for key, values in test_curves.history().items()})
        best = best_epoch(history_log.epochs) or len(history_log.epochs)
        metrics = {k[4:]: float(v[best - 1]) for k, v in history.items() if k.startswith("val_")}
        result = FitResult(str(logdir), len(history_log.epochs), best, metrics,
                           resumed_from=first_epoch, seconds=time.perf_counter() - started, history=history,
                           split=split.describe(manifest))
        if chief:
            # The saved model is rebuilt outside the strategy and given the best epoch's weights, in
            # float32 whatever the training policy (mixed precision keeps float32 weights): prediction,
            # export and evaluation then need no policy and run at float32 speed on CPUs.
            tf.keras.mixed_precision.set_global_policy("float32")
            final = build_segmenter(config, bands, tile_size, mean, std)
            best_file = BestCheckpoint.path(checkpoints, best)
            final.load_weights(str(best_file if best_file.exists() else checkpoints / "last.h5"))
            save_run(final, config, manifest, split, mean, std, result, global_batch, replicas)
            trained.unlink(missing_ok=True)
        else:
            shutil.rmtree(writable, ignore_errors=True)  # a non-chief worker's scratch copies
        return result
    finally:
        if config.mixed_precision:
            tf.keras.mixed_precision.set_global_policy("float32")


def exact_epochs(config: FitConfig, manifest: dict) -> bool:
    """True with exact tile counts (manifests that list tile positions): an epoch is then exactly
    `steps` batches of a stream that is a function of (seed, epoch), and a resumed run goes on with
    the very batches an uninterrupted run would have seen."""
    return not config.steps_per_epoch and all(len(p) == 3 for scene in manifest["scenes"]
                                              for p in scene.get("positions", [[]]))


def training_data(config: FitConfig, manifest: dict, selection, global_batch: int, mean,
                  epochs: tuple[int, int] | None, verify: bool = False):
    """The training batches `fit` reads (benchmarks/input_pipeline.py measures this very pipeline):
    with --augment-on device (image, label, seeds), augmented in the training step."""
    from rts_tf.augment import AugmentSettings
    from rts_tf.dataset import make_dataset

    train = make_dataset(config.records, manifest, selection, global_batch, training=True, seed=config.seed,
                         augment_settings=AugmentSettings() if config.augment else None,
                         oversample_slumps=config.oversample_slumps, cache=config.cache,
                         shuffle_buffer=config.shuffle_buffer, verify=verify, mean=mean, epochs=epochs,
                         augment_on=config.augment_on)
    if config.steps_per_epoch:
        train = train.repeat()
    return train.with_options(distribute_options())


def distribute_options():
    """Each replica (worker) reads its part of every batch."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def damaged_shard_error(config: FitConfig, manifest: dict, split, error: Exception) -> InputError:
    """The one-line error for a shard that tf.data found corrupt while training (it names no file):
    the shards that fail their checksum, found by verifying every shard the run reads."""
    from rts_tf.dataset import check_shards

    shards = sorted({*split.train.shards(manifest), *split.validation.shards(manifest),
                     *(split.test.shards(manifest) if split.test and config.test_curves else [])})
    resume = "; rebuild it with the same build-records command, then run fit again to resume"
    try:
        check_shards(manifest, shards, config.records, verify=True)
    except InputError as damaged:
        return InputError(f"{damaged} (training stopped on corrupt data{resume})")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else "DataLossError"
    return InputError(f"{config.records}: a shard is corrupt although every checksum matches the manifest "
                      f"({reason}){resume}")


def choose_bands(config: FitConfig, manifest: dict) -> tuple[FitConfig, dict]:
    """The configuration with its --bands resolved against the records (canonical names; None when
    they are all the records' bands) and the manifest as the run reads it: only those bands (see
    records.select_bands), so normalisation, the model's input and image panels follow them."""
    if config.bands is None:
        return config, manifest
    from rts_tf.bands import parse_bands

    available = [band["name"] for band in manifest["bands"]]
    try:
        bands = parse_bands(config.bands, available)
    except ValueError as error:
        raise InputError(f"--bands: {error}") from None
    view = select_bands(manifest, bands, str(config.records))
    return replace(config, bands=None if bands == available else bands), view


def set_determinism(on: bool) -> None:
    """Deterministic TensorFlow ops on or off for this process (TF_DETERMINISTIC_OPS=1 also turns them on)."""
    import tensorflow as tf
    from tensorflow.python.framework import config as framework_config

    if on or os.environ.get("TF_DETERMINISTIC_OPS", "").lower() in ("1", "true"):
        tf.config.experimental.enable_op_determinism()
    else:
        framework_config.disable_op_determinism()


def resume_epoch(backup: Path) -> int:
    """The epoch BackupAndRestore will resume at: one after the epoch of its last backup, or 0."""
    import tensorflow as tf

    checkpoint = tf.train.latest_checkpoint(str(backup / "chief"))
    if checkpoint is None:
        return 0
    return int(tf.train.load_variable(checkpoint, "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")) + 1


def tempfile_dir(logdir: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"{logdir.name}-worker-")


def save_run(model, config: FitConfig, manifest: dict, split, mean, std, result: FitResult,
             global_batch: int, replicas: int) -> None:
    """model.keras, saved_model/ and run.json: everything prediction needs."""
    from rts_tf.evaluate import SCORER
    from rts_tf.inference import manifest_recipe

    logdir = Path(config.logdir)
    temporary = logdir / f"tmp-{MODEL_NAME}"
    model.save(str(temporary))
    temporary.replace(logdir / MODEL_NAME)
    export = logdir / "saved_model"
    staging = logdir / "saved_model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every signature of the export
        model.export(str(staging))
    shutil.rmtree(export, ignore_errors=True)
    staging.replace(export)
    run = {
        "complete": True,
        "rts_tf_version": rts_tf.__version__,
        "git_commit": git_commit(),
        "model": MODEL_NAME,
        "saved_model": "saved_model",
        "arch": config.arch,
        "encoder": config.encoder,
        "tile_size": manifest["tile_size"],
        "overlap": manifest["overlap"],
        "bands": manifest["bands"],
        "normalisation": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "label_values": manifest["label_values"],
        **dict(zip(("threshold", "threshold_source"), validation_threshold(result.metrics))),
        "test_scorer": SCORER,
        "records": str(Path(config.records).resolve()),
        # How the bands were made: predict and evaluate rebuild scenes with exactly this recipe.
        "recipe": manifest_recipe(manifest, split.train_regions),  # with the sensors trained on
        "build_settings": manifest.get("settings", {}),
        "regions": {"train": list(split.train_regions), "validation": list(split.validation_regions),
                    "test": [split.test_region] if split.test_region else []},
        "split": split.summary(manifest),
        "holdout_region": config.holdout_region,
        "global_batch_size": global_batch,
        "replicas": replicas,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "metrics": result.metrics,
        "history": result.history,
        "config": asdict(config),
    }
    write_json(logdir / RUN_NAME, run)
    shutil.rmtree(logdir / "backup", ignore_errors=True)  # BackupAndRestore leaves an empty folder


def validation_threshold(metrics: dict) -> tuple[float, str]:
    """The threshold a run keeps and where it comes from: the best of the validation sweep at the
    best epoch, unless the sweep was flat (every threshold gave the same IoU, for example 0 on
    validation data the model finds nothing in): then 0.5, said so, and a warning."""
    import warnings

    spread = metrics.get("iou_spread")
    if spread is not None and spread <= 0.0:
        warnings.warn(f"the validation threshold sweep was flat (IoU {metrics.get('best_iou', 0.0):.3f} at every "
                      "threshold): the run keeps 0.5, not a threshold selected on validation", stacklevel=2)
        return 0.5, f"0.5: the validation sweep was flat (IoU {metrics.get('best_iou', 0.0):.3f} at every threshold)"
    return float(metrics.get("best_threshold", 0.5)), "best threshold of the validation data at the best epoch"


def load_config_file(path: str) -> dict[str, Any]:
    from rts_tf.config import load_config

    return load_config(path, FitConfig.keys())
