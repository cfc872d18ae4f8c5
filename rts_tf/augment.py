"""Augmentation: random transforms of a training tile, identical for image and label.

The only module that imports tensorflow_addons (rotations by arbitrary angles, Gaussian blur).
Every transform keeps ignored pixels ignored: geometric transforms move the label with the image
(nearest neighbour) and fill uncovered corners with the ignore value; radiometric ones change the
image only.

Ignored pixels (stored as 0) must not leak into valid ones: the model normalises them to 0, the
training mean, so here they hold the band means (`centre`) while interpolating rotations, blurs
and contrast mix neighbours, and uncovered corners are filled with the means too. The valid pixels
of a tile therefore do not depend on what its ignored pixels held. At the end ignored pixels are 0
again, as in the records.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import tensorflow as tf

from rts_tf.bands import REFLECTANCE_BANDS
from rts_tf.records import IGNORE

with warnings.catch_warnings():
    # tensorflow-addons announces its end of life on import; that is not a user's concern.
    warnings.simplefilter("ignore")
    import tensorflow_addons as tfa



@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of the random transforms (0 disables one)."""

    flips: bool = True
    rotate90: bool = True
    max_rotation_degrees: float = 10.0
    blur_probability: float = 0.2
    max_blur_sigma: float = 1.0
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.02


def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, band_names: list[str],
            settings: AugmentSettings = AugmentSettings(), centre: tf.Tensor | None = None
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly transform one tile: image (H, W, C) float32 in physical units, label (H, W, 1) uint8.

    seed is a shape-(2,) int tensor; the same seed gives the same transform (stateless ops), so a
    run with a fixed --seed is repeatable whatever the parallelism. centre (C,) holds the band
    means that ignored pixels take while pixels are mixed (default 0).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    centre = tf.zeros([len(band_names)], tf.float32) if centre is None else tf.cast(centre, tf.float32)
    label = tf.cast(label, tf.float32)
    # Work on deviations from the means: ignored pixels and fill values are 0 there.
    image = tf.where(tf.not_equal(label, IGNORE), image - centre, 0.0)
    # Flips and quarter turns move pixels without interpolation: one stacked tensor serves both.
    stacked = tf.concat([image, label], axis=-1)
    if settings.flips:
        flip = tf.random.stateless_uniform([2], seeds[0]) < 0.5
        stacked = tf.cond(flip[0], lambda: tf.reverse(stacked, [1]), lambda: stacked)
        stacked = tf.cond(flip[1], lambda: tf.reverse(stacked, [0]), lambda: stacked)
    if settings.rotate90:
        stacked = tf.image.rot90(stacked, tf.random.stateless_uniform([], seeds[1], 0, 4, dtype=tf.int32))
    image, label = stacked[..., :-1], stacked[..., -1:]
    if settings.max_rotation_degrees > 0:
        limit = settings.max_rotation_degrees * math.pi / 180
        angle = tf.random.stateless_uniform([], seeds[2], -limit, limit)
        image = tfa.image.rotate(image, angle, interpolation="bilinear", fill_mode="constant", fill_value=0.0)
        label = tfa.image.rotate(label, angle, interpolation="nearest", fill_mode="constant",
                                 fill_value=float(IGNORE))
    if settings.blur_probability > 0 and settings.max_blur_sigma > 0:
        # tfa's blur takes a Python sigma: draw one of a few strengths up to the maximum.
        sigmas = [settings.max_blur_sigma * f for f in (0.4, 0.7, 1.0)]
        choice = tf.random.stateless_uniform([], seeds[3], 0, len(sigmas), dtype=tf.int32)
        blurred = lambda: tf.switch_case(choice, [lambda s=s: tfa.image.gaussian_filter2d(image, (5, 5), s)
                                                  for s in sigmas])
        blur = tf.random.stateless_uniform([], seeds[4]) < settings.blur_probability
        image = tf.cond(blur, blurred, lambda: image)
    valid = tf.not_equal(label, IGNORE)
    image = jitter_reflectance(image + centre, valid, seeds[5:8], band_names, settings)
    image = image * tf.cast(valid, image.dtype)  # ignored pixels hold 0, as in the records
    return image, tf.cast(label, tf.uint8)


def jitter_reflectance(image: tf.Tensor, valid: tf.Tensor, seeds: tf.Tensor, band_names: list[str],
                       settings: AugmentSettings) -> tf.Tensor:
    """Brightness, contrast and multiplicative noise on the reflectance bands; NDVI is recomputed
    from the changed red and NIR so that the bands stay consistent. Contrast turns about the mean
    of the valid pixels (valid: (H, W, 1) bool)."""
    if not any(name in band_names for name in REFLECTANCE_BANDS) or \
            (settings.brightness == 0 and settings.contrast == 0 and settings.noise == 0):
        return image
    # Per-band vectors (1 where a band is reflectance) keep every step a broadcast over the tile.
    is_reflectance = tf.constant([float(name in REFLECTANCE_BANDS) for name in band_names])
    gain = 1.0 + tf.random.stateless_uniform([], seeds[0], -settings.brightness, settings.brightness)
    contrast = 1.0 + tf.random.stateless_uniform([], seeds[1], -settings.contrast, settings.contrast)
    weight = tf.cast(valid, image.dtype)
    mean = tf.reduce_sum(image * weight, axis=[0, 1], keepdims=True) / tf.maximum(tf.reduce_sum(weight), 1.0)
    changed = ((image - mean) * contrast + mean) * gain
    # Noise is drawn for the reflectance bands only and placed on their channels by a selection
    # matrix; it is uniform with standard deviation `noise` (a third of the cost of normal numbers).
    reflectance_indexes = [i for i, name in enumerate(band_names) if name in REFLECTANCE_BANDS]
    selection = tf.one_hot(reflectance_indexes, len(band_names))
    half_width = settings.noise * 3 ** 0.5
    noise = tf.random.stateless_uniform(tf.concat([tf.shape(image)[:2], [len(reflectance_indexes)]], 0), seeds[2],
                                        -half_width, half_width)
    changed *= 1.0 + tf.tensordot(noise, selection, axes=1)
    image = image + is_reflectance * (tf.maximum(changed, 0.0) - image)
    if {"red", "nir", "ndvi"} <= set(band_names):
        red, nir = image[..., band_names.index("red")], image[..., band_names.index("nir")]
        total = red + nir
        ndvi = tf.where(total > 0, (nir - red) / tf.maximum(total, 1e-6), 0.0)
        is_ndvi = tf.one_hot(band_names.index("ndvi"), len(band_names))
        image = image + is_ndvi * (ndvi[..., None] - image)
    return image
