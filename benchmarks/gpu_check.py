"""GPU check: a short fit under MirroredStrategy with mixed precision and XLA, and what limits it.

Run by hand:  .venv/bin/python benchmarks/gpu_check.py [--arch unet] [--encoder resnet34] [--batch-size 8]
                  [--steps 30] [--warmup 3] [--tile-size 256] [--tiles 128] [--no-mixed-precision] [--no-xla]
                  [--logical-cpus 2] [--decoder-filters 256,128,64,32,16] [--records-cache DIR]

Writes synthetic records of ``--tiles`` textured tiles with rts-tf's own schema (10 bands, as
benchmarks/input_pipeline.py does, at any tile size) once under ``--records-cache``, then trains the
model that ``rts-tf fit`` trains (normalisation layer + network, AdamW, focal loss, the per-epoch
metrics, fit's tf.data pipeline, augmentation in the training step) under ``MirroredStrategy`` over
all visible GPUs, or, on a machine without a GPU, over ``--logical-cpus`` logical CPU devices (fit's
``--logical-cpus``), with the ``mixed_float16`` policy and ``jit_compile=True`` (XLA; except over
several logical CPU devices, which TensorFlow's XLA cannot do: it says so and runs without it):

1. ``--warmup`` steps on one batch held in memory (tracing and XLA compilation), then ``--steps`` timed
   steps on it: the step time without the input pipeline;
2. ``--steps`` timed steps on the records (after ``--warmup`` untimed ones that fill the pipeline's
   buffers): the step time of a real fit;
3. the input pipeline alone, iterated for ``--steps`` global batches on the host.

It prints the step time (median, and CPU seconds of the process per step), images/s per device
(per GPU, or per logical CPU device), the input pipeline's share of the step (1 - step on the cached
batch / step on the records: the time the step waits for data or loses to the pipeline's CPU use),
the rate of the pipeline alone, and the peak memory: ``tf.config.experimental.get_memory_info``'s
peak of every GPU, or without a GPU the peak resident set size of the process (said so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the rts-tf command line does
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_records(folder: Path, tiles: int, tile_size: int) -> None:
    """Records of ``tiles`` textured tiles of ``tile_size`` px in two regions, written with rts-tf's schema."""
    import numpy as np

    from rts_tf.bands import BANDS
    from rts_tf.records import BandStatistics, ShardWriter, encode_example, features

    from input_pipeline import textured_tile  # benchmarks/, this script's folder

    if (folder / "manifest.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, scenes, statistics_ = {}, [], BandStatistics(len(BANDS))
    scene_count = min(8, max(tiles // 2, 2))
    for index in range(scene_count):
        region = "A" if index % 2 else "B"
        path = f"{region}/scene{index}.tfrecord"
        writer = ShardWriter(folder / path, "", 1)
        count = tiles // scene_count
        for tile in range(count):
            values, parts, label = textured_tile(rng, tile_size)
            statistics_.update(values.reshape(-1, 10).astype(np.float64))
            writer.write(encode_example(parts, label, scene_id=f"scene{index}", region=region, site=region,
                                        row=tile * tile_size, col=0, slump_pixels=int(label.sum()), ignored_pixels=0))
        shards[path] = {**writer.close(), "region": region, "scene_id": f"scene{index}"}
        scenes.append({"scene_id": f"scene{index}", "region": region, "tiles": count, "slump_tiles": count,
                       "shards": [path]})
    stats = statistics_.to_dict()
    manifest = {"schema_version": 2, "tile_size": tile_size, "overlap": 0, "compression": "",
                "bands": BANDS, "features": features(tile_size), "regions": {"A": {}, "B": {}}, "scenes": scenes,
                "shards": shards, "statistics": {"overall": stats, "regions": {"A": stats, "B": stats}}}
    temporary = folder / "manifest.json.tmp"
    temporary.write_text(json.dumps(manifest))
    temporary.replace(folder / "manifest.json")


class StepTimes:
    """A Keras callback keeping the wall and CPU time at the end of every training step."""

    def __new__(cls):
        import tensorflow as tf

        class _StepTimes(tf.keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.ends: list[tuple[float, float]] = []

            def on_train_batch_end(self, batch, logs=None):
                self.loss = float(logs["loss"])  # reading the loss waits for the step to finish
                self.ends.append((time.perf_counter(), cpu_seconds()))

        return _StepTimes()


def timed(model, dataset, steps: int, skip: int) -> tuple[float, float, float, float]:
    """Median wall seconds per step, CPU seconds per step and the last loss of ``steps`` steps after
    ``skip`` (at least 1) untimed ones, and the seconds from the call to the end of those."""
    timer = StepTimes()
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=skip + steps, callbacks=[timer], verbose=0)
    ends = timer.ends[skip - 1:]  # the end of the last untimed step starts the first timed one
    walls = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = (ends[-1][1] - ends[0][1]) / steps
    return statistics.median(walls), cpu, timer.loss, ends[0][0] - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--decoder-filters", default=None, help="comma-separated, as fit's --decoder-filters")
    parser.add_argument("--batch-size", type=int, default=8, help="per replica, as fit's --batch-size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=128, help="tiles in the synthetic records (repeated)")
    parser.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false")
    parser.add_argument("--no-xla", dest="xla", action="store_false")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--logical-cpus", type=int, default=2, help="devices to split the CPU into without a GPU")
    parser.add_argument("--records-cache", type=Path, default=Path(tempfile.gettempdir()) / "rts-tf-gpu-check")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.warmup < 1 or args.batch_size < 1:
        parser.error("--steps must be at least 2, --warmup and --batch-size at least 1")

    import tensorflow as tf

    from rts_tf.dataset import Selection, normalisation
    from rts_tf.losses import get_loss
    from rts_tf.metrics import segmentation_metrics
    from rts_tf.settings import FitConfig
    from rts_tf.train import build_segmenter, learning_rate, make_strategy, training_data

    tf.keras.utils.set_random_seed(0)  # the same weights every run, as fit's --seed 0
    gpus = tf.config.list_physical_devices("GPU")
    decoder_filters = [int(v) for v in args.decoder_filters.split(",")] if args.decoder_filters else None
    config = FitConfig(arch=args.arch, encoder=args.encoder, decoder_filters=decoder_filters,
                       batch_size=args.batch_size, mixed_precision=args.mixed_precision, xla=args.xla,
                       logical_cpus=0 if gpus else args.logical_cpus, schedule="constant")
    strategy = make_strategy(config)
    if gpus and not isinstance(strategy, tf.distribute.MirroredStrategy):
        strategy = tf.distribute.MirroredStrategy()  # one GPU: mirrored all the same, as on several
    replicas = strategy.num_replicas_in_sync
    xla, xla_note = args.xla, ""
    if xla and not gpus and replicas > 1:
        # TensorFlow 2.15 runs an XLA-compiled function on the host's CPU:0 whatever logical CPU device
        # it is placed on, and it cannot read the variables of the replicas on CPU:1, ... ("Trying to
        # access resource ... located in device CPU:1 from device CPU:0"). Each GPU is its own XLA device.
        xla, xla_note = False, (" (requested, but XLA cannot run a MirroredStrategy over logical CPU devices: "
                                "it runs every compiled step on CPU:0; use --logical-cpus 1, or a GPU)")
    global_batch = args.batch_size * replicas
    devices = f"{len(gpus)} GPU ({', '.join(d.name for d in gpus)})" if gpus else \
        f"{replicas} logical CPU device{'s' if replicas > 1 else ''} (no GPU visible)"

    records = args.records_cache / f"tiles{args.tiles}_{args.tile_size}px"
    make_records(records, args.tiles, args.tile_size)
    manifest = json.loads((records / "manifest.json").read_text())
    bands = [band["name"] for band in manifest["bands"]]
    regions = list(manifest["regions"])
    mean, std = normalisation(manifest, regions)
    # The training input of fit (train.training_data): shuffled, batched per global batch, sharded by
    # data, each tile's seed handed to the training step, which augments (--augment-on device).
    config = replace(config, records=str(records), augment=args.augment)
    dataset = training_data(config, manifest, Selection(tuple(s["scene_id"] for s in manifest["scenes"])),
                            global_batch, mean, None).repeat()
    cached = dataset.take(1).cache().repeat()

    if args.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    with strategy.scope():
        model = build_segmenter(config, bands, args.tile_size, mean, std, heads=True, augment=args.augment)
        optimizer = tf.keras.optimizers.AdamW(learning_rate(config, args.steps), weight_decay=config.weight_decay)
        model.compile(optimizer=optimizer, loss=get_loss(config.loss), metrics=segmentation_metrics(),
                      jit_compile=xla)
    for gpu in range(len(gpus)):
        tf.config.experimental.reset_memory_stats(f"GPU:{gpu}")

    cached_step, cached_cpu, _, compile_seconds = timed(model, cached, args.steps, args.warmup)
    step, step_cpu, loss, _ = timed(model, dataset, args.steps, args.warmup)
    iterator = iter(dataset)
    next(iterator)
    pipeline_started = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    pipeline_rate = args.steps * global_batch / (time.perf_counter() - pipeline_started)

    output_dtype = tf.as_dtype(model.output.dtype).name
    print(f"gpu_check: {args.arch}-{args.encoder}, {args.tile_size} px tiles, {len(bands)} bands, batch "
          f"{args.batch_size} per replica (global {global_batch}), {args.steps} timed steps after {args.warmup} "
          f"warm-up steps, augmentation {'in the training step' if args.augment else 'off'}")
    print(f"devices: {devices}")
    print(f"replicas: {replicas}")
    print(f"policy: {tf.keras.mixed_precision.global_policy().name} (model output {output_dtype}, "
          f"optimizer {type(model.optimizer).__name__})")
    print(f"xla: {'on' if xla else 'off'}{xla_note}")
    plural = "s" if args.warmup > 1 else ""
    print(f"tracing, compilation and {args.warmup} warm-up step{plural}: {compile_seconds:.1f} s")
    print(f"loss: {loss:.4f}")
    print(f"step time: {step * 1000:.1f} ms median with the input pipeline (CPU {step_cpu:.2f} s per step), "
          f"{cached_step * 1000:.1f} ms on one cached batch (CPU {cached_cpu:.2f} s per step)")
    per = "GPU" if gpus else "device"
    print(f"images/s per {per}: {global_batch / step / replicas:.3g} ({global_batch / step:.3g} in all)")
    share = max(0.0, 1.0 - cached_step / step)
    print(f"input pipeline share: {100 * share:.1f}% of the step (the pipeline alone: {pipeline_rate:.1f} tiles/s)")
    if gpus:
        peaks = [tf.config.experimental.get_memory_info(f"GPU:{gpu}")["peak"] / 2**20 for gpu in range(len(gpus))]
        print(f"peak memory: {max(peaks):.0f} MiB GPU (per GPU: {', '.join(f'{p:.0f}' for p in peaks)} MiB)")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"peak memory: {rss:.0f} MiB peak RSS of the process (no GPU: host memory instead of GPU memory)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
