"""Records: schema round trip, tile contents, manifest, determinism, resume and parallel builds."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from rasterio.transform import Affine
from shapely.geometry import Point, box

from conftest import SCENE_A, SCENE_B, TILE, build_arguments
from helpers import ORIGIN, SCENE_CRS, write_polygons
from rts_tf.build import BuildSettings, build_records
from rts_tf.cli import main
from rts_tf.labels import rasterize_labels, read_polygons, scene_labels
from rts_tf.rasters import Grid
from rts_tf.records import IMAGE_PARTS, decode_example, encode_example, features, parts_to_float32
from rts_tf.bands import BANDS


def read_tiles(records, manifest=None):
    manifest = manifest or json.loads((records / "manifest.json").read_text())
    paths = [str(records / path) for path in manifest["shards"]]
    dataset = tf.data.TFRecordDataset(paths, compression_type=manifest["compression"])
    return list(dataset.map(lambda s: decode_example(s, manifest)).as_numpy_iterator())


def shard_bytes(records):
    return {p.relative_to(records).as_posix(): p.read_bytes() for p in sorted(records.rglob("*.tfrecord*"))}


def test_schema_round_trip():
    """Schema 2: each part in its stored type, decoded to physical units in the manifest's band order
    (values pinned by hand: DN 1234 -> 0.1234, NDVI step 1e-4, TCVIS DN as stored)."""
    rng = np.random.default_rng(3)
    parts = {"image_reflectance": rng.integers(0, 10000, (16, 16, 4)).astype(np.uint16),
             "image_ndvi": rng.integers(-10000, 10000, (16, 16, 1)).astype(np.int16),
             "image_tcvis": rng.integers(0, 256, (16, 16, 3)).astype(np.uint8),
             "image_terrain": rng.normal(size=(16, 16, 2)).astype(np.float16)}
    parts["image_reflectance"][0, 0] = [1234, 0, 9999, 65535]
    parts["image_ndvi"][0, 0] = -5000
    label = rng.integers(0, 2, size=(16, 16, 1)).astype(np.uint8)
    label[0, :3] = 255
    manifest = {"features": features(16), "bands": BANDS}
    serialized = encode_example(parts, label, scene_id="s1", region="Lena", site="lena_1",
                                row=7, col=9, slump_pixels=int((label == 1).sum()), ignored_pixels=3)
    sample = {k: v.numpy() for k, v in decode_example(tf.constant(serialized), manifest).items()}
    image = sample["image"]
    assert image.dtype == np.float32 and image.shape == (16, 16, 10)
    np.testing.assert_array_equal(image[0, 0, :5], np.float32([1234, 0, 9999, 65535, -5000]) * np.float32(1e-4))
    assert image[0, 0, 0] == pytest.approx(0.1234) and image[0, 0, 4] == pytest.approx(-0.5)
    np.testing.assert_array_equal(image[..., 5:8], parts["image_tcvis"])
    np.testing.assert_array_equal(image[..., 8:], parts["image_terrain"].astype(np.float32))
    # NumPy decodes bit for bit as TensorFlow does: predict's bands are the records' bands.
    np.testing.assert_array_equal(parts_to_float32(parts), image)
    np.testing.assert_array_equal(sample["label"], label)
    assert sample["scene_id"] == b"s1" and sample["region"] == b"Lena" and sample["site"] == b"lena_1"
    assert (sample["row"], sample["col"], sample["ignored_pixels"]) == (7, 9, 3)
    stored = decode_example(tf.constant(serialized), manifest, keep_dtype=True)["image"]
    assert {key: value.dtype for key, value in stored.items()} == {
        "image_reflectance": tf.uint16, "image_ndvi": tf.int16, "image_tcvis": tf.uint8, "image_terrain": tf.float16}


def test_stored_types_round_and_clip_by_hand():
    ndvi, tcvis, terrain = (next(p for p in IMAGE_PARTS if p.name == n) for n in ("ndvi", "tcvis", "terrain"))
    np.testing.assert_array_equal(ndvi.store(np.float32([0.12344, 0.12346, -1.0, 5.0])), [1234, 1235, -10000, 32767])
    np.testing.assert_array_equal(tcvis.store(np.float32([0.4, 0.6, 254.5, 300.0, -3.0])), [0, 1, 254, 255, 0])
    assert terrain.store(np.float32([1.0001])).dtype == np.float16


def test_manifest_describes_scenes_regions_and_statistics(world_records):
    manifest = json.loads((world_records / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["tile_size"] == 32 and manifest["overlap"] == 8
    assert manifest["compression"] == "" and manifest["bands"] == BANDS
    assert manifest["label_values"] == {"background": 0, "rts": 1, "ignore": 255}
    scenes = {scene["scene_id"]: scene for scene in manifest["scenes"]}
    assert set(scenes) == {SCENE_A, SCENE_B}
    assert (scenes[SCENE_A]["region"], scenes[SCENE_A]["site"]) == ("Alpha", "alpha_site")  # from --sites
    assert scenes[SCENE_B]["region"] == "Beta" and scenes[SCENE_A]["epsg"] == 32608
    assert scenes[SCENE_A]["transform"] == list(Affine(3.0, 0, ORIGIN[0], 0, -3.0, ORIGIN[1]))[:6]
    assert (scenes[SCENE_A]["width"], scenes[SCENE_A]["height"]) == (64, 64)
    for scene in scenes.values():
        for path in scene["shards"]:
            assert path.startswith(scene["region"] + "/")
            assert len(manifest["shards"][path]["sha256"]) == 64
    overall = manifest["statistics"]["overall"]
    assert set(manifest["statistics"]["regions"]) == {"Alpha", "Beta"}
    assert overall["mean"][3] == pytest.approx(0.25, rel=0.05)  # NIR reflectance of the fixture scenes
    assert overall["count"] == sum(r["count"] for r in manifest["statistics"]["regions"].values())


def test_tiles_hold_labels_ignore_and_padding(world, world_records):
    manifest = json.loads((world_records / "manifest.json").read_text())
    tiles = read_tiles(world_records, manifest)
    scene_a = [t for t in tiles if t["scene_id"].decode() == SCENE_A]
    # 64 px, 32 px tiles, overlap 8: offsets 0, 24, 48 -> 9 tiles. Tile (48, 0) is half padding
    # (kept at the 50% limit); (0, 48) adds the nodata border, (48, 24) the cloud, and (48, 48) is
    # 75% padding: those three are dropped.
    offsets = {(int(t["row"]), int(t["col"])) for t in scene_a}
    assert offsets == {(0, 0), (0, 24), (24, 0), (24, 24), (48, 0)}
    for tile in tiles:
        label = tile["label"][..., 0]
        assert set(np.unique(label)) <= {0, 1, 255}
        assert tile["slump_pixels"] == (label == 1).sum() and tile["ignored_pixels"] == (label == 255).sum()
        assert (label == 255).mean() <= 0.5
        assert (tile["image"][label == 255] == 0).all()
        assert tile["region"].decode() == ("Alpha" if tile["scene_id"].decode() == SCENE_A else "Beta")
    edge = next(t for t in scene_a if (int(t["row"]), int(t["col"])) == (48, 0))
    assert (edge["label"][16:] == 255).all() and (edge["label"][:16] != 255).all()  # padding is ignored
    corner = next(t for t in scene_a if (int(t["row"]), int(t["col"])) == (0, 0))
    assert (corner["label"][:4] == 255).all() and (corner["label"][4:] != 255).all()  # the nodata border
    cloud_tile = next(t for t in scene_a if (int(t["row"]), int(t["col"])) == (24, 24))
    assert (cloud_tile["label"][16:, 16:] == 255).all()  # the UDM2 cloud at rows/cols 40-63
    # Mosaic the slump pixels of scene A back and compare the area with the label circle.
    mosaic = np.zeros((64, 64), dtype=np.uint8)
    for tile in scene_a:
        r, c = int(tile["row"]), int(tile["col"])
        part = tile["label"][: 64 - r, : 64 - c, 0]
        mosaic[r:r + part.shape[0], c:c + part.shape[1]] |= part == 1
    assert mosaic.sum() * 9 == pytest.approx(world["slump_a"].area, rel=0.03)


def test_rasterised_label_area_matches_polygon_area():
    grid = Grid(SCENE_CRS, Affine(3.0, 0, ORIGIN[0], 0, -3.0, ORIGIN[1]), 200, 200)
    circle = Point(ORIGIN[0] + 300, ORIGIN[1] - 300).buffer(150.0, 64)
    burnt = rasterize_labels([circle], grid)
    assert burnt.sum() * 9.0 == pytest.approx(circle.area, rel=0.01)
    touched = rasterize_labels([circle], grid, all_touched=True)
    assert touched.sum() > burnt.sum()


def test_labels_match_by_image_id_or_by_footprint(tmp_path):
    grid = Grid(SCENE_CRS, Affine(3.0, 0, ORIGIN[0], 0, -3.0, ORIGIN[1]), 64, 64)
    inside = box(ORIGIN[0] + 10, ORIGIN[1] - 50, ORIGIN[0] + 50, ORIGIN[1] - 10)
    bowtie = inside.__class__([(ORIGIN[0] + 60, ORIGIN[1] - 60), (ORIGIN[0] + 90, ORIGIN[1] - 90),
                               (ORIGIN[0] + 90, ORIGIN[1] - 60), (ORIGIN[0] + 60, ORIGIN[1] - 90)])
    far = box(ORIGIN[0] + 5000, ORIGIN[1] - 50, ORIGIN[0] + 5050, ORIGIN[1] - 10)
    with_ids = write_polygons(tmp_path / "ids.gpkg", [inside, bowtie, far],
                              {"image_id": ["s1", "s1", "s2"], "region": ["R"] * 3})
    layer = read_polygons(with_ids, "labels")
    assert all(g.is_valid for g in layer.geometries)  # the bowtie was repaired
    assert len(scene_labels(layer, "s1", grid)) == 2 and len(scene_labels(layer, "s3", grid)) == 0
    without_ids = write_polygons(tmp_path / "plain.geojson", [inside, far], {"region": ["R", "R"]},
                                 driver="GeoJSON")
    matched = scene_labels(read_polygons(without_ids, "labels"), "anything", grid)
    assert len(matched) == 1 and matched[0].area == pytest.approx(inside.area, rel=1e-3)


def test_same_inputs_give_identical_shards(world, tmp_path):
    runner = CliRunner()
    for name in ("one", "two"):
        result = runner.invoke(main, build_arguments(world, tmp_path / name))
        assert result.exit_code == 0, result.output
    first, second = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(first) == 2 and first == second


def test_two_workers_equal_one(world, world_records, tmp_path):
    result = CliRunner().invoke(main, build_arguments(world, tmp_path / "parallel", "--workers", "2"))
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "parallel") == shard_bytes(world_records)
    parallel = json.loads((tmp_path / "parallel" / "manifest.json").read_text())
    serial = json.loads((world_records / "manifest.json").read_text())
    assert parallel["shards"] == serial["shards"] and parallel["statistics"] == serial["statistics"]


def test_interrupted_build_resumes(world, world_records, tmp_path):
    out = tmp_path / "resumed"
    arguments = dict(scenes=[str(world["scenes"])], labels=str(world["labels"]), out=str(out),
                     tcvis=[str(world["tcvis"])], dem=[str(world["dem"])], sites=str(world["sites"]),
                     settings=BuildSettings(**TILE))

    def interrupt_in_second_scene(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_records(**arguments, progress=interrupt_in_second_scene)
    assert not (out / "manifest.json").exists()
    assert len(list(out.rglob("*.tfrecord"))) == 1 and not list(out.rglob("*.tmp"))
    summary = build_records(**arguments)
    assert (summary.scenes_skipped, summary.scenes_built) == (1, 1)
    assert shard_bytes(out) == shard_bytes(world_records)
    again = build_records(**arguments)
    assert again.scenes_skipped == 2 and again.tiles == summary.tiles


def test_corrupted_shard_is_rebuilt_on_resume(world, world_records, tmp_path):
    out = tmp_path / "repaired"
    shutil.copytree(world_records, out)
    shard = next(out.rglob("*.tfrecord"))
    shard.write_bytes(shard.read_bytes()[:100])
    result = CliRunner().invoke(main, build_arguments(world, out))
    assert result.exit_code == 0, result.output
    assert "1 built, 1 already complete" in result.output
    assert shard_bytes(out) == shard_bytes(world_records)


def test_regions_from_labels_without_sites(world, tmp_path):
    arguments = build_arguments(world, tmp_path / "nosites")
    index = arguments.index("--sites")
    del arguments[index:index + 2]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "nosites" / "manifest.json").read_text())
    assert {s["scene_id"]: (s["region"], s["site"]) for s in manifest["scenes"]} == {
        SCENE_A: ("Alpha", "alpha_1"), SCENE_B: ("Beta", "beta_1")}


def test_config_file_supplies_options_and_flags_override(world, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(f"scenes: [{world['scenes']}]\nlabels: {world['labels']}\ndem: [{world['dem']}]\n"
                      f"tcvis: [{world['tcvis']}]\nsites: {world['sites']}\ntile-size: 48\noverlap: 8\n")
    result = CliRunner().invoke(main, ["build-records", "--config", str(config), "--out",
                                       str(tmp_path / "configured"), "--tile-size", "32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "configured" / "manifest.json").read_text())
    assert manifest["tile_size"] == 32 and manifest["overlap"] == 8


def test_gzip_records_hold_the_same_tiles_and_tensorflow_reads_our_framing(world, world_records, tmp_path):
    """Shards are written without TensorFlow (protobuf Examples, CRC-32C framing, gzip stream);
    TensorFlow's reader checks every CRC, so reading them all back proves the framing."""
    out = tmp_path / "gzip"
    result = CliRunner().invoke(main, build_arguments(world, out, "--compression", "gzip"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compression"] == "GZIP" and all(path.endswith(".tfrecord.gz") for path in manifest["shards"])
    plain, packed = read_tiles(world_records), read_tiles(out, manifest)
    assert len(plain) == len(packed) == sum(s["tiles"] for s in manifest["scenes"]) > 0
    key = lambda tile: (tile["scene_id"], int(tile["row"]), int(tile["col"]))
    for a, b in zip(sorted(plain, key=key), sorted(packed, key=key)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    plain_bytes = sum(info["bytes"] for info in json.loads((world_records / "manifest.json").read_text())
                      ["shards"].values())
    assert sum(info["bytes"] for info in manifest["shards"].values()) < plain_bytes
    # A damaged record is caught by TensorFlow's CRC check: the framing is really checked.
    shard = out / next(iter(manifest["shards"]))
    data = bytearray(__import__("gzip").decompress(shard.read_bytes()))
    data[100] ^= 0xFF
    broken = tmp_path / "broken.tfrecord"
    broken.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset([str(broken)]))


def test_schema_1_records_still_load(world_records, tmp_path):
    """Records of schema 1 (one float16 `image` feature, written by TensorFlow's own writer) load,
    decode and feed the input pipeline as before."""
    from rts_tf.dataset import make_dataset
    from rts_tf.records import read_manifest

    manifest = json.loads((world_records / "manifest.json").read_text())
    tiles = read_tiles(world_records, manifest)
    old = tmp_path / "v1"
    v1 = {**manifest, "schema_version": 1, "compression": "GZIP", "shards": {}}
    v1["features"] = {key: value for key, value in manifest["features"].items() if "bands" not in value}
    v1["features"]["image"] = {"dtype": "float16", "shape": [32, 32, 10], "encoding": "raw bytes"}
    for scene in v1["scenes"]:
        path = scene["shards"][0] + ".gz"
        (old / path).parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(old / path), "GZIP") as writer:
            for tile in (t for t in tiles if t["scene_id"].decode() == scene["scene_id"]):
                feature = {"image": tile["image"].astype(np.float16).tobytes(), "label": tile["label"].tobytes(),
                           **{k: tile[k] for k in ("scene_id", "region", "site")}}
                feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feature.items()}
                for k in ("row", "col", "slump_pixels", "ignored_pixels"):
                    feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(tile[k])]))
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        v1["shards"][path] = {**manifest["shards"][scene["shards"][0]], "bytes": (old / path).stat().st_size}
        scene["shards"] = [path]
    (old / "manifest.json").write_text(json.dumps(v1))
    loaded = read_manifest(old)
    decoded = read_tiles(old, loaded)
    assert len(decoded) == len(tiles)
    np.testing.assert_array_equal(decoded[0]["image"], tiles[0]["image"].astype(np.float16).astype(np.float32))
    images, labels = next(iter(make_dataset(old, loaded, ["Alpha", "Beta"], 2, training=False)))
    assert images.dtype == tf.float32 and images.shape == (2, 32, 32, 10) and labels.shape == (2, 32, 32, 1)


