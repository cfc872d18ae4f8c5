"""Benchmark of the tf.data input pipeline that `fit` trains on: tiles per second from records to batches.

Run by hand:  .venv/bin/python benchmarks/input_pipeline.py [--tiles 1600] [--compression none]

Writes 256 x 256 x 10 records of schema 2 (textured, like real tiles: uint16 reflectance, int16
NDVI, uint8 TCVIS, float16 terrain; uncompressed unless --compression gzip; tile positions
listed, as build-records writes them) once under a cache folder, then times one pass over the
training batches (batch 16) that `fit` reads (rts_tf.train.training_data, with fit's own split of
these records), with TensorFlow limited to one core and to two cores, each in its own child
process (thread pools are fixed at start-up):

- augmentation off;
- augmentation on, the default `--augment-on device`: the pipeline reads, parses, converts and
  hands each tile's seed to the training step (this is fit's pipeline with augmentation on);
- augmentation on host (`--augment-on host`): the pipeline also augments.

Beside it, the CPU cost of the training step's augmentation (`AugmentingModel`: the device ops
on a batch of 16, traced, and compiled with XLA as under --xla) on this CPU, per step and per
tile: what a GPU takes over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import tensorflow as tf
cores, mode, records = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tf.config.threading.set_intra_op_parallelism_threads(cores)
tf.config.threading.set_inter_op_parallelism_threads(cores)
from rts_tf.dataset import normalisation, split_data
from rts_tf.settings import FitConfig
from rts_tf.train import exact_epochs, training_data
manifest = json.load(open(f"{records}/manifest.json"))
config = FitConfig(records=records, logdir="-", batch_size=16, augment=mode != "off",
                   augment_on="host" if mode == "host" else "device")
split = split_data(manifest)
mean, _ = normalisation(manifest, split.train_regions)
options = tf.data.Options()
options.threading.private_threadpool_size = cores
def run():
    dataset = training_data(config, manifest, split.train, 16, mean, (0, 1) if exact_epochs(config, manifest) else None)
    count = 0
    for batch in dataset.with_options(options):
        count += int(batch[0].shape[0])
    return count
run()  # warm-up: tracing and file cache
started, cpu = time.perf_counter(), time.process_time()
count = run()
print(json.dumps({"tiles": count, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}))
"""

STEP = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
cores = int(sys.argv[1])
tf.config.threading.set_intra_op_parallelism_threads(cores)
tf.config.threading.set_inter_op_parallelism_threads(cores)
from rts_tf.augment import AugmentSettings, augment_batch
from rts_tf.bands import BAND_NAMES
rng = np.random.default_rng(0)
centre = np.array([0.04, 0.06, 0.05, 0.25, 0.6, 120, 140, 110, 0.0, 4.0], np.float32)
images = tf.constant((centre * rng.uniform(0.7, 1.3, (16, 256, 256, 10))).astype(np.float32))
labels = tf.constant((rng.uniform(size=(16, 256, 256, 1)) > 0.9).astype(np.uint8))
result = {}
for name, xla in (("traced", False), ("xla", True)):
    step = tf.function(lambda images, labels, seeds: augment_batch(images, labels, seeds, BAND_NAMES,
                       AugmentSettings(), tf.constant(centre), device=True), jit_compile=xla)
    seeds = lambda k: tf.constant(np.stack([np.arange(16) + 16 * k, np.full(16, 5)], 1), tf.int64)
    step(images, labels, seeds(0))[0].numpy()
    started, cpu = time.perf_counter(), time.process_time()
    for k in range(1, 11):
        step(images, labels, seeds(k))[0].numpy()
    result[name] = {"seconds": (time.perf_counter() - started) / 10, "cpu": (time.process_time() - cpu) / 10}
