"""Model step, encoder: segmentation-models backbones exposed as a dict of features "P1".."P5".

This is the only module of rts-tf that imports ``segmentation_models``. Every architecture in
``rts_tf.models`` builds its encoder here, and decoders only see the feature dict:
``P<n>`` is the output of the encoder's stage n, at 2**n downsampling (at a 256 px tile, P1 is
128 x 128 and P5 is 8 x 8). P1 to P4 are the skip layers of segmentation-models' own table
(``Backbones.get_feature_layers``, in the order x16, x8, x4, x2) and P5 is the backbone output, so
no decoder ever names a backbone layer.

Output stride (dilated encoders)
--------------------------------
``output_stride`` 16 or 8 (DeepLab) keeps the deepest stage(s) at that resolution, the way
segmentation-models-pytorch's ``make_dilated`` (``replace_strides_with_dilation``) does: every layer
whose output would sit below 1/``output_stride`` gets stride 1, and its convolutions a dilation of
(its original stride) / ``output_stride``: at 16, stage 5 is dilated 2; at 8, stage 4 is dilated 2
and stage 5 is dilated 4. Zero paddings in front of such a convolution grow to (kernel // 2) x
dilation on each side, and strided pooling layers there pool with stride 1 and "same" padding. The
weights do not change shape, so pretrained weights load as they are. ``feature_strides`` gives each
level's downsampling: (2, 4, 8, 16, 16) at output stride 16, (2, 4, 8, 8, 8) at 8.

All backbones of segmentation-models 1.0.1 give exact 2**n feature sizes for tiles that are a
multiple of 32 px (checked at 64, 96 and 256 px), so ``ENCODERS`` holds all of them. Only
``inceptionv3`` needs tiles of at least 96 px (its stem refuses inputs under 75 px).

ImageNet weights for any number of bands
----------------------------------------
ImageNet backbones take 3 channels in R, G, B order; rts-tf inputs have N bands (10 in the paper:
B, G, R, NIR, NDVI, TCVIS x3, relative elevation, slope). ``weights="imagenet"`` works as follows:

1. Build the 3-band backbone and load its ImageNet file from the local Keras cache
   (``$KERAS_HOME/models``, by default ``~/.keras/models``), or from an explicit ``.h5`` path
   given as ``weights``. rts-tf never downloads: a missing file raises ``ValueError`` at once,
   naming the file, the URL to fetch it from and the folder to put it in.
2. Build the N-band backbone with random weights and copy every weight across. Weights whose shape
   depends on the input channel count are found by comparing shapes (not layer names): for the
   ResNet family the input BatchNormalization and the first convolution, for the others the first
   convolution. Their channels are mapped:

   * the pretrained R, G, B channels go to the bands at ``rgb_bands`` (default ``(2, 1, 0)``,
     where R, G, B sit in the rts-tf band order). The VGG encoders were trained on B, G, R input
     (Caffe's order; ``pretrained_channel_order`` reads it from segmentation-models' own
     preprocessing function of each encoder), so their first filters' channels 0, 1, 2 go to the
     B, G and R bands;
   * every other band gets the mean of the R, G, B slices;
   * kernels that sum over channels (convolutions) are then multiplied by 3 / N, so the first
     activation keeps the magnitude it had with 3 ImageNet channels;
   * per-channel parameters (BatchNormalization beta and gamma) are not scaled, and the moving
     mean and variance of such an input BatchNormalization are reset to 0 and 1, because the
     ImageNet statistics describe 0-255 pixels while rts-tf feeds bands already normalised.

   The rest of the network is copied unchanged.

Downloaded files are used as they are: their checksum is not verified, so a file prepared on
another machine (or a fine-tuned 3-band backbone saved with ``save_weights``) works too.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rts_tf.bands import BAND_NAMES, rgb_indexes  # noqa: E402

with contextlib.redirect_stdout(io.StringIO()):
    # segmentation-models announces its framework on stdout at import; library code stays quiet.
    import segmentation_models  # noqa: E402

ENCODERS: list[str] = sorted(segmentation_models.Backbones.models_names())
FEATURE_LEVELS: tuple[str, ...] = ("P1", "P2", "P3", "P4", "P5")
OUTPUT_STRIDES: tuple[int, ...] = (32, 16, 8)
DEFAULT_RGB_BANDS: tuple[int, int, int] = rgb_indexes(BAND_NAMES)  # (2, 1, 0): R, G, B of B, G, R, NIR, ...


def keras_cache_dir() -> Path:
    """Folder where pretrained weight files are looked up: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models"


