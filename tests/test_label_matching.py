"""Label matching in build-records: counts per rule, unmatched polygons, unknown regions, class selection."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely.geometry import box, mapping

from conftest import ORIGIN_B, SCENE_A, SCENE_B, build_arguments
from helpers import ORIGIN, write_polygons
from rts_tf.cli import main
from rts_tf.records import decode_example

SIZE = 64  # the world's scenes are 64 x 64 pixels of 3 m


def utm_box(origin, left, top, right, bottom):
    """A box given in metres right of and below a scene's top-left corner."""
    return box(origin[0] + left, origin[1] - bottom, origin[0] + right, origin[1] - top)


# Boxes on whole pixels: 30-90 m is pixels 10-29, so 20 x 20 = 400 label pixels by pixel centres.
SLUMP_A = utm_box(ORIGIN, 30, 30, 90, 90)
SLUMP_B = utm_box(ORIGIN_B, 30, 30, 90, 90)
# 100-130 m right: pixel centres 100.5 ... 127.5 m, columns 33-42; 30-60 m down: rows 10-19. 100 pixels.
OTHER_A = utm_box(ORIGIN, 100, 30, 130, 60)


def run(arguments):
    return CliRunner().invoke(main, arguments)


def without_sites(arguments):
    index = arguments.index("--sites")
    return arguments[:index] + arguments[index + 2:]


def with_labels(arguments, labels):
    arguments = list(arguments)
    arguments[arguments.index("--labels") + 1] = str(labels)
    return arguments


def label_mosaics(records) -> dict[str, np.ndarray]:
    """Each scene's label, put back together from its tiles parsed with tf.data."""
    manifest = json.loads((records / "manifest.json").read_text())
    paths = [str(records / path) for path in manifest["shards"]]
    dataset = tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
    mosaics = {scene["scene_id"]: np.full((SIZE, SIZE), 255, dtype=np.uint8) for scene in manifest["scenes"]}
    for tile in dataset.map(lambda s: decode_example(s, manifest)).as_numpy_iterator():
        row, col = int(tile["row"]), int(tile["col"])
        part = tile["label"][: SIZE - row, : SIZE - col, 0]
        mosaics[tile["scene_id"].decode()][row:row + part.shape[0], col:col + part.shape[1]] = part
    return mosaics


def pixels(rows, cols) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_suffix_is_unmatched_and_null_image_id_matches_by_footprint(world, tmp_path):
    suffixed = utm_box(ORIGIN, 120, 0, 150, 15)  # inside scene A, but its image_id names no scene
    labels = write_polygons(tmp_path / "labels.gpkg", [SLUMP_A, suffixed, SLUMP_B],
                            {"image_id": [SCENE_A, SCENE_A + "_v2", None], "region": ["Alpha", "Alpha", None]})
    out = tmp_path / "records"
    result = run(with_labels(build_arguments(world, out), labels))
    assert result.exit_code == 0, result.output

    manifest = json.loads((out / "manifest.json").read_text())
    scenes = {scene["scene_id"]: scene for scene in manifest["scenes"]}
    assert scenes[SCENE_A]["labels"] == {"image_id": 1, "footprint": 0}
    assert scenes[SCENE_B]["labels"] == {"image_id": 0, "footprint": 1}
    assert (scenes[SCENE_A]["label_polygons"], scenes[SCENE_B]["label_polygons"]) == (1, 1)
    assert (scenes[SCENE_A]["region_from"], scenes[SCENE_B]["region"]) == ("sites", "Beta")
    report = manifest["labels"]
    assert report["file"] == str(labels) and report["label_field"] is None and report["label_values"] is None
    assert (report["polygons"], report["selected"]) == (3, 3)
    assert report["matched"] == {"image_id": 1, "footprint": 1}
    # The second feature: index 1 in the file, GeoPackage fid 2.
    assert report["unmatched"] == {"count": 1, "polygons": [{"index": 1, "fid": 2, "image_id": SCENE_A + "_v2"}]}

    summary = next(line for line in result.output.splitlines() if line.startswith("labels:"))
    assert summary == ("labels: 3 polygons, all slumps; matched 1 by image_id, 1 by footprint; "
                       "1 matched no scene (listed in manifest.json under labels.unmatched)")
    assert f"  {SCENE_A} (Alpha): 1 + 0" in result.output and f"  {SCENE_B} (Beta): 0 + 1" in result.output

    mosaics = label_mosaics(out)
    # Scene A: only its image_id polygon is burnt (the suffixed one, rows 0-4 / cols 40-49, is not).
    np.testing.assert_array_equal(mosaics[SCENE_A] == 1, pixels(slice(10, 30), slice(10, 30)))
    # Scene B: the null image_id polygon, found by footprint, is label 1 pixel for pixel.
    np.testing.assert_array_equal(mosaics[SCENE_B] == 1, pixels(slice(10, 30), slice(10, 30)))
    # B is clear, so the rest is background, except the 8 x 8 corner that only the dropped tile
    # (48, 48) holds (it is 75% padding).
    assert (mosaics[SCENE_B] == 0).sum() == SIZE * SIZE - 400 - 8 * 8


