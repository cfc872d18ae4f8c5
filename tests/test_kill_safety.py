"""A killed fit, re-run, ends with the files an uninterrupted run writes: kills right after each write
of an epoch's end and of the final save (tests/kill_fit.py), with deterministic ops (the default)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rts_tf.cli import main

HERE = Path(__file__).parent
FIT = ["--arch", "unet", "--encoder", "resnet18", "--decoder-filters", "8,8,8,8,8", "--batch-size", "1",
       "--image-every", "0", "--epochs", "3", "--holdout-region", "Beta", "--schedule", "constant"]


def fit_arguments(records, logdir):
    return ["fit", "--records", str(records), "--logdir", str(logdir), *FIT]


@pytest.fixture(scope="module")
def straight(world_records, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("kills") / "straight"
    result = CliRunner().invoke(main, fit_arguments(world_records, logdir))
    assert result.exit_code == 0, result.output
    return logdir


def outcome(logdir: Path):
    from rts_tf.models import load_model

    run = json.loads((logdir / "run.json").read_text())
    kept = {key: run[key] for key in ("best_epoch", "epochs_run", "threshold", "threshold_source", "metrics", "history")}
    files = sorted(path.name for path in (logdir / "checkpoints").iterdir())
    return kept, files, load_model(logdir / "model.keras").get_weights()


def kill_and_resume(records, logdir, point, epoch):
    killed = subprocess.run([sys.executable, str(HERE / "kill_fit.py"), point, str(epoch),
                             *fit_arguments(records, logdir)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (logdir / "run.json").exists()
    resumed = CliRunner().invoke(main, fit_arguments(records, logdir))
    assert resumed.exit_code == 0, resumed.output
    return resumed


def check_same(straight, logdir):
    expected, expected_files, expected_weights = outcome(straight)
    got, files, weights = outcome(logdir)
    assert got == expected and files == expected_files
    for a, b in zip(weights, expected_weights):
        np.testing.assert_array_equal(a, b)
    assert not list(logdir.glob("**/*.tmp")) and not (logdir / "backup").exists()


POINTS = [("history", 2), ("model", 0)]
SLOW_POINTS = [("best", 2), ("test", 2), ("backup", 2), ("history", 3), ("trained", 0), ("saved_model", 0)]


@pytest.mark.parametrize("point,epoch", POINTS)
def test_a_kill_after_a_write_resumes_to_the_files_of_an_uninterrupted_run(world_records, straight, tmp_path,
                                                                           point, epoch):
    resumed = kill_and_resume(world_records, tmp_path / "run", point, epoch)
    check_same(straight, tmp_path / "run")
    if point == "model":  # the run was trained: it is saved again, not trained again
        assert "Epoch 1/3" not in resumed.output


@pytest.mark.slow
@pytest.mark.parametrize("point,epoch", SLOW_POINTS)
def test_a_kill_after_every_other_write_resumes_to_the_same_files(world_records, straight, tmp_path, point, epoch):
    kill_and_resume(world_records, tmp_path / "run", point, epoch)
    check_same(straight, tmp_path / "run")
