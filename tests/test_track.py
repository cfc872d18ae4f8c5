"""Tests for `rts-tf track`: linking dated slump polygons into histories, on real vector files."""

from __future__ import annotations

import datetime
import json

import geopandas
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from pyproj import Geod

from rts_tf.cli import main
from rts_tf.track import DAYS_PER_YEAR, EQUAL_AREA_CRS, date_in_name, parse_date, track
from rts_tf.vectorize import Polygons, write_polygons

# A place on the Peel Plateau in EASE-Grid 2.0 North metres; polygons are built around it.
X0, Y0 = -1_900_000.0, 1_200_000.0


def square(x: float, y: float, area: float) -> shapely.Polygon:
    """A square of `area` m2 (exact in the equal-area CRS) with its lower-left corner at (X0 + x, Y0 + y)."""
    side = float(np.sqrt(area))
    return shapely.box(X0 + x, Y0 + y, X0 + x + side, Y0 + y + side)


def write(path, rows: list[dict], crs: str = EQUAL_AREA_CRS, **kwargs) -> str:
    frame = geopandas.GeoDataFrame(rows, geometry="geometry", crs=EQUAL_AREA_CRS).to_crs(crs)
    frame.to_file(path, engine="pyogrio", **kwargs)
    return str(path)


def layers(out) -> tuple[geopandas.GeoDataFrame, geopandas.GeoDataFrame, pd.DataFrame]:
    gpkg = out / "tracks.gpkg"
    return (geopandas.read_file(gpkg, layer="observations"), geopandas.read_file(gpkg, layer="tracks"),
            pyogrio.read_dataframe(gpkg, layer="relations", read_geometry=False))


def track_of(observations, **where) -> int:
    rows = observations
    for key, value in where.items():
        rows = rows[rows[key] == value]
    ids = rows["track_id"].unique()
    assert len(ids) == 1, (where, ids)
    return int(ids[0])


def test_dates_from_fields_names_and_scene_ids():
    assert parse_date("2019-07-03") == datetime.date(2019, 7, 3)
    assert parse_date("20190703") == datetime.date(2019, 7, 3)
    assert parse_date(20190703) == datetime.date(2019, 7, 3)
    assert parse_date("2019-07-03T19:25:59Z") == datetime.date(2019, 7, 3)
    assert parse_date(np.datetime64("2019-07-03T10:00")) == datetime.date(2019, 7, 3)
    assert parse_date(None) is None and parse_date("") is None and parse_date(float("nan")) is None
    with pytest.raises(ValueError):
        parse_date("July 2019")
    assert date_in_name("slumps_2021-08-15_v2") == datetime.date(2021, 8, 15)
    assert date_in_name("20180703_192559_1006") == datetime.date(2018, 7, 3)  # PlanetScope scene id
    assert date_in_name("S2B_MSIL2A_20220804T061529_N0400_R091_T42WVD_20220804T081234") == datetime.date(2022, 8, 4)
    assert date_in_name("tile_123456789_v2") is None  # nine digits are no date
    assert date_in_name("area_20191399") is None  # month 13


