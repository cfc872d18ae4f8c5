"""Sensor profiles: how each sensor's scene files are found and become the model's canonical reflectance bands.

The model always sees the canonical bands (blue, green, red, nir, then NDVI, TCVIS and terrain).
Each sensor maps its files onto them: which file band is which canonical band, how its digital
numbers (DN) become surface reflectance (reflectance = DN * scale + offset), and which values of
its quality mask make a pixel ignored. `SENSORS` is the table; `find_scenes` turns folders into
`SceneFiles`, each naming its sensor, files and conversion. Reading is `scene.SceneReader`.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rts_tf.bands import REFLECTANCE_BANDS
from rts_tf.errors import InputError
from rts_tf.settings import GENERIC_REFLECTANCE_OFFSET, GENERIC_REFLECTANCE_SCALE, SensorSettings

# The records' one reflectance convention (records.IMAGE_PARTS "reflectance"): every sensor's
# numbers are converted to it before they are stored.
REFLECTANCE_CONVENTION = ("surface reflectance = DN * scale + offset of the scene's sensor, clipped at 0, "
                          "stored as uint16 in steps of 1e-4 (reflectance x 10000)")
REFLECTANCE_STEP = 1e-4


@dataclass(frozen=True)
class Sensor:
    """One sensor's files and conventions (the README's table of sensors is this table)."""

    name: str
    family: str  # predicting on another family than the model was trained on warns
    title: str
    files: str  # how its scenes are found
    bands: tuple  # canonical blue, green, red, nir: band numbers in the reflectance file, or band files (Sentinel-2)
    count: int | None  # bands the reflectance file must have (None: any)
    scale: float  # reflectance = DN * scale + offset (Sentinel-2: from the processing baseline, per scene)
    offset: float
    mask: str  # "udm2", "scl" or "classes" (--mask)
    ignore: tuple[int, ...] = ()  # mask values that make a pixel ignored ("scl", "classes")


# Sentinel-2 scene classification (SCL) classes that are not ground seen clearly: 0 no data,
# 1 saturated or defective, 3 cloud shadow, 8 and 9 cloud (medium, high probability), 10 thin
# cirrus, 11 snow or ice. 2 dark area, 4 vegetation, 5 bare soil, 6 water and 7 unclassified stay.
SCL_IGNORED = (0, 1, 3, 8, 9, 10, 11)

SENSORS: dict[str, Sensor] = {
    "planetscope": Sensor(
        "planetscope", "planetscope", "PlanetScope 4-band surface reflectance",
        "PSScene *_AnalyticMS_SR.tif, *_AnalyticMS_SR_clip.tif, *_AnalyticMS_SR_harmonized*.tif; "
        "OrthoTile *_BGRN_SR.tif; UDM2 *udm2*.tif beside it",
        bands=(1, 2, 3, 4), count=4, scale=1e-4, offset=0.0, mask="udm2"),
    "planetscope-8b": Sensor(
        "planetscope-8b", "planetscope", "PlanetScope 8-band (SuperDove) surface reflectance",
        "*_AnalyticMS_SR_8b*.tif (or any PlanetScope SR file with 8 bands); UDM2 *udm2*.tif beside it",
        # coastal blue, blue, green I, green, yellow, red, red edge, NIR
        bands=(2, 4, 6, 8), count=8, scale=1e-4, offset=0.0, mask="udm2"),
    "sentinel2-l2a": Sensor(
        "sentinel2-l2a", "sentinel2", "Sentinel-2 L2A surface reflectance",
        "a .SAFE folder (GRANULE/*/IMG_DATA/R10m/*_B02_10m.jp2 ..., R20m/*_SCL_20m.jp2) or a folder of "
        "B02, B03, B04, B08, SCL GeoTIFF/COG/JP2 files (any case, optionally prefixed, e.g. T08WMB_B02.tif)",
        bands=("B02", "B03", "B04", "B08"), count=1, scale=1e-4, offset=-0.1, mask="scl", ignore=SCL_IGNORED),
    "generic": Sensor(
        "generic", "generic", "any multi-band raster (--band-map)",
        "every GeoTIFF in the --scenes folders, with --sensor generic --band-map blue=N,green=N,red=N,nir=N",
        bands=(), count=None, scale=GENERIC_REFLECTANCE_SCALE, offset=GENERIC_REFLECTANCE_OFFSET, mask="classes"),
}
UDM2_BANDS = ("clear", "snow", "shadow", "light_haze", "heavy_haze", "cloud", "confidence", "udm1")

PLANETSCOPE_SR = re.compile(r"^(?P<id>.+?)(_3B_AnalyticMS_SR.*|_BGRN_SR)\.tiff?$", re.IGNORECASE)
PLANETSCOPE_8B = re.compile(r"_SR_8b", re.IGNORECASE)
# A Sentinel-2 band file: B02.tif, b02.TIF, T08WMB_B02.tif, T08WMB_20220815T204019_B02_10m.jp2, SCL.tif ...
SENTINEL2_FILE = re.compile(r"^(?:(?P<prefix>.+)_)?(?P<band>B0[2348]|SCL)(?:_(?:10|20|60)m)?\.(?:tiff?|jp2)$",
                            re.IGNORECASE)
SENTINEL2_METADATA = "MTD_MSIL2A.xml"
# BOA_ADD_OFFSET band_id of each band in MTD_MSIL2A.xml (B01 = 0, ..., B8A = 8, ..., B12 = 12).
SENTINEL2_BAND_IDS = {"B02": 1, "B03": 2, "B04": 3, "B08": 7}
RASTER_FILE = re.compile(r"\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class SceneFiles:
    """One scene as its sensor profile reads it: files, band mapping, DN conversion and quality mask."""

    scene_id: str
    sr: Path  # the reflectance file (Sentinel-2: the blue band's file)
    mask: Path | None = None  # UDM2, SCL or a --mask raster; None: only nodata is ignored
    sensor: str = "planetscope"
    bands: tuple[tuple[Path, int], ...] = ()  # canonical blue, green, red, nir: (file, 1-based band)
    scale: tuple[float, ...] = (1e-4,) * 4  # reflectance = DN * scale + offset, per canonical band
    offset: tuple[float, ...] = (0.0,) * 4
    mask_ignore: tuple[int, ...] = ()  # mask values that make a pixel ignored (SCL, --mask)
    date: str = ""  # YYYY-MM-DD or ''
    aliases: tuple[str, ...] = ()  # other ids label polygons may carry (a Sentinel-2 tile id)
    reflectance_from: str = ""  # where scale and offset come from (Sentinel-2 metadata)
    metadata: Path | None = None  # the file they were read from
    warnings: tuple[str, ...] = ()  # what the build and predict summaries report

    @property
    def udm2(self) -> Path | None:
        return self.mask if SENSORS[self.sensor].mask == "udm2" else None

    @property
    def image_date(self) -> str:
        return self.date

    @property
    def files(self) -> list[Path]:
        """Every file the scene's bands depend on (for fingerprints)."""
        found = [path for path, _ in self.bands] + [self.mask, self.metadata]
        return sorted({path for path in found if path is not None}, key=str)

    def reflectance(self) -> dict:
        """How this scene's numbers became the records' reflectance (for the manifest)."""
        return {"scale": list(self.scale), "offset": list(self.offset),
                **({"from": self.reflectance_from} if self.reflectance_from else {})}

    def sources(self) -> dict:
        """The scene's files by role, as the manifest records them."""
        sensor = SENSORS[self.sensor]
        sources = {"sr": str(self.sr)}
        if sensor.mask == "udm2":
            sources["udm2"] = str(self.mask) if self.mask else None
        else:
            sources["bands"] = {name: [str(path), band] for name, (path, band) in zip(REFLECTANCE_BANDS, self.bands)}
            sources["mask"] = str(self.mask) if self.mask else None
        if self.metadata is not None:
            sources["metadata"] = str(self.metadata)
        return sources


