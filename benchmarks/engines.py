"""Benchmark of the engines: `build-records` and `predict` with `--engine local` and `--engine ray`.

Run by hand:  .venv/bin/python benchmarks/engines.py [--scenes 8] [--size 4096] [--predict-scenes 3] [--skip-predict]

Builds the same generated scenes (the textured scenes of benchmarks/build_records.py, cached) with
both engines at `--workers 2`, then predicts some of them with a UNet run (random weights: the cost
does not depend on them) with both engines. Each command runs in a child process from scratch, so
the Ray figures include starting and stopping the embedded one-machine Ray. Reports tiles/s,
km2/min and the engine's overhead: Ray's time over the local engine's, and for build-records the CPU
seconds of every process of each command (Ray's GCS, raylet, agents and workers apart), sampled from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_records import make_dataset, run_measured  # noqa: E402
from predict import make_run  # noqa: E402

CELL_KM2 = 3 * 3 / 1e6  # a 3 m pixel


def process_cpu(pid: int) -> tuple[float, int, str]:
    """(CPU seconds so far, parent pid, title) of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/cmdline") as handle:
        title = handle.read().replace("\0", " ")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1]), title


def kind_of(title: str) -> str:
    """Which part of a command a process is: Ray's system processes by name, its workers, the rest."""
    for name, kind in (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("DashboardAgent", "agents"),
                       ("RuntimeEnvAgent", "agents"), ("dashboard.py", "dashboard"), ("monitor.py", "monitors"),
                       ("log_monitor", "monitors"), ("ray::", "ray workers")):
        if name in title:
            return kind
    return "driver and local workers"


def run_tree(command: list[str]) -> tuple[float, dict[str, float]]:
    """Run a command; (wall seconds, CPU seconds by kind of process) over it and every process it
    starts, sampled from /proc every 0.1 s (Ray's processes are not all children that the command
    waits for, so its own resource usage would miss them; up to 0.1 s of a process's last CPU time
    can be missed)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[int, tuple[float, str]] = {}
    while process.poll() is None:
        tree = {process.pid}
        try:
            pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            pids = []
        parents = {}
        for pid in pids:
            try:
                cpu, parent, title = process_cpu(pid)
            except (OSError, IndexError, ValueError):
                continue
            parents[pid] = (parent, cpu, title)
        grown = True
        while grown:  # descendants of the command, at any depth
            grown = False
            for pid, (parent, _, _) in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grown = True
        for pid in tree & parents.keys():
            _, cpu, title = parents[pid]
            previous = seen.get(pid)
            if previous is None or cpu >= previous[0]:
                seen[pid] = (cpu, title if previous is None or kind_of(title) != "driver and local workers" else previous[1])
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(process.stderr.read().decode()[-3000:])
    by_kind: dict[str, float] = {}
    for cpu, title in seen.values():
        by_kind[kind_of(title)] = by_kind.get(kind_of(title), 0.0) + cpu
    if os.environ.get("RTS_TF_BENCH_PROCESSES"):
        for cpu, title in sorted(seen.values(), reverse=True):
            print(f"      {cpu:6.2f} s  {title[:100]}")
    return seconds, by_kind


def build(data: Path, out: Path, engine: str, workers: int) -> dict:
    seconds, cpu = run_tree([sys.executable, "-m", "rts_tf", "build-records", "--scenes", str(data / "scenes"),
                             "--labels", str(data / "labels.gpkg"), "--dem", str(data / "auxiliary" / "dem"),
                             "--tcvis", str(data / "auxiliary" / "tcvis"), "--out", str(out), "--overwrite",
                             "--workers", str(workers), "--engine", engine])
    manifest = json.loads((out / "manifest.json").read_text())
    tiles = sum(scene["tiles"] for scene in manifest["scenes"])
    km2 = sum(scene["width"] * scene["height"] for scene in manifest["scenes"]) * CELL_KM2
    return {"seconds": seconds, "tiles": tiles, "km2": km2, "cpu": cpu}


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
        if "cpu" in result:
            parts = ", ".join(f"{kind} {cpu:.1f}" for kind, cpu in sorted(result["cpu"].items(), key=lambda x: -x[1]))
            print(f"    CPU seconds {sum(result['cpu'].values()):.1f}: {parts}")
    overhead = ray["seconds"] - local["seconds"]
    print(f"  {what}: Ray's overhead {overhead:+.1f} s = {100 * overhead / local['seconds']:+.1f}% of the local engine")
    if "cpu" in local and "cpu" in ray:
        extra = sum(ray["cpu"].values()) - sum(local["cpu"].values())
        print(f"  {what}: Ray's CPU overhead {extra:+.1f} CPU s = {100 * extra / sum(local['cpu'].values()):+.1f}% "
              "of the local engine's CPU seconds (the figure to read on a shared machine)")


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
    print(f"  load average before: {os.getloadavg()[0]:.1f}")
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