def test_growth_rates_recovered_exactly(tmp_path):
    # Irregular dates (a leap year, different days); area = a0 + rate * years since the first date.
    dates = [datetime.date(2017, 7, 2), datetime.date(2018, 8, 20), datetime.date(2020, 7, 15),
             datetime.date(2021, 6, 30), datetime.date(2023, 7, 10)]
    truth = {"fast": (20_000.0, 6_500.0), "slow": (8_000.0, 410.0), "steady": (5_000.0, 0.0)}
    rows = []
    for date in dates:
        years = (date - dates[0]).days / DAYS_PER_YEAR
        for offset, (name, (start, rate)) in enumerate(truth.items()):
            rows.append({"name": name, "image_date": date.isoformat(),
                         "geometry": square(1000.0 * offset, 0.0, start + rate * years)})
    summary = track([write(tmp_path / "catalogue.gpkg", rows)], tmp_path / "out")
    observations, tracks, relations = layers(tmp_path / "out")
    assert summary.tracks == 3 and summary.statuses["active"] == 3 and len(relations) == 0
    for name, (start, rate) in truth.items():
        row = tracks[tracks["track_id"] == track_of(observations, name=name)].iloc[0]
        assert row["growth_m2_per_year"] == pytest.approx(rate, abs=1e-6)
        assert row["area_first_m2"] == pytest.approx(start, rel=1e-9)
        assert row["n_observations"] == 5 and row["first_date"] == "2017-07-02" and row["last_date"] == "2023-07-10"
    # The per-polygon areas are the squares' areas, the table of the GeoParquet is the same.
    assert np.allclose(observations["area_m2"], [r["geometry"].area for r in rows])
    parquet = geopandas.read_parquet(tmp_path / "out" / "tracks.parquet")
    assert parquet.crs.to_epsg() == 6931
    assert np.allclose(parquet.sort_values("track_id")["growth_m2_per_year"],
                       tracks.sort_values("track_id")["growth_m2_per_year"])


def lineage_catalogue(tmp_path) -> list[str]:
    """One file per year, the date only in the file name: a merge, a split, a gap year, a slump that
    stabilises and a new one on its scar after a long gap, and one that appears."""
    years = {year: [] for year in range(2016, 2022)}
    for year in years:
        index = year - 2016
        years[year].append({"name": "grows", "geometry": square(0, 0, 10_000 + 1_000 * index)})
        if year <= 2017:  # two neighbours 10 m apart ...
            years[year] += [{"name": "west", "geometry": shapely.box(X0 + 300, Y0, X0 + 350, Y0 + 50)},
                            {"name": "east", "geometry": shapely.box(X0 + 360, Y0, X0 + 410, Y0 + 50)}]
        else:  # ... grow into one
            years[year].append({"name": "west+east", "geometry": shapely.box(X0 + 300, Y0, X0 + 410, Y0 + 60)})
        if year <= 2018:  # one slump ...
            years[year].append({"name": "whole", "geometry": shapely.box(X0 + 600, Y0, X0 + 700, Y0 + 40)})
        else:  # ... split in two by a stabilised middle
            years[year] += [{"name": "left", "geometry": shapely.box(X0 + 600, Y0, X0 + 640, Y0 + 40)},
                            {"name": "right", "geometry": shapely.box(X0 + 660, Y0, X0 + 700, Y0 + 40)}]
        if year != 2018:  # missed under a cloud in 2018
            years[year].append({"name": "gap", "geometry": square(2000, 0, 2_500)})
        if year <= 2017:  # stabilised after 2017 ...
            years[year].append({"name": "scar", "geometry": square(3000, 0, 3_600)})
        if year == 2021:  # ... and active again on its scar four years later: a new slump
            years[year].append({"name": "reactivated", "geometry": square(3010, 10, 900)})
        if year >= 2019:
            years[year].append({"name": "appears", "geometry": square(4000, 0, 1_000)})
    return [write(tmp_path / f"rts_{year}0715.geojson", rows, crs="EPSG:4326") for year, rows in years.items()]


