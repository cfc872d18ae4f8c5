"""rts-tf: map retrogressive thaw slumps with Keras/TensorFlow from aligned multi-source tiles."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, compile: bool = False, trust_model: bool = False):
    """A saved rts-tf model (``model.keras`` of a run or an export) loaded in Keras' safe mode;
    see ``rts_tf.models.load_model``."""
    from rts_tf.models import load_model as load

    return load(path, compile=compile, trust_model=trust_model)


def _register_keras_objects() -> None:
    """Register rts-tf's Keras layers (the input normalisation, the encoders' custom layers), so that
    plain ``tf.keras.models.load_model`` rebuilds a saved rts-tf model."""
    import rts_tf.models  # noqa: F401  (registers at import)


class _AfterKerasImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers rts-tf's layers right after Keras is imported, without importing TensorFlow itself
    at ``import rts_tf`` (the command line sets TensorFlow's options before it imports it, and
    `--help` stays fast)."""

    def find_spec(self, name, path, target=None):
        if name != "keras":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            _register_keras_objects()
        except ImportError:  # an incomplete installation must not break Keras itself; rts-tf's own loader says why
            pass


if "keras" in sys.modules:
    _register_keras_objects()
elif not any(isinstance(finder, _AfterKerasImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterKerasImport())
