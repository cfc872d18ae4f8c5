"""No loose ends: a corrupt shard, a bad run.json, labels on no scene, predict into someone's folder,
Ctrl-C and SIGTERM, a killed Ray driver and two commands on one folder each end in one `Error:` line
(or Ctrl-C's `Aborted!`), exit != 0, nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

from conftest import SCENE_A, build_arguments, fit_arguments
from helpers import write_polygons
from rts_tf.bands import BANDS
from rts_tf.cli import main
from rts_tf.engine import session_processes
from rts_tf.locks import is_chief_task
from rts_tf.records import sha256_file
from test_user_mistakes import assert_fails, make_run, replace, run

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file: same size, other content (a bad disk or copy)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))


def interruptible() -> None:
    """In the child before it runs: Ctrl-C's default action, as a terminal's foreground job has it.
    A shell without job control starts its background jobs with SIGINT ignored, the ignore is
    inherited, and Python then installs no KeyboardInterrupt handler (tests run from such a job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(*arguments: str, environment: dict | None = None) -> subprocess.Popen:
    """`python -m rts_tf ...` of this checkout in a session of its own (as a terminal runs it)."""
    return subprocess.Popen([sys.executable, "-m", "rts_tf", *map(str, arguments)], env=environment or ENVIRONMENT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=interruptible)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def scene_parts(out: Path) -> list[Path]:
    return [path for path in out.glob("*/*.json") if not path.name.endswith(".tmp")]


def temporaries(out: Path) -> list[Path]:
    return [path for path in out.rglob("*") if path.name.endswith(".tmp")]


# --- a shard with flipped bytes but the right size -------------------------------------------------

def test_flipped_bytes_in_a_shard_are_named_by_fit_and_inspect(demo_records, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(demo_records, records)
    manifest = json.loads((records / "manifest.json").read_text())
    shard = min(path for path, info in manifest["shards"].items() if info["region"] == "Lena")  # training data
    size = (records / shard).stat().st_size
    flip_bytes(records / shard)
    assert (records / shard).stat().st_size == size == manifest["shards"][shard]["bytes"]
    logdir = tmp_path / "run"
    # fit checks sizes only before training (--verify checks checksums): tf.data meets the damage while
    # training, and the error names the shard instead of TensorFlow's DataLossError.
    message = assert_fails(run(fit_arguments(records, logdir, "--epochs", "1", "--image-every", "0")),
                           records / shard, "checksum does not match the manifest", "rebuild it")
    assert "DataLossError" not in message
    assert not (logdir / "run.json").exists() and not (logdir / "model.keras").exists()
    assert_fails(run(fit_arguments(records, tmp_path / "verified", "--epochs", "1", "--verify")), records / shard,
                 "checksum")
    inspected = run(["inspect", records, "--samples", "0"])
    assert inspected.exit_code != 0 and f"{records / shard}: shard checksum does not match" in inspected.output


def test_a_rebuilt_damaged_shard_is_named(world, tmp_path):
    out = tmp_path / "records"
    assert run(build_arguments(world, out)).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shard = next(path for path, info in manifest["shards"].items() if SCENE_A in path)
    flip_bytes(out / shard)
    result = run(build_arguments(world, out))
    assert result.exit_code == 0, result.output
    assert "scenes: 2 (1 built, 1 already complete)" in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {out / shard}: shard checksum does not match the manifest: rebuilt scene "
                        f"{SCENE_A}"], result.output
    assert sha256_file(out / shard) == json.loads((out / "manifest.json").read_text())["shards"][shard]["sha256"]


# --- run.json ---------------------------------------------------------------------------------------

def predict_arguments(world, run_folder, out):
    return ["predict", "--run", run_folder, "--scene", world["scenes"] / SCENE_A, "--dem", world["dem"],
            "--tcvis", world["tcvis"], "--out", out]


def damaged_run(tmp_path, name, change):
    folder = make_run(tmp_path / name, 32, "Beta")
    info = json.loads((folder / "run.json").read_text())
    change(info)
    (folder / "run.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("name, change, words", [
    ("no_bands", lambda info: info.pop("bands"), ['no "bands"', "band", "order"]),
    ("five_bands", lambda info: info.update(bands=BANDS[:5]),
     ["lists 5 bands but its model model.keras takes 10 input channels"]),
    ("older", lambda info: info.update(rts_tf_version="0.0.3"), ["unknown rts-tf version '0.0.3'"]),
    ("newer", lambda info: info.update(rts_tf_version="7.2.0"), ["written by rts-tf 7.2.0, newer than this"]),
    ("no_tile_size", lambda info: info.pop("tile_size"), ['no "tile_size"']),
    ("text_threshold", lambda info: info.update(threshold="high"), ['"threshold" must be a number']),
])
def test_a_bad_run_json_is_one_line_in_predict_and_evaluate(world, world_records, tmp_path, name, change, words):
    folder = damaged_run(tmp_path, name, change)
    out = tmp_path / "maps"
    assert_fails(run(predict_arguments(world, folder, out)), folder / "run.json", *words)
    assert not out.exists()
    assert_fails(run(["evaluate", "--run", folder, "--records", world_records, "--out", tmp_path / "scores"]),
                 folder / "run.json", *words)
    assert not (tmp_path / "scores").exists()


