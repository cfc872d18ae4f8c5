"""Augmentation: random transforms of a batch of training tiles, identical for image and label.

Each tile gets its own transform, drawn from its own seed with stateless ops: a tile's
augmentation is a function of its seed alone, not of the batch it is in nor of the parallelism, so
a run with a fixed --seed is repeatable. The geometric transforms (flips, quarter turns, a small
rotation) are one projective transform per tile, applied to the whole batch in one call: to the
image with bilinear interpolation, to the label with nearest neighbour and the ignore value in the
uncovered corners. Blur and the radiometric jitter change the image only.

Ignored pixels (stored as 0) must not leak into valid ones: the model normalises them to 0, the
training mean, so here they hold the band means (`centre`) while interpolating rotations, blurs
and contrast mix neighbours, and uncovered corners are filled with the means too (the image is
transformed as deviations from the means, in which both are 0). The valid pixels of a tile
therefore do not depend on what its ignored pixels held. At the end ignored pixels are 0 again, as
in the records.

Two implementations of the same transforms, for the two places augmentation can run (`fit
--augment-on`): `host` in the tf.data pipeline (tensorflow_addons' projective transform, blurring
only the tiles drawn for it), and `device` inside the training step on the accelerator
(`AugmentingModel`), written with ops that have XLA kernels and static shapes: the projective
transform as four gathers with the same bilinear and nearest-neighbour rules as the host's kernel,
the blur as one separable convolution of the whole batch. Both give the same tiles for the same
seeds to float tolerance (tests/test_dataset.py runs every augmentation test on both).

The only module that imports tensorflow_addons (its `transform` takes a batch and one transform
per tile).
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


AUGMENT_ON = ("device", "host")


def augment_batch(images: tf.Tensor, labels: tf.Tensor, seeds: tf.Tensor, band_names: list[str],
                  settings: AugmentSettings = AugmentSettings(), centre: tf.Tensor | None = None,
                  device: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly transform a batch: images (B, H, W, C) float32 in physical units, labels (B, H, W, 1)
    uint8, seeds (B, 2) int, one per tile. centre (C,) holds the band means that ignored pixels take
    while pixels are mixed (default 0). Quarter turns keep pixels on the grid for square tiles only.
    device: the XLA-compatible ops (static shapes, no tensorflow_addons kernel) for the training
    step on the accelerator; the same tiles to float tolerance."""
    choices = random_choices(seeds, settings)
    centre = tf.zeros([len(band_names)]) if centre is None else tf.cast(centre, tf.float32)
    # Work on deviations from the means: ignored pixels (whatever they hold) and fill values are 0 there.
    deviation = tf.math.multiply_no_nan(images - centre, tf.cast(tf.not_equal(labels, IGNORE), tf.float32))
    if settings.flips or settings.rotate90 or settings.max_rotation_degrees > 0:
        transforms = projective_transforms(choices, tf.shape(images)[1], tf.shape(images)[2])
        warp = gather_transform if device else transform
        deviation = warp(deviation, transforms, "BILINEAR", 0.0)
        labels = warp(labels, transforms, "NEAREST", IGNORE)
    if settings.blur_probability > 0 and settings.max_blur_sigma > 0:
        deviation = (blur_all if device else blur)(deviation, choices["blur_sigma"])
    image = jitter_reflectance(deviation, tf.not_equal(labels, IGNORE), centre, choices, band_names, settings)
    image.set_shape(images.shape)
    return image, labels


