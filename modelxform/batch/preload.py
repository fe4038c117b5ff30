"""What the local pool's fork server imports once, before it forks the workers (batch/local.py):
Keras and TensorFlow, about 2.5 s of CPU that each worker would otherwise spend importing them itself,
and modelxform's modules that a job runs. JAX and matplotlib, where installed, are left out of that import
(keras_io.backend.backend_import), and TensorFlow's objects are frozen out of the
garbage collector's walks before the workers are forked.

Only the import: nothing here starts TensorFlow's runtime (no device query, no op), whose thread pools
a forked child could not use. Each worker sets its own thread counts before its first op (job.py).

The server shares the terminal of the ``batch`` command: TensorFlow's start-up messages (written by its
C++ code straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says) are kept off it by the
capture files.import_keras uses, and Ctrl-C during the import is left to the main process (the server
ignores it from then on anyway; each worker sets its own handler)."""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    from ..keras_io.backend import backend_import, import_before_fork, keras_backend, own_process

    own_process()  # (the server and the workers forked from it are modelxform's own processes)
    # (backend_import, as files.import_keras imports: messages kept off the terminal, no JAX or matplotlib,
    # and the collector paused, then what was imported frozen, which every forked worker inherits: no
    # full collection in a job walks TensorFlow's objects again, nor copies their pages by touching them)
    with backend_import(keras_backend(), silent=lambda exc: True):  # (a worker reports what fails itself)
        import_before_fork()  # (batch/local.py preloads only on TensorFlow)
        # (and what a job runs: modelxform's own modules, once, rather than in each worker's first job)
        from .. import provenance, session  # noqa: F401
        from ..engine import runner  # noqa: F401
        from ..keras_io import archive, files, graph  # noqa: F401
        from . import job  # noqa: F401
        from ..keras_io.backend import library_versions
        library_versions()  # (read once here, for every job's provenance record)
except Exception:  # noqa: BLE001 - the worker imports it again, and reports what fails, itself
    pass
