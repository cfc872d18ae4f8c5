"""Demo data: a deterministic synthetic RTS dataset written in the real input formats."""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyogrio
import pyogrio.raw
import rasterio
import shapely
import shapely.affinity
from affine import Affine
from rasterio.features import rasterize
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds, transform_geom
from scipy import ndimage

from rts_tf.bands import REFLECTANCE_BANDS

PIXEL_SIZE = 3.0
DEFAULT_SCENE_SIZE = 640
DEM_RESOLUTION = 10.0
DEM_NODATA = -9999.0
DEM_CRS = "EPSG:3413"
TCVIS_CRS = "EPSG:4326"
TCVIS_LAT_STEP = 0.00027
AUXILIARY_MARGIN = 450.0  # metres around the scenes; the contract asks for at least 300
SR_BANDS = REFLECTANCE_BANDS
# PlanetScope 8-band (SuperDove) surface reflectance, as Planet names the bands of *_AnalyticMS_SR_8b.tif.
SR_8B_BANDS = ("coastal_blue", "blue", "green_i", "green", "yellow", "red", "rededge", "nir")
SUPERDOVES = ("2413", "241c", "2426", "2439", "2461", "247d", "2480", "24a4")
SENTINEL2_PIXEL = 10.0
SENTINEL2_BANDS = ("B02", "B03", "B04", "B08")  # blue, green, red, nir at 10 m
SENTINEL2_WAVELENGTHS = {"B02": ("blue", 0.49), "B03": ("green", 0.56), "B04": ("red", 0.665), "B08": ("nir", 0.842)}
SENTINEL2_BOA_ADD_OFFSET = -1000  # processing baseline 04.00 on: DN = reflectance x 10000 + 1000
UDM2_BANDS = ("clear", "snow", "shadow", "light_haze", "heavy_haze", "cloud", "confidence", "udm1")
TCVIS_BANDS = ("brightness_trend", "greenness_trend", "wetness_trend")
SATELLITES = ("0f15", "0f22", "0f4c", "1003", "1006", "100c", "1025", "103c", "1049", "105e")
LABEL_FIELDS = ("image_id", "image_date", "region", "site", "label")


@dataclass(frozen=True)
class RegionSpec:
    """A demo region and the special cases it carries (documented in the returned data)."""

    name: str
    lon: float
    lat: float
    epsg: int
    scene_count: int
    year: int
    coast: bool = False  # sea on one side, slumps on coastal bluffs
    twin_slump: bool = False  # the first slump has a detached second lobe: a MultiPolygon label
    bowtie_label: bool = False  # the region's first label is a self-intersecting polygon
    cloud_over_slump: bool = False  # the first scene has a cloud over part of a slump
    heavy_haze: bool = False  # the first scene has a heavy-haze patch
    snow: bool = False  # the first scene has late-lying snow banks
    dem_void: bool = False  # the DEM has a nodata hole over a lake, as ArcticDEM often does
    sentinel2: bool = False  # also imaged by Sentinel-2 L2A (10 m band COGs, SCL); its PlanetScope scene is 8-band


REGIONS = (
    RegionSpec("Lena", 126.5, 72.3, 32652, 2, 2018, twin_slump=True),
    RegionSpec("Horton", -127.0, 69.9, 32609, 2, 2019, cloud_over_slump=True),
    RegionSpec("Herschel", -139.1, 69.6, 32607, 1, 2018, coast=True, twin_slump=True),
    RegionSpec("Kolguev", 49.2, 69.1, 32639, 2, 2019, coast=True, heavy_haze=True, dem_void=True),
    RegionSpec("Banks", -120.5, 72.2, 32610, 1, 2020, twin_slump=True, snow=True),
    RegionSpec("Tuktoyaktuk", -133.0, 69.4, 32608, 2, 2018, bowtie_label=True),
    RegionSpec("Yamal", 68.9, 70.3, 32642, 1, 2022, sentinel2=True),
)

TUNDRA, LAKE, RIVER, SEA, GRAVEL, BARE, SLUMP = range(7)
# Surface reflectance x 10000 (B, G, R, NIR) per class; tundra mixes SPARSE_TUNDRA and LUSH_TUNDRA.
SPECTRA = np.array(
    [
        [420, 620, 700, 2000],  # sparse tundra
        [380, 420, 260, 180],  # lake
        [620, 720, 640, 420],  # turbid river
        [480, 540, 400, 240],  # sea
        [850, 980, 1100, 1450],  # gravel bar
        [680, 880, 1150, 1650],  # bare patch on flat ground
        [700, 900, 1200, 1800],  # slump floor: bare wet soil
    ],
    dtype=np.float32,
)
LUSH_TUNDRA = np.array([280, 480, 360, 2900], dtype=np.float32)
CLOUD = np.array([5200, 5300, 5400, 5600], dtype=np.float32)
SNOW = np.array([7200, 7300, 7100, 6200], dtype=np.float32)
# TCVIS trend colours (brightness, greenness, wetness as RGB) per class.
TCVIS_COLOURS = np.array(
    # tundra greening, lake, river, sea, gravel bar, bare patch (stable), slump (bright, browning)
    [[110, 150, 105], [95, 115, 150], [120, 120, 150], [105, 115, 140],
     [125, 110, 170], [135, 128, 120], [190, 70, 120]],
    dtype=np.float32,
)


def _smoothstep(value: np.ndarray) -> np.ndarray:
    value = np.clip(value, 0.0, 1.0)
    return value * value * (3.0 - 2.0 * value)


class _Waves:
    """A smooth random field with unit RMS: a sum of plane waves, defined everywhere."""

    def __init__(self, rng: np.random.Generator, count: int, shortest: float, longest: float):
        wavelengths = rng.uniform(shortest, longest, count)
        angles = rng.uniform(0.0, 2.0 * math.pi, count)
        self.kx = 2.0 * math.pi * np.cos(angles) / wavelengths
        self.ky = 2.0 * math.pi * np.sin(angles) / wavelengths
        self.phases = rng.uniform(0.0, 2.0 * math.pi, count)

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # float32 halves the cost; phases stay accurate to 1e-4 rad over a region's few kilometres.
        u, v = np.asarray(u, dtype=np.float32), np.asarray(v, dtype=np.float32)
        total = np.zeros(u.shape, dtype=np.float32)
        for kx, ky, phase in np.stack([self.kx, self.ky, self.phases], axis=1).astype(np.float32):
            total += np.sin(kx * u + ky * v + phase)
        return total * math.sqrt(2.0 / len(self.kx))


