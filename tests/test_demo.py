"""Tests for the synthetic demo dataset: real formats, shared geometry, learnable signal, determinism."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.warp import transform_bounds, transform_geom
from scipy import ndimage

from rts_tf.demo import REGIONS, make_demo_data

TINY = 128
SEED = 0
REGION_BY_EPSG = {spec.epsg: spec for spec in REGIONS}
SPEC_BY_NAME = {spec.name: spec for spec in REGIONS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, make_demo_data(out, seed=SEED, scene_size=TINY)


def read_features(path: Path) -> tuple[dict, np.ndarray, dict]:
    meta, _, wkb, values = pyogrio.raw.read(path)
    return meta, shapely.from_wkb(wkb), dict(zip(meta["fields"], values))


SENTINEL2_FILES = ("B02.tif", "B03.tif", "B04.tif", "B08.tif", "SCL.tif")


def scene_files(out: Path, scene_id: str) -> tuple[Path, ...]:
    """A PlanetScope scene's SR (4- or 8-band) and UDM2; a Sentinel-2 scene's band COGs, SCL and STAC item."""
    folder = out / "scenes" / scene_id
    if scene_id.startswith("S2"):
        return (*(folder / name for name in SENTINEL2_FILES), folder / f"{scene_id}.json")
    suffix = "_8b" if (folder / f"{scene_id}_3B_AnalyticMS_SR_8b.tif").exists() else ""
    return folder / f"{scene_id}_3B_AnalyticMS_SR{suffix}.tif", folder / f"{scene_id}_3B_udm2.tif"


def planet_scenes(summary: dict) -> list[str]:
    return [scene_id for scene_id in summary["scenes"] if summary["sensors"][scene_id].startswith("planetscope")]


def read_scene(out: Path, scene_id: str):
    """A PlanetScope scene's blue, green, red and NIR (bands 2, 4, 6, 8 of an 8-band product), UDM2, profile."""
    sr_path, udm_path = scene_files(out, scene_id)
    with rasterio.open(sr_path) as sr, rasterio.open(udm_path) as udm:
        bands = [2, 4, 6, 8] if sr.count == 8 else [1, 2, 3, 4]
        return sr.read(bands).astype(np.float64), udm.read(), sr.profile


def scenes_by_region(out: Path, summary: dict) -> dict[str, list[str]]:
    grouped = defaultdict(list)
    for scene_id in summary["scenes"]:
        with rasterio.open(scene_files(out, scene_id)[0]) as dataset:
            grouped[REGION_BY_EPSG[dataset.crs.to_epsg()].name].append(scene_id)
    return dict(grouped)


def rasterize_labels(geometries, crs, transform, shape) -> np.ndarray:
    """Label polygons (EPSG:4326) burned onto a grid; invalid ones are repaired first, as a consumer would."""
    shapes = [transform_geom("EPSG:4326", crs, shapely.make_valid(geometry).__geo_interface__) for geometry in geometries]
    if not shapes:
        return np.zeros(shape, dtype=bool)
    return rasterize(shapes, out_shape=shape, transform=transform, dtype=np.uint8).astype(bool)


def scene_label_mask(out: Path, scene_id: str, profile) -> np.ndarray:
    _, geometries, fields = read_features(out / "labels.gpkg")
    mine = geometries[fields["image_id"] == scene_id]
    return rasterize_labels(mine, profile["crs"], profile["transform"], (profile["height"], profile["width"]))


def test_layout_and_summary(tiny):
    out, summary = tiny
    assert summary["regions"] == ["Lena", "Horton", "Herschel", "Kolguev", "Banks", "Tuktoyaktuk", "Yamal"]
    assert sorted(summary["sensors"].values()).count("planetscope") == len(summary["scenes"]) - 2
    expected = {Path("labels.gpkg"), Path("sites.geojson")}
    for scene_id in summary["scenes"]:
        sensor = summary["sensors"][scene_id]
        if sensor == "planetscope":  # Dove classic and Dove-R ids: date_time_satellite
            assert len(scene_id) == 20 and scene_id[8] == "_" and scene_id[15] == "_", scene_id
        elif sensor == "planetscope-8b":  # SuperDove ids carry hundredths of a second
            assert re.fullmatch(r"\d{8}_\d{6}_\d{2}_24[0-9a-f]{2}", scene_id), scene_id
        else:  # the ESA product name, baseline 04.00
            assert re.fullmatch(r"S2[AB]_MSIL2A_\d{8}T\d{6}_N0400_R\d{3}_T\d{2}[A-Z]{3}_\d{8}T\d{6}", scene_id), scene_id
        date = re.search(r"\d{8}", scene_id).group()
        assert date[4:6] in ("07", "08"), "acquisitions are in July or August"
        expected |= {path.relative_to(out) for path in scene_files(out, scene_id)}
    for region in summary["regions"]:
        expected |= {Path(f"auxiliary/dem/{region}_dem.tif"), Path(f"auxiliary/tcvis/{region}_tcvis.tif")}
    files = {path.relative_to(out) for path in out.rglob("*") if path.is_file()}
    assert files == expected
    assert summary["bytes"] == sum((out / path).stat().st_size for path in files)
    grouped = scenes_by_region(out, summary)
    assert set(grouped) == set(summary["regions"])
    assert all(len(ids) in (1, 2) for ids in grouped.values())
    assert sum(len(ids) == 2 for ids in grouped.values()) >= 3
    assert [summary["sensors"][scene_id] for scene_id in grouped["Yamal"]] == ["planetscope-8b", "sentinel2-l2a"]


