"""Benchmark of `rts-tf predict`: km2 per minute, overhead over the bare forward pass, and peak RSS.

Run by hand:  .venv/bin/python benchmarks/predict.py [--size 4096] [--rss-sizes 2048 10000] [--readers N]

Uses the textured scenes of benchmarks/build_records.py (cached) and a UNet-resnet34 run folder
with random weights (prediction cost does not depend on the weights). The overhead compares the
whole command (reading, stacking, blending, writing COGs, polygons) with the bare forward pass (the traced model call predict makes)
over the same number of windows.

The CPU work apart from the model (read, warp, terrain, stack, blend, write COGs, vectorise) is
measured with a null model (one 1x1 convolution, a few ms per batch): the command's CPU seconds
(user + system, of its process and its stacking processes) for the scene minus those for a 512 px
scene (start-up, model loading, tracing: the same for both); its wall time likewise. Every run
uses the same --readers (default: predict's default for a large scene on this machine).

Peak memory: the largest peak RSS of one process (the command's, or a stacking process's), and the
peak of the whole command's PSS (its processes together, shared memory counted once), sampled
every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_records import make_dataset  # noqa: E402


def make_run(folder: Path, tile_size: int, encoder: str | None) -> Path:
    """A run folder of a UNet with this encoder (random weights), or with encoder None the null
    model; its recipe is the current one (records schema 2)."""
    if (folder / "run.json").exists():
        return folder
    import numpy as np
    import tensorflow as tf

    from rts_tf.bands import BAND_NAMES, BANDS
    from rts_tf.scene import recipe_settings
    from rts_tf.settings import DEM_MIN_VALID
    from rts_tf.train import FitConfig, build_segmenter

    folder.mkdir(parents=True, exist_ok=True)
    if encoder is None:
        inputs = tf.keras.Input((tile_size, tile_size, len(BAND_NAMES)))
        outputs = tf.keras.layers.Conv2D(1, 1, activation="sigmoid", bias_initializer=tf.keras.initializers.Constant(-2.0),
                                         kernel_initializer="zeros")(inputs)
        model = tf.keras.Model(inputs, outputs)
    else:
        model = build_segmenter(FitConfig(arch="unet", encoder=encoder), BAND_NAMES, tile_size,
                                np.zeros(10), np.ones(10))
    model.save(str(folder / "model.keras"))
    (folder / "run.json").write_text(json.dumps({"model": "model.keras", "tile_size": tile_size, "bands": BANDS,
                                                 "threshold": 0.5,
                                                 "recipe": recipe_settings("dem", 100.0, DEM_MIN_VALID)}))
    return folder


def forward_seconds(run: Path, windows: int, tile_size: int, batch: int) -> tuple[float, float]:
    """Wall and CPU seconds of the bare forward pass (the traced call predict makes) over `windows` windows."""
    code = f"""
import time, numpy as np
from rts_tf.inference import forward
from rts_tf.models import load_model
model = load_model('{run / 'model.keras'}')  # kept: forward() holds the model weakly
call = forward(model)  # the call predict makes
x = np.random.rand({batch}, {tile_size}, {tile_size}, 10).astype(np.float32)
call(x)
started, cpu = time.perf_counter(), time.process_time()
for _ in range({max(windows // batch, 1)}):
    call(x)
print(time.perf_counter() - started, time.process_time() - cpu)
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(output.stderr[-3000:])
    wall, cpu = output.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def tree_pss(pid: int) -> int:
    """PSS in bytes of a process and its descendants (shared pages counted once)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_predict(run: Path, data: Path, out: Path, batch: int, readers: int) -> dict:
    """Wall seconds, CPU seconds (user + system, stacking processes included), the largest peak
    RSS of one process and the peak PSS of all of them (MiB) of the real command in a child process."""
    command = [sys.executable, "-m", "rts_tf", "predict", "--run", str(run), "--scene", str(data / "scenes"),
               "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
               "--out", str(out), "--overwrite", "--batch-size", str(batch), "--readers", str(readers)]
    started = time.perf_counter()
    peak = [0]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_pss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(errors.read().decode()[-3000:])
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "max_rss": usage.ru_maxrss / 1024,
            "pss": peak[0] / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rts-tf-benchmark"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[2048, 10000])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--readers", type=int, default=None,
                        help="stacking processes of every run (default: predict's for a large scene here)")
    args = parser.parse_args()

    from rts_tf.stacking import default_readers
    from rts_tf.tiling import tile_offsets

    readers = default_readers() if args.readers is None else args.readers
    load = os.getloadavg()

    run = make_run(args.cache / f"run_v2_unet_{args.encoder}_{args.tile}", args.tile, args.encoder)
    null = make_run(args.cache / f"run_v2_null_{args.tile}", args.tile, None)
    data = make_dataset(args.cache, args.size, 1)
    null = run_predict(null, data, args.cache / "predictions_null", args.batch, readers)
    small = run_predict(make_run(args.cache / f"run_v2_null_{args.tile}", args.tile, None),
                        make_dataset(args.cache, 512, 1), args.cache / "predictions_null_512", args.batch, readers)
    whole = run_predict(run, data, args.cache / "predictions", args.batch, readers)
    windows = len(tile_offsets(args.size, args.tile, args.tile // 4)) ** 2
    forward, forward_cpu = forward_seconds(run, windows, args.tile, args.batch)
    km2 = (args.size * 3 / 1000) ** 2
    print(f"predict: one {args.size} x {args.size} px scene ({km2:.0f} km2), UNet-{args.encoder}, {args.tile} px "
          f"windows with {args.tile // 4} px overlap ({windows} windows), batch {args.batch}, --readers {readers}; "
          f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end of these runs")
    print(f"  whole command {whole['seconds']:.1f} s = {km2 / whole['seconds'] * 60:.1f} km2/min "
          f"({whole['cpu']:.1f} CPU s); bare forward pass {forward:.1f} s; "
          f"overhead {100 * (whole['seconds'] - forward) / forward:.0f}% (start-up and model loading included)")
    print(f"  in CPU seconds (less sensitive to other load): whole command {whole['cpu']:.1f}, bare forward pass "
          f"{forward_cpu:.1f}: {100 * (whole['cpu'] - forward_cpu) / forward_cpu:.0f}% more")
    print(f"  null model: CPU work apart from the model {null['cpu'] - small['cpu']:.1f} CPU s per {args.size} px "
          f"scene ({null['cpu']:.1f} for the scene - {small['cpu']:.1f} for a 512 px one); wall "
          f"{null['seconds'] - small['seconds']:.1f} s ({null['seconds']:.1f} - {small['seconds']:.1f})")
    for size in args.rss_sizes:
        data = make_dataset(args.cache, size, 1)
        result = run_predict(run, data, args.cache / f"predictions_{size}", args.batch, readers)
        print(f"  {size} x {size} px: peak RSS {result['max_rss']:.0f} MiB (largest process), peak PSS of all "
              f"processes {result['pss']:.0f} MiB ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