@dataclass(frozen=True)
class Lobe:
    """A star-shaped blob whose boundary radius is R * (1 + harmonics - bowl cos + tongue)."""

    x: float
    y: float
    radius: float
    orientation: float  # radians; for slumps the downslope direction
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]
    bowl: float = 0.0  # longer upslope than downslope: an amphitheatre cut into the slope
    tongue: float = 0.0  # a narrow mud-flow lobe downslope

    def boundary_radius(self, theta: np.ndarray) -> np.ndarray:
        """Boundary distance from the centre at angle theta (relative to the orientation)."""
        factor = 1.0 - self.bowl * np.cos(theta) + self.tongue * np.exp(-((theta / 0.35) ** 2))
        for order, (amplitude, phase) in enumerate(zip(self.amplitudes, self.phases), start=2):
            factor = factor + amplitude * np.cos(order * theta + phase)
        return self.radius * factor

    @property
    def extent(self) -> float:
        return self.radius * (1.0 + self.bowl + self.tongue + sum(self.amplitudes))

    def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius (< 1 inside; inf far outside) and angle relative to the orientation."""
        dx, dy = np.asarray(x, dtype=float) - self.x, np.asarray(y, dtype=float) - self.y
        reach = 1.5 * self.extent  # points beyond it are outside; skipping them keeps this cheap
        near = (np.abs(dx) < reach) & (np.abs(dy) < reach)
        radius, theta = np.full(dx.shape, np.inf), np.zeros(dx.shape)
        dx, dy = dx[near], dy[near]
        theta[near] = np.mod(np.arctan2(dy, dx) - self.orientation + math.pi, 2.0 * math.pi) - math.pi
        radius[near] = np.hypot(dx, dy) / self.boundary_radius(theta[near])
        return radius, theta

    def ring(self, count: int) -> np.ndarray:
        """Boundary vertices (count x 2), counter-clockwise."""
        theta = np.linspace(-math.pi, math.pi, count, endpoint=False)
        radius = self.boundary_radius(theta)
        return np.column_stack(
            [self.x + radius * np.cos(theta + self.orientation), self.y + radius * np.sin(theta + self.orientation)]
        )


def _random_lobe(rng, x, y, radius, orientation, irregularity, bowl=0.0, tongue=0.0, elongation=None) -> Lobe:
    """A lobe with random harmonics; elongation (if given) fixes the second harmonic along the orientation."""
    orders = np.arange(2, 7)
    amplitudes = rng.uniform(0.0, irregularity, orders.size) / np.sqrt(orders - 1)
    phases = rng.uniform(0.0, 2.0 * math.pi, orders.size)
    if elongation is not None:
        amplitudes[0], phases[0] = abs(elongation), 0.0 if elongation > 0 else math.pi
    return Lobe(x, y, radius, orientation, tuple(amplitudes), tuple(phases), bowl, tongue)


@dataclass(frozen=True)
class Slump:
    """A retrogressive thaw slump: one or two lobes, a depression with a headwall upslope."""

    lobes: tuple[Lobe, ...]
    depth: float
    vertices: int

    @property
    def extent(self) -> float:
        main = self.lobes[0]
        return max(math.hypot(lobe.x - main.x, lobe.y - main.y) + lobe.extent for lobe in self.lobes)

    def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius and angle relative to the nearest lobe (by normalised radius)."""
        radius, theta = self.lobes[0].polar(x, y)
        for lobe in self.lobes[1:]:
            other_radius, other_theta = lobe.polar(x, y)
            closer = other_radius < radius
            radius, theta = np.where(closer, other_radius, radius), np.where(closer, other_theta, theta)
        return radius, theta

    def geometry(self) -> shapely.MultiPolygon:
        """The label polygon in the region's UTM coordinates."""
        counts = [self.vertices] + [max(16, self.vertices // 3)] * (len(self.lobes) - 1)
        return shapely.MultiPolygon([shapely.Polygon(lobe.ring(n)) for lobe, n in zip(self.lobes, counts)])


class Surface(NamedTuple):
    """Ground cover per point: class code, vegetation density 0..1, and the nearest slump's
    normalised radius (< 1 inside), angle from its downslope direction and radius in metres."""

    code: np.ndarray
    vegetation: np.ndarray
    slump_radius: np.ndarray
    slump_theta: np.ndarray
    slump_size: np.ndarray


class World:
    """One region's landscape as analytic functions of its UTM coordinates, shared by all sources."""

    def __init__(self, rng: np.random.Generator, centre: tuple[float, float], length: float, coast: bool):
        self.cx, self.cy = centre
        self.length = length
        # Tiny test scenes shrink the rolling hills with them (keeping their slopes); valleys and
        # objects shrink less so that slumps still find room on the valley sides.
        relief = length / (DEFAULT_SCENE_SIZE * PIXEL_SIZE)
        self.scale = max(relief, 0.4)
        self.hills = _Waves(rng, 5, 0.35 * length, 1.1 * length)
        self.hill_height = rng.uniform(7.0, 12.0) * relief
        self.vegetation_field = _Waves(rng, 8, 60.0, 0.5 * length)
        self.vegetation_detail = _Waves(rng, 10, 12.0, 60.0)
        self.vegetation_shift = rng.uniform(-0.15, 0.15)
        self.river_angle = rng.uniform(0.0, math.pi)
        self.river_offset = rng.uniform(-0.2, 0.2) * length
        self.meander = (rng.uniform(0.04, 0.07) * length, rng.uniform(0.5, 0.9) * length, *rng.uniform(0, 2 * math.pi, 2))
        self.valley_depth = rng.uniform(18.0, 30.0) * self.scale
        self.valley_width = rng.uniform(135.0, 190.0) * self.scale
        self.river_width = rng.uniform(10.0, 18.0) * self.scale
        self.bar_width = rng.uniform(30.0, 60.0) * self.scale
        self.base = self.valley_depth + 2.0 * self.hill_height + rng.uniform(5.0, 40.0)
        self.coast = None
        if coast:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            self.coast = (math.cos(angle), math.sin(angle), rng.uniform(0.3, 0.4) * length, 110.0 * self.scale)
        self.lakes: list[tuple[Lobe, float]] = []
        self.bare_patches: list[Lobe] = []
        self.slumps: list[Slump] = []

    def _river_distance(self, u, v):
        """Signed distance across the meandering channel, bend direction, and local half width."""
        along = u * math.cos(self.river_angle) + v * math.sin(self.river_angle)
        across = -u * math.sin(self.river_angle) + v * math.cos(self.river_angle)
        amplitude, wavelength, phase, second_phase = self.meander
        angle = 2.0 * math.pi * along / wavelength + phase
        bend = np.sin(angle) + 0.35 * np.sin(2.0 * angle + second_phase)
        width = self.river_width * (1.0 + 0.3 * np.sin(2.7 * angle + second_phase))
        return across - self.river_offset - amplitude * bend, bend, width

    def _inland_distance(self, u, v):
        if self.coast is None:
            return np.full(np.shape(u), np.inf)
        nx, ny, distance, _ = self.coast
        along = -u * ny + v * nx
        return distance + 25.0 * self.scale * np.sin(along / (60.0 * self.scale)) - (u * nx + v * ny)

    def elevation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Terrain height in metres with valleys, coast, lakes and the slump depressions."""
        u, v = np.asarray(x, dtype=float) - self.cx, np.asarray(y, dtype=float) - self.cy
        river, _, _ = self._river_distance(u, v)
        height = self.base + self.hill_height * self.hills(u, v)
        height = height - self.valley_depth * np.exp(-((river / self.valley_width) ** 2))
        if self.coast is not None:
            height = height * _smoothstep(self._inland_distance(u, v) / self.coast[3])
        for lake, level in self.lakes:
            weight = _smoothstep((1.25 - lake.polar(x, y)[0]) / 0.25)
            height = height * (1.0 - weight) + level * weight
        for slump in self.slumps:
            radius, theta = slump.polar(x, y)
            headwall = _smoothstep((1.0 - radius) / 0.15)
            height = height - slump.depth * headwall * (0.4 + 0.3 * (1.0 - np.cos(theta)))
        return height

    def slope(self, x: np.ndarray, y: np.ndarray, step: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
        """Slope in degrees and downslope direction (radians) by central differences."""
        gx = (self.elevation(x + step, y) - self.elevation(x - step, y)) / (2 * step)
        gy = (self.elevation(x, y + step) - self.elevation(x, y - step)) / (2 * step)
        return np.degrees(np.arctan(np.hypot(gx, gy))), np.arctan2(-gy, -gx)

    def surface(self, x: np.ndarray, y: np.ndarray) -> Surface:
        """What covers the ground at each point."""
        u, v = np.asarray(x, dtype=float) - self.cx, np.asarray(y, dtype=float) - self.cy
        code = np.full(u.shape, TUNDRA, dtype=np.int8)
        vegetation = 0.6 + 0.2 * self.vegetation_field(u, v) + 0.07 * self.vegetation_detail(u, v)
        vegetation = np.clip(vegetation + self.vegetation_shift, 0.0, 1.0)
        for patch in self.bare_patches:
            code[patch.polar(x, y)[0] < 1.0] = BARE
        river, bend, width = self._river_distance(u, v)
        bar = self.bar_width * np.clip((np.abs(bend) - 0.35) / 0.65, 0.0, 1.0)
        code[(river * bend < 0) & (np.abs(river) < width + bar)] = GRAVEL  # point bars inside bends
        code[np.abs(river) < width] = RIVER
        for lake, _ in self.lakes:
            code[lake.polar(x, y)[0] < 1.0] = LAKE
        code[self._inland_distance(u, v) < 0] = SEA
        slump_radius, slump_theta, slump_size = np.full(u.shape, np.inf), np.zeros(u.shape), np.zeros(u.shape)
        for slump in self.slumps:
            radius, theta = slump.polar(x, y)
            closer = radius < slump_radius
            slump_radius, slump_theta = np.where(closer, radius, slump_radius), np.where(closer, theta, slump_theta)
            slump_size[closer] = slump.lobes[0].radius
        code[slump_radius < 1.0] = SLUMP
        return Surface(code, vegetation, slump_radius, slump_theta, slump_size)

    def fits(self, lobes: list[Lobe], margin: float) -> bool:
        """True when the lobes' surroundings are plain tundra and clear of other features."""
        ring = np.concatenate([lobe.ring(32) for lobe in lobes])
        centre = ring.mean(axis=0)
        ring = centre + (ring - centre) * margin
        others = [(s.lobes[0].x, s.lobes[0].y, s.extent) for s in self.slumps]
        others += [(p.x, p.y, p.extent) for p in self.bare_patches]
        for x, y, extent in others:
            if np.hypot(ring[:, 0] - x, ring[:, 1] - y).min() < extent + 15.0 * self.scale:
                return False
        return bool(np.all(self.surface(ring[:, 0], ring[:, 1]).code == TUNDRA))


@dataclass(frozen=True)
class ScenePlan:
    """A PlanetScope scene: its id, date, grid and valid footprint (a polygon in UTM)."""

    scene_id: str
    date: str
    width: int
    height: int
    transform: Affine
    footprint: shapely.Polygon

    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """UTM x and y of every pixel centre, each shaped (height, width)."""
        columns = self.transform.c + self.transform.a * (np.arange(self.width) + 0.5)
        rows = self.transform.f + self.transform.e * (np.arange(self.height) + 0.5)
        return np.meshgrid(columns, rows)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        right = self.transform.c + self.transform.a * self.width
        bottom = self.transform.f + self.transform.e * self.height
        return self.transform.c, bottom, right, self.transform.f


def _plan_scenes(spec: RegionSpec, rng, centre, scene_size: int) -> list[ScenePlan]:
    """The region's scenes; a second one is shifted by 30% of the size and taken on another date."""
    plans = []
    direction = rng.uniform(0.0, 2.0 * math.pi)
    first_date = datetime.date(spec.year, 7, 1) + datetime.timedelta(days=int(rng.integers(0, 50)))
    for index in range(spec.scene_count):
        width, height = (int(round(scene_size * rng.uniform(0.85, 1.15))) for _ in range(2))
        shift = 0.3 * index * scene_size * PIXEL_SIZE
        x = centre[0] + shift * math.cos(direction) - width * PIXEL_SIZE / 2
        y = centre[1] + shift * math.sin(direction) + height * PIXEL_SIZE / 2
        left, top = (round(value / PIXEL_SIZE) * PIXEL_SIZE for value in (x, y))
        transform = Affine(PIXEL_SIZE, 0.0, left, 0.0, -PIXEL_SIZE, top)
        date = first_date
        if index:
            year, day = spec.year + int(rng.integers(0, 2)), int(rng.integers(0, 60))
            date = datetime.date(year, 7, 1) + datetime.timedelta(days=day)
            date = date + datetime.timedelta(days=9) if date == first_date else date
        # Acquisitions around 10:30 local solar time, recorded in UTC.
        seconds = int(((10.5 + rng.uniform(-1, 1) - spec.lon / 15.0) % 24.0) * 3600)
        if spec.sentinel2:  # a SuperDove: ids since 2019 carry hundredths of a second, e.g. 20220801_061530_27_2461
            satellite = f"{int(rng.integers(100)):02d}_{SUPERDOVES[int(rng.integers(len(SUPERDOVES)))]}"
        else:
            satellite = SATELLITES[int(rng.integers(len(SATELLITES)))]
        scene_id = f"{date:%Y%m%d}_{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}_{satellite}"
        # The valid footprint: a rotated, slightly irregular quadrilateral, like a PlanetScope frame.
        angle = math.radians(rng.uniform(6.0, 12.0) * rng.choice([-1, 1]))
        fit = min(
            0.94 * width / (width * math.cos(abs(angle)) + height * math.sin(abs(angle))),
            0.94 * height / (width * math.sin(abs(angle)) + height * math.cos(abs(angle))),
        )
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [fit * width / 2, fit * height / 2]
        corners = corners + rng.uniform(-0.02, 0.02, (4, 2)) * [width, height]
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pixels = corners @ rotation.T + [width / 2, height / 2]
        footprint = shapely.Polygon(np.column_stack([left + PIXEL_SIZE * pixels[:, 0], top - PIXEL_SIZE * pixels[:, 1]]))
        plans.append(ScenePlan(scene_id, f"{date:%Y-%m-%d}", width, height, transform, footprint))
    return plans


def _random_points(rng, area: shapely.Polygon, count: int) -> np.ndarray:
    """Up to count uniform random points inside area, shape (n, 2)."""
    left, bottom, right, top = area.bounds
    points = rng.uniform([left, bottom], [right, top], (count * 3, 2))
    return points[shapely.contains_xy(area, points[:, 0], points[:, 1])][:count]


def _build_world(spec: RegionSpec, rng, centre, scenes: list[ScenePlan], scene_size: int) -> World:
    """Terrain plus lakes, bare patches on flat ground, and 3 to 8 slumps on slopes inside the scenes."""
    world = World(rng, centre, scene_size * PIXEL_SIZE, spec.coast)
    union = shapely.union_all([scene.footprint for scene in scenes])
    for x, y in _random_points(rng, union, 40):
        radius, orientation = rng.uniform(0.04, 0.07) * world.length, rng.uniform(0, math.pi)
        lake = _random_lobe(rng, x, y, radius, orientation, 0.06, elongation=0.22)
        if world.fits([lake], 1.3) and world.slope(np.array([x]), np.array([y]))[0][0] < 6.0:
            world.lakes.append((lake, float(world.elevation(np.array([x]), np.array([y]))[0]) - 1.0))
        if len(world.lakes) == 2:
            break
    bare_target = int(rng.integers(2, 5))
    for x, y in _random_points(rng, union, 200):
        if len(world.bare_patches) == bare_target:
            break
        patch = _random_lobe(rng, x, y, rng.uniform(25.0, 80.0) * world.scale, rng.uniform(0, math.pi), 0.25)
        if world.slope(np.array([x]), np.array([y]))[0][0] < 2.5 and world.fits([patch], 1.2):
            world.bare_patches.append(patch)
    # Slumps sit on slopes; where scenes overlap, the first ones go in the overlap so both scenes see them.
    areas = [(union, int(rng.integers(3, 9)))]
    if len(scenes) == 2:
        areas.insert(0, (scenes[0].footprint.intersection(scenes[1].footprint), 2))
    for area, target in areas:
        if area.is_empty:
            continue
        candidates = _random_points(rng, area.buffer(-30.0 * world.scale), 600)
        slopes, downslope = world.slope(candidates[:, 0], candidates[:, 1])
        # Slopes steeper than 4 degrees first; gentler ones (2 to 4) only if too few of those fit.
        order = np.concatenate([np.flatnonzero(slopes >= 4.0), np.flatnonzero((slopes >= 2.0) & (slopes < 4.0))])
        for (x, y), orientation in zip(candidates[order], downslope[order]):
            if len(world.slumps) >= target:
                break
            radius = 35.0 * world.scale * (120.0 / 35.0) ** rng.uniform()
            shape = dict(bowl=rng.uniform(0.1, 0.25), tongue=rng.uniform(0.2, 0.6), elongation=rng.uniform(-0.2, 0.25))
            main = _random_lobe(rng, x, y, radius, orientation, 0.1, **shape)
            lobes = [main]
            if spec.twin_slump and not world.slumps:
                side = orientation + rng.choice([-1, 1]) * math.pi / 2
                small = radius * rng.uniform(0.3, 0.45)
                distance = float(main.boundary_radius(np.array([side - orientation]))[0]) + 1.5 * small + 5.0
                x_small, y_small = x + distance * math.cos(side), y + distance * math.sin(side)
                lobes.append(_random_lobe(rng, x_small, y_small, small, orientation, 0.08, bowl=0.1, tongue=0.2))
            if world.fits(lobes, 1.15):
                depth = radius * rng.uniform(0.035, 0.06) + 1.0
                world.slumps.append(Slump(tuple(lobes), depth, int(rng.integers(48, 73))))
    return world


def _ground_reflectance(world: World, scene: ScenePlan, look: dict, rng) -> np.ndarray:
    """Cloud-free surface reflectance x 10000, shape (4, H, W), seen through the region's haze."""
    x, y = scene.pixel_centres()
    code, vegetation, slump_radius, slump_theta, slump_size = world.surface(x, y)
    spectra = SPECTRA[code].transpose(2, 0, 1) * np.where(code >= GRAVEL, look["soil"][:, None, None], 1.0)
    tundra = SPECTRA[TUNDRA][:, None, None] + vegetation * (LUSH_TUNDRA - SPECTRA[TUNDRA])[:, None, None]
    reflectance = np.where(code == TUNDRA, tundra, spectra)
    # Slumps: mud-flow streaks running downslope, mud texture, a darker wet headwall and
    # vegetation remnants along the rim.
    texture = ndimage.gaussian_filter(rng.standard_normal(x.shape), 1.2) * 2.5
    inside = code == SLUMP
    across = np.where(inside, slump_radius, 0.0) * np.sin(slump_theta) * slump_size
    streaks = 0.08 * np.sin(2.0 * math.pi * across / 9.0 + texture) + 0.12 * texture
    reflectance *= 1.0 + np.where(inside, streaks, texture * (0.05 * (code == TUNDRA) + 0.08 * (code == BARE)))
    reflectance *= np.where(inside & (slump_radius > 0.8) & (np.cos(slump_theta) < -0.2), 0.8, 1.0)
    reflectance = np.where(inside & (slump_radius > 0.9) & (texture > 0.3), 0.5 * (reflectance + tundra), reflectance)
    # Terrain shading from the same elevation model, sun in the south-east 35 degrees high.
    pixel = scene.transform.a
    gradient_y, gradient_x = np.gradient(world.elevation(x, y), -pixel, pixel)
    elevation, azimuth = math.radians(35.0), math.radians(135.0)
    sun = (math.cos(elevation) * math.sin(azimuth), math.cos(elevation) * math.cos(azimuth), math.sin(elevation))
    illumination = (sun[2] - gradient_x * sun[0] - gradient_y * sun[1]) / np.sqrt(1.0 + gradient_x**2 + gradient_y**2)
    reflectance *= np.clip(illumination / sun[2], 0.4, 1.6)
    reflectance = ndimage.gaussian_filter(reflectance, (0, 0.6, 0.6))  # the sensor's point spread
    return reflectance + look["haze"] * np.array([260.0, 170.0, 90.0, 40.0])[:, None, None]


def _render_scene(world: World, scene: ScenePlan, spec: RegionSpec, look: dict, rng, first: bool):
    """Surface reflectance (4, H, W) uint16 and UDM2 (8, H, W) uint8 for one scene."""
    shape = (scene.height, scene.width)
    reflectance = _ground_reflectance(world, scene, look, rng)
    valid = rasterize([scene.footprint], out_shape=shape, transform=scene.transform, dtype=np.uint8).astype(bool)
    udm = np.zeros((8,) + shape, dtype=np.uint8)
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    waves = _Waves(rng, 6, 30.0, 200.0)(rows, columns)

    def blob(row: float, column: float, radius_metres: float, stretch: float = 1.0, angle: float = 0.0):
        radius = radius_metres * world.scale / PIXEL_SIZE  # atmospheric features shrink with tiny scenes
        along = (rows - row) * math.cos(angle) + (columns - column) * math.sin(angle)
        across = (columns - column) * math.cos(angle) - (rows - row) * math.sin(angle)
        return np.exp(-((along / stretch) ** 2 + across**2) / (2 * radius**2))

    forced = spec.cloud_over_slump and first
    if forced or rng.uniform() < 0.45:
        coverage = rng.uniform(0.05, 0.15)
        cloud_field = np.zeros(shape)
        if forced:
            # One round cloud whose edge runs through the slump nearest the scene centre.
            centre = np.array(scene.footprint.centroid.coords[0])
            slump = min(world.slumps, key=lambda s: math.hypot(s.lobes[0].x - centre[0], s.lobes[0].y - centre[1]))
            target = np.array([slump.lobes[0].x, slump.lobes[0].y])
            cloud_radius = math.sqrt(coverage * valid.sum() / math.pi) * PIXEL_SIZE
            x, y = target + (centre - target) / max(np.linalg.norm(centre - target), 1.0) * cloud_radius
            row, column = (scene.transform.f - y) / PIXEL_SIZE, (x - scene.transform.c) / PIXEL_SIZE
            cloud_field += blob(row, column, cloud_radius / world.scale)
        else:
            for _ in range(int(rng.integers(1, 4))):
                weight = rng.uniform(0.6, 1.0)
                cloud_field += weight * blob(rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(120, 300))
        cloud_field *= 1.0 + 0.15 * waves
        threshold = np.quantile(cloud_field[valid], 1.0 - coverage)
        opacity = _smoothstep((cloud_field - 0.8 * threshold) / (0.4 * threshold))
        offset = max(1, int(round(rng.uniform(40, 70) * world.scale)))  # shadows fall to the north-west
        shadow = np.zeros(shape)
        shadow[:-offset, :-offset] = opacity[offset:, offset:]
        reflectance = reflectance * (1.0 - 0.6 * shadow) * (1.0 - opacity) + CLOUD[:, None, None] * opacity
        udm[5] = cloud_field >= threshold
        udm[3] = (opacity > 0.15) & (udm[5] == 0)  # thin cloud edges count as light haze
        udm[2] = (shadow > 0.5) & (udm[5] == 0)
    if rng.uniform() < 0.5:
        haze = _smoothstep((_Waves(rng, 7, 150.0, 600.0)(rows, columns) - 0.3) / 1.5)
        reflectance += haze * np.array([240.0, 180.0, 130.0, 70.0])[:, None, None]
        udm[3] |= haze > 0.4
    if spec.heavy_haze and first:
        heavy = blob(rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0.2, 0.8) * shape[1], 60.0)
        reflectance += heavy * np.array([1800.0, 1600.0, 1400.0, 1000.0])[:, None, None]
        udm[4] = heavy > 0.5
    if spec.snow and first:
        # Late-lying snow drifts, kept clear of the slumps.
        x, y = scene.pixel_centres()
        away = world.surface(x, y).slump_radius > 2.0
        snow = np.zeros(shape)
        for _ in range(12):
            row, column = int(rng.integers(shape[0])), int(rng.integers(shape[1]))
            drift = blob(row, column, rng.uniform(8.0, 20.0), rng.uniform(2.5, 5.0), rng.uniform(0, math.pi))
            snow = np.maximum(snow, drift) if away[row, column] else snow
        snow = away & (snow * (1.0 + 0.3 * waves) > 0.5)
        reflectance = np.where(snow, SNOW[:, None, None], reflectance)
        udm[1] = snow

    noise = 0.03 * rng.standard_normal(shape) + 0.02 * rng.standard_normal(reflectance.shape)
    reflectance = reflectance * look["gain"] * (1.0 + noise) + 12.0 * rng.standard_normal(reflectance.shape)
    sr = np.where(valid, np.clip(np.round(reflectance), 1, 65535), 0).astype(np.uint16)
    udm[:6] *= valid
    udm[0] = valid & (udm[1] == 0) & (udm[2] == 0) & (udm[4] == 0) & (udm[5] == 0)
    udm[6] = np.where(valid, np.clip(95.0 - 30.0 * udm[3] - 40.0 * udm[4] - 20.0 * udm[5] + 3.0 * waves, 0, 100), 0)
    udm[7] = ~valid
    return sr, udm


def _eight_bands(sr: np.ndarray) -> np.ndarray:
    """An 8-band SuperDove product (coastal blue, blue, green I, green, yellow, red, red edge, NIR) whose
    blue, green, red and NIR (bands 2, 4, 6, 8) are the 4-band scene's, as Planet harmonises them."""
    blue, green, red, nir = sr.astype(np.float32)
    extra = [0.9 * blue + 0.1 * green - 40.0, 0.85 * green + 0.15 * blue, 0.5 * (green + red), 0.55 * red + 0.45 * nir]
    coastal, green_i, yellow, rededge = (np.clip(np.round(band), 1, 65535).astype(np.uint16) for band in extra)
    bands = np.stack([coastal, sr[0], green_i, sr[1], yellow, sr[2], rededge, sr[3]])
    return np.where(sr[0] > 0, bands, 0).astype(np.uint16)  # nodata stays 0 in every band


def _plan_sentinel2(spec: RegionSpec, rng, scene: ScenePlan) -> ScenePlan:
    """A Sentinel-2 L2A crop around a PlanetScope scene: 10 m pixels on the 20 m grid of SCL, 1.5 times
    the scene's extent, the swath edge cutting off one corner (nodata there)."""
    left, bottom, right, top = scene.bounds
    size = [2 * max(8, round(1.5 * extent / SENTINEL2_PIXEL / 2)) for extent in (right - left, top - bottom)]
    x = round(((left + right) / 2 - size[0] * SENTINEL2_PIXEL / 2) / 20.0) * 20.0
    y = round(((top + bottom) / 2 + size[1] * SENTINEL2_PIXEL / 2) / 20.0) * 20.0
    transform = Affine(SENTINEL2_PIXEL, 0.0, x, 0.0, -SENTINEL2_PIXEL, y)
    width, height = size
    corner, cut = int(rng.integers(4)), rng.uniform(0.35, 0.5)
    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    cx, cy = corners[corner]
    edge = shapely.Polygon([(cx, cy), (cx + (cut * width if cx == 0 else -cut * width), cy),
                            (cx, cy + (cut * height if cy == 0 else -cut * height))])
    pixels = shapely.box(0, 0, width, height).difference(edge)
    footprint = shapely.affinity.affine_transform(pixels, [transform.a, 0, 0, transform.e, transform.c, transform.f])
    date = datetime.date.fromisoformat(scene.date) + datetime.timedelta(days=int(rng.integers(1, 4)))
    seconds = int(((10.5 - spec.lon / 15.0) % 24.0) * 3600) + int(rng.integers(-600, 600))
    generated = seconds + int(rng.integers(3600, 10000))
    clock = lambda value: f"{value // 3600 % 24:02d}{value // 60 % 60:02d}{value % 60:02d}"  # noqa: E731
    product = (f"S2B_MSIL2A_{date:%Y%m%d}T{clock(seconds)}_N0400_R{int(rng.integers(1, 144)):03d}_T42WVD_"
               f"{date:%Y%m%d}T{clock(generated)}")
    return ScenePlan(product, f"{date:%Y-%m-%d}", width, height, transform, footprint)


def _render_sentinel2(world: World, plan: ScenePlan, look: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sentinel-2 L2A bands B02, B03, B04, B08 (4, H, W) uint16 at 10 m, with the offset of processing
    baseline 04.00 (DN = reflectance x 10000 + 1000, 0 = no data), and SCL (H/2, W/2) uint8 at 20 m."""
    fine = ScenePlan(plan.scene_id, plan.date, 2 * plan.width, 2 * plan.height, plan.transform * Affine.scale(0.5),
                     plan.footprint)
    # The same ground as PlanetScope sees, averaged over each 10 m pixel.
    reflectance = _ground_reflectance(world, fine, look, rng).reshape(4, plan.height, 2, plan.width, 2).mean(axis=(2, 4))
    rows, columns = np.mgrid[0:plan.height, 0:plan.width].astype(np.float32)
    radius = 0.12 * min(plan.width, plan.height)
    row, column = rng.uniform(0.4, 0.65) * plan.height, rng.uniform(0.4, 0.65) * plan.width  # off the swath edge
    cloud = np.exp(-((rows - row) ** 2 + (columns - column) ** 2) / (2 * radius ** 2))
    cloud *= 1.0 + 0.15 * _Waves(rng, 5, 30.0, 150.0)(rows, columns)
    opacity = _smoothstep((cloud - 0.3) / 0.4)
    offset = max(1, int(round(0.6 * radius)))  # the shadow falls to the north-west
    shadow = np.zeros_like(opacity)
    shadow[:-offset, :-offset] = opacity[offset:, offset:]
    # A thin cirrus streak across the opposite side of the scene.
    cirrus = np.exp(-((rows - (plan.height - row)) / (0.08 * plan.height)) ** 2
                    - ((columns - (plan.width - column)) / (0.3 * plan.width)) ** 2)
    reflectance = reflectance * (1.0 - 0.6 * shadow) * (1.0 - opacity) + CLOUD[:, None, None] * opacity
    reflectance += 250.0 * cirrus
    reflectance *= 1.0 + 0.01 * rng.standard_normal(reflectance.shape)
    reflectance += 8.0 * rng.standard_normal(reflectance.shape)
    valid = rasterize([plan.footprint], out_shape=(plan.height, plan.width), transform=plan.transform,
                      dtype=np.uint8).astype(bool)
    bands = np.where(valid, np.clip(np.round(reflectance - SENTINEL2_BOA_ADD_OFFSET), 1, 65535), 0).astype(np.uint16)

    # Scene classification at 20 m from the 20 m means: water, vegetation or bare, then cloud
    # (high and medium probability), cloud shadow, thin cirrus, and no data outside the swath.
    coarse = lambda array: array.reshape(*array.shape[:-2], plan.height // 2, 2, plan.width // 2, 2)  # noqa: E731
    mean = coarse(reflectance).mean(axis=(-3, -1))
    x, y = (np.asarray(values)[::2, ::2] + SENTINEL2_PIXEL / 2 for values in plan.pixel_centres())
    water = np.isin(world.surface(x, y).code, (LAKE, RIVER, SEA))
    ndvi = (mean[3] - mean[2]) / np.maximum(mean[3] + mean[2], 1.0)
    scl = np.where(water, 6, np.where(ndvi > 0.35, 4, 5)).astype(np.uint8)
    scl[coarse(cirrus).max(axis=(-3, -1)) > 0.5] = 10
    scl[coarse(shadow).max(axis=(-3, -1)) > 0.3] = 3
    strongest = coarse(cloud).max(axis=(-3, -1))
    scl[strongest > 0.3] = 8
    scl[strongest > 0.6] = 9
    scl[~coarse(valid).all(axis=(-3, -1))] = 0
    return bands, scl


def _stac_item(plan: ScenePlan, utm: str, cloud_cover: float) -> dict:
    """The STAC item a catalogue delivers beside the band COGs (Sentinel-2 L2A, processing baseline 04.00)."""
    footprint = shapely.geometry.shape(transform_geom(utm, "EPSG:4326", plan.footprint.__geo_interface__))
    raster = {"nodata": 0, "data_type": "uint16", "spatial_resolution": SENTINEL2_PIXEL, "scale": 0.0001,
              "offset": SENTINEL2_BOA_ADD_OFFSET / 10000.0}
    assets = {band: {"href": f"./{band}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                     "title": f"Band {int(band[1:])} - {name} - 10m", "roles": ["data", "reflectance"], "gsd": 10,
                     "eo:bands": [{"name": band, "common_name": name, "center_wavelength": wavelength}],
                     "raster:bands": [raster]}
              for band, (name, wavelength) in SENTINEL2_WAVELENGTHS.items()}
    assets["SCL"] = {"href": "./SCL.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                     "title": "Scene classification map (SCL)", "roles": ["data"], "gsd": 20,
                     "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}]}
    seconds = plan.scene_id.split("_")[2][9:]
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": plan.scene_id,
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/sentinel-2/v1.0.0/schema.json"],
        "bbox": [round(value, 7) for value in footprint.bounds],
        "geometry": json.loads(json.dumps(shapely.geometry.mapping(footprint))),
        "properties": {"datetime": f"{plan.date}T{seconds[:2]}:{seconds[2:4]}:{seconds[4:]}Z",
                       "platform": "sentinel-2b", "constellation": "sentinel-2", "instruments": ["msi"],
                       "eo:cloud_cover": round(cloud_cover, 2), "proj:epsg": int(utm.split(":")[1]),
                       "s2:mgrs_tile": "42WVD", "s2:product_type": "S2MSI2A", "s2:processing_baseline": "04.00",
                       "s2:product_uri": f"{plan.scene_id}.SAFE"},
        "assets": assets,
        "links": [],
    }


def _write_sentinel2(folder: Path, plan: ScenePlan, bands: np.ndarray, scl: np.ndarray, utm: str) -> list[Path]:
    """Band COGs B02, B03, B04, B08 (10 m), SCL.tif (20 m) and the STAC item, as a STAC download leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    layers = [(band, data[None], plan.transform, 2) for band, data in zip(SENTINEL2_BANDS, bands)]
    layers.append(("SCL", scl[None], plan.transform * Affine.scale(2.0), 1))
    for name, data, transform, predictor in layers:
        written.append(folder / f"{name}.tif")
        with rasterio.open(written[-1], "w", driver="COG", width=data.shape[2], height=data.shape[1], count=1,
                           dtype=data.dtype, crs=utm, transform=transform, nodata=0, compress="deflate",
                           predictor=predictor, blocksize=512) as dataset:
            dataset.write(data)
            dataset.descriptions = (name,)
    cloud_cover = 100.0 * float(np.isin(scl, (8, 9, 10)).sum()) / max(1, int((scl > 0).sum()))
    written.append(folder / f"{plan.scene_id}.json")
    written[-1].write_text(json.dumps(_stac_item(plan, utm, cloud_cover), indent=1) + "\n")
    return written


def _write_raster(path: Path, data: np.ndarray, crs: str, transform: Affine, descriptions, nodata=None, predictor=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype, crs=crs,
        transform=transform, nodata=nodata, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
        predictor=predictor,
    )
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(data)
        dataset.descriptions = tuple(descriptions)


def _write_vectors(path: Path, driver: str, geometries, records, fields, geometry_type: str) -> None:
    """Write EPSG:4326 features; a pinned GPKG timestamp keeps the file byte-identical across runs."""
    path.unlink(missing_ok=True)
    columns = [np.array([record[index] for record in records], dtype=object) for index in range(len(fields))]
    wkb = np.array([shapely.to_wkb(geometry) for geometry in geometries], dtype=object)
    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": "2000-01-01T00:00:00.000Z"})
    try:
        pyogrio.raw.write(
            str(path), wkb, columns, list(fields), layer=path.stem, driver=driver, geometry_type=geometry_type,
            crs="EPSG:4326",
        )
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})