def check_settings(settings: SensorSettings) -> None:
    """Refuse an unknown sensor and generic options given for another sensor (one line each)."""
    if settings.sensor is not None and settings.sensor not in SENSORS:
        raise InputError(f"--sensor {settings.sensor}: unknown sensor; choose one of {', '.join(SENSORS)} "
                         "(or leave it out to detect the sensor from the files)")
    given = [option for option, value in (("--band-map", settings.band_map),
                                          ("--reflectance-scale", settings.reflectance_scale),
                                          ("--reflectance-offset", settings.reflectance_offset),
                                          ("--mask", settings.mask), ("--mask-ignore", settings.mask_ignore))
             if value not in (None, (), [])]
    if given and settings.sensor != "generic":
        raise InputError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to --sensor generic "
                         "(the other sensors' bands, reflectance and masks are known)")
    if settings.sensor == "generic":
        parse_band_map(settings.band_map)
        if settings.reflectance_scale is not None and not settings.reflectance_scale > 0:
            raise InputError(f"--reflectance-scale must be positive, got {settings.reflectance_scale}")
        if settings.mask and not settings.mask_ignore:
            raise InputError(f"{settings.mask}: --mask needs --mask-ignore, the mask values that make a pixel ignored")
        if settings.mask_ignore and not settings.mask:
            raise InputError("--mask-ignore needs --mask, the quality raster it applies to")


