"""`rts-tf demo-data`, `build-records` and `inspect` end to end on the built-in demo data."""

import json

import numpy as np
import tensorflow as tf
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rts_tf.cli import main


def test_demo_records_cover_seven_regions_and_three_sensors(demo_records):
    manifest = json.loads((demo_records / "manifest.json").read_text())
    assert set(manifest["regions"]) == {"Lena", "Horton", "Herschel", "Kolguev", "Banks", "Tuktoyaktuk", "Yamal"}
    assert all(region["slump_tiles"] > 0 for region in manifest["regions"].values())
    assert {scene["epsg"] for scene in manifest["scenes"]} >= {32652, 32609, 32607, 32639, 32610, 32608, 32642}
    sensors = {scene["sensor"] for scene in manifest["scenes"] if scene["region"] == "Yamal"}
    assert sensors == {"planetscope-8b", "sentinel2-l2a"} == set(manifest["statistics"]["sensors"]) - {"planetscope"}


def test_inspect_verifies_summarises_and_previews(demo_records, tmp_path):
    previews, logs = tmp_path / "previews", tmp_path / "tb"
    result = CliRunner().invoke(main, ["inspect", str(demo_records), "--previews", str(previews),
                                       "--tensorboard", str(logs), "--samples", "4"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((demo_records / "manifest.json").read_text())
    assert f"shards verified: {len(manifest['shards'])} of {len(manifest['shards'])}" in result.output
    for region in manifest["regions"]:
        assert region in result.output
    assert "relative_elevation [m]" in result.output
    pngs = sorted(previews.glob("*.png"))
    assert len(pngs) == 4
    slump_previews = 0
    for png in pngs:
        panels = tf.io.decode_png(tf.io.read_file(str(png))).numpy()
        assert panels.shape == (64, 6 * 64 + 5 * 2, 3)
        label_panel = panels[:, -64:]
        slump_previews += np.all(label_panel == (255, 255, 0), axis=-1).any()  # a yellow slump outline
        assert panels[:, :64].std() > 0  # the true-colour panel is not blank
    assert slump_previews >= 2
    events = EventAccumulator(str(logs), size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"] or events.Tags()["tensors"]
    assert len(images) == 4


def test_inspect_names_a_corrupted_shard(demo_records, tmp_path):
    import shutil

    copy = tmp_path / "records"
    shutil.copytree(demo_records, copy)
    shard = sorted(copy.rglob("*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    result = CliRunner().invoke(main, ["inspect", str(copy), "--samples", "0"])
    assert result.exit_code != 0
    assert shard.name in result.output and "truncated" in result.output
