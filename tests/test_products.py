"""The run's products of `rts-tf predict`: detections and merged layers, GeoParquet, valid extents,
quick-looks, COG tags, QGIS styles, VRT mosaics and the STAC collection, on real files."""

import hashlib
import json
import sqlite3
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from pyproj import Geod
from rasterio.transform import from_origin

from helpers import ORIGIN, SCENE_CRS, write_dem, write_raster, write_scene, write_tcvis
from rts_tf.bands import BAND_NAMES, BANDS
from rts_tf.cli import main
from test_predict import make_run, pixel_model

A, B, C = "20210720_190000_1020", "20210805_180000_2201", "20220712_183000_1030"  # B: 8-band, C: next year


def square(folder: Path, scene_id: str, rows: slice, cols: slice, eight_bands: bool = False) -> None:
    """A 100 x 90 px scene with nodata in its top 6 rows and a bright-red 20 x 20 px square slump."""
    write_scene(folder, scene_id, size=100, nodata_border=6)
    scene = folder / scene_id
    sr = next(scene.glob("*SR.tif"))
    with rasterio.open(sr) as dataset:
        profile, data = dataset.profile, dataset.read()[:, :, :90]
    data[2, rows, cols] = 1500
    profile.update(width=90)
    if eight_bands:  # SuperDove: blue, green, red, NIR are bands 2, 4, 6, 8
        eight = np.zeros((8,) + data.shape[1:], data.dtype)
        eight[[1, 3, 5, 7]] = data
        eight[[0, 2, 4, 6]] = np.where(data[0] > 0, 700, 0)
        sr.unlink()
        sr, data = scene / f"{scene_id}_3B_AnalyticMS_SR_8b.tif", eight
        profile.update(count=8)
    with rasterio.open(sr, "w", **profile) as dataset:
        dataset.write(data)
    udm2 = next(scene.glob("*udm2.tif"))
    with rasterio.open(udm2) as dataset:
        profile, data = dataset.profile, dataset.read()[:, :, :90]
    profile.update(width=90)
    with rasterio.open(udm2, "w", **profile) as dataset:
        dataset.write(data)


@pytest.fixture(scope="module")
def products_world(tmp_path_factory):
    """Three scenes of one ground: A (4-band) and B (8-band) of 2021 whose slumps overlap by 10 x 10
    px, C of 2022 with A's slump; predicted once with a model that sees red reflectance."""
    root = tmp_path_factory.mktemp("products")
    square(root / "scenes", A, slice(40, 60), slice(30, 50))
    square(root / "scenes", B, slice(50, 70), slice(40, 60), eight_bands=True)
    square(root / "scenes", C, slice(40, 60), slice(30, 50))
    write_dem(root / "dem.tif", lambda x, y: 0.05 * x, size=100)
    write_tcvis(root / "tcvis.tif", size=100)
    red = np.zeros(len(BANDS))
    red[BAND_NAMES.index("red")] = 200.0
    run = make_run(root / "red", pixel_model(red, -200.0 * 0.1))
    arguments = ["predict", "--run", str(run), "--scene", str(root / "scenes"), "--dem", str(root / "dem.tif"),
                 "--tcvis", str(root / "tcvis.tif"), "--min-area", "0"]
    out = root / "out"
    result = CliRunner().invoke(main, arguments + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "arguments": arguments, "run": run, "output": result.output}


def layer(path, name):
    meta, _, geometry, fields = pyogrio.raw.read(path, layer=name)
    return meta, [shapely.from_wkb(g) for g in geometry], dict(zip(meta["fields"], fields))


def test_detections_keep_every_scene_with_sensor_date_and_statistics(products_world):
    out = products_world["out"]
    meta, geometries, columns = layer(out / "rts_polygons.gpkg", "detections")
    assert "4326" in meta["crs"] and list(columns["scene_id"]) == [A, B, C]
    assert list(columns["sensor"]) == ["planetscope", "planetscope-8b", "planetscope"]
    assert columns["image_date"].dtype == np.dtype("datetime64[D]")  # a real DATE field
    assert list(columns["image_date"]) == [np.datetime64(d) for d in ("2021-07-20", "2021-08-05", "2022-07-12")]
    # Statistics against the probability raster's pixels inside the slump.
    with rasterio.open(out / A / f"{A}_probability.tif") as dataset:
        inside = dataset.read(1)[40:60, 30:50].astype(np.float64)
    assert columns["area_m2"][0] == pytest.approx(400 * 9.0) and columns["perimeter_m"][0] == pytest.approx(4 * 60.0)
    for name, expected in (("min", inside.min()), ("max", inside.max()), ("mean", inside.mean()),
                           ("median", np.median(inside)), ("std", inside.std())):
        assert columns[f"{name}_probability"][0] == pytest.approx(expected, rel=1e-5), name
    assert inside.std() > 0  # the statistics differ: the slump's texture reaches the probability
    assert list(columns["merged_id"]) == [1, 1, 2]