def test_merge_split_gap_stabilised_and_new_on_scar(tmp_path):
    files = lineage_catalogue(tmp_path)
    summary = track(files[::-1], tmp_path / "out")  # any order
    observations, tracks, relations = layers(tmp_path / "out")
    assert len(observations) == 34
    ids = {name: track_of(observations, name=name) for name in
           ("grows", "west", "east", "west+east", "whole", "left", "right", "gap", "scar", "reactivated", "appears")}
    assert len(set(ids.values())) == 11 and summary.tracks == 11
    status = dict(zip(tracks["track_id"], tracks["status"]))
    origin = dict(zip(tracks["track_id"], tracks["origin"]))
    fate = dict(zip(tracks["track_id"], tracks["fate"]))
    assert {name: status[i] for name, i in ids.items()} == {
        "grows": "active", "west": "merged", "east": "merged", "west+east": "merged", "whole": "split",
        "left": "split", "right": "split", "gap": "active", "scar": "stabilised", "reactivated": "new",
        "appears": "new"}
    assert fate[ids["west"]] == "merged" and origin[ids["west+east"]] == "merged" and fate[ids["west+east"]] == "active"
    assert origin[ids["reactivated"]] == "new_on_scar" and origin[ids["appears"]] == "new"
    gap = tracks[tracks["track_id"] == ids["gap"]].iloc[0]
    assert gap["n_observations"] == 5 and gap["first_date"] == "2016-07-15" and gap["last_date"] == "2021-07-15"
    found = {(int(r.track_from), int(r.track_to), r.date_from, r.date_to, r.kind) for r in relations.itertuples()}
    assert found == {
        (ids["west"], ids["west+east"], "2017-07-15", "2018-07-15", "MergedRTS"),
        (ids["east"], ids["west+east"], "2017-07-15", "2018-07-15", "MergedRTS"),
        (ids["whole"], ids["left"], "2018-07-15", "2019-07-15", "SplitRTS"),
        (ids["whole"], ids["right"], "2018-07-15", "2019-07-15", "SplitRTS"),
        (ids["scar"], ids["reactivated"], "2017-07-15", "2021-07-15", "StabilizedRTS")}
    # The track's geometry is the union of its observations (here: the largest, last square).
    grows = tracks[tracks["track_id"] == ids["grows"]].iloc[0]
    assert grows.geometry.area == pytest.approx(15_000, rel=1e-6)
    assert grows["growth_m2_per_year"] == pytest.approx(1_000 * 365.25 / 365.2, rel=1e-3)
    # summary.csv: per date the count, total area and the area not in any slump of an earlier date.
    table = pd.read_csv(tmp_path / "out" / "summary.csv")
    row = table[table["date"] == "2018-07-15"].iloc[0]
    assert row["count"] == 3  # grows, west+east, whole; gap was missed, scar has stabilised
    assert row["total_area_m2"] == pytest.approx(12_000 + 110 * 60 + 4_000, abs=0.5)
    assert row["new_area_m2"] == pytest.approx(1_000 + (110 * 60 - 2 * 50 * 50), abs=0.5)
    # A shorter allowed gap ends the gap slump's track in 2017: seen again in 2019 it is new on its scar.
    track(files, tmp_path / "short", max_gap_years=1.5)
    observations, tracks, relations = layers(tmp_path / "short")
    before = tracks[tracks["track_id"] == track_of(observations, name="gap", date="2016-07-15")].iloc[0]
    after = tracks[tracks["track_id"] == track_of(observations, name="gap", date="2021-07-15")].iloc[0]
    assert before["status"] == "stabilised" and after["origin"] == "new_on_scar"


def test_mixed_crs_and_areas_of_geographic_input(tmp_path):
    # The same growing slump mapped in UTM, in polar stereographic and in EPSG:4326 on three dates.
    utm = square(0, 0, 10_000)
    files = [write(tmp_path / "a.gpkg", [{"date": "2019-07-01", "geometry": utm}], crs="EPSG:32608"),
             write(tmp_path / "b.shp", [{"date": "2020-07-01", "geometry": square(0, 0, 12_000)}], crs="EPSG:3413"),
             write(tmp_path / "c.geojson", [{"date": "2021-07-01", "geometry": square(0, 0, 14_000)}],
                   crs="EPSG:4326")]
    frame = geopandas.GeoDataFrame({"date": ["2022-07-01"]}, geometry=[square(0, 0, 16_000)], crs=EQUAL_AREA_CRS)
    frame.to_crs("EPSG:3413").to_parquet(tmp_path / "d.parquet")  # GeoParquet
    files.append(str(tmp_path / "d.parquet"))
    track(files, tmp_path / "out")
    observations, tracks, _ = layers(tmp_path / "out")
    assert len(tracks) == 1 and tracks["n_observations"].iloc[0] == 4
    assert tracks["area_last_m2"].iloc[0] == pytest.approx(16_000, rel=1e-6)
    # The EPSG:4326 polygon's area against the geodesic area on the WGS 84 ellipsoid, by hand.
    lonlat = geopandas.read_file(files[2]).geometry.iloc[0]
    geodesic = abs(Geod(ellps="WGS84").geometry_area_perimeter(lonlat)[0])
    measured = observations.loc[observations["date"] == "2021-07-01", "area_m2"].iloc[0]
    assert measured == pytest.approx(geodesic, rel=1e-5)
    assert measured == pytest.approx(14_000, rel=1e-4)  # the square drawn in EPSG:6931 (straight edges move)