def random_choices(seeds: tf.Tensor, settings: AugmentSettings) -> dict[str, tf.Tensor]:
    """Each tile's random choices, from its seed (seeds (B, 2)): `flip_x`, `flip_y` (bool),
    `quarter_turns` (int32, 0-3), `angle` (radians), `blur_sigma` (0: no blur), `gain` and `contrast`
    (factors), all (B,), and `noise_seed` (B, 2), the seed of its noise."""
    def draw(seed):
        keys = positive_seed(tf.random.experimental.stateless_split(positive_seed(seed), 2))
        return unit_uniform([8], keys[0]), keys[1]

    uniform, noise_seed = tf.map_fn(draw, tf.cast(seeds, tf.int64), fn_output_signature=(tf.float32, tf.int64))
    u = tf.unstack(uniform, 8, axis=1)
    between = lambda value, low, high: low + (high - low) * value
    limit = settings.max_rotation_degrees * math.pi / 180
    return {
        "flip_x": tf.logical_and(u[0] < 0.5, settings.flips),
        "flip_y": tf.logical_and(u[1] < 0.5, settings.flips),
        "quarter_turns": tf.minimum(tf.cast(u[2] * 4, tf.int32), 3) * int(settings.rotate90),
        "angle": between(u[3], -limit, limit),
        # A strength between 0.4 and 1 times the maximum, for a `blur_probability` of the tiles.
        "blur_sigma": tf.where(u[4] < settings.blur_probability,
                               between(u[5], 0.4 * settings.max_blur_sigma, settings.max_blur_sigma), 0.0),
        "gain": between(u[6], 1 - settings.brightness, 1 + settings.brightness),
        "contrast": between(u[7], 1 - settings.contrast, 1 + settings.contrast),
        "noise_seed": noise_seed,
    }


def positive_seed(seed: tf.Tensor) -> tf.Tensor:
    """Seeds as XLA reads them: XLA's stateless random ops keep only 32 bits of each seed number,
    so only non-negative 31-bit numbers draw the same numbers inside and outside XLA."""
    return tf.bitwise.bitwise_and(seed, tf.constant(0x7FFFFFFF, seed.dtype))


def unit_uniform(shape, seed: tf.Tensor) -> tf.Tensor:
    """Uniform numbers in [0, 1) drawn from a seed, 24 random bits each: the same numbers inside
    and outside XLA (TensorFlow's stateless float draws differ under XLA, its integer draws do not)."""
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32)
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * 2.0 ** -24


def projective_transforms(choices: dict[str, tf.Tensor], height, width) -> tf.Tensor:
    """(B, 8) transforms as ImageProjectiveTransformV3 takes them, mapping each output pixel to the
    input position it samples: about the tile's centre, flipped, turned by the quarter turns and
    rotated by the angle. Without an angle the coefficients are exactly 0 and +-1 (pixels stay on
    the grid)."""
    turns = choices["quarter_turns"]
    cos, sin = tf.gather([1.0, 0.0, -1.0, 0.0], turns), tf.gather([0.0, 1.0, 0.0, -1.0], turns)
    cos_angle, sin_angle = tf.cos(choices["angle"]), tf.sin(choices["angle"])
    cos, sin = cos * cos_angle - sin * sin_angle, sin * cos_angle + cos * sin_angle
    flip_x = tf.where(choices["flip_x"], -1.0, 1.0)
    flip_y = tf.where(choices["flip_y"], -1.0, 1.0)
    xx, xy, yx, yy = flip_x * cos, -flip_x * sin, flip_y * sin, flip_y * cos
    centre_x, centre_y = (tf.cast(width, tf.float32) - 1) / 2, (tf.cast(height, tf.float32) - 1) / 2
    zero = tf.zeros_like(cos)
    return tf.stack([xx, xy, centre_x - xx * centre_x - xy * centre_y,
                     yx, yy, centre_y - yx * centre_x - yy * centre_y, zero, zero], axis=1)


def transform(images: tf.Tensor, transforms: tf.Tensor, interpolation: str, fill: float) -> tf.Tensor:
    """Each image of the batch transformed by its transform (one op for the whole batch);
    positions outside take `fill`."""
    out = tfa.image.transform(images, transforms, interpolation=interpolation.lower(), fill_mode="constant",
                              fill_value=fill)
    out.set_shape(images.shape)
    return out