def test_scene_rasters_match_planetscope_formats(tiny):
    out, summary = tiny
    for scene_id in planet_scenes(summary):
        sr_path, udm_path = scene_files(out, scene_id)
        eight = summary["sensors"][scene_id] == "planetscope-8b"
        with rasterio.open(sr_path) as sr, rasterio.open(udm_path) as udm:
            assert (sr.count, sr.dtypes[0], sr.nodata) == (8 if eight else 4, "uint16", 0)
            assert sr.crs.to_epsg() in REGION_BY_EPSG and sr.res == (3.0, 3.0)
            assert sr.descriptions == (("coastal_blue", "blue", "green_i", "green", "yellow", "red", "rededge", "nir")
                                       if eight else ("blue", "green", "red", "nir"))
            assert sr.profile["tiled"] and sr.profile["blockxsize"] == 256 and sr.compression.name == "deflate"
            assert (udm.count, udm.dtypes[0]) == (8, "uint8")
            assert udm.descriptions == (
                "clear", "snow", "shadow", "light_haze", "heavy_haze", "cloud", "confidence", "udm1"
            )
            assert (udm.crs, udm.transform, udm.shape) == (sr.crs, sr.transform, sr.shape)
            image, flags = sr.read(), udm.read()
        nodata = np.all(image == 0, axis=0)
        assert np.array_equal(nodata, np.any(image == 0, axis=0)), "nodata is all bands or none"
        assert np.array_equal(nodata, flags[7] == 1) and not flags[[0, 1, 2, 3, 4, 5, 6]][:, nodata].any()
        assert set(np.unique(flags[[0, 1, 2, 3, 4, 5, 7]])) <= {0, 1} and flags[6].max() <= 100
        # A rotated footprint inside the raster: every corner is nodata, most of the raster is valid.
        assert nodata[0, 0] and nodata[0, -1] and nodata[-1, 0] and nodata[-1, -1]
        assert 0.55 < 1.0 - nodata.mean() < 0.95
        usable = flags[0] == 1
        assert not (usable & ((flags[5] == 1) | (flags[2] == 1) | (flags[4] == 1) | (flags[1] == 1))).any()
        blue, nir = (np.median(image[band - 1][usable]) for band in ((2, 8) if eight else (1, 4)))
        assert 150 < blue < 1200 and 1200 < nir < 4000, (scene_id, blue, nir)
        if eight:  # the added bands lie between their neighbours: coastal blue near blue, red edge between red and NIR
            coastal, red, rededge = (np.median(image[band - 1][usable]) for band in (1, 6, 7))
            assert 0.7 * blue < coastal < 1.1 * blue and red < rededge < nir