print(json.dumps(result))
"""


SCALE = (500, 700, 600, 2500, 0.6, 110, 148, 107, 1.0, 4.0)  # the ten bands' typical physical values


def textured_tile(rng, tile_size: int):
    """One textured tile like a real one (smooth patches of 1/16 of the tile, 2% noise), in physical
    units: (values (tile_size, tile_size, 10) float, {feature key: stored part}, label uint8)."""
    import numpy as np

    from rts_tf.records import IMAGE_PARTS

    block = max(tile_size // 16, 1)
    smooth = rng.normal(1, 0.2, (tile_size // block, tile_size // block, 10)).repeat(block, 0).repeat(block, 1)
    values = smooth * rng.normal(1, 0.02, smooth.shape) * np.array(SCALE, np.float32)
    parts, start = {}, 0
    for part in IMAGE_PARTS:
        stop = start + len(part.bands)
        parts[part.key] = values[..., start:stop].astype(part.dtype) if part.name == "reflectance" \
            else part.store(values[..., start:stop])
        start = stop
    return values, parts, (smooth[..., :1] > 1.2).astype(np.uint8)


def make_records(folder: Path, tiles: int, compression: str) -> None:
    """Records with `tiles` textured 256 px tiles in two regions, written with rts-tf's own schema."""
    import numpy as np

    from rts_tf.records import COMPRESSIONS, BandStatistics, ShardWriter, encode_example, features, shard_suffix
    from rts_tf.bands import BANDS

    if (folder / "manifest.json").exists():
        return
    rng = np.random.default_rng(0)
    shards, scenes = {}, []
    for index in range(8):
        region = "A" if index % 2 else "B"
        path = f"{region}/scene{index}{shard_suffix(COMPRESSIONS[compression])}"
        writer = ShardWriter(folder / path, COMPRESSIONS[compression], 1)
        positions, slumps = [], 0
        for tile in range(tiles // 8):
            _, parts, label = textured_tile(rng, 256)
            positions.append([tile * 256, 0, int(label.sum())])
            slumps += int(label.sum())
            writer.write(encode_example(parts, label, scene_id=f"scene{index}", region=region, site=region,
                                        row=tile * 256, col=0, slump_pixels=int(label.sum()), ignored_pixels=0))
        shards[path] = {**writer.close(), "region": region, "scene_id": f"scene{index}"}
        scenes.append({"scene_id": f"scene{index}", "region": region, "tiles": tiles // 8, "height": 256 * (tiles // 8),
                       "width": 256, "slump_tiles": tiles // 8, "slump_pixels": int(slumps), "shards": [path],
                       "positions": positions})
    stats = BandStatistics(10).to_dict()
    manifest = {"schema_version": 2, "tile_size": 256, "overlap": 0, "compression": COMPRESSIONS[compression],
                "bands": BANDS, "features": features(256), "regions": {"A": {}, "B": {}}, "scenes": scenes,
                "shards": shards, "statistics": {"overall": stats, "regions": {"A": stats, "B": stats}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rts-tf-benchmark/pipeline"))
    parser.add_argument("--tiles", type=int, default=1600)
    parser.add_argument("--compression", choices=["gzip", "none"], default="none")
    args = parser.parse_args()
    records = args.cache / f"v3_{args.compression}_{args.tiles}"
    make_records(records, args.tiles, args.compression)
    print(f"input pipeline of fit: {args.tiles} tiles of 256 x 256 x 10 (schema 2, compression {args.compression}), "
          "fit's training split, batch 16, one pass")
    for mode, text in (("off", "augmentation off              "), ("device", "augmentation on (device, fit) "),
                       ("host", "augmentation on host          ")):
        for cores in (1, 2):
            result = child(CHILD, cores, mode, str(records))
            rate = result["tiles"] / result["seconds"]
            print(f"  {text}, {cores} core{'s' if cores > 1 else ' '}: {rate:7.1f} tiles/s ({rate / cores:.1f} per "
                  f"core; {1000 * result['cpu'] / result['tiles']:.2f} ms CPU per tile)")
    step = child(STEP, 2)
    for name, text in (("traced", "traced"), ("xla", "XLA   ")):
        print(f"  training-step augmentation on this CPU, {text}, 2 cores: {1000 * step[name]['seconds']:6.1f} ms per "
              f"step of 16 ({1000 * step[name]['cpu']:.1f} ms CPU; {1000 * step[name]['cpu'] / 16:.2f} ms CPU per tile)")


def child(code: str, *arguments) -> dict:
    output = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(output.stderr[-2000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