def test_overlapping_detections_of_a_year_merge_with_equal_area(products_world):
    out = products_world["out"]
    _, geometries, columns = layer(out / "rts_polygons.gpkg", "merged")
    assert list(columns["period"]) == ["2021", "2022"]
    assert list(columns["n_scenes"]) == [2, 1] and list(columns["scene_ids"]) == [f"{A},{B}", C]
    assert list(columns["sensors"]) == ["planetscope,planetscope-8b", "planetscope"]
    assert list(columns["first_date"]) == [np.datetime64("2021-07-20"), np.datetime64("2022-07-12")]
    assert list(columns["last_date"]) == [np.datetime64("2021-08-05"), np.datetime64("2022-07-12")]
    _, _, detections = layer(out / "rts_polygons.gpkg", "detections")
    assert columns["max_probability"][0] == max(detections["max_probability"][:2])
    # Two 20 x 20 px squares sharing 10 x 10 px: 700 px of 9 m2 in UTM; area_m2 is measured in
    # EASE-Grid 2.0 North, equal-area, so it equals the area on the ellipsoid.
    geodesic = abs(Geod(ellps="WGS84").geometry_area_perimeter(geometries[0])[0])
    assert columns["area_m2"][0] == pytest.approx(geodesic, rel=1e-5)
    assert columns["area_m2"][0] == pytest.approx(700 * 9.0, rel=3e-3)  # UTM's scale error near the zone centre
    assert len(shapely.get_parts(geometries[0])) == 1


def test_geoparquet_matches_the_geopackage(products_world):
    import pyarrow.parquet as parquet

    out = products_world["out"]
    for name in ("detections", "merged"):
        table = parquet.read_table(out / f"rts_{name}.parquet")
        geo = json.loads(table.schema.metadata[b"geo"])
        assert geo["version"] == "1.0.0" and geo["primary_column"] == "geometry"
        assert geo["columns"]["geometry"]["encoding"] == "WKB"
        assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 4326}
        _, geometries, columns = layer(out / "rts_polygons.gpkg", name)
        rows = table.to_pydict()
        assert [shapely.from_wkb(g).equals_exact(h, 1e-9) for g, h in zip(rows["geometry"], geometries)] == \
               [True] * len(geometries)
        date = "image_date" if name == "detections" else "first_date"
        assert str(table.schema.field(date).type) == "date32[day]"
        assert [np.datetime64(d) for d in rows[date]] == list(columns[date])
        np.testing.assert_array_equal(rows["area_m2"], columns["area_m2"])


def test_a_rerun_gives_the_same_files_and_periods_can_be_chosen(products_world, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, products_world["arguments"] + ["--out", str(out)]).exit_code == 0
    names = ["rts_polygons.gpkg", "rts_detections.parquet", "rts_merged.parquet", "rts_probability.vrt"]
    digests = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}
    again = CliRunner().invoke(main, products_world["arguments"] + ["--out", str(out)])
    assert again.exit_code == 0 and "(0 now, 3 already complete)" in again.output, again.output
    assert "km2/min" not in again.output  # nothing computed: no rate
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names} == digests
    everything = CliRunner().invoke(main, products_world["arguments"] + ["--out", str(out), "--merge-period", "all"])
    assert everything.exit_code == 0, everything.output
    _, _, columns = layer(out / "rts_polygons.gpkg", "merged")
    assert list(columns["period"]) == ["all"] and list(columns["n_scenes"]) == [3]
    none = CliRunner().invoke(main, products_world["arguments"] + ["--out", str(out), "--merge-period", "none"])
    assert none.exit_code == 0, none.output
    assert "merged" not in pyogrio.list_layers(out / "rts_polygons.gpkg")[:, 0]
    assert not (out / "rts_merged.parquet").exists()
    wrong = CliRunner().invoke(main, products_world["arguments"] + ["--out", str(tmp_path), "--merge-period", "month"])
    assert wrong.exit_code != 0 and "--merge-period" in wrong.output and "Traceback" not in wrong.output


