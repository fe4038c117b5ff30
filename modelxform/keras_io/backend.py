"""Which Keras backend this process uses, and the library versions it runs with.

modelxform chooses its backend as every Keras program does: ``KERAS_BACKEND`` when set and not empty,
else the ``"backend"`` key of Keras's config file (``$KERAS_HOME/keras.json``, else
``~/.keras/keras.json``, or ``/tmp/.keras/keras.json`` where the home folder is not writable), else
``tensorflow``. :func:`keras_backend` reads that choice without importing Keras or the backend (the
archive engine, ``check`` and ``fmt`` never import them); once Keras is imported, its own answer counts.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

# The library that each backend is, by its distribution names (the first one installed counts).
BACKEND_DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
    "jax": ("jax",),
    "torch": ("torch",),
    "numpy": ("numpy",),
    "openvino": ("openvino",),
}
# Libraries whose version can differ between the run that made a file and the one that re-makes it
# without changing a byte of the model (the weights and the config do not depend on the backend).
BACKEND_LIBRARIES = frozenset({"backend", "tensorflow", "jax", "jaxlib", "torch", "openvino"})


def keras_home() -> str:
    """The folder Keras reads keras.json from (keras/src/backend/config.py)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return os.path.join(base, ".keras")


def backend_choice() -> tuple[str, str]:
    """(the backend Keras picks or picked, where that choice comes from), without importing Keras."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        try:
            return str(keras.backend.backend()), "the Keras already imported"
        except Exception:  # noqa: BLE001 - a half-imported keras: read the choice as Keras would
            pass
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen, "KERAS_BACKEND"
    path = os.path.expanduser(os.path.join(keras_home(), "keras.json"))
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return "tensorflow", "the default"
    if isinstance(config, dict) and config.get("backend"):
        return str(config["backend"]), path
    return "tensorflow", "the default"


def keras_backend() -> str:
    """The backend Keras uses in this process (see the module's docstring), without importing it."""
    return backend_choice()[0]


def _distribution_version(names) -> str | None:
    from importlib import metadata
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def backend_version(backend: str | None = None) -> str | None:
    """The version of the library behind ``backend`` (default: this process's), or None."""
    backend = backend or keras_backend()
    module = sys.modules.get(backend)
    version = getattr(module, "__version__", None) if module is not None else None
    return str(version) if version else _distribution_version(BACKEND_DISTRIBUTIONS.get(backend, (backend,)))


def library_versions() -> dict | None:
    """What a provenance record says the output was made with: modelxform, Keras, the Keras backend and
    its library's version, numpy and Python — read from the installed distributions' metadata
    (importing Keras and its backend to ask them is what this module avoids). None when Keras is not
    installed. Read once per process and backend (importing importlib.metadata and looking the versions
    up cost 25-35 ms; a batch's fork server reads them before it forks its workers)."""
    refuse_unknown_backend()  # (a record would name a backend no Keras program here could run on)
    versions = _library_versions(keras_backend())
    return dict(versions) if versions is not None else None


@functools.lru_cache(maxsize=None)
def _library_versions(backend: str) -> dict | None:
    from importlib import metadata

    import numpy as np

    from ..version import __version__
    try:
        keras_version = metadata.version("keras")
    except metadata.PackageNotFoundError:
        return None
    return {"modelxform": __version__, "keras": keras_version, "backend": backend,
            backend: backend_version(backend), "numpy": np.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}


def missing_backend_message(exc: ImportError) -> str | None:
    """One line for a Keras import that failed because its backend's library is missing, or None."""
    backend, origin = backend_choice()
    library = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "openvino": "openvino"}.get(backend)
    missing = getattr(exc, "name", None) or ""
    if library is None or missing.split(".")[0] not in (library, "jaxlib" if library == "jax" else library):
        return None
    others = [b for b in ("tensorflow", "jax", "torch") if b != backend and _importable(b)]
    where = {"KERAS_BACKEND": "KERAS_BACKEND", "the default": "Keras's default"}.get(origin, origin)
    hint = (f"; choose an installed one with KERAS_BACKEND={others[0]}" if others
            else "; install it (pip install tensorflow, or jax, or torch)")
    return (f"Keras's backend is {backend} (from {where}), but {library} is not installed"
            f"{hint}")


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def default_tolerance() -> tuple[float, str]:
    """``assert equivalent``'s default tolerance for this process's backend and device, and a few words
    saying which: on a CPU every backend computes in float32 and the same graph gives the same outputs
    to about 1e-6; on a GPU, TensorFlow and JAX run float32 matrix products in TF32 by default (10-bit
    mantissa), and JAX on a TPU in bfloat16 passes, so outputs of a rebuilt graph may move by ~1e-3."""
    backend = keras_backend()
    device = accelerator(backend)
    tolerance = {None: 1e-5, "gpu": 1e-3, "tpu": 1e-2}.get(device, 1e-3)
    return tolerance, f"the default for {backend} on {device.upper() if device else 'CPU'}"