def _auxiliary_grid(scenes, utm: str, crs: str, step_x: float, step_y: float, margin_x: float, margin_y: float):
    """A grid in crs covering all scenes plus a margin, snapped to multiples of its step."""
    boxes = np.array([transform_bounds(utm, crs, *scene.bounds, densify_pts=21) for scene in scenes])
    left = math.floor((boxes[:, 0].min() - margin_x) / step_x) * step_x
    top = math.ceil((boxes[:, 3].max() + margin_y) / step_y) * step_y
    width = int(math.ceil((boxes[:, 2].max() + margin_x - left) / step_x))
    height = int(math.ceil((top - boxes[:, 1].min() + margin_y) / step_y))
    return Affine(step_x, 0.0, left, 0.0, -step_y, top), width, height


def _sample_grid(utm: str, crs: str, transform: Affine, width: int, height: int, samples: int):
    """UTM coordinates of samples x samples points in each cell of a grid in crs: (samples**2, H, W).

    Cell centres go through rasterio.warp.transform; the points around each centre follow the
    local Jacobian of the projection, exact to millimetres over one cell.
    """
    columns = transform.c + transform.a * (np.arange(width) + 0.5)
    rows = transform.f + transform.e * (np.arange(height) + 0.5)
    grid_x, grid_y = np.meshgrid(columns, rows)
    centres = [np.reshape(values, (height, width)) for values in transform_points(crs, utm, grid_x.ravel(), grid_y.ravel())]
    offsets = (np.arange(samples) + 0.5) / samples - 0.5
    points = [
        np.stack([c + dc * np.gradient(c, axis=1) + dr * np.gradient(c, axis=0) for dr in offsets for dc in offsets])
        for c in centres
    ]
    return points[0], points[1]