def test_example_encoder_gives_encode_examples_bytes_as_pieces(tmp_path):
    """build-records frames examples itself (ExampleEncoder: one copy of each tile, no protobuf
    objects); its bytes must be encode_example's, for every band set, strided tiles, any scalars,
    and the shard the writer makes of the pieces must be the shard of the joined message."""
    from rts_tf.records import ExampleEncoder, ShardWriter, image_parts_for

    rng = np.random.default_rng(5)
    for bands in (BANDS, ("blue", "green", "red", "nir", "ndvi"), ("red", "slope")):
        names = [band["name"] for band in bands] if isinstance(bands[0], dict) else list(bands)
        encoder = ExampleEncoder()
        block = {part.key: rng.integers(0, 250, (40, 40, len(part.bands))).astype(part.dtype)
                 for part in image_parts_for(names)}
        label = rng.integers(0, 2, (40, 40)).astype(np.uint8)
        pieces_writer = ShardWriter(tmp_path / "pieces.tfrecord", "", None)
        bytes_writer = ShardWriter(tmp_path / "bytes.tfrecord", "", None)
        for row, col, scene_id in ((0, 0, "s"), (8, 13, "é" * 300), (24, 24, "")):
            tile = {key: part[row:row + 16, col:col + 16] for key, part in block.items()}  # strided views
            scalars = dict(scene_id=scene_id, region="Lena", site="lena_1", row=row, col=col,
                           slump_pixels=2 ** 40, ignored_pixels=0)
            pieces = encoder.encode(tile, label[row:row + 16, col:col + 16], **scalars)
            expected = encode_example(tile, label[row:row + 16, col:col + 16], **scalars)
            assert len(pieces) > 1 and b"".join(pieces) == expected
            pieces_writer.write(pieces)
            bytes_writer.write(expected)
        assert not encoder._fallback
        assert pieces_writer.close() == bytes_writer.close()  # tiles, bytes and sha256
        assert (tmp_path / "pieces.tfrecord").read_bytes() == (tmp_path / "bytes.tfrecord").read_bytes()
    # The tiles' arrays keep their flags: only the encoder's own views are read-only.
    assert block["image_reflectance"].flags.writeable