def test_predict_output_folders_and_detections_layer(tmp_path):
    """Today's predict folder (rts_polygons.gpkg, layer rts, EPSG:4326) and a GeoPackage whose
    `detections` layer holds scene ids only (dates from the PlanetScope and Sentinel-2 ids)."""
    predicted = tmp_path / "predictions"
    predicted.mkdir()
    polygons = Polygons(rasterio.crs.CRS.from_epsg(6931),
                        [square(0, 0, 9_000), square(500, 0, 2_000)],
                        {"area_m2": [9_000.0, 2_000.0], "scene_id": ["20190705_193000_1006"] * 2,
                         "image_date": ["2019-07-05"] * 2, "region": ["Peel"] * 2})
    write_polygons(polygons.to_crs(rasterio.crs.CRS.from_epsg(4326)), predicted / "rts_polygons.gpkg")
    later = tmp_path / "product.gpkg"
    rows = [{"scene_id": "S2B_MSIL2A_20210801T200000_N0400_R091_T08WMB_20210801T220000",
             "region": "Peel", "geometry": square(0, 0, 11_000)},
            {"scene_id": "20200710_193000_1003", "region": "Peel", "geometry": square(0, 0, 10_000)}]
    write(later, rows, layer="detections")
    write(later, [{"scene_id": "x", "geometry": square(0, 0, 50_000)}], layer="merged", append=True)
    track([str(predicted), str(later)], tmp_path / "out")
    observations, tracks, _ = layers(tmp_path / "out")
    assert sorted(observations["date"]) == ["2019-07-05", "2019-07-05", "2020-07-10", "2021-08-01"]
    assert observations["input_area_m2"].notna().sum() == 2  # predict's own area kept beside ours
    assert set(observations["source"]) == {"20190705_193000_1006", "20200710_193000_1003",
                                           rows[0]["scene_id"]}
    assert observations["site"].unique().tolist() == ["Peel"]  # no site field: the region
    assert sorted(tracks["status"]) == ["active", "stabilised"]
    grows = tracks[tracks["status"] == "active"].iloc[0]
    assert grows["n_observations"] == 3 and grows["area_last_m2"] == pytest.approx(11_000, rel=1e-6)
    assert grows["area_first_m2"] == pytest.approx(9_000, rel=1e-6)  # through EPSG:4326 and back


def test_change_map_holds_first_dates(tmp_path):
    x, y = X0 + 1, Y0  # multiples of the 3 m pixel: the grid is snapped to them
    rows = [{"image_date": "2019-07-01", "geometry": shapely.box(x, y, x + 30, y + 30)},
            {"image_date": "2020-07-01", "geometry": shapely.box(x, y, x + 60, y + 30)},
            {"image_date": "2021-07-01", "geometry": shapely.box(x, y, x + 60, y + 60)}]
    track([write(tmp_path / "slump.gpkg", rows)], tmp_path / "out", pixel_size=3.0)
    with rasterio.open(tmp_path / "out" / "change.tif") as dataset:
        assert dataset.crs.to_epsg() == 6931 and dataset.res == (3.0, 3.0) and dataset.nodata == 0
        assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        values = dataset.read(1)
        assert values.shape == (20, 20)
        assert dataset.transform.c == x and dataset.transform.f == y + 60
        # Rows from the top: y 60..30 is first a slump in 2021, y 30..0 in 2019 (x < 30) or 2020.
        assert (values[:10] == 20210701).all()
        assert (values[10:, :10] == 20190701).all() and (values[10:, 10:] == 20200701).all()


