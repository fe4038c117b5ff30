"""What the local pool's fork server imports once, before it forks the workers (batch/local.py):
Keras and TensorFlow, about 3 s of CPU that each worker would otherwise spend importing them itself.

Only the import: nothing here starts TensorFlow's runtime (no device query, no op), whose thread pools
a forked child could not use. Each worker sets its own thread counts before its first op (job.py)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
try:
    import keras  # noqa: F401  (the backend Keras picks: batch/local.py preloads only for TensorFlow)
    import tensorflow  # noqa: F401
except ImportError:  # the worker imports (and reports) it itself
    pass
