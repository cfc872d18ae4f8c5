"""Benchmark of the tf.data input pipeline: tiles per second from records to batches.

Run by hand:  .venv/bin/python benchmarks/input_pipeline.py [--tiles 2000] [--compression none]

Writes 256 x 256 x 10 records of schema 2 (textured, like real tiles: uint16 reflectance, int16
NDVI, uint8 TCVIS, float16 terrain; uncompressed unless --compression gzip) once under a cache
folder, then times full passes with and without
augmentation, with TensorFlow limited to one core and to two cores (each in its own child
process, as thread pools are fixed at start-up).
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
cores, augment, records = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
tf.config.threading.set_intra_op_parallelism_threads(cores)
tf.config.threading.set_inter_op_parallelism_threads(cores)
from rts_tf.augment import AugmentSettings
from rts_tf.dataset import make_dataset
manifest = json.load(open(f"{records}/manifest.json"))
options = tf.data.Options()
options.threading.private_threadpool_size = cores
def run():
    dataset = make_dataset(records, manifest, list(manifest["regions"]), 16, training=True,
                           augment_settings=AugmentSettings() if augment else None, verify=False)
    count = 0
    for images, labels in dataset.with_options(options):
        count += int(images.shape[0])
    return count
run()  # warm-up: tracing and file cache
started = time.perf_counter()
count = run()
print(json.dumps({"tiles": count, "seconds": time.perf_counter() - started}))
"""


def make_records(folder: Path, tiles: int, compression: str) -> None:
    """Records with `tiles` textured 256 px tiles in two regions, written with rts-tf's own schema."""
    import numpy as np

    from rts_tf.records import COMPRESSIONS, IMAGE_PARTS, BandStatistics, ShardWriter, encode_example, features, \
        shard_suffix
    from rts_tf.bands import BANDS

    if (folder / "manifest.json").exists():
        return
    rng = np.random.default_rng(0)
    scale = np.array([500, 700, 600, 2500, 0.6, 110, 148, 107, 1.0, 4.0], np.float32)
    shards, scenes = {}, []
    for index in range(8):
        region = "A" if index % 2 else "B"
        path = f"{region}/scene{index}{shard_suffix(COMPRESSIONS[compression])}"
        writer = ShardWriter(folder / path, COMPRESSIONS[compression], 1)
        for tile in range(tiles // 8):
            smooth = rng.normal(1, 0.2, (16, 16, 10)).repeat(16, 0).repeat(16, 1)
            values = smooth * rng.normal(1, 0.02, smooth.shape) * scale
            parts, start = {}, 0
            for part in IMAGE_PARTS:
                stop = start + len(part.bands)
                parts[part.key] = values[..., start:stop].astype(part.dtype) if part.name == "reflectance" \
                    else part.store(values[..., start:stop])
                start = stop
            label = (smooth[..., :1] > 1.2).astype(np.uint8)
            writer.write(encode_example(parts, label, scene_id=f"scene{index}", region=region, site=region,
                                        row=tile, col=0, slump_pixels=int(label.sum()), ignored_pixels=0))
        shards[path] = {**writer.close(), "region": region, "scene_id": f"scene{index}"}
        scenes.append({"scene_id": f"scene{index}", "region": region, "tiles": tiles // 8,
                       "slump_tiles": tiles // 8, "shards": [path]})
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
    records = args.cache / f"v2_{args.compression}_{args.tiles}"
    make_records(records, args.tiles, args.compression)
    print(f"input pipeline: {args.tiles} tiles of 256 x 256 x 10 (schema 2, compression {args.compression}), "
          "batch 16, one pass")
    for augment in (False, True):
        for cores in (1, 2):
            output = subprocess.run([sys.executable, "-c", CHILD, str(cores), str(int(augment)), str(records)],
                                    capture_output=True, text=True)
            if output.returncode:
                raise SystemExit(output.stderr[-2000:])
            result = json.loads(output.stdout.strip().splitlines()[-1])
            rate = result["tiles"] / result["seconds"]
            print(f"  augmentation {'on ' if augment else 'off'}, {cores} core{'s' if cores > 1 else ' '}: "
                  f"{rate:7.1f} tiles/s ({rate / cores:.1f} per core)")


if __name__ == "__main__":
    main()
