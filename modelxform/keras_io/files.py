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
import time
import zipfile

from ..errors import ModelFileError, UsageError
from .finetune import LORA_MEMBER, lora_member, restore_lora, unshare_policies
from .outputs import check_output_folder, fsync_folder, same_file, temp_stem  # noqa: F401  (same_file: used by session)

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
    """Import Keras with its backend's start-up messages kept off the terminal (TensorFlow's C++
    messages about absent GPUs, JAX's about absent TPUs): they are written straight to file descriptor
    2, so Python cannot filter them; they are captured and shown only if the import fails. The backend
    is the one Keras picks (KERAS_BACKEND, else keras.json; keras_io.backend); TensorFlow is imported
    only when it is that backend. A backend that is not installed is a UsageError saying which."""
    import sys
    if "keras" in sys.modules:
        import keras

        from .backend import saving_walk_cached
        saving_walk_cached()
        return keras
    from .backend import backend_import, keras_backend, missing_backend_message
    backend = keras_backend()

    def missing(exc) -> bool:
        return isinstance(exc, ImportError) and missing_backend_message(exc) is not None
    try:
        with backend_import(backend, silent=missing):
            import keras
            if backend == "tensorflow":
                import tensorflow as tf
                tf.config.list_physical_devices()
            elif backend == "jax":
                import jax
                jax.devices()  # (JAX looks for accelerators, and logs about it, on first use)
    except ImportError as exc:
        message = missing_backend_message(exc)
        if message is None:
            raise
        for name in [m for m in sys.modules if m == "keras" or m.startswith("keras.")]:
            del sys.modules[name]  # half imported: let a later import fail the same way
        raise UsageError(message) from None
    from .backend import owns_process, saving_walk_cached, tensorflow_probe
    if backend != "tensorflow" and owns_process():
        tensorflow_probe(False)  # (Keras would import TensorFlow, where installed, to serialise a model)
    saving_walk_cached()
    return keras


