"""Benchmark of a training step on CPU: seconds per step and images per second for each architecture.

Run by hand:  .venv/bin/python benchmarks/train_step.py [--size 256] [--batch 8] [--warmup 1] [--steps 3]
                  [--encoder resnet34] [--arch unet unetpp deeplabv3 deeplabv3plus] [--train-on-batch]
                  [--output-stride 16|8]

Each architecture is built as `rts-tf fit` builds it (normalisation layer + network, weights from
seed 0), compiled with AdamW(1e-3) and the focal loss, and stepped on one random batch (N(0,1)
images, labels > 0.9, seed 0) as `model.fit` steps: Keras' train function on one tf.data iterator
that lives for all steps. After
the warm-up steps, one line per timed step (wall time, CPU time of this process, loss), then the
median. On a shared machine the CPU seconds per step are the steadier figure: the wall time
grows with other processes' load, the CPU time hardly.

--train-on-batch times `model.train_on_batch` instead, as earlier versions of this script did. It
makes a new tf.data iterator per call, and deleting one waits for the iterator's autotuning thread
to wake, which happens 10, 30, 70, ..., 1270, 2550, 5110, 10230 ms after the iterator was made
(its period doubles): in about half the calls a step then lasts until the next of those instants,
for example 2.55 s instead of 1.4 s, or 10.2 s instead of 6.4 s. `model.fit` keeps its iterator
for a whole epoch, so its steps do not pay this.

Prints whether TensorFlow's oneDNN CPU kernels are on (see `TF_ENABLE_ONEDNN_OPTS`; `rts-tf` turns
them on unless that variable is set).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--arch", nargs="*", default=["unet", "unetpp", "deeplabv3", "deeplabv3plus"])
    parser.add_argument("--train-on-batch", action="store_true", help="time model.train_on_batch (see above)")
    parser.add_argument("--output-stride", type=int, default=16, choices=[16, 8], help="DeepLab encoders' output stride")
    args = parser.parse_args()

    import tensorflow as tf

    from rts_tf.bands import BAND_NAMES
    from rts_tf.losses import focal
    from rts_tf.models.blocks import onednn_enabled
    from rts_tf.train import FitConfig, build_segmenter

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 10)).astype(np.float32)
    labels = (rng.random((args.batch, args.size, args.size, 1)) > 0.9).astype(np.uint8)
    how = "train_on_batch" if args.train_on_batch else "train function on one iterator, as model.fit"
    print(f"training step on CPU: {args.encoder}, {args.size} px x 10 bands, batch {args.batch} "
          f"[tensorflow {tf.__version__}, oneDNN {'on' if onednn_enabled() else 'off'}, {how}, "
          f"{args.warmup} warm-up + {args.steps} timed steps]", flush=True)
    for arch in args.arch:
        config = FitConfig(arch=arch, encoder=args.encoder, output_stride=args.output_stride)
        tf.keras.utils.set_random_seed(0)
        model = build_segmenter(config, BAND_NAMES, args.size, np.zeros(10), np.ones(10))
        model.compile(optimizer=tf.keras.optimizers.AdamW(1e-3), loss=focal)
        if args.train_on_batch:
            def step() -> float:
                return float(model.train_on_batch(images, labels))
        else:
            iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
            train_function = model.make_train_function()

            def step() -> float:
                model.reset_metrics()  # the step's own loss, as train_on_batch reports it
                return float(train_function(iterator)["loss"])

        for _ in range(args.warmup):
            step()
        walls, cpus = [], []
        for index in range(1, args.steps + 1):
            started, cpu_started = time.perf_counter(), cpu_seconds()
            loss = step()
            walls.append(time.perf_counter() - started)
            cpus.append(cpu_seconds() - cpu_started)
            print(f"    {arch} step {index}/{args.steps} {walls[-1]:7.3f} s  cpu {cpus[-1]:6.3f} s  loss {loss:.4f}",
                  flush=True)
        seconds = statistics.median(walls)
        print(f"  {arch:<14} {seconds:6.2f} s/step  {args.batch / seconds:6.2f} images/s  "
              f"({model.count_params() / 1e6:.1f} M parameters)  median of {args.steps}, "
              f"CPU {statistics.median(cpus):.2f} s/step", flush=True)
        tf.keras.backend.clear_session()


if __name__ == "__main__":
    main()