def parse_band_map(value: str | dict | None) -> tuple[int, int, int, int]:
    """--band-map "blue=1,green=2,red=3,nir=4" (or a YAML mapping) -> 1-based band numbers of blue, green, red, nir."""
    if not value:
        raise InputError("--sensor generic needs --band-map blue=N,green=N,red=N,nir=N (the file's band numbers, "
                         "from 1)")
    if isinstance(value, dict):
        pairs = [(str(key), str(number)) for key, number in value.items()]
    else:
        pairs = [tuple(part.split("=", 1)) if "=" in part else (part, "") for part in str(value).split(",")
                 if part.strip()]
    mapping: dict[str, int] = {}
    for name, number in pairs:
        name = name.strip().lower()
        if name not in REFLECTANCE_BANDS:
            raise InputError(f"--band-map {value}: '{name}' is not a band the model takes "
                             f"({', '.join(REFLECTANCE_BANDS)})")
        if name in mapping:
            raise InputError(f"--band-map {value}: {name} given twice")
        try:
            mapping[name] = int(number)
        except ValueError:
            raise InputError(f"--band-map {value}: {name}={number} is not a band number") from None
        if mapping[name] < 1:
            raise InputError(f"--band-map {value}: band numbers start at 1, got {name}={mapping[name]}")
    missing = [name for name in REFLECTANCE_BANDS if name not in mapping]
    if missing:
        raise InputError(f"--band-map {value}: lacks {', '.join(missing)} (give blue, green, red and nir)")
    return tuple(mapping[name] for name in REFLECTANCE_BANDS)


def find_scenes(folders: Sequence[str | os.PathLike], settings: SensorSettings = SensorSettings()) -> list[SceneFiles]:
    """Scenes in folders: each folder is a scene folder (or file), a folder of scene folders, or both.

    Without settings.sensor, PlanetScope SR files (4- or 8-band), Sentinel-2 .SAFE folders and
    folders of Sentinel-2 band files are recognised; --sensor restricts the search to one profile
    (generic: every GeoTIFF, read with --band-map).
    """
    check_settings(settings)
    wanted = settings.sensor
    scenes: dict[str, SceneFiles] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise InputError(f"{folder}: scene folder not found")
        if wanted == "generic":
            found = _generic_scenes(folder, settings)
        else:
            found = []
            if wanted in (None, "sentinel2-l2a"):
                found += [_sentinel2_scene(path) for path in _sentinel2_folders(folder)]
            if wanted in (None, "planetscope", "planetscope-8b"):
                found += [_planetscope_scene(path, wanted) for path in _files(folder)
                          if PLANETSCOPE_SR.match(path.name)]
        if not found:
            raise InputError(f"{folder}: no {'scene' if wanted is None else wanted + ' scene'} found (expected "
                             + (SENSORS[wanted].files if wanted else
                                "PlanetScope *_3B_AnalyticMS_SR*.tif or *_BGRN_SR.tif, a Sentinel-2 L2A .SAFE folder, "
                                "or a folder of Sentinel-2 B02, B03, B04, B08 and SCL files")
                             + " here or in its sub-folders" + ("" if wanted else
                                                                "; for other rasters give --sensor generic --band-map")
                             + ")")
        for scene in found:
            if scene.scene_id in scenes and scenes[scene.scene_id].sr != scene.sr:
                raise InputError(f"{scene.sr}: scene {scene.scene_id} is also at {scenes[scene.scene_id].sr}")
            scenes[scene.scene_id] = scene
    result = [scenes[key] for key in sorted(scenes)]
    if wanted == "generic" and settings.mask and len(result) > 1:
        raise InputError(f"{settings.mask}: --mask is one scene's mask, but {len(result)} generic scenes were found "
                         f"({', '.join(scene.scene_id for scene in result[:3])}...); give one scene per command")
    return result


