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
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def call(self, inputs):
        mean = tf.constant(self.mean, inputs.dtype)
        std = tf.constant(self.std, inputs.dtype)
        known = tf.reduce_any(tf.not_equal(inputs, 0), axis=-1, keepdims=True)
        return tf.where(known, (inputs - mean) / std, tf.zeros_like(inputs))

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}