def test_sentinel2_scene_is_a_stac_download_of_the_same_ground(tiny):
    """Yamal's Sentinel-2 L2A scene: band COGs at 10 m with the offset of processing baseline 04.00
    (DN = reflectance x 10000 + 1000; 0 = no data), SCL at 20 m over the same extent, and the STAC item
    that says so; the ground and slumps of the 8-band PlanetScope scene."""
    out, summary = tiny
    eight, product = scenes_by_region(out, summary)["Yamal"]
    *band_paths, scl_path, item_path = scene_files(out, product)
    item = json.loads(item_path.read_text())
    assert (item["type"], item["id"], item["properties"]["s2:processing_baseline"]) == ("Feature", product, "04.00")
    layers = []
    for path in band_paths:
        raster = item["assets"][path.stem]["raster:bands"][0]
        assert (raster["scale"], raster["offset"], raster["nodata"]) == (0.0001, -0.1, 0)
        assert item["assets"][path.stem]["href"] == f"./{path.name}"
        with rasterio.open(path) as dataset:
            assert (dataset.count, dataset.dtypes[0], dataset.nodata, dataset.res) == (1, "uint16", 0, (10.0, 10.0))
            assert dataset.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and dataset.crs.to_epsg() == 32642
            layers.append(dataset.read(1).astype(np.float64))
            transform, shape = dataset.transform, dataset.shape
    with rasterio.open(scl_path) as dataset:
        assert (dataset.count, dataset.dtypes[0], dataset.res) == (1, "uint8", (20.0, 20.0))
        assert (dataset.transform.c, dataset.transform.f) == (transform.c, transform.f)
        assert dataset.shape == (shape[0] // 2, shape[1] // 2)
        scl = dataset.read(1)
    image = np.stack(layers)
    nodata = image[0] == 0
    assert np.array_equal(nodata, (image == 0).any(axis=0)), "no data is all bands or none"
    assert 0.05 < nodata.mean() < 0.3, "the swath edge cuts off a corner"
    assert (image[:, ~nodata] > 1000).mean() > 0.99, "numbers carry the offset of +1000"
    assert {0, 3, 4, 6, 8, 9, 10} <= set(np.unique(scl).tolist()) <= set(range(12))
    clear = ~nodata & np.isin(np.repeat(np.repeat(scl, 2, axis=0), 2, axis=1), (4, 5))
    reflectance = (image[:, clear] - 1000) / 10000
    planet, flags, _ = read_scene(out, eight)
    planet = planet[:, (flags[0] == 1)] / 10000
    ndvi = [np.median((nir - red) / (nir + red)) for red, nir in (reflectance[2:], planet[2:])]
    assert abs(ndvi[0] - ndvi[1]) < 0.05 and ndvi[0] > 0.45, ndvi
    gain = np.median(reflectance, axis=1) / np.median(planet, axis=1)  # PlanetScope's calibration varies by scene
    assert (0.75 < gain).all() and (gain < 1.4).all(), gain  # 1 / (0.8 x 0.95) at most
    # The same slumps, labelled for both scenes by image_id.
    _, geometries, fields = read_features(out / "labels.gpkg")
    seen = [set(shapely.to_wkb(geometries[fields["image_id"] == scene_id]).tolist()) for scene_id in (eight, product)]
    assert len(seen[1]) >= 3 and seen[1] <= seen[0], (len(seen[0]), len(seen[1]))


def test_auxiliary_tiles_cover_every_scene_with_margin(tiny):
    out, summary = tiny
    for region, scene_ids in scenes_by_region(out, summary).items():
        with rasterio.open(out / "auxiliary" / "dem" / f"{region}_dem.tif") as dem:
            assert (dem.crs.to_epsg(), dem.count, dem.dtypes[0], dem.nodata) == (3413, 1, "float32", -9999.0)
            assert dem.res == (10.0, 10.0)
            elevation = dem.read(1)
            dem_box = shapely.box(*dem.bounds)
        assert (elevation != -9999).mean() > 0.95 and elevation[elevation != -9999].max() < 500
        with rasterio.open(out / "auxiliary" / "tcvis" / f"{region}_tcvis.tif") as tcvis:
            assert (tcvis.crs.to_epsg(), tcvis.count, tcvis.dtypes[0]) == (4326, 3, "uint8")
            lon_step = 0.00027 / math.cos(math.radians(SPEC_BY_NAME[region].lat))
            assert tcvis.res[1] == pytest.approx(0.00027) and tcvis.res[0] == pytest.approx(lon_step, rel=1e-3)
            tcvis_box = shapely.box(*tcvis.bounds)
        for scene_id in scene_ids:
            with rasterio.open(scene_files(out, scene_id)[0]) as sr:
                scene_in_dem = shapely.box(*transform_bounds(sr.crs, "EPSG:3413", *sr.bounds, densify_pts=21))
                scene_in_tcvis = shapely.box(*transform_bounds(sr.crs, "EPSG:4326", *sr.bounds, densify_pts=21))
            assert dem_box.buffer(-300.0, join_style="mitre").contains(scene_in_dem)
            assert tcvis_box.buffer(-300.0 / 111_000.0, join_style="mitre").contains(scene_in_tcvis)


def test_labels_have_fields_crs_and_awkward_geometries(tiny):
    out, summary = tiny
    meta, geometries, fields = read_features(out / "labels.gpkg")
    assert list(meta["fields"]) == ["image_id", "image_date", "region", "site", "label"]
    assert meta["crs"] == "EPSG:4326"
    assert len(geometries) == summary["labels"] >= summary["slumps"] >= 6 * 2
    assert set(fields["label"]) == {"RTS"}
    assert set(fields["image_id"]) == set(summary["scenes"])
    grouped = scenes_by_region(out, summary)
    for image_id, image_date, region, site in zip(*(fields[key] for key in ("image_id", "image_date", "region", "site"))):
        date = re.search(r"\d{8}", image_id).group()  # PlanetScope ids start with it; S2 product names carry it
        assert image_date == f"{date[:4]}-{date[4:6]}-{date[6:8]}"
        assert image_id in grouped[region] and site == f"{region.lower()}_1"
    assert not shapely.is_valid(geometries).all(), "at least one self-intersecting label"
    assert shapely.is_valid(geometries).sum() >= len(geometries) - 2
    parts = shapely.get_num_geometries(geometries)
    assert set(shapely.get_type_id(geometries)) == {6} and parts.max() >= 2, "one label has two parts"
    # Every label touches the valid area of its own scene.
    for scene_id in planet_scenes(summary):
        image, _, profile = read_scene(out, scene_id)
        label = scene_label_mask(out, scene_id, profile)
        assert (label & (image[0] > 0)).any() or not (fields["image_id"] == scene_id).any()


def test_sites_cover_their_scenes(tiny):
    out, summary = tiny
    meta, geometries, fields = read_features(out / "sites.geojson")
    assert sorted(fields["region"]) == sorted(summary["regions"]) and set(meta["fields"]) == {"site", "region"}
    site_by_region = dict(zip(fields["region"], geometries))
    for region, scene_ids in scenes_by_region(out, summary).items():
        for scene_id in scene_ids:
            with rasterio.open(scene_files(out, scene_id)[0]) as sr:
                scene_box = shapely.box(*transform_bounds(sr.crs, "EPSG:4326", *sr.bounds, densify_pts=21))
                assert site_by_region[region].contains(scene_box)


def test_slumps_are_less_green_than_the_tundra_around_them(tiny):
    out, summary = tiny
    inside_values, ring_values = [], []
    for scene_id in planet_scenes(summary):
        image, flags, profile = read_scene(out, scene_id)
        label = scene_label_mask(out, scene_id, profile)
        usable = flags[0] == 1
        ndvi = (image[3] - image[2]) / np.maximum(image[3] + image[2], 1.0)
        ring = ndimage.binary_dilation(label, iterations=8) & ~ndimage.binary_dilation(label, iterations=2)
        if (label & usable).sum() < 20:
            continue
        inside, around = ndvi[label & usable].mean(), ndvi[ring & usable].mean()
        assert inside < around - 0.15, (scene_id, inside, around)
        inside_values.append(inside)
        ring_values.append(around)
    assert len(inside_values) >= 8
    assert 0.05 < np.mean(inside_values) < 0.4 and np.mean(ring_values) > 0.45


def test_dem_is_steeper_inside_slumps_and_tcvis_shows_their_trend(tiny):
    out, summary = tiny
    _, geometries, fields = read_features(out / "labels.gpkg")
    for region in summary["regions"]:
        mine = geometries[fields["region"] == region]
        with rasterio.open(out / "auxiliary" / "dem" / f"{region}_dem.tif") as dem:
            elevation = np.where(dem.read(1) == -9999, np.nan, dem.read(1).astype(np.float64))
            label = rasterize_labels(mine, dem.crs, dem.transform, dem.shape)
        gradient_y, gradient_x = np.gradient(elevation, 10.0)
        slope = np.degrees(np.arctan(np.hypot(gradient_x, gradient_y)))
        assert np.nanmean(slope[label]) > 1.25 * np.nanmean(slope), region
        with rasterio.open(out / "auxiliary" / "tcvis" / f"{region}_tcvis.tif") as tcvis:
            colours = tcvis.read().astype(np.float64)
            label = rasterize_labels(mine, tcvis.crs, tcvis.transform, tcvis.shape)
        trend = colours[0] - colours[1]  # brightness up, greenness down in slumps
        assert label.sum() >= 3 and trend[label].mean() > trend[~label].mean() + 40, region


def test_two_scene_regions_overlap_and_share_slumps_matched_by_image_id(tiny):
    out, summary = tiny
    _, geometries, fields = read_features(out / "labels.gpkg")
    pairs = [ids for ids in scenes_by_region(out, summary).values()
             if len(ids) == 2 and all(summary["sensors"][scene_id] == "planetscope" for scene_id in ids)]
    for first, second in pairs:
        with rasterio.open(scene_files(out, first)[0]) as a, rasterio.open(scene_files(out, second)[0]) as b:
            box_a, box_b = shapely.box(*a.bounds), shapely.box(*b.bounds)
        overlap = box_a.intersection(box_b).area / min(box_a.area, box_b.area)
        assert 0.3 < overlap < 0.9, overlap
        labels_a, labels_b = geometries[fields["image_id"] == first], geometries[fields["image_id"] == second]
        shared = [g for g in labels_a if any(shapely.equals_exact(g, other, tolerance=1e-9) for other in labels_b)]
        # The same physical slump is one row per scene, each row's image_id naming its scene, and
        # at least one such slump has valid pixels in both scenes.
        visible_in_both = []
        for geometry in shared:
            visible = []
            for scene_id in (first, second):
                image, _, profile = read_scene(out, scene_id)
                mask = rasterize_labels([geometry], profile["crs"], profile["transform"], image.shape[1:])
                visible.append((mask & (image[0] > 0)).sum() >= 10)
            visible_in_both.append(all(visible))
        assert any(visible_in_both), (first, second)


def test_udm2_has_clouds_over_part_of_a_slump_shadows_haze_and_snow(tiny):
    out, summary = tiny
    partly_clouded, seen = False, np.zeros(6, dtype=bool)
    for scene_id in planet_scenes(summary):
        image, flags, profile = read_scene(out, scene_id)
        seen |= flags[:6].reshape(6, -1).any(axis=1)
        label = scene_label_mask(out, scene_id, profile)
        clouded = (label & (flags[5] == 1)).sum()
        partly_clouded |= 0 < clouded < label.sum()
        if flags[5].any():
            cloud_brightness = image[:, flags[5] == 1].mean(axis=1)
            clear_brightness = image[:, flags[0] == 1].mean(axis=1)
            assert (cloud_brightness[:3] > 2.5 * clear_brightness[:3]).all(), "clouds are white"
    assert partly_clouded
    assert seen.all(), "clear, snow, shadow, light haze, heavy haze and cloud all occur"


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny, tmp_path):
    out, summary = tiny

    def digests(root: Path) -> dict:
        files = sorted(path for path in root.rglob("*") if path.is_file())
        return {path.relative_to(root): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}

    again = make_demo_data(tmp_path / "again", seed=SEED, scene_size=TINY)
    assert again == summary
    # GeoTIFFs carry no timestamps and the GeoPackage's last_change is pinned, so all bytes match.
    assert digests(tmp_path / "again") == digests(out)
    other = make_demo_data(tmp_path / "other", seed=SEED + 1, scene_size=TINY)
    first_scene = other["scenes"][0]
    other_image = read_scene(tmp_path / "other", first_scene)[0]
    same_image = read_scene(out, first_scene)[0] if first_scene in summary["scenes"] else None
    assert other["scenes"] != summary["scenes"] or not np.array_equal(other_image, same_image)


