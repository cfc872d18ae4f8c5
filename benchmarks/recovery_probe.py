"""Recovery probe (run by hand): kill -9 builds and fits at random moments, re-run, compare.

    .venv/bin/python benchmarks/recovery_probe.py [--builds 6] [--fits 3] [--seed 0]

Prints how many killed `build-records` runs re-ran to byte-identical records (shards and manifest
against a clean build) and how many killed `fit` runs resumed to bit-identical final weights
(checkpoints/last.h5 against an uninterrupted run, with TF_DETERMINISTIC_OPS=1).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIT = ["--arch", "unet", "--encoder", "resnet18", "--decoder-filters", "16,16,8,8,8", "--batch-size", "4",
       "--holdout-region", "Horton", "--image-every", "0", "--epochs", "3", "--oversample-slumps", "2"]


def cli(*arguments: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rts_tf", *arguments], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TF_DETERMINISTIC_OPS": "1", **(env or {})})


def run(*arguments: str) -> None:
    process = cli(*arguments)
    if process.wait() != 0:
        raise SystemExit(f"failed: rts-tf {' '.join(arguments)}")


def digest(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern)) if p.is_file()}


def records_digest(folder: Path) -> dict[str, str]:
    return {**digest(folder, "*.tfrecord*"), **digest(folder, "manifest.json")}


def weights(path: Path) -> dict:
    import h5py
    import numpy as np

    arrays = {}
    with h5py.File(path) as handle:
        handle.visititems(lambda name, item: arrays.update({name: np.array(item)})
                          if isinstance(item, h5py.Dataset) else None)
    return arrays


def killed_and_rerun(arguments: list[str], seconds: float) -> float:
    """Start a command, kill -9 it after `seconds` (if still running), run it again to the end."""
    process = cli(*arguments)
    time.sleep(seconds)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    run(*arguments)
    return killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=6)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="rts-probe-"))
    try:
        run("demo-data", str(root / "data"), "--scene-size", "160")
        data = root / "data"
        build = ["build-records", "--scenes", str(data / "scenes"), "--labels", str(data / "labels.gpkg"),
                 "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
                 "--sites", str(data / "sites.geojson"), "--tile-size", "64", "--overlap", "8"]
        started = time.perf_counter()
        run(*build, "--out", str(root / "clean"))
        build_seconds = time.perf_counter() - started
        clean = records_digest(root / "clean")
        identical = killed_count = 0
        for attempt in range(args.builds):
            out = root / f"killed{attempt}"
            killed_count += killed_and_rerun([*build, "--out", str(out), "--workers", str(1 + attempt % 2)],
                                             rng.uniform(0.2, 0.9) * build_seconds)
            identical += records_digest(out) == clean
        print(f"killed builds re-run byte-identical: {identical} of {args.builds} "
              f"({killed_count} were still running when killed; clean build {build_seconds:.0f} s)")

        fit = ["fit", "--records", str(root / "clean"), *FIT]
        started = time.perf_counter()
        run(*fit, "--logdir", str(root / "straight"))
        fit_seconds = time.perf_counter() - started
        reference = weights(root / "straight" / "checkpoints" / "last.h5")
        identical = killed_count = 0
        for attempt in range(args.fits):
            logdir = root / f"fit{attempt}"
            killed_count += killed_and_rerun([*fit, "--logdir", str(logdir)], rng.uniform(0.4, 0.9) * fit_seconds)
            resumed = weights(logdir / "checkpoints" / "last.h5")
            identical += sorted(resumed) == sorted(reference) and all(
                (resumed[key] == reference[key]).all() for key in reference)
        print(f"killed fits resumed bit-identical: {identical} of {args.fits} "
              f"({killed_count} were still running when killed; uninterrupted fit {fit_seconds:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