def test_geopackage_version_and_styles_open_without_warning(products_world):
    path = products_world["out"] / "rts_polygons.gpkg"
    with sqlite3.connect(path) as database:
        assert database.execute("pragma user_version").fetchone()[0] == 10200  # GeoPackage 1.2
        styles = dict(database.execute("select f_table_name, styleQML from layer_styles where useAsDefault"))
    assert set(styles) == {"detections", "merged", "extents"}
    for name, qml in styles.items():
        symbol = ElementTree.fromstring(qml.split("\n", 1)[1]).find("renderer-v2/symbols/symbol/layer")
        assert symbol.get("class") == "SimpleFill"
    assert pyogrio.read_info(path, layer="detections")["features"] == 3
    with sqlite3.connect(products_world["out"] / A / f"{A}_polygons.gpkg") as database:  # a scene's own file
        assert database.execute("pragma user_version").fetchone()[0] == 10200
        assert {row[0] for row in database.execute("select f_table_name from layer_styles")} == {"rts", "extent"}


def test_valid_extent_is_where_the_model_looked(products_world):
    out = products_world["out"]
    _, geometries, columns = layer(out / A / f"{A}_polygons.gpkg", "extent")
    # The top 6 rows are nodata: the extent is the 94 x 90 px below them.
    expected = shapely.box(ORIGIN[0], ORIGIN[1] - 100 * 3, ORIGIN[0] + 90 * 3, ORIGIN[1] - 6 * 3)
    assert geometries[0].symmetric_difference(expected).area == pytest.approx(0)
    assert columns["valid_area_km2"][0] == pytest.approx(94 * 90 * 9 / 1e6)
    _, extents, _ = layer(out / "rts_polygons.gpkg", "extents")
    assert len(extents) == 3


def test_cogs_carry_tags_and_styles(products_world):
    out = products_world["out"]
    for kind in ("probability", "mask"):
        with rasterio.open(out / A / f"{A}_{kind}.tif") as dataset:
            tags = dataset.tags()
            assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert tags["RTS_THRESHOLD"] == "0.5" and "validation data" in tags["RTS_THRESHOLD_SOURCE"]
        assert str(products_world["run"]) in tags["RTS_MODEL"]
        assert tags["RTS_BANDS"].split(",") == BAND_NAMES and tags["RTS_TF_VERSION"]
    probability = ElementTree.parse(out / A / f"{A}_probability.qml").getroot()
    shader = probability.find("pipe/rasterrenderer/rastershader/colorrampshader")
    assert [float(item.get("value")) for item in shader] == [0, 0.4, 0.5, 1]
    assert ElementTree.parse(out / A / f"{A}_mask.qml").find("pipe/rasterrenderer").get("type") == "paletted"


def test_quicklook_shows_true_colour_probability_and_outlines(products_world):
    from PIL import Image

    picture = np.asarray(Image.open(products_world["out"] / A / f"{A}_quicklook.png"))
    assert picture.shape == (100, 90, 3)
    assert (picture[:6] == 40).all()  # nodata: dark grey
    slump, ground = picture[45:55, 35:45].astype(int), picture[80:95, 60:85].astype(int)
    assert (slump[..., 0] > 200).all() and (slump[..., 2] < 100).all()  # red-orange overlay
    # The background is the scene in true colour: each channel follows its band, with no overlay.
    with rasterio.open(products_world["root"] / "scenes" / A / f"{A}_3B_AnalyticMS_SR.tif") as scene:
        bands = scene.read()[:, 80:95, 60:85].astype(float)
    for channel, band in enumerate((2, 1, 0)):
        assert np.corrcoef(ground[..., channel].ravel(), bands[band].ravel())[0, 1] > 0.95
    outline = picture[40, 30:50]
    assert ((outline[:, 0] == 0) & (outline[:, 1] == 255) & (outline[:, 2] == 255)).sum() >= 18  # cyan edge


