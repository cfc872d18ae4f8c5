"""Pictures of tiles: true colour, false colour, terrain, labels, probabilities and errors as RGB uint8."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rts_tf.bands import NIR_FALSE_COLOUR, TCVIS_BANDS, TRUE_COLOUR
from rts_tf.records import IGNORE

OUTLINE = (255, 255, 0)
IGNORED = np.array([255, 0, 255])


def stretch(values: np.ndarray, valid: np.ndarray, low=None, high=None) -> np.ndarray:
    """Scale to 0-255 between given limits or the 2nd and 98th percentiles of valid pixels."""
    if low is None or high is None:
        pool = values[valid] if valid.any() else values.reshape(-1, *values.shape[2:])
        low_p, high_p = np.percentile(pool, [2, 98], axis=0) if pool.size else (0.0, 1.0)
        low = low_p if low is None else low
        high = high_p if high is None else high
    scaled = (values - low) / np.maximum(np.asarray(high) - np.asarray(low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def composite(image: np.ndarray, band_names: list[str], names: tuple[str, str, str], valid: np.ndarray) -> np.ndarray:
    """Three bands as RGB with a percentile stretch."""
    return stretch(np.stack([image[..., band_names.index(n)] for n in names], -1), valid)


def grey(values: np.ndarray, valid: np.ndarray, low=None, high=None) -> np.ndarray:
    return np.repeat(stretch(values[..., None], valid, low, high), 3, axis=-1)


def outline(rgb: np.ndarray, label: np.ndarray) -> np.ndarray:
    """RGB with slump outlines in yellow and ignored pixels tinted magenta."""
    result = rgb.copy()
    ignored = label == IGNORE
    result[ignored] = (result[ignored] * 0.4 + IGNORED * 0.6).astype(np.uint8)
    slump = label == 1
    result[slump & ~ndimage.binary_erosion(slump)] = OUTLINE
    return result


def label_colour(label: np.ndarray) -> np.ndarray:
    """Background black, slump white, ignored magenta."""
    result = np.zeros(label.shape + (3,), dtype=np.uint8)
    result[label == 1] = 255
    result[label == IGNORE] = IGNORED
    return result


def error_map(label: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """True positives white, false positives red, false negatives blue, ignored grey."""
    predicted = probability >= threshold
    result = np.zeros(label.shape + (3,), dtype=np.uint8)
    result[predicted & (label == 1)] = (255, 255, 255)
    result[predicted & (label == 0)] = (255, 0, 0)
    result[~predicted & (label == 1)] = (0, 80, 255)
    result[label == IGNORE] = (128, 128, 128)
    return result


def side_by_side(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Panels (H, W, 3) joined left to right with white gaps."""
    spacer = np.full((panels[0].shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1)


def band_panels(image: np.ndarray, band_names: list[str], valid: np.ndarray,
                auxiliary: bool = True) -> list[tuple[str, np.ndarray]]:
    """(title, RGB) pictures of a tile's bands, those its band set allows: true colour, NIR false
    colour and (with auxiliary) TCVIS, relative elevation and slope; a band set with none of these
    shows its first band in grey."""
    present = set(band_names)
    band = lambda name: image[..., band_names.index(name)]
    panels = [(title, composite(image, band_names, names, valid))
              for title, names in (("true colour", TRUE_COLOUR), ("NIR false colour", NIR_FALSE_COLOUR))
              if present.issuperset(names)]
    if auxiliary and present.issuperset(TCVIS_BANDS):
        panels.append(("TCVIS", np.clip(np.stack([band(name) for name in TCVIS_BANDS], -1), 0, 255).astype(np.uint8)))
    if auxiliary and "relative_elevation" in present:
        relief = float(np.percentile(np.abs(band("relative_elevation")[valid]), 98)) if valid.any() else 1.0
        panels.append(("relative elevation", grey(band("relative_elevation"), valid, -max(relief, 0.5),
                                                   max(relief, 0.5))))
    if auxiliary and "slope" in present:
        panels.append(("slope", grey(band("slope"), valid, 0.0, 30.0)))
    if not panels:
        panels.append((band_names[0], grey(image[..., 0], valid)))
    return panels