def _write_dem(world: World, spec: RegionSpec, scenes, rng, path: Path) -> None:
    """ArcticDEM-like tile: EPSG:3413, 10 m, float32, each cell the mean of 2 x 2 samples."""
    utm = f"EPSG:{spec.epsg}"
    margin = AUXILIARY_MARGIN
    transform, width, height = _auxiliary_grid(scenes, utm, DEM_CRS, DEM_RESOLUTION, DEM_RESOLUTION, margin, margin)
    x, y = _sample_grid(utm, DEM_CRS, transform, width, height, 2)
    dem = world.elevation(x, y).mean(axis=0) + 0.15 * rng.standard_normal((height, width))
    if spec.dem_void and world.lakes:
        dem[world.lakes[0][0].polar(x, y)[0].mean(axis=0) < 0.7] = DEM_NODATA
    _write_raster(path, dem[None].astype(np.float32), DEM_CRS, transform, ("elevation",), DEM_NODATA, predictor=3)


def _write_tcvis(world: World, spec: RegionSpec, scenes, rng, path: Path) -> None:
    """TCVIS-like tile: EPSG:4326, ~30 m, 3 bands uint8, each cell the mean colour of 3 x 3 samples."""
    utm = f"EPSG:{spec.epsg}"
    stretch = 1.0 / math.cos(math.radians(spec.lat))
    margin = AUXILIARY_MARGIN / 111_000.0
    transform, width, height = _auxiliary_grid(
        scenes, utm, TCVIS_CRS, TCVIS_LAT_STEP * stretch, TCVIS_LAT_STEP, margin * stretch, margin
    )
    code, vegetation = world.surface(*_sample_grid(utm, TCVIS_CRS, transform, width, height, 3))[:2]
    colours = TCVIS_COLOURS[code]
    colours[..., 1] += np.where(code == TUNDRA, 30.0 * (vegetation - 0.5), 0.0)  # lusher tundra greened more
    colours = colours.mean(axis=0).transpose(2, 0, 1)
    colours += rng.uniform(-8, 8, (3, 1, 1)) + 4.0 * rng.standard_normal(colours.shape)
    colours = np.clip(np.round(colours), 0, 255).astype(np.uint8)
    _write_raster(path, colours, TCVIS_CRS, transform, TCVIS_BANDS, predictor=2)


