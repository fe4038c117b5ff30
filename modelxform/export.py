"""Export for serving: a TensorFlow SavedModel as Keras's own ``model.export`` writes it, but with each
variable stored once (``keras_io.savedmodel``: Keras stores every weight twice with the TensorFlow backend).

The SavedModel is written atomically: into a temporary folder beside the destination, then renamed into
place, so a crash leaves either no folder or a complete one. It is what TensorFlow Serving, TFLite's
converter and ``tf.saved_model.load`` read. It needs TensorFlow, whatever Keras's backend (under JAX, Keras converts
the model with jax2tf); without TensorFlow, export is refused with a UsageError (exit status 2)::

    from modelxform.export import export_savedmodel
    export_savedmodel(model, "serving/model/1")  # (serving/model is made if missing)
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

from .errors import ModelFileError, UsageError

PROVENANCE_PATH = os.path.join("assets.extra", "modelxform.json")


def check_export_destination(directory, *, overwrite: bool = False, inputs=(),
                             force_option: str | None = None) -> pathlib.Path:
    """The checks of a SavedModel folder ``directory`` that come before any work (export_savedmodel makes
    them again): a UsageError (exit 2) when it is one of ``inputs`` (the model files read) or, to be
    replaced (``overwrite``), holds one (a symbolic or hard link to it included: replacing the folder
    deletes what it holds); a ModelFileError (exit 3) when it is a file, a folder that is not empty (unless
    ``overwrite``; ``force_option``: the option that allows it, named in the remedy), or cannot be made
    (its nearest existing parent is not a folder or cannot be written, a name is too long; missing
    parents are made, as ``mkdir -p`` does, since TensorFlow Serving's layout is MODEL/VERSION).
    Imports no TensorFlow. Returns the folder the SavedModel's parent is, or will be."""
    from .keras_io.outputs import check_output_folder, refuse_overwriting_inputs
    dest = pathlib.Path(directory)
    refuse_overwriting_inputs("DIR", dest, [(path, "the input model") for path in inputs])
    parent = check_output_folder(dest, create=True)
    if dest.exists() and not dest.is_dir():
        raise ModelFileError(f"{dest}: is a file; a SavedModel is a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            remedy = f"remove it, or pass {force_option}" if force_option else "remove it, or choose another folder"
            raise ModelFileError(f"{dest}: folder exists and is not empty; refusing to overwrite it ({remedy})")
        for path in inputs:
            held = _held_in(dest, path)
            if held is not None:
                raise UsageError(f"{force_option or 'overwrite'} {dest}: the folder holds the input model "
                                 f"{held}; refusing to replace it (export to another folder)")
    return parent


def _held_in(folder: pathlib.Path, model) -> str | None:
    """Where the folder (or a folder inside it) holds the file ``model``: under its real path, or as a hard
    link to it (symbolic links inside are not followed: replacing the folder deletes them, not what they
    point to). None when it does not."""
    try:
        real_folder, real_model = os.path.realpath(folder), os.path.realpath(model)
        st = os.stat(model)
    except (OSError, ValueError):
        return None
    if os.path.commonpath([real_folder, real_model]) == real_folder:
        return os.fspath(model)
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                other = os.lstat(path)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return path
    return None


def export_savedmodel(model, directory, *, provenance: dict | None = None, overwrite: bool = False,
                      inputs=(), force_option: str | None = None) -> pathlib.Path:
    """Write ``model`` as a TensorFlow SavedModel in ``directory`` (created, with its missing parents;
    atomically).

    ``directory`` must not exist, or be empty; with ``overwrite`` an existing SavedModel folder is
    replaced (the old one is moved aside first and deleted after the new one is in place), unless it
    holds one of ``inputs``, the model files this export read (check_export_destination).
    """
    from .keras_io.backend import require_tensorflow
    from .keras_io.savedmodel import write_saved_model
    dest = pathlib.Path(directory)
    check_export_destination(dest, overwrite=overwrite, inputs=inputs, force_option=force_option)
    require_tensorflow("export")
    from .keras_io.outputs import fsync_folder, temp_stem
    made = _make_parents(dest)
    parent = dest.parent
    try:
        stem = temp_stem(dest.name, parent, len("..XXXXXXXX.tmp"))
        try:
            work = pathlib.Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=parent))
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
            fsync_folder(parent)
        except OSError as exc:
            raise ModelFileError(f"{dest}: cannot write: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        for folder in made:  # (deepest first: what this export made, and nothing else, goes)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return dest


def _make_parents(dest: pathlib.Path) -> list[pathlib.Path]:
    """Make the missing folders above ``dest`` (as mkdir -p); returns those this call made, deepest first
    (for the caller to remove should the export fail)."""
    missing = []
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made: list[pathlib.Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # (made meanwhile by someone else: theirs)
        except OSError as exc:
            for done in made:
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise ModelFileError(f"{dest}: cannot make the folder {folder}: {exc.strerror or exc}") from None
        made.insert(0, folder)
    return made


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
