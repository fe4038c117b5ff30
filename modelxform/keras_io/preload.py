"""What the local pool's fork server imports once, before it forks the workers (batch/local.py):
Keras and TensorFlow, about 3 s of CPU that each worker would otherwise spend importing them itself.

Only the import: nothing here starts TensorFlow's runtime (no device query, no op), whose thread pools
a forked child could not use. Each worker sets its own thread counts before its first op (job.py).

The server shares the terminal of the ``batch`` command: TensorFlow's start-up messages (written by its
C++ code straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says) are kept off it, as
files.import_keras does, and Ctrl-C during the import is left to the main process (the server
ignores it from then on anyway; each worker sets its own handler)."""
import os
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_saved = os.dup(2)
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 2)
try:
    import keras  # noqa: F401  (the backend Keras picks: batch/local.py preloads only for TensorFlow)
    import tensorflow  # noqa: F401
except Exception:  # noqa: BLE001 - the worker imports it again, and reports what fails, itself
    pass
finally:
    os.dup2(_saved, 2)
    os.close(_saved)
    os.close(_null)
