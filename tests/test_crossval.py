"""`rts-tf crossval`: a tiny leave-one-region-out grid produces its table and resumes without retraining."""

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from rts_tf.cli import main


def test_tiny_crossval_table_and_resume(world_records, tmp_path):
    arguments = ["crossval", "--records", str(world_records), "--arch", "unet", "--encoder", "resnet18",
                 "--logdir", str(tmp_path / "cv"), "--epochs", "1", "--batch-size", "1",
                 "--decoder-filters", "8,8,8,8,8", "--image-every", "0"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert "2 runs trained, 0 already complete" in result.output
    table = list(csv.DictReader((tmp_path / "cv" / "crossval.csv").open()))
    # One seed: a run row (its seed) and the cell's mean row (n = 1, no sd) per cell.
    assert [row["seed"] for row in table] == ["0", "mean", "0", "mean"]
    rows = [row for row in table if row["seed"] == "0"]
    assert sorted(row["region"] for row in rows) == ["Alpha", "Beta"]
    assert all(row["model"] == "unet resnet18" for row in rows)
    for row in rows:
        run = json.loads((Path(row["run"]) / "run.json").read_text())
        # Transfer score at the validation-chosen threshold beside the paper-style max IoU.
        assert float(row["threshold"]) == run["threshold"]
        assert float(row["paper_max_iou"]) == max(run["history"]["test_iou"])
        assert float(row["validation_iou"]) == run["metrics"]["iou"] and run["split"]["method"] == "blocks"
        scored = json.loads((Path(row["run"]) / "crossval" / "metrics.json").read_text())["regions"][row["region"]]
        assert float(row["iou"]) == scored["iou"] and float(row["f1"]) == scored["f1"]
    table = (tmp_path / "cv" / "crossval.md").read_text()
    assert "| held-out region | unet resnet18 |" in table and "| Alpha |" in table and "| mean |" in table
    models = {path: path.stat().st_mtime_ns for path in (tmp_path / "cv").rglob("model.keras")}
    assert len(models) == 2
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 0, again.output
    assert "0 runs trained, 2 already complete" in again.output
    assert {path: path.stat().st_mtime_ns for path in models} == models


def test_crossval_rejects_unknown_names_before_training(world_records, tmp_path):
    result = CliRunner().invoke(main, ["crossval", "--records", str(world_records), "--arch", "unet",
                                       "--encoder", "resnet9000", "--logdir", str(tmp_path / "cv")])
    assert result.exit_code != 0 and "resnet9000" in result.output
    assert not (tmp_path / "cv").exists()