def _files(folder: Path) -> list[Path]:
    """The folder (a file), or the files in it and in its sub-folders."""
    if folder.is_file():
        return [folder]
    children = sorted(folder.iterdir())
    return [p for p in children if p.is_file()] + [p for sub in children if sub.is_dir()
                                                   for p in sorted(sub.iterdir()) if p.is_file()]


def _image_date(name: str) -> str:
    """The first YYYYMMDD in a scene id that is a plausible date, as YYYY-MM-DD, or ''."""
    for match in re.finditer(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)", name):  # also 20220815T204019
        year, month, day = (int(value) for value in match.groups())
        if 1970 < year < 2100 and 1 <= month <= 12 and 1 <= day <= 31:
            return f"{year:04d}-{month:02d}-{day:02d}"
    return ""


# --- PlanetScope -----------------------------------------------------------------------------------

def _planetscope_scene(sr_path: Path, wanted: str | None) -> SceneFiles:
    """A PlanetScope SR file with its UDM2 beside it; 4- or 8-band from the name and band count."""
    scene_id = PLANETSCOPE_SR.match(sr_path.name).group("id")
    if wanted is not None:
        sensor = wanted
    elif PLANETSCOPE_8B.search(sr_path.name):
        sensor = "planetscope-8b"
    else:
        from rts_tf.rasters import open_raster

        with open_raster(sr_path, "PlanetScope surface reflectance") as dataset:
            sensor = "planetscope-8b" if dataset.count == 8 else "planetscope"
    udm2 = sorted(p for p in sr_path.parent.glob(f"{scene_id}*udm2*") if p.suffix.lower() in (".tif", ".tiff"))
    match = re.match(r"^(\d{4})(\d{2})(\d{2})_", scene_id)
    return SceneFiles(scene_id, sr_path, udm2[0] if udm2 else None, sensor,
                      bands=tuple((sr_path, band) for band in SENSORS[sensor].bands),
                      date="-".join(match.groups()) if match else "")


# --- Sentinel-2 L2A ----------------------------------------------------------------------------------

def _is_sentinel2_folder(folder: Path) -> bool:
    if folder.name.upper().endswith(".SAFE"):
        return True
    return any(p.is_file() and SENTINEL2_FILE.match(p.name) for p in folder.iterdir())


def _sentinel2_folders(folder: Path) -> list[Path]:
    """The folder itself when it is a Sentinel-2 product, else its sub-folders that are."""
    if folder.is_file():
        return []
    if _is_sentinel2_folder(folder):
        return [folder]
    return [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and _is_sentinel2_folder(sub)]


def _sentinel2_files(folder: Path) -> tuple[dict[str, Path], Path | None]:
    """{band: file} of B02, B03, B04, B08 and SCL (if found), and the product metadata file."""
    listing = [p for p in folder.iterdir() if p.is_file()]
    if folder.name.upper().endswith(".SAFE"):
        granules = sorted(p for p in (folder / "GRANULE").glob("*") if p.is_dir()) if (folder / "GRANULE").is_dir() \
            else []
        if len(granules) > 1:
            raise InputError(f"{folder}: {len(granules)} granules under GRANULE; rts-tf reads single-tile L2A "
                             "products (one granule)")
        images = granules[0] / "IMG_DATA" if granules else folder / "GRANULE"
        candidates = sorted(p for p in (images / "R10m").glob("*") if p.is_file()) + \
            sorted(p for p in (images / "R20m").glob("*") if p.is_file())
    else:
        candidates = sorted(listing)
    bands: dict[str, Path] = {}
    for path in candidates:
        match = SENTINEL2_FILE.match(path.name)
        if not match:
            continue
        band = match.group("band").upper()
        if band in bands and bands[band].parent == path.parent:
            raise InputError(f"{path}: a second {band} file in {folder} (also {bands[band].name})")
        bands.setdefault(band, path)
    metadata = next((p for p in sorted(listing) if p.name.upper() == SENTINEL2_METADATA.upper()), None)
    return bands, metadata


