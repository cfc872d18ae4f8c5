"""Model step, decoder building blocks shared by UNet, UNet++ and DeepLabv3(+).

Every upsampling here is bilinear (``BilinearUpSampling2D``: Keras' ``UpSampling2D`` on a float32
copy of its input, the TensorFlow ops ``ResizeBilinear`` and ``ResizeBilinearGrad``), which XLA
compiles in float32 and under ``mixed_float16``; nearest-neighbour upsampling is avoided because
XLA has no kernel for its gradient ``ResizeNearestNeighborGrad``. (Measured
on CPU with oneDNN, the resizes and their gradients take about 1-2% of a UNet++ training step, so
bilinear upsampling costs nothing worth saving.) The other ops are Conv2D, BatchNormalization
(``FusedBatchNormV3``), ReLU, Concatenate and, in DeepLab's image pooling, a spatial mean.

Dilated (atrous) convolutions are ``AtrousConv2D`` layers: a Keras ``Conv2D`` that, when
TensorFlow's oneDNN CPU kernels are on (TensorFlow's default on CPUs with AVX512-VNNI or AMX, or
``TF_ENABLE_ONEDNN_OPTS=1``), runs as one dilated ``Conv2D`` op instead of ``tf.nn.convolution``'s
SpaceToBatchND + Conv2D + BatchToSpaceND (which Keras uses because TensorFlow's own CPU kernel has
no dilations). Same weights, same results up to float rounding; 3-14x faster forward and backward
for DeepLab's ASPP rates 3, 6, 9 on an 8 x 8 map. Without oneDNN, or in float16, it is the plain
``Conv2D``.
"""

from __future__ import annotations

import tensorflow as tf

layers = tf.keras.layers


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (``TF_ENABLE_ONEDNN_OPTS`` or its default)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without the private switch: keep the default path
        return False


@tf.keras.saving.register_keras_serializable(package="rts_tf")
class AtrousConv2D(layers.Conv2D):
    """``Conv2D`` whose dilated convolution is one native op when oneDNN is on (see the module docstring).

    It has ``Conv2D``'s configuration and weights, so weights move freely between the two.
    """

    def convolution_op(self, inputs, kernel):
        dilated = any(rate != 1 for rate in self.dilation_rate)
        if (dilated and isinstance(self.padding, str) and self.padding != "causal"
                and inputs.dtype in (tf.float32, tf.bfloat16) and onednn_enabled()):
            return tf.nn.conv2d(inputs, kernel, strides=list(self.strides), padding=self.padding.upper(),
                                dilations=list(self.dilation_rate), data_format=self._tf_data_format,
                                name=self.__class__.__name__)
        return super().convolution_op(inputs, kernel)


def conv_bn_relu(x: tf.Tensor, filters: int, name: str, kernel_size: int = 3, dilation_rate: int = 1) -> tf.Tensor:
    """Convolution (no bias), BatchNormalization and ReLU; an ``AtrousConv2D`` when ``dilation_rate`` > 1."""
    conv = AtrousConv2D if dilation_rate != 1 else layers.Conv2D
    x = conv(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


@tf.keras.saving.register_keras_serializable(package="rts_tf")
class BilinearUpSampling2D(layers.UpSampling2D):
    """Bilinear ``UpSampling2D`` that resizes in float32 and returns the layer's compute dtype.

    Under ``mixed_float16`` the stock layer resizes float16 activations (``ResizeBilinear`` returns
    float32) and its gradient is ``ResizeBilinearGrad`` of a float16 image, which XLA's lowering
    turns into a float32 value feeding the float16 gradient of the ReLU before it: compiling the
    train step then fails ("Seen floating point types of different precisions ... mixed precision
    is disallowed"). Resizing a float32 copy makes that gradient float32 throughout, followed by a
    plain cast. The forward values are the stock layer's (it computes in float32 anyway), and in
    float32 the layer is the stock one; it has no weights, so models with either layer exchange them.
    """

    def call(self, inputs):
        resized = super().call(tf.cast(inputs, tf.float32))
        return tf.cast(resized, self.compute_dtype)


def upsample(x: tf.Tensor, factor: int | tuple[int, int], name: str) -> tf.Tensor:
    """Bilinear upsampling by an integer ``factor`` (or per-axis factors), in float32 (see ``BilinearUpSampling2D``)."""
    return BilinearUpSampling2D(size=factor, interpolation="bilinear", name=name)(x)


def decoder_block(x: tf.Tensor, skips: list[tf.Tensor], filters: int, name: str) -> tf.Tensor:
    """Upsample ``x`` by 2, concatenate the ``skips`` of that size, then two 3x3 conv-BN-ReLU."""
    x = upsample(x, 2, name=f"{name}_upsample")
    if skips:
        x = layers.Concatenate(name=f"{name}_concat")([x, *skips])
    x = conv_bn_relu(x, filters, name=f"{name}_1")
    return conv_bn_relu(x, filters, name=f"{name}_2")


def segmentation_head(x: tf.Tensor, name: str, upsample_factor: int = 1, kernel_size: int = 3) -> tf.Tensor:
    """One-channel convolution to logits (3x3, or 1x1 as in smp's DeepLab heads), bilinear upsampling, sigmoid.

    The sigmoid layer is called ``name``; it runs in float32 so the output stays a float32 probability under the
    ``mixed_float16`` policy.
    """
    x = layers.Conv2D(1, kernel_size, padding="same", name=f"{name}_logits")(x)
    if upsample_factor > 1:
        x = upsample(x, upsample_factor, name=f"{name}_upsample")
    return layers.Activation("sigmoid", dtype="float32", name=name)(x)


def check_decoder_filters(decoder_filters: tuple[int, ...], length: int, architecture: str) -> tuple[int, ...]:
    """Return ``decoder_filters`` as a tuple of ``length`` positive ints or raise ``ValueError``."""
    filters = tuple(int(value) for value in decoder_filters)
    if len(filters) != length or min(filters) < 1:
        raise ValueError(
            f"{architecture} decoder_filters must be {length} positive numbers of filters "
            f"(from the deepest stage to full resolution), got {tuple(decoder_filters)}"
        )
    return filters
