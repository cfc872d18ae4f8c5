"""Shared fixtures: a tiny two-region world of real GeoTIFFs and polygons, and records built from it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point, box

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from helpers import ORIGIN, write_dem, write_polygons, write_scene, write_tcvis  # noqa: E402

SCENE_A = "20190801_200000_1001"
SCENE_B = "20190805_201500_1002"
ORIGIN_B = (ORIGIN[0] + 3000.0, ORIGIN[1] - 2000.0)
TILE = dict(tile_size=32, overlap=8)


def hills(x, y):
    """Gentle terrain in UTM metres: a tilted plane with a bump."""
    return 50 + 0.05 * (x - ORIGIN[0]) + 0.02 * (y - ORIGIN[1]) + 5 * np.exp(
        -((x - ORIGIN[0] - 100) ** 2 + (y - ORIGIN[1] + 100) ** 2) / 80.0 ** 2)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """Two 64 px scenes in two regions, a DEM tile per scene, one TCVIS, labels and sites."""
    root = tmp_path_factory.mktemp("world")
    cloudy = np.zeros((8, 64, 64), dtype=np.uint8)
    cloudy[0] = 1
    cloudy[0, 40:, 40:], cloudy[5, 40:, 40:] = 0, 1  # a cloud in the lower-right corner
    write_scene(root / "scenes", SCENE_A, udm2=cloudy, nodata_border=4, seed=1)
    write_scene(root / "scenes", SCENE_B, origin=ORIGIN_B, seed=2)
    write_dem(root / "dem" / "a_dem.tif", hills)
    write_dem(root / "dem" / "b_dem.tif", hills, origin=ORIGIN_B)
    write_tcvis(root / "tcvis" / "a_tcvis.tif")
    write_tcvis(root / "tcvis" / "b_tcvis.tif", origin=ORIGIN_B)
    slump_a = Point(ORIGIN[0] + 90, ORIGIN[1] - 90).buffer(45)
    slump_b = box(ORIGIN_B[0] + 20, ORIGIN_B[1] - 80, ORIGIN_B[0] + 80, ORIGIN_B[1] - 20)
    write_polygons(root / "labels.gpkg", [slump_a, slump_b],
                   {"image_id": [SCENE_A, SCENE_B], "image_date": ["2019-08-01", "2019-08-05"],
                    "region": ["Alpha", "Beta"], "site": ["alpha_1", "beta_1"], "label": ["RTS", "RTS"]})
    write_polygons(root / "sites.geojson",
                   [box(ORIGIN[0] - 500, ORIGIN[1] - 700, ORIGIN[0] + 700, ORIGIN[1] + 500),
                    box(ORIGIN_B[0] - 500, ORIGIN_B[1] - 700, ORIGIN_B[0] + 700, ORIGIN_B[1] + 500)],
                   {"site": ["alpha_site", "beta_site"], "region": ["Alpha", "Beta"]}, driver="GeoJSON")
    return {"root": root, "scenes": root / "scenes", "dem": root / "dem", "tcvis": root / "tcvis",
            "labels": root / "labels.gpkg", "sites": root / "sites.geojson", "slump_a": slump_a,
            "slump_b": slump_b}


def build_arguments(world: dict, out: Path, *extra: str) -> list[str]:
    """`rts-tf build-records` arguments for the world."""
    return ["build-records", "--scenes", str(world["scenes"]), "--labels", str(world["labels"]),
            "--dem", str(world["dem"]), "--tcvis", str(world["tcvis"]), "--sites", str(world["sites"]),
            "--out", str(out), "--tile-size", "32", "--overlap", "8", *extra]


@pytest.fixture(scope="session")
def world_records(world, tmp_path_factory) -> Path:
    """Records built once from the world through the command line."""
    from click.testing import CliRunner

    from rts_tf.cli import main

    out = tmp_path_factory.mktemp("records") / "world"
    result = CliRunner().invoke(main, build_arguments(world, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def demo_records(tmp_path_factory) -> Path:
    """Demo data (160 px scenes) built into 64 px records through the command line."""
    from click.testing import CliRunner

    from rts_tf.cli import main

    root = tmp_path_factory.mktemp("demo")
    runner = CliRunner()
    result = runner.invoke(main, ["demo-data", str(root / "data"), "--scene-size", "160"])
    assert result.exit_code == 0, result.output
    data = root / "data"
    result = runner.invoke(main, ["build-records", "--scenes", str(data / "scenes"), "--labels", str(data / "labels.gpkg"),
                                  "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
                                  "--sites", str(data / "sites.geojson"), "--out", str(root / "records"),
                                  "--tile-size", "64", "--overlap", "8"])
    assert result.exit_code == 0, result.output
    return root / "records"


TINY = ["--arch", "unet", "--encoder", "resnet18", "--decoder-filters", "16,16,8,8,8", "--batch-size", "4",
        "--holdout-region", "Horton", "--image-every", "1", "--image-tiles", "2", "--schedule", "constant"]


def fit_arguments(records, logdir, *extra):
    return ["fit", "--records", str(records), "--logdir", str(logdir), *TINY, *extra]


@pytest.fixture(scope="session")
def tiny_run(demo_records, tmp_path_factory):
    """A real 4-epoch fit of a tiny UNet on the demo records, Horton held out."""
    from click.testing import CliRunner

    from rts_tf.cli import main

    logdir = tmp_path_factory.mktemp("runs") / "tiny"
    result = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "4", "--no-augment",
                                                    "--learning-rate", "0.003"))
    assert result.exit_code == 0, result.output
    return logdir