def check_readable(path: pathlib.Path) -> None:
    """The file exists, is a readable, non-empty file; else a ModelFileError saying which."""
    import stat
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{path}: is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        from ..lang.files import file_kind
        raise ModelFileError(f"{path}: is {file_kind(st.st_mode)}, not a model file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"{path}: permission denied")
    if st.st_size == 0:
        raise ModelFileError(f"{path}: file is empty")


# What Keras says when its safe mode refuses to load something (keras/src/saving/serialization_lib.py and
# the layers' from_config), and how modelxform names it. safety.unsafe_content finds these in the config
# before Keras reads it; this is the fallback should Keras refuse something that check missed.
_SAFE_MODE_REFUSALS = (
    ("deserialization of a `Lambda` layer", "a Lambda layer whose function is Python code"),
    ("deserialization of a Python lambda", "a serialized Python lambda"),
    ("deserialization of a `TFSMLayer`", "a TFSMLayer, which loads an external SavedModel"),
    ("deserialization of a `torch.nn.Module`", "a TorchModuleWrapper holding a pickled torch module"),
    ("loading of a vocabulary file outside of the model archive",
     "a lookup layer that reads its vocabulary from a file outside the archive"),
    ("`safe_mode=False`", "Python code or a reference to an outside file"),
)


def _explain_load_error(path: pathlib.Path, exc: Exception) -> str:
    from .safety import refusal
    text = str(exc)
    for marker, what in _SAFE_MODE_REFUSALS:  # Keras's own words when its safe mode refuses something
        if marker in text:
            return refusal(path, what)
    if "Exception encountered:" in text:  # a model's from_config wraps the layer's error: the cause is inside
        text = text.rsplit("Exception encountered:", 1)[1]
    if "Could not locate" in text or "Unknown layer" in text or "unknown layer" in text.lower():
        first = _clip(text.strip().splitlines()[0])
        return (f"{path}: the model uses a custom layer (or function) Keras does not know ({first}); "
                "pass --import MODULE for the module that registers it")
    damaged = _explain_weights_error(text) if path.suffix.lower() == ".keras" else None
    if damaged:
        return f"{path}: {damaged}"
    first = _clip(text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    return f"{path}: cannot load the model: {first}"


def _clip(text: str, limit: int = 300) -> str:
    """Keras's messages can quote a whole config: one line, and not all of it."""
    return text if len(text) <= limit else text[:limit] + "…"


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


def read_config(p: pathlib.Path, fmt: str, *, unsafe: bool = False):
    """The model config a .keras or .h5 file holds, read within the limits of safety.py and refused
    when it holds what Keras safe mode refuses (unless ``unsafe``); ModelFileError for a file that is
    not a model. Reads no weights and imports no TensorFlow."""
    from . import safety
    if fmt == "keras":
        try:
            if not zipfile.is_zipfile(p):
                raise ModelFileError(f"{p}: not a .keras archive (a .keras file is a zip)")
            with zipfile.ZipFile(p) as zf:
                safety.check_archive(zf, p)
                if safety.CONFIG_MEMBER not in zf.namelist():
                    raise ModelFileError(f"{p}: the archive has no config.json; it is not a Keras model")
                config = safety.read_json_member(zf, safety.CONFIG_MEMBER, p)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelFileError(f"{p}: not a readable .keras archive ({str(exc)[:200]})") from None
    else:
        try:
            import h5py
            with h5py.File(p, "r") as f:
                text = safety.read_h5_attribute(f, "model_config", p, "the model config")
                if text is None:
                    raise ModelFileError(f"{p}: this HDF5 file holds no Keras model (no model_config)")
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{p}: not a readable HDF5 file ({str(exc)[:200]})") from None
        config = safety.parse_json(text, p, "the model config")
    safety.check_safe(config, p, unsafe=unsafe)
    return config


def check_model_file(path: str | os.PathLike, *, unsafe: bool = False) -> tuple[pathlib.Path, str]:
    """The cheap checks load_model makes first, for commands to make on every model they will read before
    they load any (``diff A B``, ``export``): a .keras or .h5 name, a readable regular file that is not
    empty, a model's config (safety.py: what safe mode refuses is refused, unless ``unsafe``). A file that
    is not a model is so refused without importing TensorFlow. Returns the path and its format."""
    p = pathlib.Path(path)
    fmt = model_format(p)
    check_readable(p)
    read_config(p, fmt, unsafe=unsafe)
    return p, fmt


def load_model(path: str | os.PathLike, *, unsafe: bool = False, imports=()):
    """Load a .keras or .h5 model with Keras safe mode (unless ``unsafe``), without compiling it."""
    p, fmt = check_model_file(path, unsafe=unsafe)
    keras = import_keras()  # before --import modules, which usually import keras themselves
    import_modules(imports)
    # Keras numbers the objects it names by how many of that name this process made before (a second
    # load names a Task's optimizer adam_1, and that name is saved): start from none, so that a file
    # loads into the same names in a batch worker's tenth job as in a fresh process (keras.src.utils.
    # naming is private; tests/test_keras_io.py checks it is there)
    from keras.src.utils import naming
    from .backend import needs_tensorflow
    model = None
    for attempt in (1, 2):
        naming.reset_uids()
        try:
            with _quiet(), _lower_case_suffix(p) as readable:
                if fmt == "keras":
                    model = _load_keras_archive(readable, safe_mode=not unsafe) or \
                        keras.saving.load_model(readable, compile=False, safe_mode=not unsafe)
                else:
                    model = keras.models.load_model(readable, compile=False, safe_mode=not unsafe)
            break
        except ModelFileError:
            raise
        except Exception as exc:  # Keras raises many types here; all mean "this file cannot be loaded"
            if attempt == 1 and needs_tensorflow(exc):
                continue  # a layer that needs TensorFlow whatever the backend: let Keras import it
            raise ModelFileError(_explain_load_error(p, exc)) from exc
    unshare_policies(model)  # so that it can be saved again (a Keras bug, keras_io/finetune.py)
    if fmt == "keras":
        try:
            restore_lora(model, p)  # what Keras's loader zeroes or drops (keras_io/finetune.py)
        except Exception as exc:  # noqa: BLE001 - a member that does not fit this model
            raise ModelFileError(f"{p}: cannot restore the LoRA factors it keeps: {exc}") from exc
    return model


@contextlib.contextmanager
def _lower_case_suffix(p: pathlib.Path):
    """``p``, or where its suffix is not lower case (OUT.H5), a symbolic link to it that has one: Keras
    tells formats apart by lower-case suffixes only."""
    if p.suffix == p.suffix.lower():
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="modelxform-") as folder:
        link = pathlib.Path(folder) / ("model" + p.suffix.lower())
        link.symlink_to(p.resolve())
        yield link


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


from .safety import PROVENANCE_MEMBER  # noqa: E402  (the member holding the record)
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
    Python file object (h5py's fileobj driver, as model.save does into memory): in place, where the
    member's bytes go inside the zip (streams.FileWindow), or, where its size cannot be bounded
    beforehand or zipfile's internals differ, into a file beside ``path`` then copied in. So its bytes are the same whatever the machine's free memory, and they
    are those of model.save for a model that fits in memory (model.save writes a larger model through a
    temporary file, with h5py's default driver, which lays the file out differently; so does its
    choice depend on psutil being installed). Returns False, having written nothing, where those steps
    are not available (another Keras version) or the model saves assets (lookup tables and the like):
    the caller then saves with model.save and normalises. tests/test_engine.py compares both ways."""
    import io
    import json
    import shutil

    from .streams import WRITE_PIECE
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
    with _quiet():
        config_json, metadata_json = serialize(model)
    meta = json.loads(metadata_json)
    if "date_saved" in meta:
        meta["date_saved"] = stamp

    def save_weights(fileobj) -> bool:
        """Keras's weights file into ``fileobj``; False where the model saves assets."""
        with _quiet():
            weights = FileStore(fileobj)
            assets = disk_store("assets", mode="w")
            try:
                save_state(model, weights_store=weights, assets_store=assets, inner_path="",
                           visited_saveables=set())
                return not any(files for _, _, files in os.walk(assets.working_dir))
            finally:
                weights.close()
                assets.close()

    size_hint = _weights_file_size_hint(model)
    saved = True
    writeback = None
    with open(path, "w+b") as raw:
        with zipfile.ZipFile(raw, "w") as dst:
            put = _member_writer(dst, date_time)
            put("metadata.json", json.dumps(meta).encode(), zipfile.ZIP_STORED)
            put("config.json", config_json.encode(), zipfile.ZIP_STORED)
            info = member_info("model.weights.h5", date_time, zipfile.ZIP_STORED)
            if size_hint is not None:
                # Written in place: h5py writes the weights file straight into the zip, where the member's
                # bytes go (no second copy of a 2 GB file); its size is known within bounds that decide the
                # member's header the same way (zip64 or not) as its exact size would.
                info.file_size = size_hint
                with dst.open(info, "w") as out:
                    if member_writer_settable(out):
                        from .streams import FileWindow, Writeback, crc_of_range, preallocate
                        dst.fp.flush()
                        base = dst.fp.tell()
                        preallocate(dst.fp.fileno(), base, size_hint)
                        writeback = Writeback(dst.fp.fileno(), size_hint)  # (disk writes overlap the work left)
                        window = FileWindow(dst.fp.fileno(), base, writeback)
                        saved = save_weights(window)
                        writeback.kick(after_running=True)  # while the member's CRC is worked out
                        size = window.size
                        crc = crc_of_range(dst.fp.fileno(), base, size)
                        dst.fp.seek(base + size)
                        set_member_written(out, size, crc)
                    else:
                        saved = _save_through(out, save_weights, path)
            else:
                with tempfile.TemporaryFile(prefix=f".{temp_stem(path.name, path.parent, 10)}.", dir=path.parent) as weights_file:
                    saved = save_weights(weights_file)
                    info.file_size = weights_file.seek(0, os.SEEK_END)  # what writestr sets before it writes
                    weights_file.seek(0)
                    with dst.open(info, "w") as out:
                        shutil.copyfileobj(weights_file, out, WRITE_PIECE)
            if lora is not None:
                put(LORA_MEMBER, lora, zipfile.ZIP_STORED)
            if provenance is not None:
                put(PROVENANCE_MEMBER, json.dumps(provenance, indent=1, sort_keys=True).encode(),
                    zipfile.ZIP_DEFLATED)
        raw.truncate(raw.tell())  # (nothing of the weights file h5py cut short is left at the end)
    if writeback is not None:
        writeback.finish()
    if not saved:
        path.unlink()  # the model saves assets: Keras's own save writes this file instead
        return False
    return True


def member_info(name: str, date_time, compress) -> zipfile.ZipInfo:
    """The zip header of a member of a normalised archive: fixed time, owner-writable file."""
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def _weights_file_size_hint(model) -> int | None:
    """A size for the weights file Keras writes for ``model`` that its exact size cannot differ from in
    what the zip header makes of it (a zip64 record or not, by the size × 1.05 against 2**31 - 1, as
    zipfile decides): at least the bytes of the large arrays written as they are, at most every
    variable's bytes and the HDF5 structure around them. None when the two bounds straddle the limit:
    the weights file is then written to a temporary file first and its size read off."""
    import math

    import numpy as np

    from .variables import is_large
    large = total = 0
    count = 0
    for var in model.weights:
        itemsize = 2 if str(var.dtype) == "bfloat16" else np.dtype(str(var.dtype)).itemsize
        nbytes = math.prod(int(d) for d in var.shape) * itemsize
        total += nbytes
        count += 1
        if is_large(tuple(var.shape), var.dtype) and str(var.dtype) != "bfloat16":
            large += nbytes
    upper = total + (16 << 20) + (64 << 10) * count
    limit = zipfile.ZIP64_LIMIT
    if (large * 1.05 > limit) != (upper * 1.05 > limit):
        return None
    return upper


def _save_through(out, save_weights, path) -> bool:
    """The weights file through the zip writer (which computes its CRC), by way of a temporary file."""
    import shutil

    from .streams import WRITE_PIECE
    with tempfile.TemporaryFile(prefix=f".{temp_stem(path.name, path.parent, 10)}.", dir=path.parent) as weights_file:
        saved = save_weights(weights_file)
        weights_file.seek(0)
        shutil.copyfileobj(weights_file, out, WRITE_PIECE)
    return saved


def member_writer_settable(out) -> bool:
    """Whether ``out`` (what ``ZipFile.open(info, "w")`` returned) is CPython's writer of a stored member,
    whose size and CRC-32 set_member_written can give it after the bytes were written past it, straight
    into the zip file (Python 3.8 to 3.13 keep them in these attributes; elsewhere the bytes go through
    ``out.write``)."""
    return (type(out).__name__ == "_ZipWriteFile" and getattr(out, "_compressor", True) is None
            and all(isinstance(getattr(out, a, None), int) for a in ("_file_size", "_compress_size", "_crc")))


def set_member_written(out, size: int, crc: int) -> None:
    """Tell a stored member's writer that ``size`` bytes with CRC-32 ``crc`` were written after its
    header, as ``out.write`` would have counted them; closing it then writes the header as for them."""
    out._file_size = out._compress_size = size
    out._crc = crc


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


# An .h5 output keeps its provenance record in this attribute of the file's root group, which Keras
# ignores when it loads the model: model and record are one file, written and renamed at once. Files
# written by modelxform before (issue 16) have it in a sidecar, OUT.provenance.json, which is still read.
H5_PROVENANCE_ATTRIBUTE = "modelxform_provenance"


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    return p.with_name(p.stem + ".provenance.json")


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance record of a model file written by modelxform as JSON data, or None; read within
    the limits of safety.py (provenance.read_record also checks that it is a well-formed record)."""
    from . import safety
    p = pathlib.Path(path)
    what = "its provenance record"
    try:
        if model_format(p) == "keras":
            if p.is_file() and not zipfile.is_zipfile(p):  # (not "no record": not a model file at all)
                raise ModelFileError(f"{p}: not a .keras archive (a .keras file is a zip)")
            if not p.is_file():
                return None
            with zipfile.ZipFile(p) as zf:
                safety.check_archive(zf, p)
                if PROVENANCE_MEMBER not in zf.namelist():
                    return None
                data = safety.read_member(zf, PROVENANCE_MEMBER, p)
            return safety.parse_json(data, p, f"{what} ({PROVENANCE_MEMBER})")
        data = None
        if p.is_file():
            import h5py
            try:
                with h5py.File(p, "r") as f:
                    data = safety.read_h5_attribute(f, H5_PROVENANCE_ATTRIBUTE, p, what)
            except ModelFileError:
                raise
            except Exception as exc:  # noqa: BLE001 - h5py's errors are of many kinds
                raise ModelFileError(f"{p}: not a readable HDF5 file ({_clip(str(exc))})") from None
        if data is None:
            side = sidecar_path(p)
            if not os.path.exists(side):  # (False, not an error, for a name too long to be a file's)
                return None
            from ..lang.files import ReadRefused, read_bounded
            try:
                data = read_bounded(side, safety.MEMBER_LIMITS[PROVENANCE_MEMBER])
            except ReadRefused as exc:
                raise ModelFileError(f"{side}: {exc.reason}") from None
            return safety.parse_json(data, side, what)
        return safety.parse_json(data, p, what)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{p}: unreadable provenance record: {_clip(str(exc))}") from None


def member_digests(path: str | os.PathLike) -> dict | None:
    """{member name: sha256} of a zip archive, in order (None when it is not one)."""
    import hashlib
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for info in zf.infolist():
                h = hashlib.sha256()
                with zf.open(info) as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                out[info.filename] = (h.hexdigest(), info.compress_type, info.date_time)
            return out
    except (OSError, zipfile.BadZipFile):
        return None


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def same_bytes(a: str | os.PathLike, b: str | os.PathLike, block: int = 256 << 10) -> bool:
    """Whether two files hold the same bytes: their sizes, then a block at a time, in blocks that stay
    in a core's cache (two 2 GiB files from the page cache: 0.55 s, where hashing both took 1.5 s of
    two cores). Read, never mapped: a file cut short meanwhile ends the comparison, not the process."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        size = os.fstat(fa.fileno()).st_size
        if os.fstat(fb.fileno()).st_size != size:
            return False
        ba, bb = bytearray(block), bytearray(block)
        at = 0
        while at < size:
            n = min(block, size - at)
            if n < block:  # (the last block: compared as a whole bytearray each, which is a memcmp)
                ba, bb = bytearray(n), bytearray(n)
            if os.preadv(fa.fileno(), [ba], at) != n or os.preadv(fb.fileno(), [bb], at) != n or ba != bb:
                return False
            at += n
        return True


def sha256_with_identity(path: str | os.PathLike, *, cached: bool = True) -> tuple[str, tuple | None]:
    """The file's sha256 and its identity (digests.file_identity) if it did not change while it was
    read, else None: a digest taken once (by a batch run's main process, by verify) that a later reader
    of the same file may use instead of reading it again, when the identity is still the same (the
    ``input_digest`` of session.apply_file). A large file's digest comes from the digest cache when it
    holds one for this identity (digests.py), and goes there once read; ``cached=False`` (verify, which
    trusts no cache) reads every byte and leaves the cache alone."""
    from . import digests
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        remembered = digests.lookup(st) if cached else None
        if remembered is not None:
            return remembered, digests.file_identity(st)
        started = time.time_ns()
        import hashlib
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
        after = os.fstat(fh.fileno())
    if cached:
        digests.remember(st, after, sha, started)
    before, after = digests.file_identity(st), digests.file_identity(after)
    return sha, (before if before == after else None)


def sha256_remembered(path: str | os.PathLike) -> str:
    """An input file's sha256, from the digest cache where it holds one for this file as it is now
    (digests.py), else read (and kept there). Not for verify, which reads every byte it checks."""
    return sha256_with_identity(path)[0]


def known_sha256(path_or_fd, digest) -> str | None:
    """``digest`` (sha256, identity) from sha256_with_identity, or a digests.FileDigest begun earlier
    (its sha256, once it is done), if the file — a path, or an open file descriptor — still has that
    identity; None otherwise (read it again)."""
    from .digests import FileDigest, file_identity
    if not digest or not isinstance(digest, FileDigest) and digest[1] is None:
        return None
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    if isinstance(digest, FileDigest):
        return digest.result() if digest.holds(st) else None
    return digest[0] if file_identity(st) == tuple(digest[1]) else None


def save_model(model, path: str | os.PathLike, provenance: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename).

    A .keras output is byte-reproducible (see _normalise_keras_archive) and carries ``provenance`` as
    the member modelxform.json; an .h5 output as the attribute H5_PROVENANCE_ATTRIBUTE of its root group,
    so that model and record are replaced together (a sidecar of an earlier version is removed).
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
            _write_h5_record(tmp, provenance)
    write_atomically(dest, write, failure="cannot save the model")
    if fmt == "h5" and provenance is not None:
        _unlink(sidecar_path(dest))  # an earlier version's record of an earlier file: no longer true


def write_atomically(dest: pathlib.Path, write, failure: str | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``dest``, then sync and rename it over ``dest``.

    A crash leaves the previous ``dest`` or none, never a truncated one; any failure removes the
    temporary file. OSErrors become ModelFileError; other exceptions do too when ``failure`` names what
    was being done, else they propagate (the fast path falls back to Keras on them).
    """
    folder = check_output_folder(dest)  # (a folder that is there and can be written; a name that fits)
    if dest.is_dir():
        raise ModelFileError(f"{dest}: is a directory")
    remove_stale_temp_files(dest)  # what saves of this output that were killed left behind
    tmp_name = None
    try:
        try:  # (Keras chooses the format by a lower-case suffix: out.H5 is written through .….h5)
            fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=dest.suffix.lower(), dir=folder)
        except OSError as exc:
            raise ModelFileError(f"{dest}: cannot write in {folder}: {exc.strerror or exc}") from None
        os.close(fd)
        tmp = pathlib.Path(tmp_name)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dest)
        fsync_folder(folder)
    # Each failure removes this process's temporary files of ``dest`` by their names: also one that
    # mkstemp made before Ctrl-C or SIGTERM landed in its Python code, whose name it never returned
    except ModelFileError:
        remove_stale_temp_files(dest, os.getpid())
        raise
    except OSError as exc:
        remove_stale_temp_files(dest, os.getpid())
        raise ModelFileError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    except Exception as exc:
        remove_stale_temp_files(dest, os.getpid())
        if failure is None:
            raise
        detail = str(exc).replace(tmp_name, str(dest)) if tmp_name else str(exc)  # (no temporary name in it)
        raise ModelFileError(f"{dest}: {failure}: {_clip(' '.join(detail.split()))}") from exc
    except BaseException:
        remove_stale_temp_files(dest, os.getpid())
        raise


# Temporary files are named so that they are recognisable (docs/robustness.md#after-a-kill):
# .OUTPUT.modelxform-tmp-HOST-PID-XXXXXXXX.SUFFIX (and ….norm while an archive is normalised), beside
# OUTPUT. A kill cannot remove its own; stale_temp_files finds those whose process is gone. OUTPUT is
# the output's name where the whole temporary name fits the file system, else its first characters and
# a digest of it (outputs.temp_stem): any name an output may have, its temporary file may have too.
TEMP_TAG = "modelxform-tmp"
_HOST_CHARS, _PID_DIGITS = 40, 7  # (Linux's pid_max is at most 4194304)
# what a temporary name holds besides OUTPUT, at most: the dots, the tag, HOST, PID, mkstemp's 8
# characters, the longest suffix (.keras) and .norm
TEMP_OVERHEAD = len(f"..{TEMP_TAG}---") + _HOST_CHARS + _PID_DIGITS + 8 + len(".keras") + len(".norm")
_TEMP_NAME = re.compile(r"^\.(?P<output>.+)\." + TEMP_TAG + r"-(?P<host>[A-Za-z0-9.-]*)-(?P<pid>\d+)-[A-Za-z0-9_]+"
                        r"\.(?:keras|h5|hdf5)(?:\.norm)?$")


def _host() -> str:
    import socket
    return re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:_HOST_CHARS]


def _output_stem(dest: pathlib.Path) -> str:
    """What the temporary names of ``dest`` keep of its name."""
    return temp_stem(dest.name, dest.parent if str(dest.parent) else pathlib.Path("."), TEMP_OVERHEAD)


def temp_prefix(dest: pathlib.Path, pid: int | None = None) -> str:
    dest = pathlib.Path(dest)
    return f".{_output_stem(dest)}.{TEMP_TAG}-{_host()}-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: it exists, under another user)
        return True
    return True


def stale_temp_files(output: str | os.PathLike, pid: int | None = None) -> list[pathlib.Path]:
    """The temporary files left beside ``output`` by saves that were killed: made on this machine by
    process ``pid``, or (without ``pid``) by any process that is no longer running. Files of running
    processes and of other machines (a shared file system) are left alone."""
    dest = pathlib.Path(output)
    folder = dest.parent if str(dest.parent) else pathlib.Path(".")
    host, stem = _host(), _output_stem(dest)
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = _TEMP_NAME.match(name)
        if not m or m.group("output") != stem or m.group("host") != host:
            continue
        owner = int(m.group("pid"))
        if (owner == pid) if pid is not None else (owner != os.getpid() and not _alive(owner)):
            found.append(folder / name)
    return sorted(found)


def remove_stale_temp_files(output: str | os.PathLike, pid: int | None = None) -> list[pathlib.Path]:
    """Remove stale_temp_files(output, pid); returns the ones removed."""
    removed = []
    for path in stale_temp_files(output, pid):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _write_h5_record(path: pathlib.Path, provenance: dict) -> None:
    import json

    import h5py
    with h5py.File(path, "r+") as f:
        f.attrs[H5_PROVENANCE_ATTRIBUTE] = json.dumps(provenance, indent=1, sort_keys=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


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
