"""The model's band table: the one place that names the bands, their order, their units and their sources."""

from __future__ import annotations

from typing import Sequence

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

# Shorthands of --bands: the bands of one input source (optical: the scene itself, NDVI included).
BAND_GROUPS: dict[str, tuple[str, ...]] = {
    "optical": (*REFLECTANCE_BANDS, "ndvi"),
    "reflectance": REFLECTANCE_BANDS,
    "tcvis": TCVIS_BANDS,
    "terrain": TERRAIN_BANDS,
}
# The input a band is made from besides the scene: build-records and predict need these only for such bands.
SOURCES = {**{name: "tcvis" for name in TCVIS_BANDS}, **{name: "terrain" for name in TERRAIN_BANDS}}
SOURCE_OPTIONS = {"tcvis": "--tcvis", "terrain": "--dem (or --rel-elevation and --slope)"}


def parse_bands(text: str | Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """A band set from its text: band names and group names (`optical`, `reflectance`, `tcvis`,
    `terrain`, `all`) joined by `,` or `+`, e.g. "optical+terrain" or "red,green,blue,slope".

    The result is in the canonical order of BAND_NAMES whatever the order given. `all` means every
    band in `available` (a records folder's bands) or, without it, the ten bands. A list is taken
    as tokens. ValueError names an unknown token and the choices.
    """
    tokens = [text] if isinstance(text, str) else list(text)
    tokens = [token.strip() for item in tokens for part in item.split(",") for token in part.split("+")]
    tokens = [token for token in tokens if token]
    if not tokens:
        raise ValueError("the band set is empty")
    chosen: set[str] = set()
    for token in tokens:
        name = token.lower()
        if name == "all":
            chosen.update(available if available is not None else BAND_NAMES)
        elif name in BAND_GROUPS:
            chosen.update(BAND_GROUPS[name])
        elif name in UNITS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown band or group '{token}'; choose among {', '.join(BAND_NAMES)} or the groups "
                             f"{', '.join(BAND_GROUPS)}, all")
    return [name for name in BAND_NAMES if name in chosen]


def band_sources(bands: Sequence[str]) -> list[str]:
    """The auxiliary sources ('tcvis', 'terrain') the bands are made from, besides the scene."""
    return [source for source in ("tcvis", "terrain") if any(SOURCES.get(name) == source for name in bands)]


def describe_bands(bands: Sequence[str]) -> str:
    """A band set in short words: group names where a whole group is in it (e.g. 'optical+terrain')."""
    words, left = [], list(bands)
    if list(bands) == BAND_NAMES:
        return "all"
    for group in ("optical", "reflectance", "tcvis", "terrain"):
        members = BAND_GROUPS[group]
        if all(name in left for name in members):
            words.append(group)
            left = [name for name in left if name not in members]
    return "+".join(words + left)


def rgb_indexes(band_names: list[str]) -> tuple[int, int, int]:
    """Positions of red, green and blue among the bands (where pretrained RGB filters go)."""
    missing = [name for name in TRUE_COLOUR if name not in band_names]
    if missing:
        raise ValueError(f"the bands lack {', '.join(missing)} for the pretrained RGB filters")
    return tuple(band_names.index(name) for name in TRUE_COLOUR)