def check_encoder_name(name: str) -> None:
    """Raise ``ValueError`` listing the choices when ``name`` is not a known encoder."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")


def pretrained_channel_order(name: str) -> str:
    """"BGR" for encoders whose ImageNet weights take B, G, R input (VGG, Caffe's order), else "RGB".

    Read from segmentation-models' preprocessing of the encoder: which channel the input's blue
    channel (the third of an RGB image) ends up in.
    """
    check_encoder_name(name)
    preprocess = segmentation_models.get_preprocessing(name)
    black = preprocess(np.zeros((1, 1, 1, 3), "float32"))
    blue = preprocess(np.array([[[[0.0, 0.0, 200.0]]]], "float32"))
    changed = np.flatnonzero(np.abs(np.asarray(blue) - np.asarray(black)).reshape(-1) > 1e-6)
    return "BGR" if changed.tolist() == [0] else "RGB"


def feature_strides(output_stride: int = 32) -> dict[str, int]:
    """Downsampling of each feature level ``P1``..``P5`` of an encoder at ``output_stride``."""
    return {level: min(2 ** int(level[1:]), output_stride) for level in FEATURE_LEVELS}


def build_encoder(
    name: str,
    input_shape: tuple[int, int, int],
    weights: str | os.PathLike | None = None,
    rgb_bands: tuple[int, int, int] = DEFAULT_RGB_BANDS,
    output_stride: int = 32,
) -> tf.keras.Model:
    """Build backbone ``name`` for ``input_shape`` as a model returning the dict ``P1``..``P5``.

    ``weights`` is None (random initialisation), ``"imagenet"`` (from the local Keras cache) or
    the path of an ``.h5`` weight file of the 3-band backbone; pretrained weights are adapted to
    any band count as described in the module docstring, with R, G, B at ``rgb_bands``.
    ``output_stride`` 16 or 8 dilates the deepest stages instead of downsampling them (see the
    module docstring); ``feature_strides(output_stride)`` gives the levels' downsampling.
    """
    check_encoder_name(name)
    if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
        raise ValueError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    height, width, num_bands = (int(size) for size in input_shape)
    if weights is None:
        backbone = _backbone(name, (height, width, num_bands))
    else:
        _check_rgb_bands(rgb_bands, num_bands)
        pretrained = _pretrained_backbone(name, (height, width, 3), weights)
        backbone = _backbone(name, (height, width, num_bands))
        # With 3 bands no shape differs, so a 4-band twin tells which weights follow the bands.
        reference = backbone if num_bands != 3 else _backbone(name, (height, width, 4))
        # rgb_bands name the R, G, B bands; the pretrained filters' channels may be B, G, R (VGG).
        channel_bands = tuple(reversed(rgb_bands)) if pretrained_channel_order(name) == "BGR" else tuple(rgb_bands)
        _transfer_weights(pretrained, backbone, reference, channel_bands)
    if output_stride < 32:
        backbone = _dilated(backbone, name, output_stride)

    feature_layers = segmentation_models.Backbones.get_feature_layers(name, n=4)
    outputs = {}
    for level, layer_key in zip(("P4", "P3", "P2", "P1"), feature_layers):
        # The table names a layer, or gives its index where layer names are not stable.
        if isinstance(layer_key, str):
            layer = backbone.get_layer(name=layer_key)
        else:
            layer = backbone.get_layer(index=layer_key)
        outputs[level] = layer.output
    outputs["P5"] = backbone.output
    for level, factor in feature_strides(output_stride).items():
        expected = (height // factor, width // factor)
        if tuple(outputs[level].shape[1:3]) != expected or height % 32 or width % 32:
            raise ValueError(
                f"encoder {name!r} gives {level} of size {tuple(outputs[level].shape[1:3])} for a "
                f"{height}x{width} input at output stride {output_stride}, not {expected}; use a tile size "
                "that is a multiple of 32"
            )
    return tf.keras.Model(backbone.input, {level: outputs[level] for level in FEATURE_LEVELS}, name=f"encoder_{name}")


def _dilated(backbone: tf.keras.Model, name: str, output_stride: int) -> tf.keras.Model:
    """A copy of ``backbone`` (same weights) whose layers below 1/``output_stride`` are dilated, not strided."""
    from rts_tf.models.blocks import AtrousConv2D

    height = int(backbone.input.shape[1])

    def stride_of(layer) -> int | None:
        shape = layer.output.shape
        return height // int(shape[1]) if len(shape) == 4 and shape[1] else None

    consumers: dict[str, list] = {layer.name: [] for layer in backbone.layers}
    for layer in backbone.layers:
        for node in layer.inbound_nodes:
            for inbound in tf.nest.flatten(node.inbound_layers):
                consumers[inbound.name].append(layer)
    convolutions = (tf.keras.layers.Conv2D, tf.keras.layers.DepthwiseConv2D, tf.keras.layers.SeparableConv2D)
    poolings = (tf.keras.layers.MaxPooling2D, tf.keras.layers.AveragePooling2D)

    def dilation_of(layer) -> int:
        stride = stride_of(layer)
        return stride // output_stride if stride and stride > output_stride else 1

    def clone(layer):
        config = layer.get_config()
        dilation = dilation_of(layer)
        if isinstance(layer, convolutions) and dilation > 1:
            config["strides"] = (1, 1)
            if max(config["kernel_size"]) > 1:
                config["dilation_rate"] = (dilation, dilation)
            if type(layer) is tf.keras.layers.Conv2D and max(config["kernel_size"]) > 1:
                return AtrousConv2D.from_config(config)  # one native op with oneDNN (see blocks.py)
        elif isinstance(layer, poolings) and dilation > 1:
            config["strides"] = (1, 1)
            config["padding"] = "same"
        elif isinstance(layer, tf.keras.layers.ZeroPadding2D):
            # The padding in front of a convolution that is now dilated: (kernel // 2) x dilation each side.
            dilated = [user for user in consumers[layer.name]
                       if isinstance(user, convolutions) and dilation_of(user) > 1]
            if dilated:
                kernel, rate = dilated[0].get_config()["kernel_size"], dilation_of(dilated[0])
                config["padding"] = tuple((size // 2 * rate, size // 2 * rate) for size in kernel)
        elif "strides" in config and dilation > 1 and max(tuple(config["strides"])) > 1:
            raise ValueError(f"encoder {name!r} cannot be dilated to output stride {output_stride}: its layer "
                             f"{layer.name!r} ({type(layer).__name__}) downsamples; use output stride 32")
        return layer.__class__.from_config(config)

    dilated = tf.keras.models.clone_model(backbone, clone_function=clone)
    dilated.set_weights(backbone.get_weights())
    return dilated


def imagenet_weights_file(name: str, tile_size: int = 256) -> tuple[str, str, Path]:
    """Return ``(file name, download URL, local path)`` of the ImageNet weights of encoder ``name``.

    Only MobileNet file names depend on ``tile_size``. Builds the 3-band backbone once to ask
    segmentation-models which file it would load; nothing is downloaded.
    """
    check_encoder_name(name)
    utils = _OfflineKerasUtils(name, record_only=True)
    with contextlib.suppress(_WeightFileRequest):
        _backbone(name, (tile_size, tile_size, 3), weights="imagenet", utils=utils)
    if utils.requested is None:
        raise ValueError(f"encoder {name!r} has no ImageNet weight file")
    file_name, url = utils.requested
    return file_name, url, keras_cache_dir() / file_name


def _backbone(name: str, input_shape: tuple[int, int, int], weights: str | None = None, utils=None) -> tf.keras.Model:
    """Build one segmentation-models backbone without its classification top."""
    with warnings.catch_warnings():
        # keras-applications warns about any band count other than 1 or 3; rts-tf expects that.
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        return segmentation_models.Backbones.get_backbone(
            name,
            input_shape=input_shape,
            weights=weights,
            include_top=False,
            # segmentation-models takes the Keras submodules as arguments; pass tf.keras explicitly.
            backend=tf.keras.backend,
            layers=tf.keras.layers,
            models=tf.keras.models,
            utils=utils if utils is not None else tf.keras.utils,
        )


class _WeightFileRequest(Exception):
    """Raised by ``_OfflineKerasUtils.get_file`` when only the requested file name is wanted."""


class _OfflineKerasUtils:
    """``tf.keras.utils`` whose ``get_file`` reads the local Keras cache and never downloads."""

    def __init__(self, encoder_name: str, record_only: bool = False) -> None:
        self.encoder_name = encoder_name
        self.record_only = record_only
        self.requested: tuple[str, str] | None = None

    def __getattr__(self, attribute: str):
        return getattr(tf.keras.utils, attribute)

    def get_file(self, fname: str, origin: str, *args, **kwargs) -> str:
        self.requested = (fname, origin)
        if self.record_only:
            raise _WeightFileRequest(fname)
        path = keras_cache_dir() / fname
        if path.is_file():
            return str(path)
        raise ValueError(
            f"ImageNet weights for encoder {self.encoder_name!r} are not available offline: "
            f"download {origin} on a machine with internet and place it as {path} "
            f"(folder $KERAS_HOME/models, default ~/.keras/models), or pass the path of the .h5 "
            f"file as the encoder weights"
        )


def _pretrained_backbone(name: str, input_shape: tuple[int, int, int], weights: str | os.PathLike) -> tf.keras.Model:
    """The 3-band backbone with ImageNet weights from the cache, or weights from an .h5 file."""
    if str(weights) == "imagenet":
        return _backbone(name, input_shape, weights="imagenet", utils=_OfflineKerasUtils(name))
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"encoder weights {str(weights)!r}: expected None, 'imagenet' or the path of an "
            f"existing .h5 weight file of the 3-band {name} backbone"
        )
    backbone = _backbone(name, input_shape)
    backbone.load_weights(str(path))
    return backbone


def _check_rgb_bands(rgb_bands: tuple[int, int, int], num_bands: int) -> None:
    if num_bands < 3:
        raise ValueError(f"pretrained encoder weights need at least 3 bands (R, G, B), got {num_bands}")
    if len(rgb_bands) != 3 or len(set(rgb_bands)) != 3 or not all(0 <= band < num_bands for band in rgb_bands):
        raise ValueError(
            f"rgb_bands must be three different band indexes in 0..{num_bands - 1} "
            f"(the positions of R, G, B), got {tuple(rgb_bands)}"
        )


def _transfer_weights(
    source: tf.keras.Model,
    target: tf.keras.Model,
    reference: tf.keras.Model,
    channel_bands: tuple[int, int, int],
) -> None:
    """Copy ``source`` (3 bands) into ``target``, adapting the weights whose shape follows the bands.

    ``channel_bands`` are the target bands of the source's channels 0, 1, 2.

    ``reference`` has the same architecture with a band count other than 3 (it is ``target``
    itself unless ``target`` has 3 bands) and shows which weights depend on the band count.
    """
    num_bands = int(target.input.shape[-1])
    if not len(source.layers) == len(target.layers) == len(reference.layers):
        raise RuntimeError("pretrained and target backbones differ in their layers")
    for source_layer, target_layer, reference_layer in zip(source.layers, target.layers, reference.layers):
        if not type(source_layer) is type(target_layer) is type(reference_layer):
            raise RuntimeError(f"pretrained and target backbones differ at layer {target_layer.name!r}")
        source_values = source_layer.get_weights()
        if not source_values:
            continue
        reference_shapes = [value.shape for value in reference_layer.get_weights()]
        adapted = []
        for variable, value, reference_shape in zip(source_layer.weights, source_values, reference_shapes):
            if value.shape == reference_shape:
                adapted.append(value)
                continue
            band_axes = [axis for axis, (a, b) in enumerate(zip(value.shape, reference_shape)) if a != b]
            if len(band_axes) != 1 or value.shape[band_axes[0]] != 3:
                raise RuntimeError(f"cannot adapt weight {variable.name} of shape {value.shape} to {num_bands} bands")
            adapted.append(_adapt_to_bands(value, band_axes[0], num_bands, channel_bands, source_layer, variable.name))
        target_layer.set_weights(adapted)


def _adapt_to_bands(
    value: np.ndarray,
    axis: int,
    num_bands: int,
    channel_bands: tuple[int, int, int],
    layer: tf.keras.layers.Layer,
    variable_name: str,
) -> np.ndarray:
    """Map a 3-channel weight onto ``num_bands`` channels along ``axis``, channel c to band ``channel_bands[c]``."""
    short_name = variable_name.split("/")[-1]
    if isinstance(layer, tf.keras.layers.BatchNormalization) and short_name.startswith("moving_"):
        fill = 0.0 if short_name.startswith("moving_mean") else 1.0
        shape = list(value.shape)
        shape[axis] = num_bands
        return np.full(shape, fill, dtype=value.dtype)
    rgb = np.moveaxis(value, axis, 0)  # (3, ...)
    bands = np.repeat(rgb.mean(axis=0, keepdims=True), num_bands, axis=0)
    for channel, band in enumerate(channel_bands):
        bands[band] = rgb[channel]
    sums_over_channels = value.ndim >= 2 and not isinstance(layer, tf.keras.layers.DepthwiseConv2D)
    if sums_over_channels:
        bands = bands * (3.0 / num_bands)
    return np.moveaxis(bands, 0, axis).astype(value.dtype)