def test_a_run_without_threshold_says_so(world_records, tmp_path):
    folder = damaged_run(tmp_path, "no_threshold", lambda info: info.pop("threshold"))
    result = run(["evaluate", "--run", folder, "--records", world_records, "--out", tmp_path / "scores"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5
    assert metrics["threshold_source"] == f"0.5 ({folder / 'run.json'} has no threshold)"
    assert "selected on the validation data" not in result.output


# --- labels on no scene; a mask that leaves nothing --------------------------------------------------

def test_labels_in_a_wrong_crs_are_refused_unless_allowed(world, tmp_path):
    # The slumps' UTM coordinates in a file that says EPSG:3413: they land far from every scene.
    labels = tmp_path / "wrong_crs.gpkg"
    geometries = shapely.to_wkb(np.array([world["slump_a"], world["slump_b"]], dtype=object))
    pyogrio.raw.write(labels, geometries, [np.array(["RTS", "RTS"], dtype=object)], ["label"], crs="EPSG:3413",
                      driver="GPKG", geometry_type="Polygon")
    out = tmp_path / "records"
    assert_fails(run(replace(build_arguments(world, out), "--labels", labels)), labels,
                 "none of its 2 slump polygon(s) lies on any of the 2 scene(s)", "wrong CRS", "--allow-no-labels")
    assert not out.exists()


def test_a_generic_mask_that_covers_no_pixel_leaves_nothing(world, tmp_path):
    scene = tmp_path / "generic" / "mosaic_20190801.tif"
    scene.parent.mkdir()
    shutil.copy(next((world["scenes"] / SCENE_A).glob("*_SR.tif")), scene)
    import rasterio

    with rasterio.open(scene) as dataset:
        profile = dataset.profile
    mask = tmp_path / "quality.tif"
    profile.update(count=1, dtype="uint8", nodata=None)
    with rasterio.open(mask, "w", **profile) as dataset:
        dataset.write(np.full((1, profile["height"], profile["width"]), 3, np.uint8))
    labels = write_polygons(tmp_path / "labels.gpkg", [world["slump_a"]], {"label": ["RTS"]})
    out = tmp_path / "records"
    arguments = replace(replace(build_arguments(world, out), "--scenes", scene.parent), "--labels", labels)
    message = assert_fails(run(arguments + ["--sensor", "generic", "--band-map", "blue=1,green=2,red=3,nir=4",
                                            "--mask", mask, "--mask-ignore", "3"]),
                           out, "no tiles written", f"its --mask {mask} marks no pixel usable")
    assert "mosaic_20190801" in message
    assert not out.exists()  # no manifest.json, build-settings.json or empty shard left behind


# --- predict --out into someone's folder ------------------------------------------------------------

def test_predict_refuses_a_folder_that_holds_no_predictions(world, tmp_path):
    folder = make_run(tmp_path / "run", 32, "Beta")
    data = tmp_path / "data"  # the input data folder, given as --out by mistake
    shutil.copytree(world["scenes"], data / "scenes")
    shutil.copy(world["labels"], data / "labels.gpkg")
    before = sorted(path.relative_to(data) for path in data.rglob("*"))
    assert_fails(run(predict_arguments(world, folder, data)), data, "holds no rts-tf predictions",
                 "choose a new or empty --out")
    assert sorted(path.relative_to(data) for path in data.rglob("*")) == before
    # A prediction folder is accepted again: the re-run finds the scene complete.
    out = tmp_path / "maps"
    assert run(predict_arguments(world, folder, out)).exit_code == 0
    again = run(predict_arguments(world, folder, out))
    assert again.exit_code == 0, again.output


# --- two commands on one folder ---------------------------------------------------------------------

HOLDER = ("import sys, time; from rts_tf.locks import folder_lock\n"
          "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)")


def test_a_folder_in_use_is_refused_at_once_and_freed_by_a_kill(world, world_records, tmp_path):
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENVIRONMENT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        in_use = [folder, "is in use by process", str(holder.pid), "folder_lock", "nothing was changed"]
        started = time.monotonic()
        assert_fails(run(build_arguments(world, folder)), "--out", *in_use)
        assert_fails(run(predict_arguments(world, make_run(tmp_path / "run", 32, "Beta"), folder)), "--out", *in_use)
        assert_fails(run(fit_arguments(world_records, folder, "--epochs", "1")), "--logdir", *in_use)
        assert_fails(run(["crossval", "--records", world_records, "--arch", "unet", "--encoder", "resnet18",
                          "--logdir", folder]), "--logdir", *in_use)
        assert_fails(run(["track", world["labels"], "--out", folder]), "--out", *in_use)
        assert time.monotonic() - started < 30  # refused at once, not after the work
        assert list(folder.iterdir()) == []  # the lock writes nothing into the folder
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    result = run(build_arguments(world, folder))
    assert result.exit_code == 0, result.output


def test_only_the_chief_of_a_multi_worker_run_locks_its_logdir(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        assert is_chief_task() is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["127.0.0.1:3"], **cluster},
                                                "task": {"type": "worker", "index": 0}}))
    assert not is_chief_task()
    monkeypatch.delenv("TF_CONFIG")
    assert is_chief_task()


