"""Benchmark of a training step on CPU: images per second for each architecture with resnet34.

Run by hand:  .venv/bin/python benchmarks/train_step.py [--size 256] [--batch 8] [--steps 3]

Each architecture is built as `rts-tf fit` builds it (normalisation layer + network), compiled with
AdamW and the focal loss, and timed over a few train_on_batch steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--arch", nargs="*", default=["unet", "unetpp", "deeplabv3", "deeplabv3plus"])
    args = parser.parse_args()

    import tensorflow as tf

    from rts_tf.bands import BAND_NAMES
    from rts_tf.losses import focal
    from rts_tf.train import FitConfig, build_segmenter

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 10)).astype(np.float32)
    labels = (rng.random((args.batch, args.size, args.size, 1)) > 0.9).astype(np.uint8)
    print(f"training step on CPU: {args.encoder}, {args.size} px x 10 bands, batch {args.batch}")
    for arch in args.arch:
        config = FitConfig(arch=arch, encoder=args.encoder)
        model = build_segmenter(config, BAND_NAMES, args.size, np.zeros(10), np.ones(10))
        model.compile(optimizer=tf.keras.optimizers.AdamW(1e-3), loss=focal)
        model.train_on_batch(images, labels)
        started = time.perf_counter()
        for _ in range(args.steps):
            model.train_on_batch(images, labels)
        seconds = (time.perf_counter() - started) / args.steps
        print(f"  {arch:<14} {seconds:6.2f} s/step  {args.batch / seconds:6.2f} images/s  "
              f"({model.count_params() / 1e6:.1f} M parameters)")
        tf.keras.backend.clear_session()


if __name__ == "__main__":
    main()
