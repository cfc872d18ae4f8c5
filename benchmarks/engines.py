"""Benchmark of the engines: `build-records` and `predict` with `--engine local` and `--engine ray`.

Run by hand:  .venv/bin/python benchmarks/engines.py [--scenes 8] [--size 4096] [--predict-scenes 3]

Builds the same generated scenes (the textured scenes of benchmarks/build_records.py, cached) with
both engines at `--workers 2`, then predicts some of them with a UNet run (random weights: the cost
does not depend on them) with both engines. Each command runs in a child process from scratch, so
the Ray figures include starting and stopping the embedded one-machine Ray. Reports tiles/s,
km2/min and the engine's overhead: Ray's time over the local engine's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_records import make_dataset, run_measured  # noqa: E402
from predict import make_run  # noqa: E402

CELL_KM2 = 3 * 3 / 1e6  # a 3 m pixel


def build(data: Path, out: Path, engine: str, workers: int) -> dict:
    seconds, _ = run_measured([sys.executable, "-m", "rts_tf", "build-records", "--scenes", str(data / "scenes"),
                               "--labels", str(data / "labels.gpkg"), "--dem", str(data / "auxiliary" / "dem"),
                               "--tcvis", str(data / "auxiliary" / "tcvis"), "--out", str(out), "--overwrite",
                               "--workers", str(workers), "--engine", engine])
    manifest = json.loads((out / "manifest.json").read_text())
    tiles = sum(scene["tiles"] for scene in manifest["scenes"])
    km2 = sum(scene["width"] * scene["height"] for scene in manifest["scenes"]) * CELL_KM2
    return {"seconds": seconds, "tiles": tiles, "km2": km2}


def predict(run: Path, data: Path, scenes: Path, out: Path, engine: str, workers: int, tile: int) -> dict:
    from rts_tf.tiling import tile_offsets

    seconds, _ = run_measured([sys.executable, "-m", "rts_tf", "predict", "--run", str(run), "--scene", str(scenes),
                               "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
                               "--out", str(out), "--overwrite", "--engine", engine, "--workers", str(workers)])
    summary = json.loads((out / "summary.json").read_text())
    import rasterio

    tiles = km2 = 0
    for scene in summary["scenes"]:
        with rasterio.open(scene["probability"]) as dataset:
            tiles += len(tile_offsets(dataset.height, tile, tile // 4)) * len(tile_offsets(dataset.width, tile, tile // 4))
        km2 += scene["km2"]
    return {"seconds": seconds, "tiles": tiles, "km2": km2}


def report(what: str, local: dict, ray: dict) -> None:
    for name, result in (("local", local), ("ray", ray)):
        print(f"  {what}, --engine {name:5}: {result['seconds']:6.1f} s, {result['tiles'] / result['seconds']:6.1f} "
              f"tiles/s, {result['km2'] / result['seconds'] * 60:7.1f} km2/min")
    overhead = ray["seconds"] - local["seconds"]
    print(f"  {what}: Ray's overhead {overhead:+.1f} s = {100 * overhead / local['seconds']:+.1f}% of the local engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rts-tf-benchmark"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--predict-scenes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each command, the engines alternating; the fastest counts (the machine is shared)")
    parser.add_argument("--skip-predict", action="store_true")
    args = parser.parse_args()

    data = make_dataset(args.cache, args.size, args.scenes)
    print(f"engines: {args.scenes} scenes of {args.size} px, --workers {args.workers}, 256 px tiles, overlap 25 "
          "(build), UNet-{} with {} px windows (predict, {} scenes)".format(args.encoder, args.tile,
                                                                           args.predict_scenes))
    results = {}
    for _ in range(args.repeats):
        for engine in ("local", "ray"):
            run = build(data, args.cache / f"records_{engine}", engine, args.workers)
            results[engine] = min(results.get(engine, run), run, key=lambda r: r["seconds"])
    same = all((args.cache / "records_local" / path).read_bytes() == (args.cache / "records_ray" / path).read_bytes()
               for path in json.loads((args.cache / "records_local" / "manifest.json").read_text())["shards"])
    report("build-records", results["local"], results["ray"])
    print(f"  shards identical: {same}")
    if args.skip_predict:
        return

    scenes = args.cache / f"predict_scenes_{args.size}_{args.predict_scenes}"
    if not scenes.exists():
        scenes.mkdir(parents=True)
        for scene in sorted((data / "scenes").iterdir())[:args.predict_scenes]:
            (scenes / scene.name).symlink_to(scene.resolve())
    run = make_run(args.cache / f"run_v2_unet_{args.encoder}_{args.tile}", args.tile, args.encoder)
    results = {}
    for _ in range(args.repeats):
        for engine in ("local", "ray"):
            result = predict(run, data, scenes, args.cache / f"predictions_{engine}", engine, args.workers, args.tile)
            results[engine] = min(results.get(engine, result), result, key=lambda r: r["seconds"])
    report("predict", results["local"], results["ray"])


if __name__ == "__main__":
    main()
