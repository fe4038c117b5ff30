"""Reading and writing model files: loading with safe mode, atomic and reproducible saving.

Loading always uses Keras safe mode unless the user passes --unsafe; saving is atomic: the model is
written to a temporary file in the destination folder and renamed over the destination, so a crash
leaves either the previous file or none, never a truncated one.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import re
import tempfile
import zipfile

from ..errors import ModelFileError, UsageError
from .finetune import LORA_MEMBER, lora_member, restore_lora, unshare_policies

FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}


def model_format(path: str | os.PathLike) -> str:
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"{path}: unknown model format {suffix or '(no extension)'!r}; "
                         "use a .keras or .h5 file name")
    return FORMATS[suffix]


def import_modules(modules) -> None:
    """Import modules that register custom layers (the CLI's --import)."""
    for name in modules or ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure inside user code is reported, not raised
            raise UsageError(f"--import {name}: {type(exc).__name__}: {exc}") from None


def import_keras():
    """Import Keras (and TensorFlow) with TensorFlow's C++ start-up messages about absent GPUs kept
    off the terminal. The messages are written straight to file descriptor 2, so Python cannot
    filter them; they are captured and shown only if the import fails."""
    import sys
    if "keras" in sys.modules:
        import keras
        return keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras
            import tensorflow as tf
            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    # TensorFlow leaves a few hundred thousand long-lived objects behind; keep the collector from
    # walking them again at every full collection while a model is built (a tenth of a second each)
    import gc
    gc.freeze()
    return keras


def check_readable(path: pathlib.Path) -> None:
    """The file exists, is a readable, non-empty file; else a ModelFileError saying which."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a model file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: file is empty")


def _explain_load_error(path: pathlib.Path, exc: Exception) -> str:
    text = str(exc)
    if "Lambda" in text or "safe_mode" in text:
        return (f"{path}: the model contains a Lambda layer (arbitrary Python code), which safe mode "
                "refuses to load; if you trust this file, rerun with --unsafe")
    if "Could not locate" in text or "Unknown layer" in text or "unknown layer" in text.lower():
        first = text.strip().splitlines()[0]
        return (f"{path}: the model uses a custom layer Keras does not know ({first}); "
                "pass --import MODULE for the module that registers it")
    damaged = _explain_weights_error(text) if path.suffix.lower() == ".keras" else None
    if damaged:
        return f"{path}: {damaged}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{path}: cannot load the model: {first}"


# Keras reports weights that do not fit the architecture as "A total of N objects could not be
# loaded. Example error message for object <Dense name=dense_2, built=True>:" followed, after a blank
# line, by the cause (and for a shape mismatch, the whole array); the first line alone names no cause.
_NOT_LOADED = re.compile(r"A total of (\d+) objects? could not be loaded\. Example error message for object "
                         r"<(\w+) name=([^,>]+)[^>]*>:\s*(.*)", re.S)
_SHAPES = re.compile(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))")


def _explain_weights_error(text: str) -> str | None:
    """A one-line cause for the weights member of a .keras archive not fitting or not opening."""
    m = _NOT_LOADED.search(text)
    if m:
        count, cls, name, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        cause = rest.strip().split("\n\n")[0]
        shapes = _SHAPES.search(cause)
        if shapes:
            var = re.search(r"Target variable: <Variable path=([^,\s>]+)", cause)
            cause = (f"{var.group(1) if var else 'a weight'} has shape {shapes.group(2)} in the file, "
                     f"but the model needs {shapes.group(1)}")
        cause = re.sub(rf"^Layer '{re.escape(name)}' ", "", " ".join(cause.split()))
        if len(cause) > 300:
            cause = cause[:300] + "…"
        more = f" (and {count - 1} more layer{'s' if count > 2 else ''})" if count > 1 else ""
        return f"the weights do not fit the model: layer {name!r} ({cls}): {cause}{more}"
    if "Expected a model.weights.h5" in text:
        return "the archive holds no weights (no model.weights.h5)"
    if "Unable to synchronously open file" in text or "file signature not found" in text:
        detail = text.strip().splitlines()[0]
        detail = detail.split("(", 1)[1].rstrip(")") if "(" in detail else detail
        return f"the weights in the archive (model.weights.h5) are not a readable HDF5 file ({detail})"
    return None


def load_model(path: str | os.PathLike, *, unsafe: bool = False, imports=()):
    """Load a .keras or .h5 model with Keras safe mode (unless ``unsafe``), without compiling it."""
    p = pathlib.Path(path)
    fmt = model_format(p)
    check_readable(p)
    # the cheap checks first: a file that is not a model is refused without importing TensorFlow
    if fmt == "keras" and not zipfile.is_zipfile(p):
        raise ModelFileError(f"{p}: not a .keras archive (a .keras file is a zip)")
    if fmt == "keras":
        with zipfile.ZipFile(p) as zf:
            if "config.json" not in zf.namelist():
                raise ModelFileError(f"{p}: the archive has no config.json; it is not a Keras model")
    if fmt == "h5":
        try:
            import h5py
            with h5py.File(p, "r") as f:
                if "model_config" not in f.attrs:
                    raise ModelFileError(f"{p}: this HDF5 file holds no Keras model (no model_config)")
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{p}: not a readable HDF5 file ({exc})") from None
    keras = import_keras()  # before --import modules, which usually import keras themselves
    import_modules(imports)
    # Keras numbers the objects it names by how many of that name this process made before (a second
    # load names a Task's optimizer adam_1, and that name is saved): start from none, so that a file
    # loads into the same names in a batch worker's tenth job as in a fresh process (keras.src.utils.
    # naming is private; tests/test_keras_io.py checks it is there)
    from keras.src.utils import naming
    naming.reset_uids()
    try:
        with _quiet():
            if fmt == "keras":
                model = _load_keras_archive(p, safe_mode=not unsafe) or \
                    keras.saving.load_model(p, compile=False, safe_mode=not unsafe)
            else:
                model = keras.models.load_model(p, compile=False, safe_mode=not unsafe)
    except ModelFileError:
        raise
    except Exception as exc:  # Keras raises many types here; all mean "this file cannot be loaded"
        raise ModelFileError(_explain_load_error(p, exc)) from exc
    unshare_policies(model)  # so that it can be saved again (a Keras bug, keras_io/finetune.py)
    if fmt == "keras":
        try:
            restore_lora(model, p)  # what Keras's loader zeroes or drops (keras_io/finetune.py)
        except Exception as exc:  # noqa: BLE001 - a member that does not fit this model
            raise ModelFileError(f"{p}: cannot restore the LoRA factors it keeps: {exc}") from exc
    return model


def _load_keras_archive(path: pathlib.Path, safe_mode: bool):
    """Load a .keras file as keras.saving.load_model does (keras.src.saving.saving_lib's
    _load_model_from_fileobj: the model from config.json, then its variables from model.weights.h5), but
    with h5py reading the weights member where it lies in the zip (the archive's byte-range window) rather
    than from a copy in memory: Keras reads the whole member into an io.BytesIO when it thinks the machine
    has room, so the weights are held twice while the model loads (a 108M-parameter model peaks 0.4 GB
    higher), or else extracts it to a temporary file. Returns None, having loaded nothing, where those
    steps are not available (another Keras version) or the archive is not plain (a compressed weights
    member, assets): the caller then uses keras.saving.load_model. tests/test_finetune.py compares both."""
    try:
        from keras.src.saving import saving_lib
        from_config, load_state = saving_lib._model_from_config, saving_lib._load_state
        raise_failure, h5_store = saving_lib._raise_loading_failure, saving_lib.H5IOStore
    except (ImportError, AttributeError):
        return None
    import io

    from .zipmember import Window, member_offset
    with open(path, "rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            names = zf.namelist()
            if "model.weights.h5" not in names or any(n.startswith("assets/") for n in names):
                return None
            info = zf.getinfo("model.weights.h5")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                return None
            config_json = zf.read("config.json").decode("utf-8")
        try:
            start = member_offset(fh, info)
        except Exception:  # noqa: BLE001 - an unusual header: Keras's own loader will say
            return None
        import h5py

        class WindowStore(h5_store):  # H5IOStore takes a path or a BytesIO; this one opens the window
            def __init__(self, window):
                self._window = window
                super().__init__(io.BytesIO(), mode="r")

            def _get_h5_file(self, path_or_io, mode=None):
                return h5py.File(self._window, mode="r")

        model = from_config(config_json, None, False, safe_mode)
        store = WindowStore(Window(fh.fileno(), start, info.file_size))
        failed, messages = set(), {}
        try:
            load_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set(),
                       failed_saveables=failed, error_msgs=messages)
        finally:
            store.close()
        if failed:
            raise_failure(messages)
    return model


@contextlib.contextmanager
def _quiet():
    """Keras prints warnings about absent optimizer state and the like; the user did not ask."""
    import warnings

    from absl import logging as absl_logging  # Keras logs its "legacy HDF5" advice through absl
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


PROVENANCE_MEMBER = "modelxform.json"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def build_time():
    """The time written into outputs: SOURCE_DATE_EPOCH when set (reproducible-builds convention),
    else a fixed date, so that the same inputs give the same bytes."""
    import datetime
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
        if moment.year >= 1980:
            return moment
    return datetime.datetime(1980, 1, 1, tzinfo=datetime.timezone.utc)


def _normalise_keras_archive(path: pathlib.Path, provenance: dict | None, lora: bytes | None = None) -> None:
    """Rewrite a .keras zip so that it depends only on the model: Keras stamps the save time into
    metadata.json and the weights member's zip header. Members keep their order and compression;
    the LoRA factors (``lora``, keras_io/finetune.py) and the provenance record become members of their
    own, which keras.models.load_model ignores."""
    moment = build_time()
    stamp = moment.strftime("%Y-%m-%d@%H:%M:%S")
    date_time = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info.filename)) for info in src.infolist()
                   if info.filename not in (PROVENANCE_MEMBER, LORA_MEMBER)]
    out_path = path.with_name(path.name + ".norm")
    try:
        _write_members(out_path, members, date_time, stamp, provenance, lora)
    except BaseException:
        _unlink(out_path)
        raise
    os.replace(out_path, path)


def _write_keras_archive(model, path: pathlib.Path, provenance: dict | None, lora: bytes | None = None) -> bool:
    """Write ``model`` to ``path`` as a .keras archive in the normalised form at once, without writing
    the archive twice (model.save, then _normalise_keras_archive) and without holding the weights file
    in memory (model.save does, for a model it thinks fits). It takes the steps of
    keras.src.saving.saving_lib.save_model, with one difference: the weights file is written through a
    Python file object on disk beside ``path`` (h5py's fileobj driver, as model.save does into memory),
    then streamed into the zip. So its bytes are the same whatever the machine's free memory, and they
    are those of model.save for a model that fits in memory (model.save writes a larger model through a
    temporary file, with h5py's default driver, which lays the file out differently; so does its
    choice depend on psutil being installed). Returns False, having written nothing, where those steps
    are not available (another Keras version) or the model saves assets (lookup tables and the like):
    the caller then saves with model.save and normalises. tests/test_engine.py compares both ways."""
    import io
    import json
    import shutil
    try:
        import h5py
        import keras
        import numpy as np
        from keras.src.saving import saving_lib
        keras_variable = keras.Variable
        serialize, save_state = saving_lib._serialize_model_as_json, saving_lib._save_state
        h5_store, disk_store = saving_lib.H5IOStore, saving_lib.DiskIOStore
    except (ImportError, AttributeError):
        return False

    class FileStore(h5_store):
        def __init__(self, fileobj):
            self._fileobj = fileobj
            super().__init__(io.BytesIO(), mode="w")  # (the type it accepts for a file object)

        def _get_h5_file(self, path_or_io, mode=None):
            return h5py.File(self._fileobj, mode=mode or self.mode)

        def __setitem__(self, key, value):
            # A large variable is written a block of rows at a time (H5IOStore would make a NumPy copy of
            # the whole array first), into a dataset made and linked as h5py does for a whole array.
            from .variables import is_large, read_variable_rows, row_blocks
            shape, dtype = tuple(getattr(value, "shape", ())), getattr(value, "dtype", None)
            if not (isinstance(value, keras_variable) and is_large(shape, dtype) and str(dtype) != "bfloat16"):
                return super().__setitem__(key, value)
            if not self._h5_entry_initialized:
                self._create_h5_group(self._h5_entry_path)
            np_dtype = np.dtype(str(dtype))
            dataset = self._h5_entry_group.create_dataset(None, shape=shape, dtype=np_dtype)
            for start, stop in row_blocks(shape, np_dtype.itemsize):
                dataset[start:stop] = read_variable_rows(value, start, stop)
            self._h5_entry_group[key] = dataset

    moment = build_time()
    stamp = moment.strftime("%Y-%m-%d@%H:%M:%S")
    date_time = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    with tempfile.TemporaryFile(prefix=f".{path.name}.", dir=path.parent) as weights_file:
        with _quiet():
            config_json, metadata_json = serialize(model)
            weights = FileStore(weights_file)
            assets = disk_store("assets", mode="w")
            try:
                save_state(model, weights_store=weights, assets_store=assets, inner_path="",
                           visited_saveables=set())
                has_assets = any(files for _, _, files in os.walk(assets.working_dir))
            finally:
                weights.close()
                assets.close()
        if has_assets:
            return False
        weights_size = weights_file.seek(0, os.SEEK_END)
        weights_file.seek(0)
        meta = json.loads(metadata_json)
        if "date_saved" in meta:
            meta["date_saved"] = stamp
        with zipfile.ZipFile(path, "w") as dst:
            put = _member_writer(dst, date_time)
            put("metadata.json", json.dumps(meta).encode(), zipfile.ZIP_STORED)
            put("config.json", config_json.encode(), zipfile.ZIP_STORED)
            info = member_info("model.weights.h5", date_time, zipfile.ZIP_STORED)
            info.file_size = weights_size  # what writestr sets before it writes
            with dst.open(info, "w") as out:
                shutil.copyfileobj(weights_file, out, 8 << 20)
            if lora is not None:
                put(LORA_MEMBER, lora, zipfile.ZIP_STORED)
            if provenance is not None:
                put(PROVENANCE_MEMBER, json.dumps(provenance, indent=1, sort_keys=True).encode(),
                    zipfile.ZIP_DEFLATED)
    return True


def member_info(name: str, date_time, compress) -> zipfile.ZipInfo:
    """The zip header of a member of a normalised archive: fixed time, owner-writable file."""
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def _member_writer(dst: zipfile.ZipFile, date_time):
    def put(name, data, compress):
        dst.writestr(member_info(name, date_time, compress), data)
    return put


def _write_members(out_path, members, date_time, stamp, provenance, lora=None) -> None:
    import json
    with zipfile.ZipFile(out_path, "w") as dst:
        put = _member_writer(dst, date_time)
        for info, data in members:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                if "date_saved" in meta:
                    meta["date_saved"] = stamp
                data = json.dumps(meta).encode()
            put(info.filename, data, info.compress_type)
        if lora is not None:
            put(LORA_MEMBER, lora, zipfile.ZIP_STORED)
        if provenance is not None:
            put(PROVENANCE_MEMBER, json.dumps(provenance, indent=1, sort_keys=True).encode(), zipfile.ZIP_DEFLATED)


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    return p.with_name(p.stem + ".provenance.json")


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance record of a model file written by modelxform, or None."""
    import json
    p = pathlib.Path(path)
    try:
        if model_format(p) == "keras":
            if not zipfile.is_zipfile(p):
                return None
            with zipfile.ZipFile(p) as zf:
                if PROVENANCE_MEMBER not in zf.namelist():
                    return None
                return json.loads(zf.read(PROVENANCE_MEMBER))
        side = sidecar_path(p)
        return json.loads(side.read_text()) if side.is_file() else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{p}: unreadable provenance record: {exc}") from None


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model, path: str | os.PathLike, provenance: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename).

    A .keras output is byte-reproducible (see _normalise_keras_archive) and carries ``provenance`` as
    the member modelxform.json; an .h5 output gets it in a sidecar OUT.provenance.json.
    """
    dest = pathlib.Path(path)
    fmt = model_format(dest)

    unshare_policies(model)
    lora = lora_member(model)
    if lora is not None and fmt != "keras":
        raise ModelFileError(f"{dest}: the model has LoRA adapters, whose factors modelxform keeps only in a "
                             ".keras file (an .h5 file would hold the merged kernels, factors zeroed)")

    def write(tmp: pathlib.Path) -> None:
        if fmt == "keras" and _write_keras_archive(model, tmp, provenance, lora):
            return
        with _quiet():
            model.save(tmp)
        if fmt == "keras":
            _normalise_keras_archive(tmp, provenance, lora)
        elif provenance is not None:
            _write_sidecar(dest, provenance)
    write_atomically(dest, write, failure="cannot save the model")


def write_atomically(dest: pathlib.Path, write, failure: str | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``dest``, then sync and rename it over ``dest``.

    A crash leaves the previous ``dest`` or none, never a truncated one; any failure removes the
    temporary file. OSErrors become ModelFileError; other exceptions do too when ``failure`` names what
    was being done, else they propagate (the fast path falls back to Keras on them).
    """
    folder = dest.parent if str(dest.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"{dest}: folder {folder} does not exist")
    if dest.is_dir():
        raise ModelFileError(f"{dest}: is a directory")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=dest.suffix, dir=folder)
    except OSError as exc:
        raise ModelFileError(f"{dest}: cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dest)
        _fsync_dir(folder)
    except ModelFileError:
        _unlink(tmp)
        raise
    except OSError as exc:
        _unlink(tmp)
        raise ModelFileError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    except Exception as exc:
        _unlink(tmp)
        if failure is None:
            raise
        raise ModelFileError(f"{dest}: {failure}: {exc}") from exc
    except BaseException:
        _unlink(tmp)
        raise


def _write_sidecar(dest: pathlib.Path, provenance: dict) -> None:
    import json
    side = sidecar_path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", dir=side.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(provenance, fh, indent=1, sort_keys=True)
        os.replace(tmp, side)
    except BaseException:
        _unlink(pathlib.Path(tmp))
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_dir(folder: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def working_copy(model):
    """A copy of an in-memory ``model`` that a run may change freely (the caller's model is never
    touched): rebuilt from its config with its weights, or — a subclassed model, which has no config
    of its layers — saved and loaded."""
    import keras

    from .finetune import copy_lora_structure
    from .graph import transfer_weights
    from .layers import model_kind, walk
    if model_kind(model) != "subclassed":
        config = keras.saving.serialize_keras_object(model)
        clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
        source = walk(model)
        copy_lora_structure(source, clone)  # a config rebuilds sublayers without their LoRA
        transfer_weights(source, clone, {}, 0)
        return clone
    with tempfile.TemporaryDirectory(prefix="modelxform-") as tmp:
        path = os.path.join(tmp, "copy.keras")
        save_model(model, path)
        return load_model(path)
