"""Benchmark of `rts-tf predict`: km2 per minute, overhead over the bare forward pass, and peak RSS.

Run by hand:  .venv/bin/python benchmarks/predict.py [--size 4096] [--rss-sizes 2048 8192]

Uses the textured scenes of benchmarks/build_records.py (cached) and a UNet-resnet34 run folder
with random weights (prediction cost does not depend on the weights). The overhead compares the
whole command (reading, stacking, blending, writing COGs, polygons) with the bare forward pass (the traced model call predict makes)
over the same number of windows.

The CPU work apart from the model (read, warp, terrain, stack, blend, write COGs, vectorise) is
measured with a null model (one 1x1 convolution, a few ms per batch): the command's time for the
scene minus its time for a 512 px scene (start-up, model loading, tracing: the same for both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_records import make_dataset, run_measured  # noqa: E402


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


def forward_seconds(run: Path, windows: int, tile_size: int, batch: int) -> float:
    """Seconds of the bare forward pass (the traced call predict makes) over `windows` windows."""
    code = f"""
import time, numpy as np
from rts_tf.inference import forward
from rts_tf.models import load_model
call = forward(load_model('{run / 'model.keras'}'))  # the call predict makes
x = np.random.rand({batch}, {tile_size}, {tile_size}, 10).astype(np.float32)
call(x)
started = time.perf_counter()
for _ in range({max(windows // batch, 1)}):
    call(x)
print(time.perf_counter() - started)
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def run_predict(run: Path, data: Path, out: Path, batch: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of the real command in a child process."""
    return run_measured([sys.executable, "-m", "rts_tf", "predict", "--run", str(run), "--scene", str(data / "scenes"),
                         "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
                         "--out", str(out), "--overwrite", "--batch-size", str(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rts-tf-benchmark"))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder", default="resnet34")
    args = parser.parse_args()

    from rts_tf.tiling import tile_offsets

    run = make_run(args.cache / f"run_v2_unet_{args.encoder}_{args.tile}", args.tile, args.encoder)
    null = make_run(args.cache / f"run_v2_null_{args.tile}", args.tile, None)
    data = make_dataset(args.cache, args.size, 1)
    null_seconds, _ = run_predict(null, data, args.cache / "predictions_null", args.batch)
    small_seconds, _ = run_predict(null, make_dataset(args.cache, 512, 1), args.cache / "predictions_null_512",
                                   args.batch)
    seconds, _ = run_predict(run, data, args.cache / "predictions", args.batch)
    windows = len(tile_offsets(args.size, args.tile, args.tile // 4)) ** 2
    forward = forward_seconds(run, windows, args.tile, args.batch)
    km2 = (args.size * 3 / 1000) ** 2
    print(f"predict: one {args.size} x {args.size} px scene ({km2:.0f} km2), UNet-{args.encoder}, {args.tile} px "
          f"windows with {args.tile // 4} px overlap ({windows} windows), batch {args.batch}")
    print(f"  whole command {seconds:.0f} s = {km2 / seconds * 60:.1f} km2/min; bare forward pass {forward:.0f} s; "
          f"overhead {100 * (seconds - forward) / forward:.0f}% (start-up and model loading included)")
    print(f"  null model: whole command {null_seconds:.1f} s, on a 512 px scene {small_seconds:.1f} s: CPU work apart "
          f"from the model {null_seconds - small_seconds:.1f} s per {args.size} px scene; start-up about "
          f"{small_seconds:.1f} s")
    for size in args.rss_sizes:
        data = make_dataset(args.cache, size, 1)
        seconds, peak = run_predict(run, data, args.cache / f"predictions_{size}", args.batch)
        print(f"  {size} x {size} px: peak RSS {peak:.0f} MiB ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
