"""Benchmark of `rts-tf build-records`: tiles/s and MB/s, and peak RSS against scene size.

Run by hand:  .venv/bin/python benchmarks/build_records.py [--sizes 2048 8192] [--throughput-scenes 2]

Generates textured scenes (smooth land cover plus sensor noise, a 10 m EPSG:3413 DEM and a
30 m EPSG:4326 TCVIS) window by window under a cache folder, then runs the real command line in
child processes so that each peak RSS is measured on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.warp import transform, transform_bounds, transform_geom
from rasterio.windows import Window
from shapely.geometry import Point, mapping, shape

CRS = "EPSG:32608"


def texture(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth land-cover variation in [0, 1] from a few sinusoids of UTM coordinates."""
    rng = np.random.default_rng(seed)
    value = np.zeros_like(x)
    for _ in range(6):
        kx, ky = rng.uniform(-1, 1, 2) * 2 * np.pi / rng.uniform(60, 900)
        value += np.sin(kx * x + ky * y + rng.uniform(0, 6.3))
    return (value / 6 + 1) / 2


def write_scene(folder: Path, scene_id: str, size: int, origin: tuple[float, float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    affine = from_origin(*origin, 3.0, 3.0)
    profile = dict(driver="GTiff", width=size, height=size, crs=CRS, transform=affine, tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(folder / f"{scene_id}_3B_AnalyticMS_SR.tif", "w", count=4, dtype="uint16", nodata=0,
                       **profile) as sr, \
            rasterio.open(folder / f"{scene_id}_3B_udm2.tif", "w", count=8, dtype="uint8", **profile) as udm2:
        for row in range(0, size, 512):
            height = min(512, size - row)
            rows, cols = np.mgrid[row:row + height, 0:size]
            x, y = affine @ (cols + 0.5, rows + 0.5)
            vegetation = texture(x, y, seed)
            base = np.array([700, 900, 1200, 1800])[:, None, None] * (1 - vegetation) + \
                np.array([300, 500, 400, 2600])[:, None, None] * vegetation
            noisy = base * rng.normal(1.0, 0.03, base.shape)
            window = Window(0, row, size, height)
            sr.write(np.clip(noisy, 1, 10000).astype(np.uint16), window=window)
            mask = np.zeros((8, height, size), dtype=np.uint8)
            mask[0] = 1
            mask[5] = texture(x, y, seed + 1) > 0.93  # scattered clouds
            mask[0] &= 1 - mask[5]
            udm2.write(mask, window=window)


def write_auxiliary(root: Path, size: int, origin: tuple[float, float]) -> None:
    bounds = (origin[0] - 500, origin[1] - size * 3 - 500, origin[0] + size * 3 + 500, origin[1] + 500)
    for name, crs, res, count, dtype in (("dem", "EPSG:3413", (10.0, 10.0), 1, "float32"),
                                         ("tcvis", "EPSG:4326", None, 3, "uint8")):
        left, bottom, right, top = transform_bounds(CRS, crs, *bounds)
        if res is None:
            res = (0.00027 / np.cos(np.radians((top + bottom) / 2)), 0.00027)
        width, height = int((right - left) / res[0]) + 1, int((top - bottom) / res[1]) + 1
        affine = from_origin(left, top, *res)
        rows, cols = np.mgrid[0:height, 0:width]
        gx, gy = affine @ (cols + 0.5, rows + 0.5)
        ux, uy = (np.array(v).reshape(height, width) for v in transform(crs, CRS, gx.ravel(), gy.ravel()))
        if name == "dem":
            data = (40 + 30 * texture(ux, uy, 7))[None].astype(np.float32)
        else:
            data = np.stack([110 + 40 * texture(ux, uy, s) for s in (8, 9, 10)]).astype(np.uint8)
        (root / name).mkdir(parents=True, exist_ok=True)
        with rasterio.open(root / name / f"{name}_{size}.tif", "w", driver="GTiff", width=width, height=height,
                           count=count, dtype=dtype, crs=crs, transform=affine, tiled=True,
                           nodata=-9999 if name == "dem" else None, compress="deflate") as dataset:
            dataset.write(data)


def make_dataset(root: Path, size: int, scenes: int) -> Path:
    """Scenes of size x size px (cached), with DEM, TCVIS and a few labels."""
    folder = root / f"{size}px_{scenes}"
    if (folder / "labels.gpkg").exists():
        return folder
    origin = (560000.0, 7700000.0)
    polygons, ids = [], []
    for index in range(scenes):
        scene_id = f"20190801_2000{index:02d}_1001"
        write_scene(folder / "scenes" / scene_id, scene_id, size, origin, seed=index)
        for k in range(8):
            centre = Point(origin[0] + (k + 1) * size * 3 / 9, origin[1] - (k + 1) * size * 3 / 9)
            polygons.append(shape(transform_geom(CRS, "EPSG:4326", mapping(centre.buffer(60)))))
            ids.append(scene_id)
    write_auxiliary(folder / "auxiliary", size, origin)
    pyogrio.raw.write(folder / "labels.gpkg", shapely.to_wkb(np.array(polygons, dtype=object)),
                      [np.array(ids, dtype=object), np.array(["Bench"] * len(ids), dtype=object)],
                      ["image_id", "region"], crs="EPSG:4326", driver="GPKG", geometry_type="Polygon")
    return folder


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run a command; (seconds, peak RSS in MiB of it and the processes it waited for)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(errors.read().decode()[-3000:])
    return seconds, usage.ru_maxrss / 1024


def run_build(data: Path, out: Path, workers: int, extra: list[str] = ()) -> dict:
    """Run the real CLI in a child process from scratch; return its figures and peak RSS."""
    command = [sys.executable, "-m", "rts_tf", "build-records", "--scenes", str(data / "scenes"),
               "--labels", str(data / "labels.gpkg"), "--dem", str(data / "auxiliary" / "dem"),
               "--tcvis", str(data / "auxiliary" / "tcvis"), "--out", str(out), "--workers", str(workers),
               "--overwrite", *extra]
    seconds, peak = run_measured(command)
    manifest = json.loads((out / "manifest.json").read_text())
    tiles = sum(scene["tiles"] for scene in manifest["scenes"])
    megabytes = sum(shard["bytes"] for shard in manifest["shards"].values()) / 1e6
    return {"tiles": tiles, "seconds": seconds, "tiles_per_s": tiles / seconds, "mb": megabytes,
            "mb_per_s": megabytes / seconds, "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rts-tf-benchmark"))
    parser.add_argument("--throughput-size", type=int, default=4096)
    parser.add_argument("--throughput-scenes", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[2048, 8192], help="scene sizes for peak RSS")
    parser.add_argument("--levels", type=int, nargs="*", default=[1], help="GZIP levels to compare with the default (no compression)")
    args = parser.parse_args()

    data = make_dataset(args.cache, args.throughput_size, args.throughput_scenes)
    print(f"throughput: {args.throughput_scenes} scenes of {args.throughput_size} px, 256 px tiles, overlap 25")
    for workers in (1, 2):
        result = run_build(data, args.cache / "records", workers)
        print(f"  no compression (default), --workers {workers}: {result['tiles']} tiles in {result['seconds']:.1f} s "
              f"= {result['tiles_per_s']:.1f} tiles/s, {result['mb']:.0f} MB at {result['mb_per_s']:.1f} MB/s")
    for level in args.levels:
        result = run_build(data, args.cache / "records", 2, ["--compression", "gzip", "--compression-level", str(level)])
        print(f"  gzip level {level}, --workers 2: {result['tiles']} tiles in {result['seconds']:.1f} s "
              f"= {result['tiles_per_s']:.1f} tiles/s, {result['mb']:.0f} MB at {result['mb_per_s']:.1f} MB/s")
    print("peak RSS of one scene against its size (--workers 1):")
    for size in args.sizes:
        result = run_build(make_dataset(args.cache, size, 1), args.cache / f"records_{size}", 1)
        print(f"  {size} x {size} px: peak RSS {result['peak_rss_mib']:.0f} MiB, {result['tiles']} tiles, "
              f"{result['tiles_per_s']:.1f} tiles/s")


if __name__ == "__main__":
    main()
