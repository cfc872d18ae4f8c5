"""Benchmark of `rts-tf track`: seconds for a generated pan-Arctic catalogue (100,000 polygons over 6 dates).

Run by hand:  .venv/bin/python benchmarks/track.py [--polygons 100000] [--dates 6] [--sites 100]

Generates slumps (irregular 24-vertex outlines, 0.1 to 3 ha) in `--sites` sites of 10 km spread
over the Arctic; each grows on each date, 4% stabilise, 3% appear, neighbours merge. One file
per date in EPSG:4326 (GeoPackage), so reading and reprojection are part of the figure. Times the
library call (as the command runs it) with and without change maps (10 m), and the linking alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import geopandas
import numpy as np
import shapely

from rts_tf.track import EQUAL_AREA_CRS, build_lineage, read_inputs, track


def outline(x: float, y: float, radius: float, rng: np.random.Generator, vertices: int = 24) -> shapely.Polygon:
    angles = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    radii = radius * (1.0 + 0.15 * np.sin(3 * angles + rng.uniform(0, 6.3)) + 0.05 * rng.standard_normal(vertices))
    return shapely.Polygon(np.column_stack([x + radii * np.cos(angles), y + radii * np.sin(angles)]))


def generate(folder: Path, polygons: int, dates: int, sites: int, seed: int = 0) -> list[Path]:
    """One GeoPackage per date (EPSG:4326) with about `polygons` polygons in total."""
    rng = np.random.default_rng(seed)
    # Slumps alive on date k: 0.96**k of the first date's, plus 3% appearing each date.
    per_date = int(round(polygons / sum(0.96 ** k + 0.03 for k in range(dates))))
    # Site centres on a ring between 64 and 74 N in EPSG:6931 (polar azimuthal; metres).
    angle = rng.uniform(0, 2 * np.pi, sites)
    distance = rng.uniform(1.8e6, 2.9e6, sites)
    centres = np.column_stack([distance * np.cos(angle), distance * np.sin(angle)])
    slumps = per_date
    site = rng.integers(0, sites, slumps)
    position = centres[site] + rng.uniform(-5_000, 5_000, (slumps, 2))
    radius = rng.uniform(18.0, 100.0, slumps)
    growth = rng.uniform(0.0, 0.12, slumps)  # relative radius growth per date
    alive = np.ones(slumps, dtype=bool)
    files = []
    for index in range(dates):
        if index:
            alive &= rng.uniform(size=slumps) > 0.04  # stabilised
            radius = radius * (1.0 + growth)
        geometries = [outline(x, y, r, rng) for (x, y), r, a in zip(position, radius, alive) if a]
        labels = [f"site_{s:03d}" for s, a in zip(site, alive) if a]
        new = int(0.03 * slumps)  # appearing this date
        extra = centres[rng.integers(0, sites, new)] + rng.uniform(-5_000, 5_000, (new, 2))
        geometries += [outline(x, y, rng.uniform(15.0, 40.0), rng) for x, y in extra]
        labels += [f"site_{int(np.argmin(np.hypot(*(centres - p).T))):03d}" for p in extra]
        frame = geopandas.GeoDataFrame({"site": labels, "image_date": f"{2018 + index}-07-15"},
                                       geometry=geometries, crs=EQUAL_AREA_CRS).to_crs("EPSG:4326")
        path = folder / f"catalogue_{2018 + index}.gpkg"
        frame.to_file(path, engine="pyogrio")
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polygons", type=int, default=100_000)
    parser.add_argument("--dates", type=int, default=6)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--change-pixel-size", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rts-tf-track-") as directory:
        folder = Path(directory)
        started = time.perf_counter()
        files = generate(folder, args.polygons, args.dates, args.sites)
        print(f"generated {args.polygons} polygons over {args.dates} dates in {args.sites} sites: "
              f"{time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        inputs = read_inputs(files)
        read = time.perf_counter() - started
        frame = inputs.frame
        started = time.perf_counter()
        for site in frame["site"].unique():
            rows = frame["site"].to_numpy() == site
            build_lineage(frame.geometry.to_numpy()[rows], frame["date"].to_numpy()[rows].astype("datetime64[D]"),
                          6.0, 2.5 * 365.25)
        linking = time.perf_counter() - started
        print(f"read + reproject {len(frame)} polygons: {read:.1f} s; group and link: {linking:.1f} s")
        for change_maps in (False, True):
            started = time.perf_counter()
            summary = track(files, folder / f"out_{change_maps}", change_maps=change_maps,
                            pixel_size=args.change_pixel_size)
            seconds = time.perf_counter() - started
            what = f"with change maps at {args.change_pixel_size:g} m" if change_maps else "without change maps"
            print(f"track {what}: {seconds:.1f} s ({summary.observations / seconds:,.0f} polygons/s); "
                  f"{summary.lines()[0]}; {summary.lines()[1]}")


if __name__ == "__main__":
    main()