@pytest.mark.slow
def test_two_fits_into_one_logdir(demo_records, tmp_path):
    """The probe of the issue: a second fit (another seed) into a running run's folder."""
    logdir = tmp_path / "run"
    first = command(*fit_arguments(demo_records, logdir, "--epochs", "3"))
    try:
        wait_for(lambda: (logdir / "config.yaml").exists(), 120, "the first fit to start")
        second = subprocess.run([sys.executable, "-m", "rts_tf", *fit_arguments(demo_records, logdir, "--epochs", "3",
                                                                                "--seed", "4")],
                                env=ENVIRONMENT, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {logdir}: --logdir is in use by process {first.pid}")
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
    assert json.loads((logdir / "run.json").read_text())["config"]["seed"] == 0


# --- Ctrl-C, SIGTERM, a killed Ray driver -----------------------------------------------------------

def demo_build(demo_records, out, *extra):
    data = demo_records.parent / "data"
    return ["build-records", "--scenes", data / "scenes", "--labels", data / "labels.gpkg", "--dem",
            data / "auxiliary" / "dem", "--tcvis", data / "auxiliary" / "tcvis", "--sites", data / "sites.geojson",
            "--out", out, "--tile-size", "64", "--overlap", "8", *extra]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_build_with_two_workers_ends_in_one_line_and_resumes(demo_records, tmp_path, stop):
    out = tmp_path / "records"
    process = command(*demo_build(demo_records, out, "--workers", "2"))
    wait_for(lambda: scene_parts(out) or process.poll() is not None, 120, "a first finished scene")
    if stop == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    else:
        process.send_signal(signal.SIGTERM)  # what a batch scheduler does: the command's process
    _, error = process.communicate(timeout=60)
    assert "Traceback" not in error, error
    lines = [line for line in error.splitlines() if line.strip() and "%|" not in line]  # the progress bar's
    if stop == "ctrl-c":
        assert process.returncode == 1 and lines == ["Aborted!"], error
    else:
        assert process.returncode == 143 and lines == [
            "Error: terminated (SIGTERM); finished work is kept: run the same command again to resume"], error
    assert not temporaries(out) and not (out / "manifest.json").exists()
    done = len(scene_parts(out))
    resumed = run(demo_build(demo_records, out))
    assert resumed.exit_code == 0 and f"({12 - done} built, {done} already complete)" in resumed.output, \
        resumed.output


@pytest.mark.slow
def test_sigterm_ends_fit_cleanly_and_it_resumes(demo_records, tmp_path):
    logdir = tmp_path / "run"
    process = command(*fit_arguments(demo_records, logdir, "--epochs", "3", "--image-every", "0",
                                     "--no-test-curves"))
    # An epoch counts for a resume once its backup is written (after its logs).
    wait_for(lambda: any((logdir / "backup").rglob("checkpoint")) or process.poll() is not None, 300,
             "a finished epoch")
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 143, error
    assert "Traceback" not in error and error.strip().splitlines()[-1] == (
        "Error: terminated (SIGTERM); finished work is kept: run the same command again to resume")
    assert not (logdir / "run.json").exists()
    finished = len(json.loads((logdir / "history.json").read_text()))
    assert 1 <= finished < 3
    resumed = run(fit_arguments(demo_records, logdir, "--epochs", "3", "--image-every", "0", "--no-test-curves"))
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed after epoch {finished}" in resumed.output and (logdir / "run.json").exists()


def test_the_ray_processes_of_a_killed_driver_end(demo_records, tmp_path):
    pytest.importorskip("ray")
    root = Path(tempfile.mkdtemp(prefix="rtsr", dir="/tmp"))  # Ray's socket paths must stay short
    out = tmp_path / "records"
    try:
        process = command(*demo_build(demo_records, out, "--engine", "ray", "--workers", "2"),
                          environment={**ENVIRONMENT, "RTS_TF_RAY_TMPDIR": str(root)})
        wait_for(lambda: scene_parts(out) or process.poll() is not None, 180, "a first finished scene")
        sessions = list(root.iterdir())
        assert len(sessions) == 1 and session_processes(str(sessions[0]))  # Ray is running
        process.kill()  # kill -9: no clean-up runs in the driver
        process.wait()
        wait_for(lambda: not sessions[0].exists(), 30, "the session's processes to end and its folder to go")
        assert session_processes(str(sessions[0])) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    resumed = run(demo_build(demo_records, out))
    assert resumed.exit_code == 0 and "already complete" in resumed.output, resumed.output