def gather_transform(images: tf.Tensor, transforms: tf.Tensor, interpolation: str, fill: float) -> tf.Tensor:
    """`transform` with gathers (XLA kernels on every device): the rules of TensorFlow's
    ImageProjectiveTransformV3 with a constant fill, whose transforms here have no perspective
    part. Output pixel (x, y) samples (t0 x + t1 y + t2, t3 x + t4 y + t5); nearest rounds half
    away from zero; bilinear mixes the four neighbours, each outside the image counting as `fill`."""
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    rows, cols = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij")
    t = tf.unstack(transforms[:, :6, None, None], 6, axis=1)
    x = t[0] * cols + t[1] * rows + t[2]  # (B, H, W), summed in the kernel's order
    y = t[3] * cols + t[4] * rows + t[5]
    flat = tf.reshape(images, [-1, images.shape[-1]])
    base = tf.range(batch)[:, None, None] * height * width

    def read(row: tf.Tensor, col: tf.Tensor) -> tf.Tensor:
        """images at integer (row, col) positions (float tensors), `fill` outside."""
        inside = (row >= 0) & (row < tf.cast(height, tf.float32)) & (col >= 0) & (col < tf.cast(width, tf.float32))
        index = base + tf.cast(tf.clip_by_value(row, 0, tf.cast(height - 1, tf.float32)), tf.int32) * width + \
            tf.cast(tf.clip_by_value(col, 0, tf.cast(width - 1, tf.float32)), tf.int32)
        return tf.where(inside[..., None], tf.gather(flat, index), tf.cast(fill, images.dtype))

    if interpolation == "NEAREST":
        away = lambda value: tf.sign(value) * tf.floor(tf.abs(value) + 0.5)  # std::round, not half to even
        out = read(away(y), away(x))
    else:
        x_floor, y_floor = tf.floor(x), tf.floor(y)
        x_ceil, y_ceil = x_floor + 1, y_floor + 1
        weight = lambda value: value[..., None]
        top = weight(x_ceil - x) * read(y_floor, x_floor) + weight(x - x_floor) * read(y_floor, x_ceil)
        bottom = weight(x_ceil - x) * read(y_ceil, x_floor) + weight(x - x_floor) * read(y_ceil, x_ceil)
        out = weight(y_ceil - y) * top + weight(y - y_floor) * bottom
    out.set_shape(images.shape)
    return out