def _bowtie(geometry: shapely.MultiPolygon) -> shapely.MultiPolygon:
    """Swap two adjacent vertices of the first ring: a self-intersecting digitising error.

    Where the boundary bends the other way a swap does not cross, so take the first swap that does.
    """
    ring = np.array(geometry.geoms[0].exterior.coords)[:-1]
    for index in range(5, len(ring) - 1):
        nicked = ring.copy()
        nicked[[index, index + 1]] = nicked[[index + 1, index]]
        bowtie = shapely.MultiPolygon([shapely.Polygon(nicked)] + list(geometry.geoms)[1:])
        if not bowtie.is_valid:
            return bowtie
    raise RuntimeError("no vertex swap made the label invalid")  # not reached for a curved ring


def make_demo_data(out: str | os.PathLike, seed: int = 0, scene_size: int | None = None) -> dict:
    """Write the synthetic demo dataset under `out` in the real input formats.

    Returns {"scenes": [scene_id...], "sensors": {scene_id: sensor profile}, "regions": [...],
    "slumps": physical slumps, "labels": label rows (a slump seen in two scenes has two), "bytes":
    size of the files written}. The region imaged by Sentinel-2 (Yamal) has an 8-band PlanetScope
    scene and a Sentinel-2 L2A scene (band COGs, SCL, STAC item) of the same ground. The same seed
    and scene_size give byte-identical files. scene_size (pixels, default 640) is the nominal scene
    width and height; each scene varies by +-15%.
    """
    scene_size = DEFAULT_SCENE_SIZE if scene_size is None else int(scene_size)
    if scene_size < 64:
        raise ValueError(f"scene_size must be at least 64 pixels, got {scene_size}")
    out = Path(out)
    scene_ids, sensors, written, labels, sites, slump_count = [], {}, [], [], [], 0
    for region_index, spec in enumerate(REGIONS):
        rng = np.random.default_rng([seed, region_index])
        utm = f"EPSG:{spec.epsg}"
        centre = tuple(float(value[0]) for value in transform_points("EPSG:4326", utm, [spec.lon], [spec.lat]))
        scenes = _plan_scenes(spec, rng, centre, scene_size)
        world = _build_world(spec, rng, centre, scenes, scene_size)
        slump_count += len(world.slumps)
        look = {"gain": rng.uniform(0.8, 1.2), "haze": rng.uniform(0.0, 1.0), "soil": rng.uniform(0.85, 1.15, 4)}
        site = f"{spec.name.lower()}_1"
        for scene_index, scene in enumerate(scenes):
            scene_rng = np.random.default_rng([seed, region_index, scene_index + 1])
            gain, haze = scene_rng.uniform(0.95, 1.05), scene_rng.uniform(0.7, 1.3)
            scene_look = dict(look, gain=look["gain"] * gain, haze=look["haze"] * haze)
            sr, udm = _render_scene(world, scene, spec, scene_look, scene_rng, scene_index == 0)
            folder = out / "scenes" / scene.scene_id
            suffix, descriptions = ("_SR_8b", SR_8B_BANDS) if spec.sentinel2 else ("_SR", SR_BANDS)
            written += [folder / f"{scene.scene_id}_3B_AnalyticMS{suffix}.tif", folder / f"{scene.scene_id}_3B_udm2.tif"]
            _write_raster(written[-2], _eight_bands(sr) if spec.sentinel2 else sr, utm, scene.transform, descriptions,
                          nodata=0, predictor=2)
            _write_raster(written[-1], udm, utm, scene.transform, UDM2_BANDS)
            scene_ids.append(scene.scene_id)
            sensors[scene.scene_id] = "planetscope-8b" if spec.sentinel2 else "planetscope"
            for slump in world.slumps:
                if slump.geometry().intersection(scene.footprint).area < 5 * PIXEL_SIZE**2:
                    continue  # not visible in this scene
                geometry = shapely.geometry.shape(transform_geom(utm, "EPSG:4326", slump.geometry().__geo_interface__))
                if spec.bowtie_label and not any(record[2] == spec.name for _, record in labels):
                    geometry = _bowtie(geometry)
                labels.append((geometry, (scene.scene_id, scene.date, spec.name, site, "RTS")))
        if spec.sentinel2:  # the same ground seen by Sentinel-2 a few days later
            s2_rng = np.random.default_rng([seed, region_index, 50])
            plan = _plan_sentinel2(spec, s2_rng, scenes[0])
            bands, scl = _render_sentinel2(world, plan, look, s2_rng)
            written += _write_sentinel2(out / "scenes" / plan.scene_id, plan, bands, scl, utm)
            scene_ids.append(plan.scene_id)
            sensors[plan.scene_id] = "sentinel2-l2a"
            for slump in world.slumps:
                if slump.geometry().intersection(plan.footprint).area >= 5 * SENTINEL2_PIXEL**2:
                    geometry = shapely.geometry.shape(transform_geom(utm, "EPSG:4326",
                                                                     slump.geometry().__geo_interface__))
                    labels.append((geometry, (plan.scene_id, plan.date, spec.name, site, "RTS")))
            scenes = scenes + [plan]  # the DEM, TCVIS and site cover it too
        written += [out / "auxiliary" / kind / f"{spec.name}_{kind}.tif" for kind in ("dem", "tcvis")]
        _write_dem(world, spec, scenes, np.random.default_rng([seed, region_index, 0]), written[-2])
        _write_tcvis(world, spec, scenes, np.random.default_rng([seed, region_index, 99]), written[-1])
        boxes = np.array([transform_bounds(utm, "EPSG:4326", *scene.bounds, densify_pts=21) for scene in scenes])
        envelope = shapely.box(*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
        sites.append((envelope.buffer(0.005, join_style="mitre"), (site, spec.name)))

    written += [out / "labels.gpkg", out / "sites.geojson"]
    _write_vectors(written[-2], "GPKG", *zip(*labels), LABEL_FIELDS, "MultiPolygon")
    _write_vectors(written[-1], "GeoJSON", *zip(*sites), ("site", "region"), "Polygon")
    return {
        "scenes": scene_ids,
        "sensors": sensors,
        "regions": [spec.name for spec in REGIONS],
        "slumps": slump_count,
        "labels": len(labels),
        "bytes": sum(path.stat().st_size for path in written),
    }


# ---------------------------------------------------------------- time series (rts-tf track)

TIME_SERIES_REGION = RegionSpec("Peel", -135.3, 67.25, 32608, 1, 2019)  # Peel Plateau: fast-growing mega slumps
TIME_SERIES_SITE = "peel_1"
TIME_SERIES_DATES = ("2019-07-21", "2020-07-18", "2021-07-24", "2022-07-19")
# Each slump's radius in metres (at full scene size) on each date: None where it is not visible
# (not yet formed, or stabilised and revegetated); "cloud" where a cloud hides it that day.
TIME_SERIES_HISTORIES = {
    "grows": (45.0, 55.0, 65.0, 75.0),
    "merge_west": (38.0, 44.0, 53.0, 58.0),  # two neighbours on one slope that grow into one
    "merge_east": (38.0, 44.0, 53.0, 58.0),
    "appears": (None, 30.0, 40.0, 48.0),
    "stops": (50.0, 50.0, None, None),
    "clouded": (40.0, 46.0, "cloud", 58.0),
}
# What `rts-tf track` should find on the truth polygons (one track per history; the merged pair ends
# in a third track that starts where they meet).
TIME_SERIES_STATUSES = {"grows": "active", "merge_west": "merged", "merge_east": "merged",
                        "merge_west+merge_east": "merged", "appears": "new", "stops": "stabilised",
                        "clouded": "active"}


def _scaled_lobe(lobe: Lobe, radius: float) -> Lobe:
    return Lobe(lobe.x, lobe.y, radius, lobe.orientation, lobe.amplitudes, lobe.phases, lobe.bowl, lobe.tongue)


def _place_time_series(world: World, rng, area: shapely.Polygon) -> dict[str, Lobe]:
    """Lobes (at their largest size) of the designed slumps on slopes inside `area`; the merging
    pair side by side across one slope, at a distance where they touch between dates 2 and 3."""
    placed: dict[str, Lobe] = {}
    largest = {name: max(r for r in radii if isinstance(r, float)) * world.scale
               for name, radii in TIME_SERIES_HISTORIES.items()}
    candidates = _random_points(rng, area, 2000)
    slopes, downslope = world.slope(candidates[:, 0], candidates[:, 1])
    order = np.argsort(-slopes)
    names = [name for name in TIME_SERIES_HISTORIES if name != "merge_east"]
    for relax in (False, True):  # plain tundra around each slump first; else anywhere clear of the others
        for (x, y), orientation in zip(candidates[order], downslope[order]):
            name = next((n for n in names if n not in placed), None)
            if name is None:
                break
            lobe = _random_lobe(rng, x, y, largest[name], orientation, 0.04, bowl=0.12, tongue=0.0)
            lobes = [lobe]
            if name == "merge_west":
                # Across the slope, at the distance where the two boundaries meet at radius 48 (x scale).
                side = orientation + math.pi / 2
                probe = _scaled_lobe(lobe, 48.0 * world.scale)
                reach = float(probe.boundary_radius(np.array([math.pi / 2]))[0])
                twin = Lobe(0.0, 0.0, 48.0 * world.scale, orientation, lobe.amplitudes, lobe.phases, lobe.bowl, 0.0)
                reach += float(twin.boundary_radius(np.array([-math.pi / 2]))[0])
                east = Lobe(x + reach * math.cos(side), y + reach * math.sin(side), lobe.radius, orientation,
                            lobe.amplitudes, lobe.phases, lobe.bowl, 0.0)
                lobes.append(east)
            ring = np.concatenate([candidate.ring(32) for candidate in lobes])
            if not all(shapely.contains_xy(area, ring[:, 0], ring[:, 1])):
                continue
            clear = all(np.hypot(ring[:, 0] - other.x, ring[:, 1] - other.y).min() > other.extent + 40.0 * world.scale
                        for other in placed.values())
            if not clear or not (relax or world.fits(lobes, 1.2)):
                continue
            placed[name] = lobe
            if name == "merge_west":
                placed["merge_east"] = lobes[1]
    missing = [name for name in TIME_SERIES_HISTORIES if name not in placed]
    if missing:
        raise ValueError(f"no room for the time series' slumps {', '.join(missing)}; use a larger scene_size")
    return placed


def make_time_series_data(out: str | os.PathLike, seed: int = 0, scene_size: int | None = None) -> dict:
    """Write a time series for `rts-tf track` under `out`: one site (Peel, EPSG:32608) imaged by
    PlanetScope on four dates (TIME_SERIES_DATES), with slumps that grow, merge, appear, stop and
    hide under a cloud (TIME_SERIES_HISTORIES); its own DEM, TCVIS, sites and per-date truth labels.

    out/scenes/<scene_id>/..., out/auxiliary/{dem,tcvis}/Peel_*.tif, out/labels.gpkg (fields of the
    demo's labels plus `slump`, the designed history), out/sites.geojson and out/truth.json (each
    history's UTM area per date and the status `track` should give it). Kept apart from the
    training data's folders so that it never enters the demo's records.
    """
    scene_size = DEFAULT_SCENE_SIZE if scene_size is None else int(scene_size)
    if scene_size < 128:
        raise ValueError(f"scene_size must be at least 128 pixels for the time series, got {scene_size}")
    out = Path(out)
    spec = TIME_SERIES_REGION
    rng = np.random.default_rng([seed, 1000])
    utm = f"EPSG:{spec.epsg}"
    centre = tuple(float(value[0]) for value in transform_points("EPSG:4326", utm, [spec.lon], [spec.lat]))
    base = _plan_scenes(spec, rng, centre, scene_size)[0]
    plans = []
    for index, date in enumerate(TIME_SERIES_DATES):
        # The same ground each year, shifted by a few pixels as repeat PlanetScope frames are.
        dx, dy = (int(value) for value in rng.integers(-6, 7, 2))
        shift = Affine.translation(dx * PIXEL_SIZE, dy * PIXEL_SIZE)
        seconds = int(((10.5 + rng.uniform(-1, 1) - spec.lon / 15.0) % 24.0) * 3600)
        satellite = SATELLITES[int(rng.integers(len(SATELLITES)))]
        clock = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        scene_id = f"{date.replace('-', '')}_{clock}_{satellite}"
        plans.append(ScenePlan(scene_id, date, base.width, base.height, shift * base.transform,
                               shapely.affinity.translate(base.footprint, dx * PIXEL_SIZE, dy * PIXEL_SIZE)))
    world = _build_world(spec, rng, centre, plans, scene_size)
    world.slumps = []
    common = shapely.intersection_all([plan.footprint for plan in plans]).buffer(-25.0 * world.scale)
    lobes = _place_time_series(world, rng, common)
    look = {"gain": rng.uniform(0.9, 1.1), "haze": rng.uniform(0.0, 0.5), "soil": rng.uniform(0.9, 1.1, 4)}
    calm = RegionSpec(spec.name, spec.lon, spec.lat, spec.epsg, 1, spec.year)
    written, labels, truth, worlds = [], [], {name: {} for name in TIME_SERIES_STATUSES}, []
    for index, plan in enumerate(plans):
        visible = {name: radii[index] for name, radii in TIME_SERIES_HISTORIES.items() if radii[index] is not None}
        dated = World.__new__(World)
        dated.__dict__.update(world.__dict__)
        dated.slumps = [Slump((_scaled_lobe(lobes[name], (58.0 if radius == "cloud" else radius) * world.scale),),
                              depth=4.0 * world.scale + 2.0, vertices=64) for name, radius in visible.items()]
        worlds.append(dated)
        inside = rasterize([shapely.union_all([slump.geometry() for slump in dated.slumps])],
                           out_shape=(plan.height, plan.width), transform=plan.transform, dtype=np.uint8) > 0
        for attempt in range(20):  # random clouds of a scene stay off the slumps: only the designed one hides one
            scene_rng = np.random.default_rng([seed, 1000, index + 1, attempt])
            sr, udm = _render_scene(dated, plan, calm, dict(look, haze=look["haze"] * scene_rng.uniform(0.8, 1.2)),
                                    scene_rng, False)
            if not (udm[5].astype(bool) | udm[2].astype(bool))[inside].any():
                break
        hidden = [name for name, radius in visible.items() if radius == "cloud"]
        for name in hidden:  # a cloud (and its shadow) over the slump: not visible, marked in UDM2
            rows, columns = np.mgrid[0:plan.height, 0:plan.width]
            lobe = lobes[name]
            row, column = (plan.transform.f - lobe.y) / PIXEL_SIZE, (lobe.x - plan.transform.c) / PIXEL_SIZE
            reach = 2.2 * lobe.extent / PIXEL_SIZE
            opacity = _smoothstep(1.6 - np.hypot(rows - row, columns - column) / reach)
            cloud = (opacity > 0.3) & (sr[0] > 0)
            blended = sr * (1.0 - opacity) + CLOUD[:, None, None] * opacity
            sr = np.where(sr > 0, np.clip(np.round(blended), 1, 65535), 0).astype(np.uint16)
            udm[5] |= cloud.astype(np.uint8)
            udm[3] &= (~cloud).astype(np.uint8)
            udm[0] &= (~cloud).astype(np.uint8)
        folder = out / "scenes" / plan.scene_id
        written += [folder / f"{plan.scene_id}_3B_AnalyticMS_SR.tif", folder / f"{plan.scene_id}_3B_udm2.tif"]
        _write_raster(written[-2], sr, utm, plan.transform, SR_BANDS, nodata=0, predictor=2)
        _write_raster(written[-1], udm, utm, plan.transform, UDM2_BANDS)
        shown = {name: slump for (name, radius), slump in zip(visible.items(), dated.slumps) if radius != "cloud"}
        if "merge_west" in shown and shown["merge_west"].geometry().intersects(shown["merge_east"].geometry()):
            shown["merge_west+merge_east"] = None  # grown into one: one label for both
        for name in shown:
            if name in ("merge_west", "merge_east") and "merge_west+merge_east" in shown:
                continue
            if name == "merge_west+merge_east":
                geometry = shapely.union_all([shown["merge_west"].geometry(), shown["merge_east"].geometry()])
            else:
                geometry = shown[name].geometry()
            truth[name][plan.date] = round(float(geometry.area), 3)
            moved = shapely.geometry.shape(transform_geom(utm, "EPSG:4326", shapely.geometry.mapping(geometry)))
            moved = moved if moved.geom_type == "MultiPolygon" else shapely.MultiPolygon([moved])
            labels.append((moved, (plan.scene_id, plan.date, spec.name, TIME_SERIES_SITE, "RTS", name)))
    last = worlds[-1]
    written += [out / "auxiliary" / kind / f"{spec.name}_{kind}.tif" for kind in ("dem", "tcvis")]
    _write_dem(last, spec, plans, np.random.default_rng([seed, 1000, 0]), written[-2])
    _write_tcvis(last, spec, plans, np.random.default_rng([seed, 1000, 99]), written[-1])
    boxes = np.array([transform_bounds(utm, "EPSG:4326", *plan.bounds, densify_pts=21) for plan in plans])
    envelope = shapely.box(*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
    written += [out / "labels.gpkg", out / "sites.geojson", out / "truth.json"]
    _write_vectors(written[-3], "GPKG", *zip(*labels), LABEL_FIELDS + ("slump",), "MultiPolygon")
    _write_vectors(written[-2], "GeoJSON", [envelope.buffer(0.005, join_style="mitre")],
                   [(TIME_SERIES_SITE, spec.name)], ("site", "region"), "Polygon")
    expected = {"crs": utm, "site": TIME_SERIES_SITE, "dates": list(TIME_SERIES_DATES),
                "scenes": [plan.scene_id for plan in plans],
                "slumps": {name: {"area_m2": areas, "status": TIME_SERIES_STATUSES[name]}
                           for name, areas in truth.items()}}
    written[-1].write_text(json.dumps(expected, indent=1) + "\n")
    return {"scenes": [plan.scene_id for plan in plans], "labels": len(labels), "truth": expected,
            "bytes": sum(path.stat().st_size for path in written)}
