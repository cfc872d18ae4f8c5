"""--overwrite removes only what rts-tf wrote; a folder that is not rts-tf's is refused; a failed
start leaves nothing behind that blocks the corrected command."""

import json
import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner

from rts_tf.cli import main

from conftest import build_arguments, fit_arguments


def users_folder(root: Path) -> Path:
    """A folder of a user's own files, given as an output folder by mistake."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("field notes")
    (root / "table.json").write_text("{\"a\": 1}")
    (root / "sub").mkdir()
    (root / "sub" / "data.tfrecord").write_bytes(b"someone else's records")
    return root


def unchanged(root: Path) -> bool:
    return ((root / "notes.txt").read_text() == "field notes" and (root / "table.json").read_text() == "{\"a\": 1}"
            and (root / "sub" / "data.tfrecord").read_bytes() == b"someone else's records"
            and sorted(p.name for p in root.rglob("*")) == ["data.tfrecord", "notes.txt", "sub", "table.json"])


def test_fit_overwrite_never_touches_a_folder_that_is_not_a_run(demo_records, tmp_path):
    folder = users_folder(tmp_path / "mine")
    bad_option = CliRunner().invoke(main, fit_arguments(demo_records, folder, "--overwrite", "--epochs", "0"))
    assert bad_option.exit_code != 0 and "--epochs" in bad_option.output and unchanged(folder)
    refused = CliRunner().invoke(main, fit_arguments(demo_records, folder, "--overwrite", "--epochs", "1"))
    assert refused.exit_code != 0 and "holds no rts-tf run" in refused.output and unchanged(folder)
    assert "Traceback" not in refused.output


def test_build_records_overwrite_never_touches_a_folder_that_is_not_records(world, tmp_path):
    folder = users_folder(tmp_path / "mine")
    refused = CliRunner().invoke(main, build_arguments(world, folder, "--overwrite"))
    assert refused.exit_code != 0 and "holds no rts-tf records" in refused.output and unchanged(folder)


def test_build_records_overwrite_removes_only_its_own_files(world, world_records, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(world_records, records)
    (records / "notes.txt").write_text("mine")
    region = next(p for p in records.iterdir() if p.is_dir())
    (region / "extra.tfrecord").write_bytes(b"mine too")
    (region / "list.json").write_text("[1, 2]")
    result = CliRunner().invoke(main, build_arguments(world, records, "--overwrite", "--max-ignored", "0.9"))
    assert result.exit_code == 0, result.output
    assert (records / "notes.txt").read_text() == "mine" and (region / "extra.tfrecord").read_bytes() == b"mine too"
    assert (region / "list.json").read_text() == "[1, 2]"
    manifest = json.loads((records / "manifest.json").read_text())
    assert manifest["settings"]["max_ignored"] == 0.9 and all((records / p).exists() for p in manifest["shards"])


def test_predict_overwrite_removes_only_its_own_files(tiny_run, demo_records, tmp_path):
    manifest = json.loads((demo_records / "manifest.json").read_text())
    scene = next(s for s in manifest["scenes"] if s["region"] == "Horton")
    data = demo_records.parent / "data"
    arguments = ["predict", "--run", str(tiny_run), "--scene", str(data / "scenes" / scene["scene_id"]),
                 "--dem", str(data / "auxiliary" / "dem"), "--tcvis", str(data / "auxiliary" / "tcvis"),
                 "--out", str(tmp_path / "maps")]
    assert CliRunner().invoke(main, arguments).exit_code == 0
    mine = tmp_path / "maps" / scene["scene_id"] / "my_notes.txt"
    mine.write_text("keep me")
    probability = tmp_path / "maps" / scene["scene_id"] / f"{scene['scene_id']}_probability.tif"
    written = probability.stat().st_mtime_ns
    again = CliRunner().invoke(main, arguments)  # the scene is complete: skipped, not refused
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    assert probability.stat().st_mtime_ns == written
    replaced = CliRunner().invoke(main, [*arguments, "--overwrite"])  # recomputed
    assert replaced.exit_code == 0, replaced.output
    assert "already complete" not in replaced.output and probability.stat().st_mtime_ns != written
    assert mine.read_text() == "keep me"
    assert probability.exists()


def test_a_failed_start_writes_nothing_and_does_not_block_the_corrected_command(demo_records, tmp_path):
    logdir = tmp_path / "run"
    too_big = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--batch-size", "4000"))
    assert too_big.exit_code != 0 and "fewer than one global batch" in too_big.output
    assert not logdir.exists()
    # A folder that holds only the configuration of a run that never finished an epoch (as an
    # earlier version left behind) is replaced without --overwrite.
    logdir.mkdir()
    (logdir / "config.yaml").write_text(yaml.safe_dump({"records": str(demo_records), "batch_size": 4000}))
    corrected = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--image-every", "0"))
    assert corrected.exit_code == 0, corrected.output
    assert yaml.safe_load((logdir / "config.yaml").read_text())["batch_size"] == 4


def test_fit_overwrite_replaces_a_run_but_keeps_the_users_files(tiny_run, demo_records, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(tiny_run, logdir)
    (logdir / "notes.txt").write_text("mine")
    different = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--image-every", "0"))
    assert different.exit_code != 0 and "another configuration (augment, epochs" in different.output
    replaced = CliRunner().invoke(main, fit_arguments(demo_records, logdir, "--epochs", "1", "--image-every", "0",
                                                      "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert (logdir / "notes.txt").read_text() == "mine"
    run = json.loads((logdir / "run.json").read_text())
    assert run["epochs_run"] == 1 and not (logdir / "images").exists()