def blur_all(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """`blur` with static shapes: every tile blurred (separably, as sums of five shifted copies
    weighted by its own kernel: elementwise work that XLA fuses on any device, where a depthwise
    convolution with a kernel per tile is slow), the tiles whose sigma is 0 then taken unchanged."""
    safe = tf.where(sigma > 0, sigma, 1.0)
    weights = tf.unstack(tf.nn.softmax(-tf.range(-2.0, 3.0) ** 2 / (2 * safe[:, None] ** 2))[:, None, None, None, :],
                         5, axis=-1)  # five (B, 1, 1, 1) weights, sum 1
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
    rows = tf.add_n([weights[k] * padded[:, k:k + height] for k in range(5)])
    blurred = tf.add_n([weights[k] * rows[:, :, k:k + width] for k in range(5)])
    return tf.where((sigma > 0)[:, None, None, None], blurred, images)


def blur(images: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """A 5 x 5 Gaussian blur (edges reflected) of the tiles whose sigma (B,) is above 0, each with
    its own sigma; only those tiles are touched."""
    chosen = tf.where(sigma > 0)[:, 0]
    offsets = tf.range(-2.0, 3.0)
    weights = tf.nn.softmax(-offsets ** 2 / (2 * tf.gather(sigma, chosen)[:, None] ** 2))  # (n, 5), sum 1
    kernels = tf.tile((weights[:, :, None] * weights[:, None, :])[..., None, None], [1, 1, 1, images.shape[-1], 1])

    def one(index, kernel):
        tile = tf.pad(images[index][None], [[0, 0], [2, 2], [2, 2], [0, 0]], mode="REFLECT")
        return tf.nn.depthwise_conv2d(tile, kernel, [1, 1, 1, 1], "VALID")[0]

    blurred = tf.map_fn(lambda pair: one(*pair), (chosen, kernels), fn_output_signature=tf.TensorSpec(images.shape[1:]))
    return tf.tensor_scatter_nd_update(images, chosen[:, None], blurred)


def jitter_reflectance(deviation: tf.Tensor, valid: tf.Tensor, centre: tf.Tensor, choices: dict[str, tf.Tensor],
                       band_names: list[str], settings: AugmentSettings) -> tf.Tensor:
    """The image in physical units (deviation + centre), ignored pixels 0 (valid: (B, H, W, 1)
    bool), with brightness, contrast and multiplicative noise on the reflectance bands, which stay
    >= 0; NDVI is recomputed from the changed red and NIR so that the bands stay consistent.
    Contrast turns about the mean of the tile's valid pixels."""
    weight = tf.cast(valid, tf.float32)
    reflectance = [i for i, name in enumerate(band_names) if name in REFLECTANCE_BANDS]
    if not reflectance or (settings.brightness == 0 and settings.contrast == 0 and settings.noise == 0):
        return (deviation + centre) * weight
    ndvi = [band_names.index("ndvi")] if {"red", "nir", "ndvi"} <= set(band_names) else []
    rest = [i for i in range(len(band_names)) if i not in reflectance + ndvi]
    # Per tile and band, contrast about the mean m then gain g is an affine map of the deviations:
    # ((d + centre - m) * contrast + m) * gain = d * scale + offset.
    changed = channels(deviation, reflectance)
    shape = tf.shape(changed)
    sums = tf.matmul(tf.reshape(weight, [shape[0], 1, -1]), tf.reshape(changed, [shape[0], -1, len(reflectance)]))
    mean = sums[:, 0] / tf.maximum(tf.reduce_sum(weight, axis=[1, 2, 3]), 1.0)[:, None] + tf.gather(centre, reflectance)
    contrast, gain = choices["contrast"][:, None], choices["gain"][:, None]
    scale = (contrast * gain)[:, None, None, :]
    offset = (((tf.gather(centre, reflectance) - mean) * contrast + mean) * gain)[:, None, None, :]
    # Noise is uniform with standard deviation `noise` (a third of the cost of normal numbers); the
    # weight that zeroes ignored pixels rides on it.
    factor = weight
    if settings.noise > 0:
        half_width = settings.noise * 3 ** 0.5
        draw = lambda seed: 1 - half_width + 2 * half_width * unit_uniform([shape[1], shape[2], len(reflectance)], seed)
        factor = weight * tf.map_fn(draw, choices["noise_seed"], fn_output_signature=tf.float32)
    parts = [tf.maximum((changed * scale + offset) * factor, 0.0)]
    if ndvi:
        red, nir = (channels(parts[0], [reflectance.index(band_names.index(name))]) for name in ("red", "nir"))
        parts.append(tf.math.divide_no_nan(nir - red, nir + red))  # 0 where both are (ignored pixels)
    if rest:
        parts.append((channels(deviation, rest) + tf.gather(centre, rest)) * weight)
    image = tf.concat(parts, axis=-1)
    order = [(reflectance + ndvi + rest).index(i) for i in range(len(band_names))]
    return image if order == list(range(len(band_names))) else channels(image, order)


def channels(images: tf.Tensor, indexes: list[int]) -> tf.Tensor:
    """images[..., indexes]: a slice where the indexes are a run (much cheaper than a gather)."""
    if indexes == list(range(indexes[0], indexes[0] + len(indexes))):
        return images[..., indexes[0]:indexes[0] + len(indexes)]
    return tf.gather(images, indexes, axis=-1)


class AugmentingModel(tf.keras.Model):
    """A functional model whose training step first augments its batch (`augment_batch` with the
    device ops) on the device that trains, per replica under any strategy, and under XLA with the
    rest of the step (--xla). Its batches are (image, label, seeds): tf.data only reads, parses
    and converts. Evaluation and prediction are the plain model's. Its layers and weights are the
    plain model's: checkpoints load into the plain model."""

    def __init__(self, *args, band_names: list[str], settings: AugmentSettings, centre, **kwargs):
        super().__init__(*args, **kwargs)
        self.band_names, self.augment_settings = list(band_names), settings
        self.centre = tf.constant(centre, tf.float32)

    def train_step(self, data):
        image, label, seeds = data
        image, label = augment_batch(image, label, seeds, self.band_names, self.augment_settings, self.centre,
                                     device=True)
        return super().train_step((image, label))
