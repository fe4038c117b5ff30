"""Export for serving: a TensorFlow SavedModel as Keras's own ``model.export`` writes it, but with each
variable stored once (``keras_io.savedmodel``: Keras stores every weight twice with the TensorFlow backend).

The SavedModel is written atomically: into a temporary folder beside the destination, then renamed into
place, so a crash leaves either no folder or a complete one. It is what TensorFlow Serving, TFLite's
converter and ``tf.saved_model.load`` read. It needs TensorFlow, whatever Keras's backend (under JAX, Keras converts
the model with jax2tf); without TensorFlow, export is refused with a UsageError (exit status 2)::

    from modelxform.export import export_savedmodel
    export_savedmodel(model, "serving/model/1")
    reloaded = tf.saved_model.load("serving/model/1")
    y = reloaded.serve(x)                       # also reloaded.signatures["serving_default"]

A provenance record (the one ``apply`` writes into .keras files) goes to
``assets.extra/modelxform.json``, the folder SavedModel keeps for files its loaders ignore.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

from .errors import ModelFileError

PROVENANCE_PATH = os.path.join("assets.extra", "modelxform.json")


def export_savedmodel(model, directory, *, provenance: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write ``model`` as a TensorFlow SavedModel in ``directory`` (created; atomically).

    ``directory`` must not exist, or be empty; with ``overwrite`` an existing SavedModel folder is
    replaced (the old one is moved aside first and deleted after the new one is in place).
    """
    from .keras_io.backend import require_tensorflow
    from .keras_io.savedmodel import write_saved_model
    require_tensorflow("export")
    dest = pathlib.Path(directory)
    parent = dest.parent if str(dest.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise ModelFileError(f"{dest}: folder {parent} does not exist")
    if dest.exists() and not dest.is_dir():
        raise ModelFileError(f"{dest}: is a file; a SavedModel is a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ModelFileError(f"{dest}: folder exists and is not empty; refusing to overwrite it "
                             "(remove it, or pass --force)")
    try:
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise ModelFileError(f"{dest}: cannot write in {parent}: {exc.strerror or exc}") from None
    try:
        stage = work / "savedmodel"
        try:
            with _quiet():
                write_saved_model(model, str(stage))
        except Exception as exc:  # TensorFlow raises many types here; all mean "this model did not export"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{dest}: cannot export the model as a SavedModel: {first}") from exc
        if provenance is not None:
            extra = stage / PROVENANCE_PATH
            extra.parent.mkdir(parents=True, exist_ok=True)
            extra.write_text(json.dumps(provenance, indent=1, sort_keys=True), encoding="utf-8")
        _make_readable(stage)
        if dest.exists():
            os.rename(dest, work / "previous")
        os.rename(stage, dest)
        _fsync_dir(parent)
    except OSError as exc:
        raise ModelFileError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def read_export_provenance(directory) -> dict | None:
    """The provenance record stored with an exported SavedModel, or None."""
    path = pathlib.Path(directory) / PROVENANCE_PATH
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable provenance record: {exc}") from None


def _make_readable(folder: pathlib.Path) -> None:
    # mkdtemp makes a 0700 folder; a SavedModel is usually read by a server running as another user
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644 & ~mask)


@contextlib.contextmanager
def _quiet():
    """TensorFlow logs each traced function and asset while saving; the user did not ask."""
    from .keras_io.files import _quiet as keras_quiet
    import logging
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        with keras_quiet():
            yield
    finally:
        tf_logger.setLevel(level)


def _fsync_dir(folder: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