def _sentinel2_scene(folder: Path) -> SceneFiles:
    """A Sentinel-2 L2A scene from a .SAFE folder or a folder of band files."""
    product = folder.name[:-5] if folder.name.upper().endswith(".SAFE") else folder.name
    files, metadata = _sentinel2_files(folder)
    where = "GRANULE/*/IMG_DATA/R10m" if folder.name.upper().endswith(".SAFE") else "this folder"
    for band in SENSORS["sentinel2-l2a"].bands:
        if band not in files:
            raise InputError(f"{folder}: Sentinel-2 band {band} not found (expected a *{band}*.jp2/.tif file in {where})")
    scale, offset, source, used = sentinel2_reflectance(folder, product, files, metadata)
    warnings = () if "SCL" in files else (
        f"scene {product}: no SCL file in {folder}: only nodata pixels are ignored (clouds, shadows and snow "
        "are not masked)",)
    return SceneFiles(product, files["B02"], files.get("SCL"), "sentinel2-l2a",
                      bands=tuple((files[band], 1) for band in SENSORS["sentinel2-l2a"].bands),
                      scale=scale, offset=offset, mask_ignore=SCL_IGNORED, date=_image_date(product),
                      aliases=_tile_ids(product, files["B02"].name), reflectance_from=source, metadata=used,
                      warnings=warnings)


def _tile_ids(product: str, band_file: str) -> tuple[str, ...]:
    """The MGRS tile id of a product, as T08WMB and 08WMB (labels may carry either), or ()."""
    for pattern, text in ((r"_T(\d{2}[C-X][A-Z]{2})(?:_|$)", product), (r"^S2[A-D]_(\d{1,2}[C-X][A-Z]{2})_", product),
                          (r"^T(\d{2}[C-X][A-Z]{2})_", band_file)):
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            tile = match.group(1).upper().zfill(5)
            return (f"T{tile}", tile)
    return ()


def baseline_offset(baseline: str) -> float:
    """The reflectance offset of L2A numbers of a processing baseline: -0.1 (DN - 1000) from 04.00 on, else 0."""
    try:
        major, minor = (int(part) for part in baseline.strip().split(".")[:2])
    except ValueError:
        raise ValueError(f"not a processing baseline: {baseline!r}") from None
    return -0.1 if (major, minor) >= (4, 0) else 0.0