def test_rejects_tiny_scene_size(tmp_path):
    with pytest.raises(ValueError, match="scene_size"):
        make_demo_data(tmp_path / "bad", scene_size=16)


def test_default_size_fits_the_budget(tmp_path):
    start = time.perf_counter()
    summary = make_demo_data(tmp_path / "default", seed=SEED)
    elapsed = time.perf_counter() - start
    assert summary["bytes"] < 60e6 and elapsed < 60.0, (summary["bytes"], elapsed)
    _, geometries, fields = read_features(tmp_path / "default" / "labels.gpkg")
    for region in summary["regions"]:
        # The same slump seen in two scenes is two rows with (nearly, if one is the bowtie) the same centroid.
        distinct = []
        for point in shapely.centroid(geometries[fields["region"] == region]):
            if all(point.distance(other) > 1e-4 for other in distinct):
                distinct.append(point)
        assert 3 <= len(distinct) <= 8, (region, len(distinct))
    for scene_id in planet_scenes(summary):
        with rasterio.open(scene_files(tmp_path / "default", scene_id)[0]) as sr:
            assert 544 <= sr.width <= 736 and 544 <= sr.height <= 736
    sentinel2 = next(scene_id for scene_id, sensor in summary["sensors"].items() if sensor == "sentinel2-l2a")
    with rasterio.open(scene_files(tmp_path / "default", sentinel2)[0]) as b02:
        assert 250 <= b02.width <= 340 and 250 <= b02.height <= 340  # 1.5 times a PlanetScope scene at 10 m
