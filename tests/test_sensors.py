"""Sensor profiles: 8-band PlanetScope, Sentinel-2 L2A (.SAFE with JPEG 2000, band COGs) and generic
rasters through `build-records` and `predict`, onto one canonical reflectance; bad sensor input."""

import json
import shutil

import numpy as np
import pytest
import rasterio
import tensorflow as tf
from click.testing import CliRunner
from rasterio.transform import from_origin
from shapely.geometry import box

from helpers import ORIGIN, SCENE_CRS, write_dem, write_polygons, write_raster, write_scene, write_tcvis
from rts_tf.bands import BANDS, BAND_NAMES
from rts_tf.cli import main
from rts_tf.records import decode_example
from rts_tf.sensors import baseline_offset

S2_SIZE = 48  # 10 m pixels: 480 m
TILE = ["--tile-size", "32", "--overlap", "8", "--max-ignored", "1"]
TILE_ID = "T08WMB"
PRODUCTS = {  # the same surface, three deliveries
    "cog_0400": f"S2B_MSIL2A_20220801T200019_N0400_R057_{TILE_ID}_20220801T224425",
    "safe_0400": f"S2A_MSIL2A_20220804T201021_N0400_R100_{TILE_ID}_20220804T230109",
    "cog_0301": f"S2A_MSIL2A_20210806T200021_N0301_R057_{TILE_ID}_20210806T223012",
}
CLOUD = (slice(10, 14), slice(20, 26))  # SCL 9 over 20 m pixels rows 5-6, cols 10-12
SNOW = (slice(30, 32), slice(4, 8))  # SCL 11
DARK = (slice(36, 40), slice(36, 40))  # SCL 2 (dark area): stays usable


def run(arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments])


def assert_fails(result, *words):
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert str(word) in lines[0], lines[0]


def surface(seed=0):
    """Reflectance steps (x 10000) of blue, green, red, nir: a tundra-like surface, never 0."""
    rng = np.random.default_rng(seed)
    base = np.array([400, 600, 500, 2500])[:, None, None]
    return (base * rng.uniform(0.7, 1.3, (4, S2_SIZE, S2_SIZE))).astype(np.uint16)


