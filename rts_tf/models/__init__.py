"""Model step: segmentation models (UNet, UNet++, DeepLabv3, DeepLabv3+) on segmentation-models encoders.

``build_model`` is the one entry point. Every architecture is an encoder from ``encoders.py``
(a dict of features ``P1``..``P5``) plus a decoder function from its own module; the decoder ends
in a float32 sigmoid, so the model maps a (tile, tile, bands) float32 input that is already
normalised to a (tile, tile, 1) float32 probability, also under the ``mixed_float16`` policy.
All decoders upsample bilinearly, so ``compile(jit_compile=True)`` (XLA) has kernels for their
gradients; see each module for the ops it uses.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import zipfile
from pathlib import Path

import tensorflow as tf

from rts_tf.models.deeplab_v3 import deeplab_v3_decoder, deeplab_v3_plus_decoder
from rts_tf.models.encoders import DEFAULT_RGB_BANDS, ENCODERS, build_encoder, check_encoder_name
from rts_tf.models.normalisation import IgnoreAwareNormalization
from rts_tf.models.unet import unet_decoder
from rts_tf.models.unet_plus_plus import unet_plus_plus_decoder

ARCHITECTURES = {
    "unet": unet_decoder,
    "unetpp": unet_plus_plus_decoder,
    "deeplabv3": deeplab_v3_decoder,
    "deeplabv3plus": deeplab_v3_plus_decoder,
}

__all__ = ["ARCHITECTURES", "ENCODERS", "IgnoreAwareNormalization", "build_encoder", "build_model", "load_model"]


def build_model(
    arch: str,
    encoder: str,
    num_bands: int,
    tile_size: int,
    encoder_weights: str | os.PathLike | None = None,
    rgb_bands: tuple[int, int, int] = DEFAULT_RGB_BANDS,
    **options,
) -> tf.keras.Model:
    """Build architecture ``arch`` on encoder ``encoder`` for square tiles of ``num_bands`` bands.

    ``encoder_weights`` is None, ``"imagenet"`` (read from the local Keras cache, never
    downloaded) or the path of a 3-band ``.h5`` weight file; ``rgb_bands`` are the input indexes
    of the R, G, B bands that receive the pretrained RGB filters (2, 1, 0 in the rts-tf band
    order B, G, R, ...). ``options`` go to the decoder, for example ``decoder_filters`` or
    ``deep_supervision`` and ``heads_output`` (unetpp: a (tile, tile, 5) output of the mean and the
    four heads, for training). ``heads_output=False`` is accepted by every architecture. The tile
    size must be a multiple of 32.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    check_encoder_name(encoder)
    decoder = ARCHITECTURES[arch]
    accepted = [name for name in inspect.signature(decoder).parameters if name != "features"]
    if "heads_output" not in accepted and not options.get("heads_output", True):
        del options["heads_output"]  # one output channel is what every other architecture gives
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"architecture {arch!r} has no option {', '.join(unknown)}; its options are: {', '.join(accepted)}"
        )
    if int(num_bands) < 1:
        raise ValueError(f"num_bands must be at least 1, got {num_bands}")
    if int(tile_size) < 32 or int(tile_size) % 32:
        raise ValueError(f"tile_size must be a multiple of 32 (the encoders downsample 32 times), got {tile_size}")

    shape = (int(tile_size), int(tile_size), int(num_bands))
    inputs = tf.keras.Input(shape=shape, dtype="float32", name="image")
    features = build_encoder(encoder, shape, encoder_weights, rgb_bands)(inputs)
    probability = decoder(features, **options)
    return tf.keras.Model(inputs, probability, name=f"{arch}_{encoder}")


def load_model(path: str | os.PathLike, compile: bool = False) -> tf.keras.Model:
    """Load a model saved with ``model.save`` (``.keras`` or ``.h5``).

    Importing this package registers the custom layers of the EfficientNet encoders (``swish``,
    ``FixedDropout``), without which Keras cannot rebuild such a model.

    A ``.keras`` archive is read as Keras reads it (the model from ``config.json``, the variables
    from ``model.weights.h5``), except that the weight file is first extracted: Keras 2.15 reads
    it by seeking inside the zip member, and on Python 3.11 every backward seek rereads the
    member from its start (15 s instead of 0.6 s for a UNet-resnet34).
    """
    path = Path(path)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        return tf.keras.models.load_model(path, compile=compile)
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        if not {"config.json", "model.weights.h5"} <= set(archive.namelist()):
            return tf.keras.models.load_model(path, compile=compile)
        config = json.loads(archive.read("config.json"))
        if not compile:
            config["compile_config"] = None
        model = tf.keras.saving.deserialize_keras_object(config)
        model.load_weights(archive.extract("model.weights.h5", folder))
    return model
