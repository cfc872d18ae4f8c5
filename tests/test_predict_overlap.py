"""`rts-tf predict --readers N`: stacking in worker processes gives the same files, and ends cleanly on bad input."""

import filecmp
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from helpers import SCENE_CRS, write_dem, write_raster, write_scene, write_tcvis
from rts_tf.cli import main
from rts_tf.stacking import GroupReader, column_groups
from test_predict import SCENE, predict_arguments, read, scene_world  # noqa: F401  (a fixture)


def stacking_processes() -> list[int]:
    """Processes of this one started by multiprocessing's spawn (stacking workers), finished or not."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def test_column_groups_are_even_strips_for_the_readers():
    cols = list(range(21))
    assert column_groups(cols, 16, 1) == [cols[0:10], cols[10:21]]  # two reads of at most 16 windows
    assert column_groups(cols, 16, 4) == [cols[0:5], cols[5:10], cols[10:15], cols[15:21]]
    assert column_groups([0, 24, 48, 58], 16, 2) == [[0, 24], [48, 58]]
    assert column_groups([0, 24], 16, 3) == [[0], [24]]  # never more groups than windows


def test_stacking_processes_write_the_same_files_as_one_thread(scene_world, tmp_path):  # noqa: F811
    runner = CliRunner()
    outputs = {}
    for readers in ("0", "2"):
        # batch 2: groups of up to 16 windows, two strips of two windows for two readers
        out = tmp_path / f"readers_{readers}"
        result = runner.invoke(main, predict_arguments(scene_world, out, "random_a",
                                                       extra=["--readers", readers, "--batch-size", "2"]))
        assert result.exit_code == 0, result.output
        outputs[readers] = out
    thread, processes = (read(outputs[readers], "probability")[0] for readers in ("0", "2"))
    valid = thread != -1
    assert valid.sum() == 94 * 90 and thread[valid].std() > 0.01  # the nodata strip of 6 rows, a textured map
    np.testing.assert_array_equal(processes, thread)
    for kind in ("probability", "mask"):
        assert filecmp.cmp(outputs["0"] / SCENE / f"{SCENE}_{kind}.tif", outputs["2"] / SCENE / f"{SCENE}_{kind}.tif",
                           shallow=False)
    assert stacking_processes() == []


def corrupt_middle_block(path: Path) -> None:
    """Overwrite the compressed bytes of a block inside the raster (not its first or last pixel,
    which predict checks before it starts)."""
    with rasterio.open(path) as dataset:
        offset = int(dataset.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(dataset.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * size)


def test_a_corrupt_scene_in_a_stacking_process_is_a_one_line_error(scene_world, tmp_path):  # noqa: F811
    # Two scenes: the good one is copied, the other has a damaged block in the middle of its reflectance.
    scenes = tmp_path / "scenes"
    with rasterio.open(next(scene_world["scene"].glob("*SR.tif"))) as dataset:
        reflectance, transform = dataset.read(), dataset.transform
    with rasterio.open(next(scene_world["scene"].glob("*udm2.tif"))) as dataset:
        udm2 = dataset.read()
    for scene_id in ("20210720_190000_1020", "20210721_190000_1020"):
        folder = scenes / scene_id
        profile = dict(tiled=True, blockxsize=32, blockysize=32, compress="deflate")
        write_raster(folder / f"{scene_id}_3B_AnalyticMS_SR.tif", reflectance, SCENE_CRS, transform, nodata=0, **profile)
        write_raster(folder / f"{scene_id}_3B_udm2.tif", udm2, SCENE_CRS, transform)
    damaged = scenes / "20210721_190000_1020" / "20210721_190000_1020_3B_AnalyticMS_SR.tif"
    corrupt_middle_block(damaged)
    arguments = predict_arguments(scene_world, tmp_path / "out", "random_a", extra=["--readers", "2"])
    arguments[arguments.index("--scene") + 1] = str(scenes)
    shared_before = set(Path("/dev/shm").glob("psm_*"))
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: 1 of 2 scenes failed"), result.output
    assert f"{damaged}: cannot read scene" in errors[0] and "Traceback" not in result.output
    # The good scene, predicted after the failure by the same processes, is complete and right.
    good = tmp_path / "out" / SCENE
    assert (good / f"{SCENE}_complete.json").exists()
    expected = CliRunner().invoke(main, predict_arguments(scene_world, tmp_path / "one", "random_a",
                                                          extra=["--readers", "0"]))
    assert expected.exit_code == 0, expected.output
    np.testing.assert_array_equal(read(tmp_path / "out", "probability")[0], read(tmp_path / "one", "probability")[0])
    # Nothing half-written for the damaged scene, no process and no shared memory left.
    assert not (tmp_path / "out" / "20210721_190000_1020").exists()
    assert stacking_processes() == []
    assert set(Path("/dev/shm").glob("psm_*")) <= shared_before


def children_stacking(pid: int) -> list[int]:
    """The stacking processes (multiprocessing's spawn) whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command_line = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command_line:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_predict_ends_its_stacking_processes_and_leaves_nothing_half_written(scene_world, tmp_path, stop):  # noqa: F811
    from test_loose_ends import command, wait_for

    root = tmp_path / "big"
    scene = write_scene(root / "scenes", SCENE, size=1536)
    write_dem(root / "dem.tif", lambda x, y: 0.05 * x, size=1536)
    write_tcvis(root / "tcvis.tif", size=1536)
    out = tmp_path / "out"
    process = command("predict", "--scene", scene, "--dem", root / "dem.tif", "--tcvis", root / "tcvis.tif",
                      "--out", out, "--run", scene_world["runs"]["random_a"], "--readers", "2")
    staging = out / SCENE
    wait_for(lambda: (len(children_stacking(process.pid)) == 2 and any(staging.glob(".probability.*.staging.tif")))
             or process.poll() is not None, 120, "stacking processes and a scene under way")
    workers = children_stacking(process.pid)
    assert process.poll() is None and len(workers) == 2
    if stop == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    else:
        process.send_signal(signal.SIGTERM)  # what a batch scheduler does: the command's process
    _, error = process.communicate(timeout=60)
    assert "Traceback" not in error, error
    lines = [line for line in error.splitlines() if line.strip() and "%|" not in line]
    if stop == "ctrl-c":
        assert process.returncode == 1 and lines == ["Aborted!"], error
    else:
        assert process.returncode == 143 and lines == [
            "Error: terminated (SIGTERM); finished work is kept: run the same command again to resume"], error
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert not out.exists() or not [path for path in out.rglob("*") if path.is_file() and path.name != ".rts-tf.lock"]


def test_read_into_gives_the_records_decoded_bands_bit_for_bit(scene_world):  # noqa: F811
    from rts_tf.scene import SceneSources, find_scenes
    from rts_tf.settings import SensorSettings

    root = scene_world["root"]
    scene = find_scenes([str(scene_world["scene"])], SensorSettings())[0]
    for bands in (None, ["blue", "green", "red", "nir", "ndvi", "slope"]):  # all ten, and a band set
        sources = SceneSources([str(root / "tcvis.tif")], [str(root / "dem.tif")],
                               **({"bands": bands} if bands else {}))
        with sources, sources.stack(scene) as stack, sources.stack(scene) as other:
            # inside, over the top-left corner (nodata strip, outside pixels) and over the bottom-right one
            for row, col, height, width in ((10, 20, 32, 40), (-8, -5, 32, 32), (80, 70, 32, 32)):
                image = np.full((height, width, len(stack.bands)), np.nan, np.float32)
                valid = np.ones((height, width), bool)
                stack.read_into(image, valid, row, col)
                expected, expected_valid = other.read(row, col, height, width)
                assert np.array_equal(image.view(np.uint32), expected.view(np.uint32))
                assert np.array_equal(valid, expected_valid) and 0 < valid.sum() < valid.size or row == 10
            # Rows shared with the group above come from that read: the same bands as a read of their own.
            reader = GroupReader(stack, [0, 24, 48, 68], 32)
            for index in range(4):
                image, valid = reader(index, [0, 24, 48, 58])
                expected, expected_valid = other.read([0, 24, 48, 68][index], 0, 32, 90)
                assert np.array_equal(image.view(np.uint32), expected.view(np.uint32))
                assert np.array_equal(valid, expected_valid)
                if index == 1:  # rows 24 to 56: the red square of rows 40 to 60, columns 30 to 50
                    red = image[..., stack.bands.index("red")]
                    assert (red[16:32, 30:50] == np.float32(1500) * np.float32(1e-4)).all()
                    assert red[16:32, 50:].max() < 0.06


def test_a_strip_reader_warps_each_chunk_of_its_strip_once(tmp_path, monkeypatch):
    from rts_tf.scene import AUXILIARY_CHUNK, SceneSources, SceneStack, find_scenes
    from rts_tf.settings import SensorSettings
    from rts_tf.stacking import read_order
    from rts_tf.tiling import tile_offsets

    size = 1100  # 3 x 3 chunks of 512 px
    scene = find_scenes([str(write_scene(tmp_path / "scenes", SCENE, size=size))], SensorSettings())[0]
    write_dem(tmp_path / "dem.tif", lambda x, y: 0.05 * x, size=size)
    write_tcvis(tmp_path / "tcvis.tif", size=size)
    warped, largest = [], [0]
    chunk = SceneStack._chunk

    def counted(stack, chunk_row, chunk_col):
        if (chunk_row, chunk_col) not in stack._chunks:
            warped.append((chunk_row, chunk_col))
        result = chunk(stack, chunk_row, chunk_col)
        largest[0] = max(largest[0], len(stack._chunks))
        return result

    monkeypatch.setattr(SceneStack, "_chunk", counted)
    rows = cols = tile_offsets(size, 256, 64)  # 0, 192, ..., 844: six windows a row
    groups = column_groups(cols, 16, 2)  # two strips of three windows: 0-640 and 576-1100 px
    with SceneSources([str(tmp_path / "tcvis.tif")], [str(tmp_path / "dem.tif")]) as sources:
        for strip in groups:
            with sources.stack(scene) as stack:
                reader = GroupReader(stack, rows, 256, strip[-1] + 256 - strip[0])
                for index, group in read_order(rows, [strip]):
                    reader(index, group)
    # Columns 0-640 px: chunk columns 0 and 1; columns 576-1100 px: 1 and 2 (column 1 in both strips).
    assert sorted(warped) == sorted([(r, c) for r in range(3) for c in (0, 1)] + [(r, c) for r in range(3) for c in (1, 2)])
    assert largest[0] <= 2 * (math.ceil(640 / AUXILIARY_CHUNK) + 1) + 2  # its cache: two rows of the strip