def test_one_file_mosaic_equals_rasterio_merge(tmp_path):
    """RasterSource reads a one-file source without rasterio.merge (merge_one): the same array and
    transform as merge for windows inside, across the edge of and outside the file, with nodata."""
    import rasterio
    import rasterio.merge

    from helpers import write_raster
    from rts_tf.rasters import merge_one

    data = np.arange(30 * 40, dtype=np.float32).reshape(1, 30, 40)
    data[0, 5:9, 7:12] = -9999
    path = write_raster(tmp_path / "dem.tif", data, "EPSG:3413", Affine(10, 0, 1000, 0, -10, 5000), nodata=-9999)
    with rasterio.open(path) as dataset:
        for left, top, width, height in ((1020, 4950, 100, 120), (950, 5080, 200, 150), (1300, 4800, 300, 300),
                                         (2000, 4000, 50, 50), (1000, 5000, 400, 300)):
            bounds = (left, top - height, left + width, top)
            expected = rasterio.merge.merge([dataset], bounds=bounds, res=(10, 10), nodata=np.nan, dtype="float32")
            array, transform = merge_one(dataset, bounds, (10.0, 10.0))
            assert transform == expected[1] and array.tobytes() == expected[0].tobytes()
        inside, _ = merge_one(dataset, (1020, 4830, 1120, 4950), (10.0, 10.0))
        assert inside[0, 0, 0] == data[0, 5, 2] and np.isnan(inside[0, 0, 5])  # pixel values; nodata -> NaN


