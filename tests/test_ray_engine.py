"""`--engine ray` on a real local Ray (two CPUs, started once for this module): the same records and
maps as the local engine, jobs that survive a killed worker, and bad scenes that fail alone."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
from click.testing import CliRunner

from rts_tf.cli import main

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One embedded Ray for the module; its session folder is gone after it shuts down."""
    from rts_tf.engine import ray_session

    with ray_session(2):
        folder = Path(ray._private.worker._global_node.get_temp_dir_path())
        assert folder.exists() and folder.name.startswith("rts-ray-")
        yield
    assert not ray.is_initialized() and not folder.exists()


def files_of(folder: Path, *patterns: str) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for pattern in patterns for path in sorted(folder.rglob(pattern))}


def demo_build(data: Path, out: Path, *extra: str, scenes: Path | None = None) -> list[str]:
    return ["build-records", "--scenes", str(scenes or data / "scenes"), "--labels", str(data / "labels.gpkg"),
            "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
            "--sites", str(data / "sites.geojson"), "--out", str(out), "--tile-size", "64", "--overlap", "8", *extra]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name or ".staging" in p.name]


def corrupt_middle_block(scene: Path) -> Path:
    """Rewrite a scene's SR in 32 px blocks and garble one in the middle: its header, first and
    last pixels read (the inputs check passes), the block does not."""
    sr = next(scene.glob("*SR*.tif"))
    with rasterio.open(sr) as dataset:
        profile, data = dataset.profile, dataset.read()
    profile.update(blockxsize=32, blockysize=32, tiled=True, compress="deflate")
    with rasterio.open(sr, "w", **profile) as dataset:
        dataset.write(data)
    with rasterio.open(sr) as dataset:
        offset = int(dataset.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(dataset.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    with open(sr, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * size)
    return sr


def test_build_records_on_ray_equals_one_local_worker(demo_records, tmp_path):
    data = demo_records.parent / "data"
    out = tmp_path / "ray"
    result = CliRunner().invoke(main, demo_build(data, out, "--engine", "ray", "--workers", "2"))
    assert result.exit_code == 0, result.output
    count = len(json.loads((demo_records / "manifest.json").read_text())["scenes"])
    assert f"scenes: {count} ({count} built, 0 already complete)" in result.output
    built = files_of(out, "*.tfrecord*", "*.json")
    assert built == files_of(demo_records, "*.tfrecord*", "*.json")  # shards, parts, manifest, settings
    assert len([name for name in built if ".tfrecord" in name]) == count and not temporaries(out)
    again = CliRunner().invoke(main, demo_build(data, out, "--engine", "ray", "--workers", "2"))
    assert again.exit_code == 0 and f"(0 built, {count} already complete)" in again.output, again.output


def three_scenes(data: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for scene in sorted((data / "scenes").iterdir())[:3]:
        shutil.copytree(scene, folder / scene.name)
    return folder


def predict_arguments(run: Path, data: Path, scenes: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", str(run), "--scene", str(scenes), "--dem", str(data / "auxiliary" / "dem"),
            "--tcvis", str(data / "auxiliary" / "tcvis"), "--sites", str(data / "sites.geojson"),
            "--out", str(out), "--min-area", "0", "--threshold", "0.3", *extra]


def polygons_of(path: Path):
    meta, _, geometry, fields = pyogrio.raw.read(path)
    return meta["crs"], list(meta["fields"]), [bytes(g) for g in geometry], [list(f) for f in fields]


def test_predict_on_ray_equals_local_pixel_for_pixel(tiny_run, demo_records, tmp_path):
    data = demo_records.parent / "data"
    scenes = three_scenes(data, tmp_path / "scenes")
    runner = CliRunner()
    local = runner.invoke(main, predict_arguments(tiny_run, data, scenes, tmp_path / "local"))
    assert local.exit_code == 0, local.output
    on_ray = runner.invoke(main, predict_arguments(tiny_run, data, scenes, tmp_path / "ray", "--engine", "ray",
                                                   "--workers", "1", "--readers", "1"))  # an actor's stacking process
    assert on_ray.exit_code == 0, on_ray.output
    assert "predicted 3 scenes" in on_ray.output
    assert "engine: ray (3 scenes in Ray actors on an embedded one-machine Ray" in on_ray.output
    assert "engine: local (this process)" in local.output
    slumps = 0
    for scene in sorted(scenes.iterdir()):
        for kind in ("probability", "mask"):
            with rasterio.open(tmp_path / "local" / scene.name / f"{scene.name}_{kind}.tif") as a, \
                    rasterio.open(tmp_path / "ray" / scene.name / f"{scene.name}_{kind}.tif") as b:
                assert a.profile == b.profile
                np.testing.assert_array_equal(a.read(), b.read())
        name = f"{scene.name}_polygons.gpkg"
        assert polygons_of(tmp_path / "local" / scene.name / name) == polygons_of(tmp_path / "ray" / scene.name / name)
        slumps += len(polygons_of(tmp_path / "ray" / scene.name / name)[2])
        assert (tmp_path / "ray" / scene.name / f"{scene.name}_complete.json").exists()
        look = f"{scene.name}_quicklook.png"
        assert (tmp_path / "ray" / scene.name / look).read_bytes() == (tmp_path / "local" / scene.name / look).read_bytes()
    merged = polygons_of(tmp_path / "ray" / "rts_polygons.gpkg")
    assert merged == polygons_of(tmp_path / "local" / "rts_polygons.gpkg") and len(merged[2]) == slumps > 0
    assert not temporaries(tmp_path / "ray")
    # A second run finds every scene complete and leaves the maps alone.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.tif")}
    again = runner.invoke(main, predict_arguments(tiny_run, data, scenes, tmp_path / "ray", "--engine", "ray"))
    assert again.exit_code == 0 and "(0 now, 3 already complete)" in again.output, again.output
    assert {p: p.stat().st_mtime_ns for p in before} == before


def killer():
    """A progress callback that kills (SIGKILL, by pid) a Ray worker process while it builds a
    scene, once; Ray titles a worker's process `ray::<task name>` while it runs a task."""
    import psutil

    killed = []

    def progress(done, total):
        if killed or not done:
            return
        for process in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(process.info["cmdline"] or [])
            if title.startswith("ray::build_scene"):
                os.kill(process.info["pid"], signal.SIGKILL)
                killed.append((process.info["pid"], title))
                return

    return progress, killed


def test_a_killed_worker_is_retried_and_the_shards_equal_a_clean_build(tmp_path):
    from rts_tf.build import build_records
    from rts_tf.settings import BuildSettings

    runner = CliRunner()
    assert runner.invoke(main, ["demo-data", str(tmp_path / "data"), "--scene-size", "480"]).exit_code == 0
    data = tmp_path / "data"
    scenes = three_scenes(data, tmp_path / "scenes")
    arguments = dict(scenes=[str(scenes)], labels=str(data / "labels.gpkg"), tcvis=[str(data / "auxiliary" / "tcvis")],
                     dem=[str(data / "auxiliary" / "dem")], sites=str(data / "sites.geojson"),
                     settings=BuildSettings(tile_size=64, overlap=8))
    build_records(**arguments, out=str(tmp_path / "clean"))
    progress, killed = killer()
    summary = build_records(**arguments, out=str(tmp_path / "killed"), engine="ray", workers=2, progress=progress)
    assert killed, "no worker was building a scene when progress was reported"
    assert summary.scenes_built == 3 and not temporaries(tmp_path / "killed")
    assert files_of(tmp_path / "killed", "*.tfrecord*", "*.json") == files_of(tmp_path / "clean", "*.tfrecord*",
                                                                               "*.json")


def test_a_bad_scene_fails_alone_and_is_named(demo_records, tiny_run, tmp_path):
    data = demo_records.parent / "data"
    scenes = three_scenes(data, tmp_path / "scenes")
    bad = sorted(scenes.iterdir())[1]
    corrupt_middle_block(bad)
    good = [scene.name for scene in sorted(scenes.iterdir()) if scene != bad]
    runner = CliRunner()
    for engine in ("ray", "local"):
        out = tmp_path / f"records_{engine}"
        result = runner.invoke(main, demo_build(data, out, "--engine", engine, "--workers", "2", scenes=scenes))
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and "1 of 3 scenes failed" in error[0] and bad.name in error[0], result.output
        assert "SR.tif" in error[0]  # the file GDAL could not read
        assert not (out / "manifest.json").exists() and not temporaries(out)
        assert sorted(p.stem for p in out.rglob("*.tfrecord")) == good  # the good scenes are finished and kept
    maps = tmp_path / "maps"
    result = runner.invoke(main, predict_arguments(tiny_run, data, scenes, maps, "--engine", "ray"))
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "1 of 3 scenes failed" in result.output and bad.name in result.output.split("Error:")[1]
    assert all((maps / name / f"{name}_complete.json").exists() for name in good)
    assert not (maps / bad.name).exists() and not temporaries(maps)
    assert (maps / "rts_polygons.gpkg").exists()


def test_crossval_on_ray_gives_the_local_table(world_records, tmp_path):
    arguments = ["crossval", "--records", str(world_records), "--arch", "unet", "--encoder", "resnet18",
                 "--epochs", "1", "--batch-size", "1", "--decoder-filters", "8,8,8,8,8", "--image-every", "0",
                 "--seed", "1"]
    result = CliRunner().invoke(main, [*arguments, "--logdir", str(tmp_path / "ray"), "--engine", "ray",
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 runs trained, 0 already complete" in result.output
    rows = (tmp_path / "ray" / "crossval.csv").read_text().splitlines()
    # A run row and the cell's mean row per held-out region.
    assert len(rows) == 5 and rows[1].startswith("Alpha,") and rows[3].startswith("Beta,")
    for region in ("Alpha", "Beta"):
        run = json.loads((tmp_path / "ray" / "unet_resnet18" / region / "run.json").read_text())
        assert run["epochs_run"] == 1
    again = CliRunner().invoke(main, [*arguments, "--logdir", str(tmp_path / "ray"), "--engine", "ray"])
    assert again.exit_code == 0 and "0 runs trained, 2 already complete" in again.output, again.output


def test_embedded_ray_starts_only_what_the_jobs_need():
    """The embedded Ray (engine.start_minimal_node) runs GCS, raylet and what the raylet starts: no
    dashboard API server, no autoscaler monitor, no log monitor (about 3 CPU seconds and seconds of
    start-up on two cores), with metrics off."""
    from rts_tf.engine import session_processes

    folder = ray._private.worker._global_node.get_temp_dir_path()
    titles = []
    for pid in session_processes(folder):
        with open(f"/proc/{pid}/cmdline") as handle:
            titles.append(handle.read().replace("\0", " "))
    assert any("gcs_server" in title for title in titles) and any("/raylet" in title for title in titles)
    unwanted = [title for title in titles for name in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py",
                                                       "log_monitor.py") if name in title]
    assert not unwanted, unwanted
    assert ray.cluster_resources()["CPU"] == 2  # the driver is connected to it


def test_embedded_ray_workers_allocate_from_one_malloc_arena():
    """The embedded Ray's workers run with MALLOC_ARENA_MAX=1 (engine.worker_environment): an actor's
    job runs in a thread of its own, whose glibc arena would otherwise shrink and grow again block
    after block (twice the page faults of a local worker). The variable reaches the workers through
    the raylet, and the arena count is what glibc reads at the worker's start."""
    import os

    @ray.remote(num_cpus=1)
    def worker_setting():
        return os.environ.get("MALLOC_ARENA_MAX")

    expected = os.environ.get("MALLOC_ARENA_MAX", "1")  # a value the user set is kept
    assert ray.get(worker_setting.remote()) == expected