def sentinel2_reflectance(folder: Path, product: str, files: dict[str, Path], metadata: Path | None
                          ) -> tuple[tuple[float, ...], tuple[float, ...], str, Path | None]:
    """(scale, offset) per canonical band, where they come from, and the file read.

    In order: BOA_ADD_OFFSET and BOA_QUANTIFICATION_VALUE of MTD_MSIL2A.xml; a STAC item's
    `raster:bands` offset and scale or its `s2:processing_baseline`; the baseline in the product
    name (_N0400_); else an error (a wrong guess would shift every reflectance by 0.1).
    """
    bands = SENSORS["sentinel2-l2a"].bands
    if metadata is not None:
        try:
            root = ElementTree.parse(metadata).getroot()
        except (ElementTree.ParseError, OSError) as error:
            raise InputError(f"{metadata}: unreadable Sentinel-2 product metadata: {error}") from None
        texts = {}
        offsets = {}
        try:
            for element in root.iter():
                tag = element.tag.rsplit("}", 1)[-1]
                if tag == "BOA_ADD_OFFSET":
                    offsets[int(element.get("band_id", -1))] = float((element.text or "").strip())
                elif tag in ("BOA_QUANTIFICATION_VALUE", "PROCESSING_BASELINE") and tag not in texts:
                    texts[tag] = (element.text or "").strip()
            quantification = float(texts.get("BOA_QUANTIFICATION_VALUE") or 10000.0)
            if texts.get("PROCESSING_BASELINE"):
                baseline_offset(texts["PROCESSING_BASELINE"])
        except ValueError as error:
            raise InputError(f"{metadata}: unreadable Sentinel-2 product metadata: {error}") from None
        scale = (1.0 / quantification,) * 4
        if offsets:
            return (scale, tuple(offsets.get(SENTINEL2_BAND_IDS[band], 0.0) / quantification for band in bands),
                    f"BOA_ADD_OFFSET of {metadata.name}", metadata)
        if texts.get("PROCESSING_BASELINE"):
            return (scale, (baseline_offset(texts["PROCESSING_BASELINE"]),) * 4,
                    f"processing baseline {texts['PROCESSING_BASELINE']} of {metadata.name}", metadata)
    for item_path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".json"):
        try:
            item = json.loads(item_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(item, dict) or item.get("type") != "Feature":
            continue
        assets = item.get("assets") or {}
        by_file = {Path(str(asset.get("href", ""))).name.lower(): asset for asset in assets.values()
                   if isinstance(asset, dict)}
        declared = []
        for band in bands:
            asset = by_file.get(files[band].name.lower()) or assets.get(band) or {}
            raster = (asset.get("raster:bands") or [{}])[0] if isinstance(asset, dict) else {}
            if "offset" in raster or "scale" in raster:
                declared.append((float(raster.get("scale", 1.0)), float(raster.get("offset", 0.0))))
        if len(declared) == len(bands):
            return (tuple(s for s, _ in declared), tuple(o for _, o in declared),
                    f"raster:bands scale and offset of the STAC item {item_path.name}", item_path)
        baseline = (item.get("properties") or {}).get("s2:processing_baseline")
        if baseline:
            try:
                return ((REFLECTANCE_STEP,) * 4, (baseline_offset(str(baseline)),) * 4,
                        f"processing baseline {baseline} of the STAC item {item_path.name}", item_path)
            except ValueError as error:
                raise InputError(f"{item_path}: {error}") from None
    match = re.search(r"_N(\d{2})(\d{2})_", product)
    if match:
        baseline = f"{match.group(1)}.{match.group(2)}"
        return ((REFLECTANCE_STEP,) * 4, (baseline_offset(baseline),) * 4,
                f"processing baseline {baseline} in the product name", None)
    raise InputError(f"{folder}: cannot tell the Sentinel-2 processing baseline (no {SENTINEL2_METADATA}, no STAC item "
                     "JSON with s2:processing_baseline, no _Nxxxx_ in the product name): from baseline 04.00 on L2A "
                     "numbers carry an offset of -1000; put the product's metadata beside the band files")


# --- generic --------------------------------------------------------------------------------------

def _generic_scenes(folder: Path, settings: SensorSettings) -> list[SceneFiles]:
    """Every GeoTIFF of a folder (or the file itself), read with the --band-map."""
    bands = parse_band_map(settings.band_map)
    mask = Path(settings.mask) if settings.mask else None
    if mask is not None and not mask.exists():
        raise InputError(f"{mask}: --mask file not found")
    scale = GENERIC_REFLECTANCE_SCALE if settings.reflectance_scale is None else float(settings.reflectance_scale)
    offset = GENERIC_REFLECTANCE_OFFSET if settings.reflectance_offset is None else float(settings.reflectance_offset)
    found = []
    for path in _files(folder):
        if not RASTER_FILE.search(path.name) or (mask is not None and path.resolve() == mask.resolve()):
            continue
        found.append(SceneFiles(path.stem, path, mask, "generic", bands=tuple((path, band) for band in bands),
                                scale=(scale,) * 4, offset=(offset,) * 4,
                                mask_ignore=tuple(int(value) for value in settings.mask_ignore or ()),
                                date=_image_date(path.stem)))
    return found


def family(sensor: str) -> str:
    """A sensor's family (PlanetScope's 4- and 8-band products are one: harmonised canonical bands)."""
    return SENSORS[sensor].family if sensor in SENSORS else sensor
