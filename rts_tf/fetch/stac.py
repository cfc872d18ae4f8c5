"""Fetch, shared part: the area of interest, STAC API search, windowed COG reads over HTTP, atomic writes, jobs."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.windows import Window, from_bounds
from shapely.geometry import box, mapping, shape

from rts_tf.errors import InputError, disk_problem, output_error
from rts_tf.records import attempt_id

WGS84 = CRS.from_epsg(4326)
# HTTP retries with backoff. STAC requests: urllib3's Retry (connection errors, 429 and 5xx, exponential
# backoff 0.5, 1, 2, 4 s). COG reads: GDAL's own retry of 429 and 5xx answers, from a 1 s delay.
HTTP_RETRIES = 4
HTTP_BACKOFF = 0.5
HTTP_TIMEOUT = 60
GDAL_HTTP_OPTIONS = {
    "GDAL_HTTP_MAX_RETRY": str(HTTP_RETRIES),
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": str(HTTP_TIMEOUT),
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    # A COG is one file: do not list its "directory" on the server, and only open URLs of rasters.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    # Neighbouring tiles of a window are read in one request where the server allows it.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
}
GEOTIFF_OPTIONS = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
PARTIAL = ".partial"  # OUT/.partial/<name>.<attempt>: work in progress, never read as a result


def gdal_env() -> rasterio.Env:
    """GDAL settings of every read over HTTP (retries, no directory listings)."""
    return rasterio.Env(**GDAL_HTTP_OPTIONS)


# --- area of interest ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Area:
    """An area of interest in the CRS it was given in; moved to other CRSs from there (a round trip through
    EPSG:4326 would bend straight edges and grow windows)."""

    geometry: shapely.Geometry
    crs: CRS

    def in_crs(self, crs: CRS) -> shapely.Geometry:
        """The area in another CRS, its edges densified first so they stay close to true."""
        from rts_tf.labels import reproject_geometries

        if crs == self.crs:
            return self.geometry
        left, bottom, right, top = self.geometry.bounds
        step = max(right - left, top - bottom) / 64 or 1e-6
        return reproject_geometries([self.geometry.segmentize(step)], self.crs, crs, "area of interest")[0]

    @property
    def wgs84(self) -> shapely.Geometry:
        return self.in_crs(WGS84)

    def buffered(self, crs: CRS, metres: float) -> "Area":
        """The area in a projected CRS, grown by metres."""
        return Area(self.in_crs(crs).buffer(metres), crs)


def read_aoi(path: str | os.PathLike) -> Area:
    """The union of a vector file's polygons, in its CRS."""
    from rts_tf.labels import read_polygons

    layer = read_polygons(path, "area of interest")
    return Area(shapely.union_all(layer.geometries), layer.crs)


def scenes_aoi(folders: Sequence[str | os.PathLike]) -> Area:
    """The union of the footprints (raster extents) of the scenes in folders."""
    from rts_tf.labels import reproject_geometries
    from rts_tf.rasters import open_raster
    from rts_tf.sensors import find_scenes

    footprints = []
    for scene in find_scenes(folders):
        with open_raster(scene.sr, "scene") as dataset:
            if dataset.crs is None:
                raise InputError(f"{scene.sr}: scene has no CRS")
            footprint = box(*dataset.bounds)
            footprints += reproject_geometries([footprint.segmentize(max(dataset.res) * 64)], dataset.crs, WGS84,
                                               str(scene.sr))
    return Area(shapely.union_all(footprints), WGS84)