def run_cli(*args):
    result = CliRunner().invoke(main, ["track", *map(str, args)])
    return result


def one_line_error(result, *words):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path):
    polygon = square(0, 0, 1_000)
    undated = write(tmp_path / "slumps.gpkg", [{"name": "a", "geometry": polygon}])
    result = run_cli(undated, "--out", tmp_path / "out")
    one_line_error(result, "slumps.gpkg", "no date")
    assert not (tmp_path / "out" / "tracks.gpkg").exists()
    garbled = write(tmp_path / "garbled.gpkg", [{"image_date": "2019-07-01", "geometry": polygon},
                                                {"image_date": "summer 2020", "geometry": polygon}])
    one_line_error(run_cli(garbled, "--out", tmp_path / "out"), "garbled.gpkg", "summer 2020", "feature 2")
    one_line_error(run_cli(tmp_path / "missing.gpkg", "--out", tmp_path / "out"), "missing.gpkg")
    (tmp_path / "notvector.geojson").write_text("this is not GeoJSON")
    one_line_error(run_cli(tmp_path / "notvector.geojson", "--out", tmp_path / "out"), "notvector.geojson")
    one_line_error(run_cli(undated, "--out", tmp_path / "out", "--date-field", "when"), "when")
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_empty_file_and_no_overlap_warn(tmp_path):
    empty = tmp_path / "rts_2020-07-01.gpkg"
    geopandas.GeoDataFrame({"name": []}, geometry=[], crs=EQUAL_AREA_CRS).to_file(empty, engine="pyogrio")
    one_line_error(run_cli(empty, "--out", tmp_path / "only_empty"), "no polygons")
    first = write(tmp_path / "rts_2019-07-01.gpkg", [{"geometry": square(0, 0, 1_000)}])
    second = write(tmp_path / "rts_2021-07-01.gpkg", [{"geometry": square(5_000, 0, 1_000)}])
    result = run_cli(first, second, empty, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.output and "rts_2020-07-01.gpkg: holds no polygons; skipped" in result.output
    assert "no polygon of one date meets a polygon of another date" in result.output
    assert "2 tracks (0 active, 1 new, 0 merged, 0 split, 1 stabilised)" in result.output
    # A second run into the same folder is refused unless --overwrite.
    one_line_error(run_cli(first, second, "--out", tmp_path / "out"), "--overwrite")
    assert run_cli(first, second, "--out", tmp_path / "out", "--overwrite").exit_code == 0


def test_plots_show_the_sites_and_fastest_slumps(tmp_path):
    files = lineage_catalogue(tmp_path)
    track(files, tmp_path / "out")
    from PIL import Image

    for name in ("area_by_site.png", "fastest_growing.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == (1080, 480)
            colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
            # Lines in matplotlib's default colour cycle, not an empty frame.
            assert (np.abs(colours.astype(int) - [31, 119, 180]).sum(axis=1) < 30).sum() > 200


def test_tolerance_bridges_a_co_registration_shift(tmp_path):
    # The second sensor's outline lies 4 m east of the first's: linked within 6 m, not within 2 m.
    files = [write(tmp_path / "planet_20190701.gpkg", [{"geometry": shapely.box(X0, Y0, X0 + 50, Y0 + 50)}]),
             write(tmp_path / "s2_20200701.gpkg", [{"geometry": shapely.box(X0 + 54, Y0, X0 + 110, Y0 + 50)}])]
    assert track(files, tmp_path / "wide", tolerance=6.0).tracks == 1
    assert track(files, tmp_path / "narrow", tolerance=2.0).tracks == 2


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """`rts-tf demo-data --time-series` (tiny training scenes; the time series is always full size)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    result = CliRunner().invoke(main, ["demo-data", str(out), "--scene-size", "64", "--time-series"])
    assert result.exit_code == 0, result.output
    assert "time series:" in result.output and "4 dates of one site" in result.output
    return out


def test_demo_data_command_writes_the_time_series(demo_data, tmp_path):
    labels = geopandas.read_file(demo_data / "timeseries" / "labels.gpkg")
    assert sorted(labels["image_date"].unique()) == ["2019-07-21", "2020-07-18", "2021-07-24", "2022-07-19"]
    assert set(labels["site"]) == {"peel_1"}
    # The training demo's labels and scenes do not hold the time series.
    training = geopandas.read_file(demo_data / "labels.gpkg")
    assert not set(training["image_id"]) & set(labels["image_id"])
    assert not set(p.name for p in (demo_data / "scenes").iterdir()) & set(labels["image_id"])
    result = CliRunner().invoke(main, ["track", str(demo_data / "timeseries" / "labels.gpkg"), "--out",
                                       str(tmp_path / "tracks"), "--no-change-maps", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "7 tracks (2 active, 1 new, 3 merged, 0 split, 1 stabilised)" in result.output
    assert not (tmp_path / "tracks" / "change.tif").exists() and (tmp_path / "tracks" / "tracks.gpkg").exists()


def test_time_series_demo_truth(demo_data, tmp_path):
    series = demo_data / "timeseries"
    truth = json.loads((series / "truth.json").read_text())
    # Scenes of four dates in their own folder, none among the training demo's.
    assert sorted(p.name for p in (series / "scenes").iterdir()) == sorted(truth["scenes"])
    summary = track([series / "labels.gpkg"], tmp_path / "out")
    observations, tracks, relations = layers(tmp_path / "out")
    status = dict(zip(tracks["track_id"], tracks["status"]))
    found = {name: status[track_of(observations, slump=name)] for name in truth["slumps"]}
    assert found == {name: slump["status"] for name, slump in truth["slumps"].items()}
    assert summary.statuses == {"active": 2, "new": 1, "merged": 3, "split": 0, "stabilised": 1}
    assert sorted(relations["kind"]) == ["MergedRTS", "MergedRTS"]
    # Growth against the truth's UTM areas: equal within the UTM zone's scale error (< 0.2%).
    for name, slump in truth["slumps"].items():
        dates = np.array(list(slump["area_m2"]), dtype="datetime64[D]").astype(float)
        areas = np.array(list(slump["area_m2"].values()))
        if len(areas) < 2:
            continue
        years = (dates - dates.mean()) / DAYS_PER_YEAR
        expected = np.dot(years, areas - areas.mean()) / np.dot(years, years)
        row = tracks[tracks["track_id"] == track_of(observations, slump=name)].iloc[0]
        assert row["growth_m2_per_year"] == pytest.approx(expected, rel=2e-3, abs=1e-3)


def test_sites_are_tracked_apart_with_a_change_map_each(tmp_path):
    # Two sites with a slump at the same place (as if two regions shared coordinates): never linked.
    rows = [{"site": site, "image_date": date, "geometry": square(0, 0, area)}
            for site in ("banks_1", "peel 2") for date, area in (("2019-07-01", 900), ("2020-07-01", 1_600))]
    summary = track([write(tmp_path / "two_sites.gpkg", rows)], tmp_path / "out", pixel_size=10.0)
    observations, tracks, _ = layers(tmp_path / "out")
    assert sorted(tracks["site"]) == ["banks_1", "peel 2"] and list(tracks["n_observations"]) == [2, 2]
    assert summary.sites["banks_1"]["dates"] == ["2019-07-01", "2020-07-01"]
    table = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert table[["site", "count", "total_area_m2", "new_area_m2"]].values.tolist() == [
        ["banks_1", 1, 900.0, 900.0], ["banks_1", 1, 1600.0, 700.0],
        ["peel 2", 1, 900.0, 900.0], ["peel 2", 1, 1600.0, 700.0]]
    for name in ("change_banks_1.tif", "change_peel_2.tif"):
        with rasterio.open(tmp_path / "out" / name) as dataset:
            assert dataset.res == (10.0, 10.0) and dataset.tags()["SITE"] in ("banks_1", "peel 2")
            assert set(np.unique(dataset.read(1))) <= {0, 20190701, 20200701}
