"""Model step, input normalisation: physical band values -> standardised values, ignored pixels -> 0."""

from __future__ import annotations

import tensorflow as tf


@tf.keras.saving.register_keras_serializable(package="rts_tf")
class IgnoreAwareNormalization(tf.keras.layers.Layer):
    """(x - mean) / std per band, with pixels that are 0 in every band set to 0.

    Records, evaluation and prediction store ignored pixels (cloud, nodata, outside the DEM) as 0
    in every band; standardised as they are they would become about -mean/std (-8 sigma for TCVIS)
    and mix into valid neighbours through the convolutions. Here they become 0, the training mean,
    so they look like "nothing known" to the network, in training and inference alike.

    Under the ``mixed_float16`` policy the layer still standardises in float32 and casts the result
    to float16: Keras would otherwise cast the physical values to float16 first, whose spacing is
    2 between 2048 and 4096 (reflectance x 10000), so that 3001 with mean 3000 and std 1 became 0,
    not 1. Its output has the layer's compute dtype (float16 under that policy), which the network's
    first convolution takes as it is.
    """

    def __init__(self, mean, std, **kwargs):
        # No automatic cast of the input to the compute dtype: call() casts after standardising.
        super().__init__(autocast=False, **kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def call(self, inputs):
        inputs = tf.cast(inputs, tf.float32)
        mean = tf.constant(self.mean, tf.float32)
        std = tf.constant(self.std, tf.float32)
        known = tf.reduce_any(tf.not_equal(inputs, 0), axis=-1, keepdims=True)
        return tf.cast(tf.where(known, (inputs - mean) / std, tf.zeros_like(inputs)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}
