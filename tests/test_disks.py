"""Full and read-only disks: one line naming the path and the cause, no temporary files left, and a
re-run after freeing space resumes. Uses a small tmpfs and a read-only bind mount (tests run as root)."""

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from rts_tf.cli import main

from conftest import fit_arguments


def mount(*arguments: str) -> None:
    completed = subprocess.run(["mount", *arguments], capture_output=True, text=True)
    if completed.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {completed.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs; grow(size) enlarges it as a user would free space."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))

    def grow(size: str) -> None:
        mount("-o", f"remount,size={size}", str(folder))

    yield folder, grow
    subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path):
    source, folder = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    folder.mkdir()
    mount("--bind", str(source), str(folder))
    mount("-o", "remount,bind,ro", str(folder))
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def one_line_error(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name or ".staging" in p.name]


def demo_build_arguments(demo_records: Path, out: Path) -> list[str]:
    data = demo_records.parent / "data"
    return ["build-records", "--scenes", str(data / "scenes"), "--labels", str(data / "labels.gpkg"),
            "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
            "--sites", str(data / "sites.geojson"), "--out", str(out), "--tile-size", "64", "--overlap", "8"]


def test_a_full_disk_during_build_records_fails_cleanly_and_the_rerun_resumes(demo_records, small_disk):
    folder, grow = small_disk
    out = folder / "records"
    full = CliRunner().invoke(main, demo_build_arguments(demo_records, out))
    one_line_error(full, "no space left on device", str(folder))
    assert not leftovers(folder)
    grow("64m")
    again = CliRunner().invoke(main, demo_build_arguments(demo_records, out))
    assert again.exit_code == 0, again.output
    scenes = len(json.loads((demo_records / "manifest.json").read_text())["scenes"])
    built = int(again.output.split(f"scenes: {scenes} (")[1].split(" built")[0])
    assert 0 < built < scenes  # the scenes finished before the disk filled up were kept
    assert not leftovers(folder)


def test_read_only_outputs_are_one_line_errors(demo_records, tiny_run, read_only):
    build = CliRunner().invoke(main, demo_build_arguments(demo_records, read_only / "records"))
    one_line_error(build, "read-only file system", str(read_only))
    fit = CliRunner().invoke(main, fit_arguments(demo_records, read_only / "run", "--epochs", "1"))
    one_line_error(fit, "read-only file system", str(read_only))
    evaluate = CliRunner().invoke(main, ["evaluate", "--run", str(tiny_run), "--records", str(demo_records),
                                         "--out", str(read_only)])
    one_line_error(evaluate, "read-only file system", "metrics.json")


def test_a_full_disk_during_predict_fails_cleanly(demo_records, tiny_run, small_disk):
    folder, _ = small_disk
    (folder / "ballast").write_bytes(b"\0" * (1024 * 1024 - 8 * 1024))  # leave 8 KiB
    data = demo_records.parent / "data"
    scene = next((data / "scenes").iterdir())
    result = CliRunner().invoke(main, ["predict", "--run", str(tiny_run), "--scene", str(scene),
                                       "--dem", str(data / "auxiliary" / "dem"),
                                       "--tcvis", str(data / "auxiliary" / "tcvis"), "--out", str(folder / "maps")])
    one_line_error(result, "no space left on device", str(folder / "maps"))
    assert not leftovers(folder)