# --- STAC API ------------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _network_problem(error: BaseException) -> str | None:
    """The reason when an error is that the server cannot be reached, else None."""
    import requests

    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        if isinstance(link, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            text = str(link).lower()
            if "refused" in text:
                return "connection refused"
            if "name or service not known" in text or "name resolution" in text or "nodename" in text:
                return "host name not found (no network?)"
            if isinstance(link, requests.exceptions.Timeout) or "timed out" in text:
                return "timed out"
            return "no connection (no network?)"
    return None


def catalogue_error(url: str, error: BaseException, doing: str) -> InputError:
    """One line for a STAC API that cannot be reached or does not answer as one."""
    reason = _network_problem(error)
    if reason is not None:
        return InputError(f"{url}: cannot reach the STAC API ({reason}) while {doing}; check the network or --stac")
    return InputError(f"{url}: the server did not answer as a STAC API while {doing} ({_first_line(error)}); "
                      "check --stac")


def open_collection(url: str, collection: str):
    """(pystac_client.Client, pystac.Collection) of a STAC API, with retries; one-line errors."""
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from urllib3 import Retry

    retry = Retry(total=HTTP_RETRIES, backoff_factor=HTTP_BACKOFF, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None)
    try:
        client = Client.open(url, stac_io=StacApiIO(max_retries=retry, timeout=HTTP_TIMEOUT))
    except Exception as error:  # requests, JSON and pystac errors alike: all mean "not a usable STAC API here"
        raise catalogue_error(url, error, "opening it") from None
    try:
        found = client.get_collection(collection)
    except Exception as error:
        if _network_problem(error) is not None:
            raise catalogue_error(url, error, f"reading collection {collection}") from None
        found = None
    if found is None:
        try:
            names = sorted(c.id for c in client.get_collections())
        except Exception:
            names = []
        raise InputError(f"{url}: no collection '{collection}' in this STAC API"
                         + (f" (it has: {', '.join(names[:12])}{'...' if len(names) > 12 else ''})" if names else "")
                         + "; check --collection")
    return client, found


def collection_bbox(collection) -> shapely.Geometry | None:
    """The union of a collection's spatial extent boxes (EPSG:4326), or None when it declares none."""
    try:
        boxes = collection.extent.spatial.bboxes
    except AttributeError:
        return None
    shapes = [box(b[0], b[1], b[2], b[3]) for b in boxes if len(b) >= 4]
    return shapely.union_all(shapes) if shapes else None


def search_items(client, url: str, collection: str, aoi: shapely.Geometry, datetime: str | None = None) -> list:
    """Items of a collection that intersect the AOI (EPSG:4326), sorted by id. The bbox goes to the API;
    the exact intersection is tested here (not every API implements `intersects`)."""
    try:
        search = client.search(collections=[collection], bbox=list(aoi.bounds), datetime=datetime, limit=100)
        items = list(search.items())
    except Exception as error:
        raise catalogue_error(url, error, f"searching {collection}") from None
    found = []
    for item in items:
        try:
            footprint = shape(item.geometry) if item.geometry else box(*item.bbox)
        except Exception as error:
            raise InputError(f"{url}: item {item.id} of {collection} has an unreadable geometry "
                             f"({_first_line(error)})") from None
        if footprint.intersects(aoi):
            found.append(item)
    return sorted(found, key=lambda item: item.id)


def asset_href(item, keys: Iterable[str], what: str) -> tuple[str, str]:
    """(asset key, absolute href) of the first of keys an item has; one line when it has none."""
    for key in keys:
        if key in item.assets:
            return key, item.assets[key].get_absolute_href() or item.assets[key].href
    raise InputError(f"STAC item {item.id}: no {what} asset (looked for {', '.join(keys)}; it has "
                     f"{', '.join(item.assets) or 'none'})")


# --- windowed reads of Cloud-Optimised GeoTIFFs ----------------------------------------------------------

@dataclass(frozen=True)
class WindowPlan:
    """What one read takes from one raster: its URL, the window (pixels) and the window's georeferencing."""

    href: str
    window: Window
    crs: CRS
    transform: Any  # affine.Affine of the window
    dtype: str
    nodata: float | None
    file_bytes: int | None  # the whole file's size, when the server says it
    window_bytes: int  # compressed bytes of the tiles the window touches (what a read transfers, about)

    @property
    def width(self) -> int:
        return int(self.window.width)

    @property
    def height(self) -> int:
        return int(self.window.height)


def open_remote(href: str, what: str) -> rasterio.DatasetReader:
    """Open a raster over HTTP (GDAL /vsicurl/) with one-line errors."""
    try:
        return rasterio.open(href)
    except RasterioIOError as error:
        raise InputError(f"{href}: cannot read {what}: {_gdal_reason(error)}") from None


def _gdal_reason(error: BaseException) -> str:
    text = _first_line(error)
    lower = text.lower()
    if "couldn't connect" in lower or "connection refused" in lower or "could not connect" in lower:
        return "connection refused (no network?)"
    if "could not resolve" in lower:
        return "host name not found (no network?)"
    if "404" in lower:
        return "not found (HTTP 404)"
    if "not recognized as" in lower or "not a tiff" in lower:
        return "not a GeoTIFF"
    return text


def plan_window(dataset: rasterio.DatasetReader, bounds: tuple[float, float, float, float], href: str,
                align: float | None = None) -> WindowPlan | None:
    """The window of a raster covering bounds (in its CRS), grown outward to whole pixels (and to a
    multiple of `align` metres, so windows of rasters of different resolution cover the same ground),
    clipped to the raster; None when it does not overlap."""
    left, bottom, right, top = bounds
    if align:
        left, bottom = np.floor(left / align) * align, np.floor(bottom / align) * align
        right, top = np.ceil(right / align) * align, np.ceil(top / align) * align
    window = from_bounds(left, bottom, right, top, transform=dataset.transform)
    col0, row0 = int(np.floor(window.col_off + 1e-6)), int(np.floor(window.row_off + 1e-6))
    col1 = int(np.ceil(window.col_off + window.width - 1e-6))
    row1 = int(np.ceil(window.row_off + window.height - 1e-6))
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, dataset.width), min(row1, dataset.height)
    if col1 <= col0 or row1 <= row0:
        return None
    window = Window(col0, row0, col1 - col0, row1 - row0)
    return WindowPlan(href, window, dataset.crs, dataset.window_transform(window), dataset.dtypes[0],
                      dataset.nodata, _file_size(dataset), _window_bytes(dataset, window))