def test_vrt_mosaic_reads_every_scene(products_world):
    out = products_world["out"]
    with rasterio.open(out / "rts_probability.vrt") as mosaic:
        assert mosaic.crs.to_epsg() == 32608 and mosaic.nodata == -1
        values = mosaic.read(1)
    with rasterio.open(out / C / f"{C}_probability.tif") as last:  # the last scene lies on top
        np.testing.assert_array_equal(values, last.read(1))
    assert ElementTree.parse(out / "rts_probability.qml").getroot().tag == "qgis"


def test_vrt_mosaics_of_several_crs_and_resolutions(tmp_path):
    from rts_tf.products import mosaic_vrts

    fine = write_raster(tmp_path / "a" / "fine.tif", np.full((4, 6), 0.25, np.float32), SCENE_CRS,
                        from_origin(1000, 2000, 3, 3), nodata=-1)
    coarse = write_raster(tmp_path / "b" / "coarse.tif", np.array([[0.5, 0.75]], np.float32), SCENE_CRS,
                          from_origin(1018, 2000, 6, 6), nodata=-1)
    other = write_raster(tmp_path / "c.tif", np.full((2, 2), 0.9, np.float32), "EPSG:32607",
                         from_origin(400000, 7700000, 10, 10), nodata=-1)
    written = mosaic_vrts(tmp_path, [str(fine), str(coarse), str(other)])
    assert [Path(p).name for p in written] == ["rts_probability_32608.vrt", "rts_probability_32607.vrt"]
    with rasterio.open(written[0]) as mosaic:
        assert mosaic.res == (3.0, 3.0) and (mosaic.width, mosaic.height) == (10, 4)
        expected = np.full((4, 10), 0.25, np.float32)
        expected[:, 6:] = -1
        expected[:2, 6:8], expected[:2, 8:10] = 0.5, 0.75  # each 6 m pixel covers 2 x 2 pixels of 3 m
        np.testing.assert_array_equal(mosaic.read(1), expected)
    with rasterio.open(written[1]) as mosaic:
        assert mosaic.crs.to_epsg() == 32607 and (mosaic.read(1) == np.float32(0.9)).all()


def test_stac_collection_is_valid(products_world):
    import pystac
    from stac_validator import stac_validator

    out = products_world["out"]
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    items = sorted(collection.get_items(recursive=True), key=lambda item: item.id)
    assert [item.id for item in items] == [A, B, C]
    item = items[0]
    assert item.properties["rts_tf:threshold"] == 0.5 and str(products_world["run"]) in item.properties["rts_tf:model"]
    assert item.datetime.isoformat() == "2021-07-20T12:00:00+00:00"
    assert set(item.assets) == {"probability", "mask", "polygons", "quicklook"}
    assert Path(item.assets["probability"].get_absolute_href()) == out / A / f"{A}_probability.tif"
    assert item.assets["probability"].media_type == pystac.MediaType.COG
    assert shapely.geometry.shape(item.geometry).area == pytest.approx(
        layer(out / "rts_polygons.gpkg", "extents")[1][0].area)
    assert set(collection.assets) == {"polygons", "detections_parquet", "merged_parquet", "rts_probability"}
    # stac-validator with the STAC 1.1 schemas pystac ships (no network here).
    schemas = Path(pystac.__file__).parent / "validation" / "jsonschemas"
    online = "https://schemas.stacspec.org/v1.1.0/"
    mapping = {f"{online}item-spec/json-schema/item.json": schemas / "stac-spec/v1.1.0/item.json",
               f"{online}collection-spec/json-schema/collection.json": schemas / "stac-spec/v1.1.0/collection.json",
               f"{online}catalog-spec/json-schema/catalog.json": schemas / "stac-spec/v1.1.0/catalog.json"}
    for name in ("bands", "basics", "common", "data-values", "datetime", "instrument", "licensing", "provider"):
        mapping[f"{online}item-spec/json-schema/{name}.json"] = schemas / f"stac-spec/v1.1.0/{name}.json"
    mapping["https://geojson.org/schema/Feature.json"] = schemas / "geojson/Feature.json"
    mapping["https://geojson.org/schema/Geometry.json"] = schemas / "geojson/Geometry.json"
    validator = stac_validator.StacValidate(str(out / "collection.json"), recursive=True,
                                            schema_map={k: str(v) for k, v in mapping.items()})
    assert validator.run(), validator.message
    checked = [message for message in validator.message if message.get("valid_stac")]
    assert len(checked) == 4, validator.message
