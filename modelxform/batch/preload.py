"""What the local pool's fork server imports once, before it forks the workers (batch/local.py):
Keras and TensorFlow, about 2.5 s of CPU that each worker would otherwise spend importing them itself,
and modelxform's modules that a job runs. JAX and matplotlib, where installed, are left out of that import
(keras_io.backend.keras_import_without_extras), and TensorFlow's objects are frozen out of the
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
    from ..keras_io.backend import (collector_paused_then_frozen, import_before_fork, own_process,
                                    start_up_messages_kept_off)

    # (collector_paused_then_frozen: as files.import_keras does, the collector does not walk what
    # TensorFlow leaves behind while it imports, nor at each full collection in every forked worker,
    # which inherits the frozen objects — nor copies their pages by touching them)
    with collector_paused_then_frozen(), start_up_messages_kept_off(silent=lambda exc: True):
        own_process()  # (the server and the workers forked from it are modelxform's own processes)
        import_before_fork()  # (batch/local.py preloads only on TensorFlow)
        # (and what a job runs: modelxform's own modules, once, rather than in each worker's first job)
        from .. import provenance, session  # noqa: F401
        from ..engine import runner  # noqa: F401
        from ..keras_io import archive, files, graph  # noqa: F401
        from . import job  # noqa: F401
except Exception:  # noqa: BLE001 - the worker imports it again, and reports what fails, itself
    pass