def test_precomputed_terrain_warped_together_equals_each_warped_alone(tmp_path):
    """Relative elevation and slope rasters on one pixel grid are warped as one 2-band array: the
    values are those of warping each alone, bit for bit (NaN holes included)."""
    from helpers import scene_bounds_in, write_raster
    from rts_tf.rasters import RasterSource
    from rts_tf.scene import Terrain

    left, bottom, right, top = scene_bounds_in("EPSG:3413", size=64, margin=400)
    shape = (int((top - bottom) / 10) + 1, int((right - left) / 10) + 1)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    relative = np.sin(rows / 3) * 5 + cols / 7
    middle = (shape[0] // 2, shape[1] // 2)  # a hole under the scene
    relative[middle[0] - 2:middle[0] + 2, middle[1] - 2:middle[1] + 2] = np.nan
    slope = np.float32(2) + rows * 0.3 + np.cos(cols / 4)
    transform = Affine(10, 0, left, 0, -10, top)
    rel = RasterSource([write_raster(tmp_path / "rel.tif", relative.astype(np.float32), "EPSG:3413", transform)],
                       "relative elevation", 1)
    slp = RasterSource([write_raster(tmp_path / "slope.tif", slope.astype(np.float32), "EPSG:3413", transform)],
                       "slope", 1)
    terrain = Terrain(None, rel, slp)
    grid = Grid(SCENE_CRS, Affine(3, 0, ORIGIN[0], 0, -3, ORIGIN[1]), 64, 64)
    for window in (grid, grid.window_grid(10, 20, 30, 40)):
        together = terrain.read(window)
        alone = np.concatenate([rel.read_on(window)[:1], slp.read_on(window)[:1]])
        assert together.shape == (2, window.height, window.width) and together.tobytes() == alone.tobytes()
    assert np.isfinite(together).any() and np.isnan(terrain.read(grid)).any()
