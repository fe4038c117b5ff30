"""Put this folder on PYTHONPATH to run Python as if TensorFlow were not installed: `import tensorflow`
(and any tensorflow.* module) fails as it does where the package is absent. tests/test_backends.py
runs modelxform this way under KERAS_BACKEND=jax; child processes inherit it."""
import importlib.abc
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTensorFlow())