def test_scene_without_region_fails_naming_it_unless_default_region(world, tmp_path):
    # Scene A has a label with a region; scene B has no label and there are no sites.
    labels = write_polygons(tmp_path / "labels.gpkg", [SLUMP_A], {"image_id": [SCENE_A], "region": ["Alpha"]})
    out = tmp_path / "records"
    arguments = without_sites(with_labels(build_arguments(world, out), labels))
    result = run(arguments)
    assert result.exit_code != 0
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: "), result.output
    assert SCENE_B in message[0] and SCENE_A not in message[0]
    assert "region unknown" in message[0] and "--sites" in message[0] and "--default-region" in message[0]
    assert not out.exists() or not any(out.rglob("*.tfrecord*"))

    result = run(arguments + ["--default-region", "Gamma"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    scenes = {scene["scene_id"]: scene for scene in manifest["scenes"]}
    assert (scenes[SCENE_A]["region"], scenes[SCENE_A]["region_from"]) == ("Alpha", "labels")
    assert (scenes[SCENE_B]["region"], scenes[SCENE_B]["region_from"], scenes[SCENE_B]["site"]) == (
        "Gamma", "default", "Gamma")
    assert scenes[SCENE_B]["shards"] == [f"Gamma/{SCENE_B}.tfrecord"]
    assert manifest["labels"]["default_region"] == "Gamma" and set(manifest["regions"]) == {"Alpha", "Gamma"}
    assert f"  {SCENE_B} (Gamma from --default-region): 0 + 0  no labels: all background" in result.output


def test_a_site_that_does_not_cover_a_scene_names_the_sites_file(world, tmp_path):
    sites = write_polygons(tmp_path / "sites.geojson", [utm_box(ORIGIN, -500, -500, 700, 700)],
                           {"site": ["alpha_site"], "region": ["Alpha"]}, driver="GeoJSON")
    labels = write_polygons(tmp_path / "labels.gpkg", [SLUMP_A], {"image_id": [SCENE_A]})
    arguments = with_labels(build_arguments(world, tmp_path / "records"), labels)
    arguments[arguments.index("--sites") + 1] = str(sites)
    message = run(arguments).output.strip()
    assert message.startswith("Error: ") and "\n" not in message
    assert SCENE_B in message and str(sites) in message and "--default-region" in message


@pytest.fixture
def classes(world, tmp_path):
    """A label file with a `label` field: an RTS and an 'other' polygon in scene A, an RTS in B."""
    return write_polygons(tmp_path / "classes.gpkg", [SLUMP_A, OTHER_A, SLUMP_B],
                          {"image_id": [SCENE_A, SCENE_A, SCENE_B], "label": ["RTS", "other", "RTS"]})


def test_label_field_selects_the_slump_class_and_rebuilds(world, classes, tmp_path):
    out = tmp_path / "records"
    arguments = with_labels(build_arguments(world, out), classes)
    result = run(arguments)
    assert result.exit_code == 0, result.output
    everything = label_mosaics(out)[SCENE_A] == 1
    assert everything.sum() == 400 + 100  # by default every polygon is a slump

    result = run(arguments + ["--label-field", "label", "--label-value", "RTS"])
    assert result.exit_code == 0, result.output
    assert "2 built, 0 already complete" in result.output  # the selection is part of each scene's fingerprint
    assert ("labels: 2 of 3 polygons selected as slumps (label = RTS); matched 2 by image_id, 0 by footprint; "
            "0 matched no scene") in result.output
    mosaic = label_mosaics(out)[SCENE_A] == 1
    assert mosaic.sum() == 400 and not (mosaic & pixels(slice(10, 20), slice(33, 43))).any()
    grid = from_origin(ORIGIN[0], ORIGIN[1], 3.0, 3.0)
    expected = rasterize([(mapping(SLUMP_A), 1)], out_shape=(SIZE, SIZE), transform=grid, dtype="uint8")
    np.testing.assert_array_equal(mosaic, expected == 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["labels"]["label_field"], manifest["labels"]["label_values"]) == ("label", ["RTS"])
    assert (manifest["labels"]["selected"], manifest["labels"]["unmatched"]["count"]) == (2, 0)
    scene_a = next(scene for scene in manifest["scenes"] if scene["scene_id"] == SCENE_A)
    assert scene_a["labels"] == {"image_id": 1, "footprint": 0} and scene_a["label_polygons"] == 1

    again = run(arguments + ["--label-field", "label", "--label-value", "RTS,RTS"])
    assert again.exit_code == 0 and "0 built, 2 already complete" in again.output  # same selection: reused


@pytest.mark.parametrize("options, words", [
    (["--label-field", "class", "--label-value", "RTS"], ["no field 'class'", "image_id, label"]),
    (["--label-field", "label", "--label-value", "rts"], ["no polygon has label = rts", "values present: RTS, other"]),
    (["--label-value", "RTS"], ["--label-value needs --label-field"]),
])
def test_label_selection_mistakes_are_one_line_errors(world, classes, tmp_path, options, words):
    out = tmp_path / "records"
    result = run(with_labels(build_arguments(world, out), classes) + options)
    assert result.exit_code != 0
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error: "), result.output
    for word in words:
        assert word in message[0], message[0]
    if options[0] == "--label-field":
        assert str(classes) in message[0]
    assert not out.exists()
