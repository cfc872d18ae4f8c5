"""rts-tf: map retrogressive thaw slumps with Keras/TensorFlow from aligned multi-source tiles."""

__version__ = "0.1.0"