def s2_scl():
    scl = np.full((S2_SIZE // 2, S2_SIZE // 2), 4, np.uint8)  # vegetation
    for block, value in ((CLOUD, 9), (SNOW, 11), (DARK, 2)):
        scl[block[0].start // 2:block[0].stop // 2, block[1].start // 2:block[1].stop // 2] = value
    return scl


MTD = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_URI>{product}.SAFE</PRODUCT_URI>
      <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
      <PRODUCT_TYPE>S2MSI2A</PRODUCT_TYPE>
      <PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX></Special_Values>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
        <AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
      {offsets}
    </Product_Image_Characteristics>
  </n1:General_Info>
</n1:Level-2A_User_Product>
"""


def write_sentinel2(folder, product, numbers, scl=None, layout="cog", metadata=None):
    """A Sentinel-2 L2A scene as delivered: `cog` a folder of band COGs as a STAC download leaves them
    (optionally with its STAC item), `safe` a .SAFE folder with JPEG 2000 bands and MTD_MSIL2A.xml.
    numbers: DN (4, H, W) of B02, B03, B04, B08; scl at 20 m."""
    transform = from_origin(ORIGIN[0], ORIGIN[1], 10.0, 10.0)
    tile, stamp = product.split("_")[5], product.split("_")[2]
    if layout == "safe":
        root = folder / f"{product}.SAFE"
        images = root / "GRANULE" / f"L2A_{tile}_A036999_{stamp}" / "IMG_DATA"
        files = {band: images / "R10m" / f"{tile}_{stamp}_{band}_10m.jp2" for band in ("B02", "B03", "B04", "B08")}
        files["SCL"] = images / "R20m" / f"{tile}_{stamp}_SCL_20m.jp2"
        driver = dict(driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
    else:
        root = folder / product
        files = {band: root / f"{band}.tif" for band in ("B02", "B03", "B04", "B08", "SCL")}
        driver = dict(driver="COG", compress="deflate", nodata=0)
    for band, path in files.items():
        if band == "SCL" and scl is None:
            continue
        data = scl if band == "SCL" else numbers[("B02", "B03", "B04", "B08").index(band)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                           crs=SCENE_CRS, transform=transform * (rasterio.Affine.scale(2) if band == "SCL" else
                                                                 rasterio.Affine.identity()), **driver) as dataset:
            dataset.write(data[None])
    if metadata == "mtd":
        baseline = product.split("_")[3]
        baseline = f"{baseline[1:3]}.{baseline[3:]}"
        offsets = "" if baseline_offset(baseline) == 0 else "<BOA_ADD_OFFSET_VALUES_LIST>" + "".join(
            f'<BOA_ADD_OFFSET band_id="{band}">-1000</BOA_ADD_OFFSET>' for band in range(13)) + \
            "</BOA_ADD_OFFSET_VALUES_LIST>"
        (root / "MTD_MSIL2A.xml").write_text(MTD.format(product=product, baseline=baseline, offsets=offsets))
    elif metadata == "stac":
        raster = {"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}
        item = {"type": "Feature", "stac_version": "1.0.0", "id": product,
                "properties": {"s2:processing_baseline": "04.00"},
                "assets": {band: {"href": f"https://example.org/{product}/{band}.tif", "raster:bands": [raster]}
                           for band in ("B02", "B03", "B04", "B08")}}
        (root / f"{product}.json").write_text(json.dumps(item))
    return root


def mosaic(records, scene_id):
    """A scene's stored reflectance (H, W, 4) uint16, NDVI steps and label, put back together from its tiles."""
    manifest = json.loads((records / "manifest.json").read_text())
    scene = next(s for s in manifest["scenes"] if s["scene_id"] == scene_id)
    height, width = scene["height"], scene["width"]
    reflectance = np.zeros((height, width, 4), np.uint16)
    ndvi = np.zeros((height, width), np.int16)
    label = np.full((height, width), 77, np.uint8)  # 77: no tile covers the pixel
    paths = [str(records / path) for path in scene["shards"]]
    for tile in tf.data.TFRecordDataset(paths).map(lambda s: decode_example(s, manifest, keep_dtype=True)):
        row, col = int(tile["row"]), int(tile["col"])
        rows, cols = min(height - row, 32), min(width - col, 32)
        reflectance[row:row + rows, col:col + cols] = tile["image"]["image_reflectance"].numpy()[:rows, :cols]
        ndvi[row:row + rows, col:col + cols] = tile["image"]["image_ndvi"].numpy()[:rows, :cols, 0]
        label[row:row + rows, col:col + cols] = tile["label"].numpy()[:rows, :cols, 0]
    return reflectance, ndvi, label, scene, manifest


@pytest.fixture(scope="module")
def ground(tmp_path_factory):
    """DEM, TCVIS and sites around a 480 m square at ORIGIN, and labels: one by tile id, one by product name."""
    root = tmp_path_factory.mktemp("sensors")
    write_dem(root / "dem.tif", lambda x, y: 40 + 0.03 * (x - ORIGIN[0]), size=S2_SIZE * 10 // 3 + 1)
    write_tcvis(root / "tcvis.tif", size=S2_SIZE * 10 // 3 + 1)
    write_polygons(root / "sites.geojson", [box(ORIGIN[0] - 300, ORIGIN[1] - 800, ORIGIN[0] + 800, ORIGIN[1] + 300)],
                   {"site": ["north_1"], "region": ["North"]}, driver="GeoJSON")
    by_tile = box(ORIGIN[0] + 100, ORIGIN[1] - 200, ORIGIN[0] + 200, ORIGIN[1] - 100)
    by_product = box(ORIGIN[0] + 300, ORIGIN[1] - 400, ORIGIN[0] + 400, ORIGIN[1] - 300)
    write_polygons(root / "labels.gpkg", [by_tile, by_product],
                   {"image_id": [TILE_ID, PRODUCTS["cog_0400"]], "region": ["North", "North"]})
    return root


def build_arguments(ground, scenes, out, *extra):
    return ["build-records", "--scenes", scenes, "--labels", ground / "labels.gpkg", "--dem", ground / "dem.tif",
            "--tcvis", ground / "tcvis.tif", "--sites", ground / "sites.geojson", "--out", out, *TILE, *extra]


@pytest.fixture(scope="module")
def sentinel2(ground):
    """Three Sentinel-2 deliveries of one surface built into records: band COGs of baseline 04.00 (offset
    from their STAC item), a .SAFE of 04.00 (JPEG 2000, offset from MTD_MSIL2A.xml), band COGs of 03.01
    (no offset; the baseline from the product name)."""
    reflectance = surface()
    with_offset = reflectance + np.uint16(1000)
    with_offset[:, 1, 1] = 2000  # reflectance (2000 - 1000) / 10000 = 0.1 -> stored 1000
    with_offset[:, 1, 2] = 500  # reflectance -0.05 -> clipped at 0
    without = reflectance.copy()
    without[:, 1, 1] = 2000  # no offset: 0.2 -> stored 2000
    for numbers in (with_offset, without):
        numbers[:, 0, :] = 0  # the swath edge: no data
    scenes = ground / "s2"
    write_sentinel2(scenes, PRODUCTS["cog_0400"], with_offset, s2_scl(), "cog", "stac")
    write_sentinel2(scenes, PRODUCTS["safe_0400"], with_offset, s2_scl(), "safe", "mtd")
    write_sentinel2(scenes, PRODUCTS["cog_0301"], without, s2_scl(), "cog")
    out = ground / "s2_records"
    result = run(build_arguments(ground, scenes, out))
    assert result.exit_code == 0, result.output
    return {"scenes": scenes, "records": out, "reflectance": reflectance, "output": result.output}


def test_baseline_offsets_by_hand():
    assert baseline_offset("04.00") == -0.1 and baseline_offset("05.09") == -0.1
    assert baseline_offset("03.01") == 0.0 and baseline_offset("02.14") == 0.0


def test_sentinel2_baselines_and_formats_give_the_same_reflectance(sentinel2):
    records = sentinel2["records"]
    assert "sensors: sentinel2-l2a 3 (detected from the files)" in sentinel2["output"]
    cog, _, cog_label, scene, manifest = mosaic(records, PRODUCTS["cog_0400"])
    safe, _, safe_label, _, _ = mosaic(records, PRODUCTS["safe_0400"])
    old, _, old_label, _, _ = mosaic(records, PRODUCTS["cog_0301"])
    # The 10 m grid of B02, and the product name's date.
    assert (scene["width"], scene["height"]) == (S2_SIZE, S2_SIZE) and scene["image_date"] == "2022-08-01"
    assert scene["transform"] == [10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]]
    assert scene["sensor"] == "sentinel2-l2a" and scene["reflectance"]["offset"] == [-0.1] * 4
    assert "STAC item" in scene["reflectance"]["from"]
    # Pinned by hand: DN 2000 at baseline 04.00 -> reflectance 0.1 -> stored 1000; at 03.01 -> 2000;
    # DN 500 at 04.00 -> reflectance -0.05 -> clipped at 0, and still a valid pixel.
    assert (cog[1, 1] == 1000).all() and (safe[1, 1] == 1000).all() and (old[1, 1] == 2000).all()
    assert (cog[1, 2] == 0).all() and cog_label[1, 2] != 255
    same = np.ones((S2_SIZE, S2_SIZE), bool)
    same[1, 1:3] = False
    expected = np.moveaxis(sentinel2["reflectance"], 0, -1)
    usable = cog_label != 255
    for stored in (cog, safe, old):  # the JPEG 2000 .SAFE and the 03.01 COGs give exactly the same numbers
        np.testing.assert_array_equal(stored[same & usable], expected[same & usable])
    np.testing.assert_array_equal(cog_label == 255, safe_label == 255)
    np.testing.assert_array_equal(cog_label == 255, old_label == 255)
    # The slump labelled by tile id is in all three, the one labelled by product name in its own only.
    assert (cog_label == 1).sum() == 200 and (safe_label == 1).sum() == (old_label == 1).sum() == 100
    # Ignored: DN 0 (no data) and SCL cloud and snow, each 20 m SCL pixel over its four 10 m pixels;
    # SCL 2 (dark area) and 4 (vegetation) stay usable.
    ignored = np.zeros((S2_SIZE, S2_SIZE), bool)
    for block in (CLOUD, SNOW):
        ignored[block] = True
    ignored[0] = True
    assert 77 not in cog_label
    np.testing.assert_array_equal(cog_label == 255, ignored)
    assert (cog[ignored] == 0).all() and (cog_label[DARK] != 255).all()


def test_sentinel2_labels_match_by_tile_id_or_product_name_and_statistics_are_per_sensor(sentinel2):
    manifest = json.loads((sentinel2["records"] / "manifest.json").read_text())
    labels = {scene["scene_id"]: scene["labels"] for scene in manifest["scenes"]}
    assert labels[PRODUCTS["cog_0400"]] == {"image_id": 2, "footprint": 0}  # tile id and its own product name
    assert labels[PRODUCTS["safe_0400"]] == labels[PRODUCTS["cog_0301"]] == {"image_id": 1, "footprint": 0}
    assert manifest["recipe"]["sensors"] == ["sentinel2-l2a"] and "reflectance" in manifest["recipe"]
    statistics = manifest["statistics"]
    assert set(statistics["sensors"]) == {"sentinel2-l2a"}
    assert statistics["sensors"]["sentinel2-l2a"] == statistics["overall"]
    assert statistics["overall"]["mean"][BAND_NAMES.index("nir")] == pytest.approx(0.25, rel=0.05)


def test_eight_band_and_four_band_scenes_of_the_same_surface_agree(ground, tmp_path):
    """An 8-band SuperDove file whose bands 2, 4, 6, 8 are a 4-band scene's: the same stored bands,
    found by name (*_SR_8b.tif) and by band count (an 8-band *_SR_clip.tif)."""
    scenes = tmp_path / "scenes"
    four = write_scene(scenes, "20220801_190000_1001", size=S2_SIZE * 10 // 3)
    with rasterio.open(next(four.glob("*SR.tif"))) as dataset:
        sr, profile = dataset.read(), dataset.profile
    udm2 = next(four.glob("*udm2.tif"))
    rng = np.random.default_rng(5)
    eight = np.stack([rng.integers(100, 3000, sr.shape[1:]).astype(np.uint16) if band % 2 == 0 else sr[band // 2]
                      for band in range(8)])
    for scene_id, name in (("20220801_190000_12_2461", "_3B_AnalyticMS_SR_8b.tif"),
                           ("20220801_190001_34_2462", "_3B_AnalyticMS_SR_clip.tif")):
        folder = scenes / scene_id
        write_raster(folder / f"{scene_id}{name}", eight, SCENE_CRS, profile["transform"], nodata=0)
        shutil.copy(udm2, folder / f"{scene_id}_3B_udm2.tif")
    out = tmp_path / "records"
    result = run(build_arguments(ground, scenes, out))
    assert result.exit_code == 0, result.output
    assert "sensors: planetscope 1, planetscope-8b 2 (detected from the files)" in result.output
    reference, reference_ndvi, reference_label, _, manifest = mosaic(out, "20220801_190000_1001")
    for scene_id in ("20220801_190000_12_2461", "20220801_190001_34_2462"):
        stored, ndvi, label, scene, _ = mosaic(out, scene_id)
        assert scene["sensor"] == "planetscope-8b" and scene["image_date"] == "2022-08-01"
        np.testing.assert_array_equal(stored, reference)
        np.testing.assert_array_equal(ndvi, reference_ndvi)
        np.testing.assert_array_equal(label, reference_label)
    np.testing.assert_array_equal(reference[..., 0], np.moveaxis(sr, 0, -1)[..., 0])  # as delivered
    statistics = manifest["statistics"]["sensors"]
    assert set(statistics) == {"planetscope", "planetscope-8b"}
    assert statistics["planetscope"]["count"] * 2 == statistics["planetscope-8b"]["count"]
    np.testing.assert_allclose(statistics["planetscope"]["mean"], statistics["planetscope-8b"]["mean"], rtol=1e-12)


def test_generic_raster_with_band_map_scale_offset_and_mask(ground, tmp_path):
    """A 5-band float raster of reflectance in percent (scale 0.01), bands in another order, and a
    quality raster at 20 m whose values 3 and 8 are ignored."""
    reflectance = surface(1).astype(np.float32) / 100.0  # percent
    data = np.stack([np.full(reflectance.shape[1:], 7.0, np.float32), reflectance[3], reflectance[2],
                     reflectance[1], reflectance[0]])  # other, nir, red, green, blue
    data[:, 5, 5] = np.nan  # no data
    path = write_raster(tmp_path / "scenes" / "mosaic_20220805.tif", data, SCENE_CRS,
                        from_origin(ORIGIN[0], ORIGIN[1], 10.0, 10.0))
    quality = np.zeros((S2_SIZE // 2, S2_SIZE // 2), np.uint8)
    quality[2:4, 2:5] = 3
    quality[10, 10] = 8
    quality[12, 12] = 5  # not ignored
    mask = write_raster(tmp_path / "quality.tif", quality, SCENE_CRS, from_origin(ORIGIN[0], ORIGIN[1], 20.0, 20.0))
    out = tmp_path / "records"
    result = run(build_arguments(ground, path, out, "--sensor", "generic", "--band-map",
                                 "blue=5,green=4,red=3,nir=2", "--reflectance-scale", "0.01", "--mask", mask,
                                 "--mask-ignore", "3,8"))
    assert result.exit_code == 0, result.output
    assert "sensors: generic 1 (--sensor)" in result.output
    stored, _, label, scene, _ = mosaic(out, "mosaic_20220805")
    assert scene["sensor"] == "generic" and scene["image_date"] == "2022-08-05"
    ignored = np.zeros((S2_SIZE, S2_SIZE), bool)
    ignored[4:8, 4:10] = ignored[20:22, 20:22] = ignored[5, 5] = True
    np.testing.assert_array_equal(label == 255, ignored)
    np.testing.assert_array_equal(stored[~ignored], np.moveaxis(surface(1), 0, -1)[~ignored])


def test_predict_on_sentinel2_with_a_model_of_sentinel2_records(sentinel2, ground, tmp_path):
    """GeoTIFFs on the scene's 10 m grid; a model of PlanetScope records warns (and still predicts)."""
    manifest = json.loads((sentinel2["records"] / "manifest.json").read_text())
    inputs = tf.keras.Input((32, 32, len(BANDS)))
    layer = tf.keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = tf.keras.Model(inputs, layer(inputs))
    kernel = np.zeros((1, 1, len(BANDS), 1), np.float32)
    kernel[0, 0, BAND_NAMES.index("nir")] = 40.0
    layer.set_weights([kernel, np.array([-40.0 * 0.25], np.float32)])
    runs = {}
    for name, sensors in (("sentinel2", ["sentinel2-l2a"]), ("planet", ["planetscope"])):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        model.save(str(runs[name] / "model.keras"))
        (runs[name] / "run.json").write_text(json.dumps({
            "complete": True, "model": "model.keras", "tile_size": 32, "overlap": 8, "bands": BANDS, "threshold": 0.5,
            "recipe": {**manifest["recipe"], "sensors": sensors}}))
    scene = sentinel2["scenes"] / f"{PRODUCTS['safe_0400']}.SAFE"
    arguments = ["predict", "--scene", scene, "--dem", ground / "dem.tif", "--tcvis", ground / "tcvis.tif",
                 "--min-area", "0"]
    result = run([*arguments, "--run", runs["sentinel2"], "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    product = PRODUCTS["safe_0400"]
    # No sensor warning; this one-pixel NIR model marks over half of the scene, which predict says.
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "over half of the scene's" in warned[0], result.output
    assert "sensors: sentinel2-l2a 1" in result.output
    with rasterio.open(tmp_path / "out" / product / f"{product}_probability.tif") as probability, \
            rasterio.open(next(scene.rglob("*_B02_10m.jp2"))) as b02:
        assert probability.crs == b02.crs and probability.transform == b02.transform
        assert probability.res == (10.0, 10.0) and probability.shape == (S2_SIZE, S2_SIZE)
        values = probability.read(1)
    assert (values[0] == -1).all() and (values[CLOUD] == -1).all()  # no data and cloud stay nodata
    assert 0 < values[values >= 0].min() < values[values >= 0].max() < 1  # it sees the NIR texture
    other = run([*arguments, "--run", runs["planet"], "--out", tmp_path / "other"])
    assert other.exit_code == 0, other.output
    warnings = [line for line in other.output.splitlines()
                if line.startswith("warning:") and "over half" not in line]
    assert len(warnings) == 1 and product in warnings[0] and "sentinel2-l2a" in warnings[0] \
        and "planetscope" in warnings[0], other.output
    with rasterio.open(tmp_path / "other" / product / f"{product}_probability.tif") as dataset:
        np.testing.assert_array_equal(dataset.read(1), values)


def test_safe_without_scl_ignores_only_nodata_with_a_warning(ground, tmp_path):
    numbers = surface() + np.uint16(1000)
    numbers[:, 0, :] = 0
    write_sentinel2(tmp_path / "scenes", PRODUCTS["safe_0400"], numbers, None, "safe", "mtd")
    out = tmp_path / "records"
    result = run(build_arguments(ground, tmp_path / "scenes", out))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no SCL" in warnings[0] and "only nodata" in warnings[0], result.output
    _, _, label, scene, _ = mosaic(out, PRODUCTS["safe_0400"])
    assert (label[0] == 255).all() and (label[1:] != 255).all() and scene["sources"]["mask"] is None


def test_bad_sensor_input(ground, sentinel2, tmp_path):
    """One-line errors naming the file or option; nothing written."""
    out = tmp_path / "out"
    missing = tmp_path / "missing"
    shutil.copytree(sentinel2["scenes"] / PRODUCTS["cog_0400"], missing / PRODUCTS["cog_0400"])
    (missing / PRODUCTS["cog_0400"] / "B08.tif").unlink()
    assert_fails(run(build_arguments(ground, missing, out)), missing / PRODUCTS["cog_0400"], "B08 not found")
    assert_fails(run(build_arguments(ground, missing, out, "--sensor", "landsat9")), "--sensor landsat9",
                 "unknown sensor", "sentinel2-l2a")
    four = write_scene(tmp_path / "planet", "20220801_190000_1001", size=32)
    sr = next(four.glob("*SR.tif"))
    assert_fails(run(build_arguments(ground, sr, out, "--sensor", "generic", "--band-map",
                                     "blue=1,green=2,red=3,nir=5")), sr, "band 5", "4 bands")
    assert_fails(run(build_arguments(ground, four, out, "--band-map", "blue=1,green=2,red=3,nir=4")),
                 "--band-map only applies to --sensor generic")
    assert_fails(run(build_arguments(ground, sr, out, "--sensor", "generic", "--band-map", "blue=1,green=2,red=3")),
                 "--band-map", "nir")
    assert_fails(run(build_arguments(ground, four, out, "--sensor", "planetscope-8b")), sr, "8 bands", "found 4")
    unknown = tmp_path / "unknown" / "S2B_20220801_L2A"
    shutil.copytree(sentinel2["scenes"] / PRODUCTS["cog_0301"], unknown)
    assert_fails(run(build_arguments(ground, unknown, out)), unknown, "processing baseline")
    assert not out.exists()