def accelerator(backend: str) -> str | None:
    """"gpu" or "tpu" when the backend computes on one by default, else None (CPU). Keras is imported."""
    try:
        if backend == "jax":
            import jax
            platform = jax.default_backend()
            return None if platform == "cpu" else ("tpu" if platform == "tpu" else "gpu")
        if backend == "torch":
            import torch
            return "gpu" if torch.cuda.is_available() else None
        if backend == "tensorflow":
            import tensorflow as tf
            return "gpu" if tf.config.list_logical_devices("GPU") else None
    except Exception:  # noqa: BLE001 - a backend that cannot say runs where Keras puts it: assume CPU
        return None
    return None


_OWN_PROCESS = False


def own_process() -> None:
    """Say that this process is modelxform's own (the command line, a batch worker): Keras may then be
    kept from importing TensorFlow needlessly on another backend (tensorflow_probe). A program that
    calls the session API in its own process keeps Keras's behaviour."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def owns_process() -> bool:
    return _OWN_PROCESS


# What Keras's import, or its backend's, imports where installed only to offer something modelxform never
# calls: JAX, which ``import tensorflow`` imports for tensorflow.lite's JAX converter (0.5-0.9 s and
# 160 MiB of every start of a command that uses TensorFlow); matplotlib, which keras.visualization imports
# for its image galleries (0.25 s). Left out on the backends listed ("*": all).
UNUSED_EXTRAS = {"jax": ("tensorflow",), "matplotlib": ("*",)}


@contextlib.contextmanager
def keras_import_without_extras(backend: str):
    """Keep UNUSED_EXTRAS out of the import of Keras and ``backend``, in modelxform's own processes
    (own_process). In this block ``import jax`` (say) fails as where it is not installed (None in
    sys.modules, which Python's import system documents for this), and the importer goes on without it
    (both importers above catch ImportError); after it, the module imports as usual. A program that
    calls the session API in its own process keeps Keras's and TensorFlow's imports as they are, as
    does a process that imported the module already."""
    if not _OWN_PROCESS:
        yield
        return
    left_out = [name for name, backends in UNUSED_EXTRAS.items()
                if name not in sys.modules and ("*" in backends or backend in backends)]
    for name in left_out:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in left_out:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextlib.contextmanager
def collector_paused_then_frozen():
    """The cyclic garbage collector paused while Keras and its backend's library import, and what they
    leave behind frozen out of its walks afterwards (gc.freeze), where the block succeeds.

    Importing TensorFlow and Keras creates about half a million long-lived objects, and the collector's
    thresholds make it walk all of them again several times on the way: five full collections, 0.5-1 s
    of a 2-3 s import on the development machine, which find about 2,000 unreachable objects (1-2 MiB,
    mostly the frames and functions of modules' start-up code). Paused, the import does none; the few
    cycles it leaves are frozen with the rest and never freed, the trade Python's gc.freeze
    documentation describes for a process that forks workers. Frozen, the objects are not walked at every
    full collection while a model is built (a tenth of a second each), and a forked worker does not copy
    their pages by touching them. A collector the caller had turned off stays off."""
    import gc
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def import_before_fork() -> None:
    """Import Keras and its backend's library without starting the backend's runtime (no device query,
    no op: TensorFlow's thread pools would not survive a fork). The import a fork server does once for
    the workers it forks (batch/preload.py), inside backend_import."""
    import keras  # noqa: F401
    if keras_backend() == "tensorflow":
        import tensorflow  # noqa: F401
    saving_walk_cached()  # (the workers forked from the server inherit it)


def tensorflow_probe(enabled: bool) -> None:
    """Whether Keras may import TensorFlow when it merely asks whether it is installed.

    On the JAX and torch backends Keras still imports TensorFlow, where it is installed, the first time
    it serialises a model (keras.src.saving.serialization_lib asks ``tf.available`` before checking
    whether a value is a tf.TensorShape): 2.5 s and 400 MiB for nothing, since no value of a model
    built on another backend is one. In modelxform's own processes (own_process) import_keras turns
    that off for the other backends — Keras then behaves as where TensorFlow is not installed, which is
    how modelxform is tested there — and the few things that do need TensorFlow turn it back on: export, and the layers that use it whatever
    the backend (StringLookup, TextVectorization, …: see needs_tensorflow). Uses the private
    ``_available`` of Keras's LazyModule for TensorFlow (tests/test_keras_io.py checks it is there)."""
    if "keras" not in sys.modules:
        return
    from keras.src.utils import module_utils
    handle = module_utils.tensorflow
    if enabled:
        if handle._available is False:
            handle._available = None  # asked again, and TensorFlow imported, on the next question
    elif handle._available is None and "tensorflow" not in sys.modules:
        handle._available = False


def saving_walk_cached() -> None:
    """Let Keras's saving walk keep what it works out once per kind of object, as it means to.

    Saving a model, and loading one through Keras, visits every layer (saving_lib._walk_saveable), and
    each visit asks ``saving_lib.get_attr_skipset`` for the attributes that every layer has (those of a
    throwaway ``Layer()``). The function keeps its answer in Keras's global state for the next visit, but
    under another key than the one it looks under (``saving_attr_skipset_<type>`` written,
    ``saving_attr_skiplist_<type>`` read; Keras 3.15.1 and the releases before it): every visit builds a
    fresh ``Layer()`` and lists its attributes, about 2 ms a layer, a fifth of a structural batch job.
    In modelxform's own processes (own_process) the answer is read back under the key it is written
    under: the same set Keras computes, so the same walk and the same bytes; a Keras that computes it
    anew (say, after ``clear_session``, which empties its global state) is asked again. A program that
    calls the session API in its own process keeps Keras's behaviour. Nothing happens where Keras has
    no such function (another version): tests/test_keras_io.py checks that it is there."""
    if not _OWN_PROCESS or "keras" not in sys.modules:
        return
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving import saving_lib
        compute = saving_lib.get_attr_skipset
    except (ImportError, AttributeError):
        return
    if getattr(compute, "_modelxform_cached", False):
        return

    def get_attr_skipset(obj_type):
        kept = global_state.get_global_attribute(f"saving_attr_skipset_{obj_type}", None)
        return kept if kept is not None else compute(obj_type)

    get_attr_skipset._modelxform_cached = True
    get_attr_skipset.__wrapped__ = compute
    saving_lib.get_attr_skipset = get_attr_skipset


def needs_tensorflow(exc: BaseException) -> bool:
    """Whether ``exc`` is Keras refusing a layer that needs TensorFlow (StringLookup and the like say
    "requires TensorFlow") while TensorFlow is installed but kept from Keras (tensorflow_probe): the
    caller then turns the probe back on and tries again."""
    if "requires TensorFlow" not in str(exc) or "tensorflow" in sys.modules or keras_backend() == "tensorflow":
        return False
    if not _importable("tensorflow"):
        return False
    tensorflow_probe(True)
    return True


@contextlib.contextmanager
def start_up_messages_kept_off(silent=lambda exc: False):
    """File descriptor 2 captured while a backend's library imports and starts: TensorFlow's C++ code
    (absl, oneDNN, CUDA) and JAX's write their start-up messages straight to it, whatever
    TF_CPP_MIN_LOG_LEVEL says, so Python cannot filter them. What was captured is shown if the block
    fails, unless ``silent(exc)`` (the caller says it in one line: a library that is not installed)."""
    import tempfile
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            except BaseException as exc:
                os.dup2(saved, 2)
                if not silent(exc):
                    captured.seek(0)
                    sys.stderr.write(captured.read().decode("utf-8", "replace"))
                raise
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextlib.contextmanager
def backend_import(backend: str, silent=lambda exc: False):
    """How modelxform imports Keras and a backend's library, and starts it: with its start-up messages
    kept off the terminal (start_up_messages_kept_off, ``silent`` as there), without what it would import
    only to offer what modelxform never calls (keras_import_without_extras; in modelxform's own processes),
    and with the garbage collector paused and what the import leaves frozen (collector_paused_then_frozen).
    files.import_keras, require_tensorflow and the batch fork server (batch/preload.py) import through it.
    A backend Keras does not have is a UsageError saying so, before anything is imported (Keras would
    raise a ValueError from inside its import)."""
    if "keras" not in sys.modules:
        refuse_unknown_backend()
    with collector_paused_then_frozen(), start_up_messages_kept_off(silent), keras_import_without_extras(backend):
        yield


def refuse_unknown_backend() -> None:
    """A UsageError (exit 2) where the backend Keras would pick is none it has (unknown_backend_message)."""
    problem = unknown_backend_message()
    if problem is not None:
        from ..errors import UsageError
        raise UsageError(problem)


def unknown_backend_message() -> str | None:
    """One line where the backend Keras would pick (KERAS_BACKEND, keras.json) is none it has, else None."""
    import difflib
    backend, origin = backend_choice()
    if backend in BACKEND_DISTRIBUTIONS:
        return None
    where = {"KERAS_BACKEND": "KERAS_BACKEND", "the default": "Keras's default"}.get(origin, origin)
    guess = [b for b in BACKEND_DISTRIBUTIONS if b == backend.strip().lower()] or \
        difflib.get_close_matches(backend.lower(), list(BACKEND_DISTRIBUTIONS), n=1)
    return (f"Keras's backend is {backend!r} (from {where}), which is not one Keras has"
            + (f" (did you mean {guess[0]!r}?)" if guess else "")
            + f"; it has {', '.join(BACKEND_DISTRIBUTIONS)}")


def require_tensorflow(what: str) -> None:
    """A UsageError (exit 2) saying that ``what`` needs TensorFlow, unless it can be imported (on any
    Keras backend: Keras exports a JAX model through jax2tf, which needs TensorFlow too)."""
    from ..errors import UsageError
    tensorflow_probe(True)
    if "tensorflow" in sys.modules:
        return
    try:
        with backend_import(keras_backend(), silent=lambda exc: isinstance(exc, ImportError)):
            import tensorflow
            tensorflow.config.list_physical_devices()  # (it looks for accelerators, and logs, on first use)
    except ImportError:
        raise UsageError(f"{what} writes a TensorFlow SavedModel and needs TensorFlow, which is not installed "
                         f"(Keras runs on {keras_backend()} here); install tensorflow to export") from None
