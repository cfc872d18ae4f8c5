"""Fetch: ArcticDEM and Sentinel-2 L2A for an area from open STAC catalogues (rts-tf fetch)."""

# pystac-client and friends are the optional extra `fetch`; the CLI says so when they are missing.
FETCH_EXTRA_HINT = "rts-tf fetch needs the optional packages of the 'fetch' extra: pip install 'rts-tf[fetch]'"

# The documented defaults (public catalogues that need no account), shared by the CLI and the modules.
PGC_STAC = "https://stac.pgc.umn.edu/api/v1/"
EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
SENTINEL2_COLLECTION = "sentinel-2-c1-l2a"
# 100 m relative-elevation radius + a 32 m pixel of slope's kernel + margin for resampling onto scene grids.
DEM_BUFFER = 200.0
