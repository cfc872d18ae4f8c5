"""Model step: segmentation models (UNet, UNet++, DeepLabv3, DeepLabv3+) on segmentation-models encoders.

``build_model`` is the one entry point. Every architecture is an encoder from ``encoders.py``
(a dict of features ``P1``..``P5``) plus a decoder function from its own module; the decoder ends
in a float32 sigmoid, so the model maps a (tile, tile, bands) float32 input that is already
normalised to a (tile, tile, 1) float32 probability, also under the ``mixed_float16`` policy.
All decoders upsample bilinearly (in float32, see ``blocks.BilinearUpSampling2D``), so
``compile(jit_compile=True)`` (XLA) compiles their whole train step, also under ``mixed_float16``;
see each module for the ops it uses.
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
from rts_tf.models.encoders import (
    DEFAULT_RGB_BANDS,
    ENCODERS,
    build_encoder,
    check_encoder_name,
    feature_strides,
)
from rts_tf.models.normalisation import IgnoreAwareNormalization
from rts_tf.models.unet import unet_decoder
from rts_tf.models.unet_plus_plus import unet_plus_plus_decoder

ARCHITECTURES = {
    "unet": unet_decoder,
    "unetpp": unet_plus_plus_decoder,
    "deeplabv3": deeplab_v3_decoder,
    "deeplabv3plus": deeplab_v3_plus_decoder,
}
# Architectures whose encoder runs at an output stride below 32 (dilated last stages), and their default.
DILATED_ARCHITECTURES = ("deeplabv3", "deeplabv3plus")
DEFAULT_OUTPUT_STRIDE = 16

__all__ = ["ARCHITECTURES", "ENCODERS", "IgnoreAwareNormalization", "build_encoder", "build_model", "feature_strides",
           "load_model"]


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
    four heads, for training). ``heads_output=False`` is accepted by every architecture.
    ``output_stride`` (deeplabv3, deeplabv3plus only; 16 by default, or 8) is the downsampling of
    the encoder's last feature, reached with dilated last stages as in DeepLab; UNet and UNet++ use
    the whole downsampling pyramid (32) and refuse the option. The tile size must be a multiple of 32.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    check_encoder_name(encoder)
    decoder = ARCHITECTURES[arch]
    output_stride = 32
    if arch in DILATED_ARCHITECTURES:
        output_stride = options.pop("output_stride", DEFAULT_OUTPUT_STRIDE)
        if output_stride not in (16, 8) or isinstance(output_stride, bool):
            raise ValueError(f"output_stride of {arch} must be 16 or 8, got {output_stride!r}")
    accepted = [name for name in inspect.signature(decoder).parameters if name != "features"]
    if "heads_output" not in accepted and not options.get("heads_output", True):
        del options["heads_output"]  # one output channel is what every other architecture gives
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = accepted + (["output_stride"] if arch in DILATED_ARCHITECTURES else [])
        raise ValueError(
            f"architecture {arch!r} has no option {', '.join(unknown)}; its options are: {', '.join(listed)}"
        )
    if int(num_bands) < 1:
        raise ValueError(f"num_bands must be at least 1, got {num_bands}")
    if int(tile_size) < 32 or int(tile_size) % 32:
        raise ValueError(f"tile_size must be a multiple of 32 (the encoders downsample 32 times), got {tile_size}")

    shape = (int(tile_size), int(tile_size), int(num_bands))
    inputs = tf.keras.Input(shape=shape, dtype="float32", name="image")
    features = build_encoder(encoder, shape, encoder_weights, rgb_bands, output_stride)(inputs)
    probability = decoder(features, **options)
    return tf.keras.Model(inputs, probability, name=f"{arch}_{encoder}")


def load_model(path: str | os.PathLike, compile: bool = False, trust_model: bool = False) -> tf.keras.Model:
    """Load a model saved with ``model.save`` as a ``.keras`` archive, without running code from the file.

    Importing this package registers the custom layers of the EfficientNet encoders (``swish``,
    ``FixedDropout``), without which Keras cannot rebuild such a model.

    A ``.keras`` archive is read as Keras reads it (the model from ``config.json``, the variables
    from ``model.weights.h5``), except that the weight file is first extracted: Keras 2.15 reads
    it by seeking inside the zip member, and on Python 3.11 every backward seek rereads the
    member from its start (15 s instead of 0.6 s for a UNet-resnet34).

    A model file can carry Python code: HDF5 and SavedModel files rebuild Lambda layers from stored
    bytecode with no safe mode, and a ``config.json`` can name any importable module or TensorFlow
    function. So unless ``trust_model``, only a ``.keras`` archive is read, in Keras' safe mode, and
    it is refused (``InputError``) if it names a module outside Keras, rts-tf and the encoder
    packages, holds a Lambda layer, or a layer that calls a TensorFlow function named in the file
    (TFOpLambda). The one exception: the Lambda layers of the SE-ResNet, SE-ResNeXt, ResNeXt and
    SENet encoders get their functions (``expand_dims``, ``slice_tensor``) from the installed
    ``classification_models``, never from the file's bytecode. ``trust_model`` lifts all of this
    and also loads HDF5 and SavedModel files with ``tf.keras.models.load_model``.
    """
    from classification_models.models import _common_blocks
    from keras.src.saving.serialization_lib import SafeModeScope

    from rts_tf.errors import InputError

    path = Path(path)
    refuse = "; give --trust-model to load it anyway (only for a model you trust)"
    members = set()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
    if not {"config.json", "model.weights.h5"} <= members:
        if trust_model:
            return tf.keras.models.load_model(path, compile=compile, safe_mode=False)
        raise InputError(f"{path}: not a .keras model archive (HDF5 and SavedModel files can run code when loaded)"
                         + refuse)
    # The encoders' Lambda layers, known by their module and argument names (see the docstring).
    encoder_functions = {frozenset(("start", "stop", "axis")): _common_blocks.slice_tensor,
                         frozenset(("channels_axis",)): _common_blocks.expand_dims}

    def make_safe(node) -> None:
        """Refuse what would run code from the file; swap the encoders' Lambda bytecode for their functions."""
        if isinstance(node, list):
            for item in node:
                make_safe(item)
        if not isinstance(node, dict):
            return
        kind, inner = node.get("class_name"), node.get("config")
        if kind in ("TFOpLambda", "SlicingOpLambda"):
            raise InputError(f"{path}: the model calls TensorFlow functions named in the file (a {kind} layer), "
                             "which rts-tf models never do" + refuse)
        if kind in ("Lambda", "__lambda__"):
            arguments = inner.get("arguments") if isinstance(inner, dict) else None
            function = encoder_functions.get(frozenset(arguments)) if isinstance(arguments, dict) else None
            if (function is None or inner.get("module") != _common_blocks.__name__
                    or inner.get("function_type") != "lambda" or inner.get("output_shape_type") != "raw"
                    or "mask" in inner or not all(type(value) is int for value in arguments.values())):
                raise InputError(f"{path}: the model holds a Python lambda (a Lambda layer), code that would run "
                                 "when it is loaded" + refuse)
            node["config"] = {**inner, "function": function, "function_type": "raw"}
            return
        module = node.get("module")
        if isinstance(module, str) and module.split(".")[0] not in ("keras", "rts_tf", "efficientnet",
                                                                     "classification_models", "segmentation_models"):
            raise InputError(f"{path}: the model names the Python module {module!r}, which loading would import "
                             "and use; rts-tf models only use Keras, rts-tf and the encoder packages" + refuse)
        for value in node.values():
            make_safe(value)

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        config = json.loads(archive.read("config.json"))
        if not compile:
            config["compile_config"] = None
        if not trust_model:
            make_safe(config)
        # The scope, not only the argument: it also overrides a process-wide enable_unsafe_deserialization().
        with SafeModeScope(not trust_model):
            model = tf.keras.saving.deserialize_keras_object(config, safe_mode=not trust_model)
        model.load_weights(archive.extract("model.weights.h5", folder))
    return model
