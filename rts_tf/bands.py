"""The model's band table: the one place that names the bands, their order and their units."""

from __future__ import annotations

# Nitze et al. (2021)'s ten bands: PlanetScope reflectance, NDVI, TCVIS trends and terrain.
REFLECTANCE_BANDS = ("blue", "green", "red", "nir")
TCVIS_BANDS = ("tcvis_brightness", "tcvis_greenness", "tcvis_wetness")
TERRAIN_BANDS = ("relative_elevation", "slope")
UNITS = {**{name: "reflectance" for name in REFLECTANCE_BANDS}, "ndvi": "1",
         **{name: "DN" for name in TCVIS_BANDS}, "relative_elevation": "m", "slope": "degree"}
BAND_NAMES: list[str] = [*REFLECTANCE_BANDS, "ndvi", *TCVIS_BANDS, *TERRAIN_BANDS]
BANDS: list[dict[str, str]] = [{"name": name, "unit": UNITS[name]} for name in BAND_NAMES]
TRUE_COLOUR = ("red", "green", "blue")
NIR_FALSE_COLOUR = ("nir", "red", "green")


def rgb_indexes(band_names: list[str]) -> tuple[int, int, int]:
    """Positions of red, green and blue among the bands (where pretrained RGB filters go)."""
    missing = [name for name in TRUE_COLOUR if name not in band_names]
    if missing:
        raise ValueError(f"the bands lack {', '.join(missing)} for the pretrained RGB filters")
    return tuple(band_names.index(name) for name in TRUE_COLOUR)