def _file_size(dataset: rasterio.DatasetReader) -> int | None:
    """The size of the file behind a dataset (its HTTP Content-Length, from a HEAD request), or None."""
    try:
        import requests

        name = dataset.name
        if name.startswith(("http://", "https://")):
            answer = requests.head(name, timeout=HTTP_TIMEOUT, allow_redirects=True)
            size = answer.headers.get("Content-Length")
            return int(size) if answer.ok and size else None
        return os.path.getsize(name)
    except Exception:
        return None


def _window_bytes(dataset: rasterio.DatasetReader, window: Window) -> int:
    """Compressed bytes of the TIFF blocks a window touches (all bands), from the file's tile index."""
    block_height, block_width = dataset.block_shapes[0]
    rows = range(int(window.row_off) // block_height, (int(window.row_off + window.height) - 1) // block_height + 1)
    cols = range(int(window.col_off) // block_width, (int(window.col_off + window.width) - 1) // block_width + 1)
    total = 0
    for band in dataset.indexes:
        for row in rows:
            for col in cols:
                try:
                    total += dataset.block_size(band, row, col)
                except Exception:  # not a tiled TIFF: the uncompressed size is the best guess
                    total += block_height * block_width * np.dtype(dataset.dtypes[0]).itemsize
    return total


def read_plan(dataset: rasterio.DatasetReader, plan: WindowPlan) -> np.ndarray:
    """The window's pixels (bands, rows, cols), exactly as stored."""
    try:
        return dataset.read(window=plan.window)
    except RasterioIOError as error:
        raise InputError(f"{plan.href}: cannot read window {plan.window}: {_gdal_reason(error)}") from None


def write_geotiff(path: Path, data: np.ndarray, crs: CRS, transform, nodata: float | None,
                  tags: dict | None = None) -> None:
    """A tiled, compressed GeoTIFF (data: bands, rows, cols), written under a temporary name then renamed."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{attempt_id()}.tmp")
    height, width = data.shape[-2:]
    options = dict(GEOTIFF_OPTIONS)
    if width < 256 or height < 256:  # small windows: one strip-free tile of 16-multiples would be wasted
        options.update(blockxsize=max(16, min(256, 16 * ((width + 15) // 16))),
                       blockysize=max(16, min(256, 16 * ((height + 15) // 16))))
    try:
        with rasterio.open(temporary, "w", width=width, height=height, count=data.shape[0], dtype=data.dtype,
                           crs=crs, transform=transform, nodata=nodata, **options) as out:
            out.write(data)
            if tags:
                out.update_tags(**tags)
        os.replace(temporary, path)
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if disk_problem(error, path) is not None:
            raise output_error(path, error) from None
        raise


def same_grid(path: Path, crs: CRS, transform, width: int, height: int) -> bool:
    """Whether an existing raster has this grid (a complete earlier result of the same request)."""
    with rasterio.open(path) as dataset:
        return (dataset.crs == crs and dataset.transform.almost_equals(transform)
                and (dataset.width, dataset.height) == (width, height))


def partial_folder(out: Path, name: str) -> Path:
    """A fresh work folder OUT/.partial/<name>.<attempt> (build-records never looks inside .partial)."""
    folder = out / PARTIAL / f"{name}.{attempt_id()}"
    folder.mkdir(parents=True)
    return folder


def clean_partial(out: Path, names: Iterable[str] = ()) -> None:
    """Remove what killed attempts left for these names, and .partial itself when empty."""
    root = out / PARTIAL
    if not root.is_dir():
        return
    for name in names:
        for stale in root.glob(f"{name}.*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass


def run_jobs(jobs: Sequence[Any], work: Callable[[Any], Any], workers: int, unit: str,
             progress: Callable[[int, int], None] | None = None) -> list:
    """Run work(job) on threads (the work is HTTP I/O), in job order; the first error stops the rest."""
    results: list = [None] * len(jobs)
    if progress:
        progress(0, len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=f"fetch-{unit}") as pool:
        futures = {pool.submit(work, job): index for index, job in enumerate(jobs)}
        done = 0
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                if progress:
                    progress(done, len(jobs))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def human_bytes(size: float | None) -> str:
    """1234567 -> '1.2 MB' (None: 'unknown')."""
    if size is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} TB"


def geojson(geometry: shapely.Geometry) -> dict:
    """A shapely geometry as a GeoJSON dict."""
    return mapping(geometry)
