"""A .keras archive opened without Keras: its layers, the places of their arrays, and writing it back.

A .keras file is a zip holding metadata.json, config.json and model.weights.h5 (stored uncompressed).
:class:`Archive` reads config.json and maps every layer's variables to their byte ranges in
model.weights.h5, so that statements can read and change arrays without building the model (and
without importing TensorFlow), and :meth:`Archive.save` writes the edited archive by copying the input
with the changed byte ranges replaced — the bytes Keras would write for the same model.

It may only stand in for the model where it can promise exactly that. Whenever the promise could
break, opening the archive raises :class:`NotApplicable` and the caller loads the model with Keras:

- an archive not written by the installed Keras version (other members, compressed or sharded
  weights, optimizer state, assets);
- a layer class missing from :data:`VARIABLE_TABLE`, a quantized, LoRA or renorm layer, a dtype policy
  other than plain float ones, shared objects other than dtype policies (a regularizer, a quantization
  config), a frozen nested model, a subclassed model, arrays whose shapes do not fit the config (Keras
  would refuse to load them);
- anything in a layer's config that only Keras can resolve (:func:`_check_settings`): an object other
  than a Keras initializer, regularizer, constraint or dtype policy, an activation name Keras does not
  know, an initializer named by a string.

Before any of that, the archive is checked as every model file is (safety.py): members over their size
limits are refused, and so is a config holding what Keras safe mode refuses (exit 3, the message
``load_model`` gives) — unless ``unsafe``, when such a config is left to Keras.

tests/test_archive_weights.py and tests/test_archive_structure.py hold the results to those of the loaded
model, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
import threading
import zipfile

import numpy as np

from . import safety
from .config import MODEL_CLASS_NAMES as MODEL_CLASSES
from .config import layers_of
from .layers import LayerInfo, snake_case
from .safety import CONFIG_MEMBER, METADATA_MEMBER, PROVENANCE_MEMBER
from .streams import (Ahead, EditedCrc, Writeback, copy_range, crc_of_range, preallocate, read_exact, write_all,
                      write_pieces)
from .zipmember import Window as _Window
from .zipmember import member_offset

WEIGHTS_MEMBER = "model.weights.h5"


WEIGHTLESS = frozenset({
    "Activation", "ActivityRegularization", "Add", "AlphaDropout", "Average", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "Concatenate", "Cropping1D", "Cropping2D", "Cropping3D", "Dot",
    "Dropout", "ELU", "Flatten", "GaussianDropout", "GaussianNoise", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "GlobalMaxPooling3D", "Identity", "LeakyReLU", "Masking", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "Maximum", "Minimum", "Multiply", "Permute", "ReLU", "RepeatVector", "Rescaling", "Reshape", "Softmax",
    "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "Subtract", "UnitNormalization",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
})
_KERNEL_BIAS = frozenset({"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                          "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D"})


def _flag(config: dict, key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise KeyError(key)
    return value


def variable_names(class_name: str, config: dict) -> list[str] | None:
    """The names of a layer's variables in the order model.weights.h5 stores them (``vars/0``, ``vars/1``,
    …; that is ``layer.weights`` order), from its class and config; None for a layer this module does
    not know (the caller then takes the Keras path). Keras 3.15 names: a DepthwiseConv2D's array is
    ``kernel``, not ``depthwise_kernel``."""
    c = config
    if c.get("lora_rank") or c.get("quantization_config") is not None:
        return None
    try:
        if class_name in WEIGHTLESS:
            return []
        if class_name in _KERNEL_BIAS:
            return ["kernel", "bias"] if _flag(c, "use_bias") else ["kernel"]
        if class_name in ("SeparableConv1D", "SeparableConv2D"):
            return ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if _flag(c, "use_bias") else [])
        if class_name == "BatchNormalization":
            if c.get("renorm") or c.get("synchronized"):
                return None
            return ((["gamma"] if _flag(c, "scale") else []) + (["beta"] if _flag(c, "center") else [])
                    + ["moving_mean", "moving_variance"])
        if class_name == "LayerNormalization":
            rms = bool(c.get("rms_scaling", False))
            return ((["gamma"] if _flag(c, "scale") or rms else [])
                    + (["beta"] if _flag(c, "center") and not rms else []))
        if class_name == "GroupNormalization":
            return (["gamma"] if _flag(c, "scale") else []) + (["beta"] if _flag(c, "center") else [])
        if class_name == "RMSNormalization":
            return ["scale"]
        if class_name == "Embedding":
            return ["embeddings"]
        if class_name == "PReLU":
            return ["alpha"]
        if class_name == "Normalization":
            # Given mean and variance, it creates no variables; otherwise the adapt state.
            if c.get("mean") is None and c.get("variance") is None:
                return ["mean", "variance", "count"]
            return []
    except KeyError:
        return None
    return None


def _axis_dim(shape: tuple, axis: int) -> int:
    dim = shape[axis]
    if not isinstance(dim, int):
        raise KeyError("unknown dimension")
    return dim


def expected_shapes(class_name: str, config: dict, input_shape) -> list[tuple] | None:
    """The shapes Keras's ``build(input_shape)`` gives the variables of :func:`variable_names`, or None when
    this module cannot tell. Loading checks every array against them, so an archive whose arrays do not
    fit its config is refused by Keras; the fast path declines it rather than write what Keras would not
    load."""
    names = variable_names(class_name, config)
    if names is None:
        return None
    if not names:
        return []
    c = config
    try:
        shape = tuple(input_shape)
        if class_name == "Embedding":
            return [(c["input_dim"], c["output_dim"])]
        if class_name == "Dense":
            units = c["units"]
            return [(_axis_dim(shape, -1), units), (units,)][:len(names)]
        if class_name in _KERNEL_BIAS or class_name in ("SeparableConv1D", "SeparableConv2D"):
            kernel = tuple(c["kernel_size"])
            channels = _axis_dim(shape, -1 if c.get("data_format", "channels_last") == "channels_last" else 1)
            if class_name.startswith("Depthwise"):
                m = c["depth_multiplier"]
                return [kernel + (channels, m), (channels * m,)][:len(names)]
            if class_name.startswith("Separable"):
                m, f = c["depth_multiplier"], c["filters"]
                return [kernel + (channels, m), (1,) * len(kernel) + (channels * m, f), (f,)][:len(names)]
            f = c["filters"]
            if class_name.endswith("Transpose"):
                return [kernel + (f, channels), (f,)][:len(names)]
            return [kernel + (channels // c.get("groups", 1), f), (f,)][:len(names)]
        if class_name in ("BatchNormalization", "GroupNormalization"):
            return [(_axis_dim(shape, c["axis"]),)] * len(names)
        if class_name in ("LayerNormalization", "RMSNormalization"):
            axis = c["axis"]
            axes = sorted(axis) if isinstance(axis, (list, tuple)) else [axis]
            return [tuple(_axis_dim(shape, a) for a in axes)] * len(names)
        if class_name == "PReLU":
            param = list(shape[1:])
            for a in c.get("shared_axes") or ():
                param[a - 1] = 1
            if not all(isinstance(d, int) for d in param):
                return None
            return [tuple(param)]
        if class_name == "Normalization":
            axis = c["axis"]
            keep = () if axis is None else tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
            keep = sorted(a % len(shape) for a in keep)
            mean = tuple(_axis_dim(shape, a) for a in keep)
            return [mean, mean, ()]
    except (KeyError, TypeError, IndexError, ZeroDivisionError):
        return None
    return None


VARIABLE_TABLE = WEIGHTLESS | _KERNEL_BIAS | {
    "SeparableConv1D", "SeparableConv2D", "BatchNormalization", "LayerNormalization", "GroupNormalization",
    "RMSNormalization", "Embedding", "PReLU", "Normalization"}


_ALLOWED_POLICIES = frozenset({"float16", "float32", "float64", "mixed_float16", "mixed_bfloat16"})
_POLICY_VARIABLE_DTYPE = {"mixed_float16": "float32", "mixed_bfloat16": "float32"}


def variable_dtype(class_name: str, config: dict, var_name: str) -> str:
    """The dtype Keras gives a variable of a layer with this config (after _check_policy): the policy's
    variable dtype (float32 where there is none, and for mixed policies), but int64 for Normalization's
    count."""
    if class_name == "Normalization" and var_name == "count":
        return "int64"
    policy = config.get("dtype")
    name = policy.get("config", {}).get("name") if isinstance(policy, dict) else None
    return _POLICY_VARIABLE_DTYPE.get(name, name) if name else "float32"


class NotApplicable(Exception):
    """The fast path cannot promise the engine's result here; take the Keras path."""


class ArchiveLayerInfo(LayerInfo):
    """selectors.LayerInfo for a layer described by config.json (no Keras object behind it): the type
    is the config's class name, the ancestors are the classes of the nested models around it."""

    def __init__(self, path: str, layer: "ArchiveLayer", ancestor_types: tuple):
        super().__init__(path, layer, ())
        self._ancestor_types = ancestor_types

    @property
    def type_name(self) -> str:
        return self.layer.class_name

    @property
    def ancestor_types(self) -> tuple:
        return self._ancestor_types


class ArchiveLayer:
    """What the selectors and passes read of a Keras layer: name, trainable, weights, count_params()."""

    def __init__(self, entry: dict, weights: list):
        self.entry = entry
        self.class_name = entry["class_name"]
        self.name = entry["config"]["name"]
        self.trainable = entry["config"]["trainable"]
        self.weights = weights

    def count_params(self) -> int:
        return sum(v.size for v in self.weights)

    @property
    def quantization_mode(self) -> str | None:
        """The mode of a quantized policy in the layer's config. The archive declines quantized layers
        (their arrays are int8 or packed int4 with scales, which no pass may treat as floats), so a layer
        here never has one; weight statements check it all the same."""
        policy = self.entry["config"].get("dtype")
        mode = policy.get("config", {}).get("mode") if isinstance(policy, dict) else None
        return mode.split("/")[0] if isinstance(mode, str) else None


class ArchiveVariable:
    """A stand-in for a Keras variable whose array lives in the archive: ``numpy()`` reads it,
    ``assign()`` records the new array (see Archive.write)."""

    def __init__(self, archive: "Archive", name: str, key: str, shape: tuple, dtype: np.dtype, offset: int):
        self.archive = archive
        self.name = name
        self.key = key  # the dataset's path in model.weights.h5
        self.shape = shape
        self.np_dtype = dtype
        self.dtype = dtype.name
        self.offset = offset  # of its data in model.weights.h5
        self.size = math.prod(shape)
        self.nbytes = self.size * dtype.itemsize

    def numpy(self) -> np.ndarray:
        return self.archive.read(self)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the values (along the first axis), read on their own."""
        return self.archive.read(self, rows=(start, stop))

    def take_array(self) -> np.ndarray:
        """The values, in an array handed over to the caller, who assigns it back (statements/weights.py
        changes it in place): a pending new array is not copied."""
        return self.archive.read(self, take=True)

    def assign(self, value) -> None:
        self.archive.write(self, value)

    def defer(self, change) -> None:
        """Change the values elementwise, later: as the array streams into the saved file (or whenever it
        is read), a block at a time, so that the change never holds the whole array. ``change.begin()``
        returns a pass: ``pass_(block)`` changes a flat block of the values in place (blocks come in
        order, and the result must not depend on where the array is cut), ``pass_.end()`` follows the
        last block. Changes deferred one after another apply in that order; ``assign`` replaces them."""
        self.archive.defer(self, change)


def _data_offset(fh, info: zipfile.ZipInfo) -> int:
    try:
        return member_offset(fh, info)
    except ValueError as exc:
        raise NotApplicable(str(exc)) from None


def _normalised_config(config):
    """The config Keras writes after loading this one: loading does not share dtype policy objects, so
    their ``shared_object_id`` disappears. Any other shared object is a case for the Keras path."""
    if isinstance(config, dict):
        if "shared_object_id" in config:
            cls = config.get("class_name")
            if cls != "DTypePolicy":
                raise NotApplicable(f"a shared {str(cls)[:40]} (of shared objects, only dtype policies are read)")
            config = {k: v for k, v in config.items() if k != "shared_object_id"}
        return {k: _normalised_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_normalised_config(v) for v in config]
    return config


# The activations keras.activations.get resolves by name (its ALL_OBJECTS_DICT; tests/test_hostile_input.py
# compares this snapshot with the installed Keras): any other name is refused by Keras on load.
KERAS_ACTIVATIONS = frozenset({
    "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_swish",
    "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish", "relu", "relu6", "selu",
    "sigmoid", "silu", "soft_shrink", "softmax", "softplus", "softsign", "sparse_plus", "sparse_sigmoid",
    "sparsemax", "squareplus", "swish", "tanh", "tanh_shrink", "threshold"})
# The modules of the objects a layer's config may hold on the archive path: initializers, regularizers,
# constraints and dtype policies, which Keras resolves from its own modules. Anything else (a function,
# a class from another module, a Keras API that is not a modelling object) is Keras's to judge.
_SETTING_MODULES = frozenset({"keras", "keras.initializers", "keras.regularizers", "keras.constraints"})
_MODEL_MODULES = ("keras", "keras.src.models.functional", "keras.models")


def _check_settings(config: dict, name: str) -> None:
    """Raise NotApplicable when a layer's config holds something only Keras can resolve (see
    _SETTING_MODULES), so that the archive never writes out a config Keras would not load."""
    stack = [(None, config)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            if "class_name" in value:
                cls, module = value.get("class_name"), value.get("module")
                if not (isinstance(cls, str) and cls.isidentifier() and not cls.startswith("_")
                        and cls != "function" and module in _SETTING_MODULES
                        and value.get("registered_name") in (None, cls)):
                    raise NotApplicable(f"{name}: {key} holds {str(cls)[:40]!r} from {str(module)[:40]!r}")
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str) and isinstance(key, str):
            if key == "activation" and value not in KERAS_ACTIVATIONS:
                raise NotApplicable(f"{name}: activation {value[:40]!r}")
            if key.endswith(("_initializer", "_regularizer", "_constraint")):
                raise NotApplicable(f"{name}: {key} named by a string")


def _check_model_entry(entry: dict) -> None:
    if entry.get("module") not in _MODEL_MODULES or entry.get("registered_name") not in (
            None, "Functional", "Sequential"):
        raise NotApplicable(f"model class {str(entry.get('class_name'))[:40]} from {str(entry.get('module'))[:40]}")


def _check_policy(config: dict) -> None:
    policy = config.get("dtype")
    if policy is None:
        return
    if not (isinstance(policy, dict) and policy.get("class_name") == "DTypePolicy"
            and policy.get("module") == "keras" and policy.get("config", {}).get("name") in _ALLOWED_POLICIES):
        raise NotApplicable(f"dtype policy {policy!r}")


class Archive:
    """A .keras file opened for the fast path: its layers as ArchiveLayerInfo, its arrays by offset.

    Raises NotApplicable for anything the Keras path must handle (see the module docstring), and
    ModelFileError for what no path may read (safety.py)."""

    def __init__(self, path, *, unsafe: bool = False):
        import h5py
        from importlib import metadata

        self.path = pathlib.Path(path)
        self._fh = open(self.path, "rb")
        self._spill = None
        self._patches: dict = {}  # dataset key -> the new array, or (spill offset, nbytes)
        self._changes: dict = {}  # dataset key -> elementwise changes not yet applied (ArchiveVariable.defer)
        self._cursors: dict = {}  # dataset key -> _Cursor of a read by rows in progress
        self.lazy_variables: list = []  # weak references to Keras variables whose values are still here
        self._in_memory = 0  # bytes of the arrays held in _patches
        self._largest = 0  # bytes of the largest array read
        self._digest = None  # the input's sha256, computed by a thread (see hash_input)
        self._intact = None  # the weights member's CRC-32 being checked, by a thread (see check_intact)
        try:
            with zipfile.ZipFile(self._fh) as zf:
                infos = zf.infolist()
                safety.check_archive(zf, self.path)  # sizes, before anything is read
                names = [i.filename for i in infos]
                if names not in ([METADATA_MEMBER, CONFIG_MEMBER, WEIGHTS_MEMBER],
                                 [METADATA_MEMBER, CONFIG_MEMBER, WEIGHTS_MEMBER, PROVENANCE_MEMBER]):
                    raise NotApplicable(f"archive members {names}")
                metadata_json = safety.read_json_member(zf, METADATA_MEMBER, self.path)
                config_bytes = safety.read_member(zf, CONFIG_MEMBER, self.path)
            self.config = safety.parse_json(config_bytes, self.path, CONFIG_MEMBER)
            # safe mode, on the config as the file holds it, before anything else reads it
            if safety.unsafe_content(self.config) is not None:
                safety.check_safe(self.config, self.path, unsafe=unsafe)
                raise NotApplicable("a config that safe mode refuses (--unsafe: Keras loads it)")
            if not isinstance(metadata_json, dict) or list(metadata_json) != ["keras_version", "date_saved"] or \
                    metadata_json["keras_version"] != metadata.version("keras"):
                raise NotApplicable("written by another Keras version")
            self.keras_version = metadata_json["keras_version"]
            weights = infos[2]
            if weights.compress_type != zipfile.ZIP_STORED:  # (an encrypted member: refused by check_archive)
                raise NotApplicable("compressed weights")
            self.h5_start = _data_offset(self._fh, weights)
            self.h5_size = weights.file_size
            self.h5_crc = weights.CRC
            if not isinstance(self.config, dict):
                raise NotApplicable("config.json is not a model entry")
            self.output_config = _normalised_config(self.config)
            with h5py.File(_Window(self._fh.fileno(), self.h5_start, self.h5_size), "r") as h5:
                if h5.userblock_size:
                    raise NotApplicable("an HDF5 user block")
                self.layers = self._map_layers(h5)
        except BaseException:
            self._fh.close()
            raise
        self.param_count = sum(info.layer.count_params() for info in self.layers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def hash_input(self, known=None) -> None:
        """Start computing the input file's sha256 (for the provenance record) in a thread, alongside
        the work on the arrays: hashlib and os.pread release the GIL. ``known``: a digest of this file
        taken earlier in the run (files.sha256_with_identity), or one being taken since before the
        file was opened (digests.begin), used if the file is unchanged since; else the digest cache's,
        where it holds one for this file as it is (digests.py)."""
        if self._digest is None:
            from . import digests
            from .files import known_sha256
            st = os.fstat(self._fh.fileno())
            if isinstance(known, digests.FileDigest):  # (begun before this file was opened: its thread)
                if known.holds(st):
                    self._digest = known
                    return
                known = None
            sha = known_sha256(self._fh.fileno(), known) or digests.lookup(st)
            self._digest = digests.FileDigest(self._fh.fileno(), sha)
            if sha is None:
                self._digest.start()

    def begin_integrity_check(self) -> None:
        """Start working out model.weights.h5's CRC-32 in a thread (check_intact compares it with the
        archive's). Keras reads a member whole through zipfile, which refuses a CRC that does not match;
        modelxform reads arrays where they lie, so a damaged byte would reach a structural edit's output
        under a fresh, valid CRC. (A weight-only edit on the archive keeps the damage detectable instead:
        its output's CRC is worked out from the input's, streams.EditedCrc.)"""
        if self._intact is None and self._fh is not None and not self._fh.closed:
            self._intact = _MemberCrc(self._fh.fileno(), self.h5_start, self.h5_size)
            self._intact.start()

    def check_intact(self) -> None:
        """ModelFileError unless model.weights.h5's bytes have the CRC-32 the archive records (see
        begin_integrity_check, started here if it was not)."""
        self.begin_integrity_check()
        if self._intact is None:
            return
        crc = self._intact.result()
        if crc != self.h5_crc:
            from ..errors import ModelFileError
            raise ModelFileError(f"{self.path}: {WEIGHTS_MEMBER} is damaged: its bytes' CRC-32 is {crc:08x}, the "
                                 f"archive records {self.h5_crc:08x} (Keras refuses to load it)")

    def input_sha256(self) -> str:
        """The input file's sha256 (started by hash_input, or now)."""
        self.hash_input()
        return self._digest.result()

    def current_config(self) -> dict:
        """The config as it stands: output_config with the trainable flags freeze/unfreeze set."""
        for layer_info in self.layers:  # the entries belong to output_config
            config = layer_info.layer.entry["config"]
            if bool(layer_info.layer.trainable) != config["trainable"]:
                config["trainable"] = bool(layer_info.layer.trainable)
        return self.output_config

    def forget_lazy_variables(self) -> None:
        """The models built from this archive will not be used again (the run is over): closing it
        need not give their variables the values they still take from it (variables.FromSource)."""
        self.lazy_variables.clear()

    def close(self) -> None:
        from .variables import materialise
        for ref in self.lazy_variables:  # a model built from the archive may outlive it: fill it first
            var = ref()
            if var is not None and not self._fh.closed:
                materialise(var)
        self.lazy_variables.clear()
        if self._digest is not None:
            self._digest.stop()
        if self._intact is not None:
            self._intact.stop()
        self._fh.close()
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    # -- handed to another process ---------------------------------------------------------------
    # batch opens the first jobs' archives in its main process while the workers' TensorFlow imports
    # (batch/local.py, _Preparer) and hands each to the worker that runs the job, inside the job's
    # payload: what was read of the file travels, and the worker opens the file again. Only an archive
    # as opened can be handed over (nothing assigned, deferred or read by rows yet).
    def __getstate__(self) -> dict:
        if self._patches or self._changes or self._cursors or self._spill is not None or self.lazy_variables \
                or self._digest is not None or self._intact is not None:
            raise TypeError("only an archive as opened can be handed to another process")
        from .digests import file_identity
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fh", "lazy_variables")}
        state["_identity"] = file_identity(os.fstat(self._fh.fileno()))
        return state

    def __setstate__(self, state: dict) -> None:
        """Open the file again; where it is no longer the file that was read (another file by that name,
        or this one written or changed since: digests.file_identity), or cannot be opened, the archive is
        not ``reopened`` and must not be used (the receiver opens the file itself). Never raises: it runs
        while a job's payload is received, and the job says what is wrong."""
        from .digests import file_identity
        identity = state.pop("_identity", None)
        self.__dict__.update(state)
        self.lazy_variables = []
        self._fh = None
        try:
            fh = open(self.path, "rb")
        except OSError:
            return
        try:
            same = file_identity(os.fstat(fh.fileno())) == identity
        except OSError:
            same = False
        if same:
            self._fh = fh
        else:
            fh.close()

    @property
    def reopened(self) -> bool:
        """Whether this archive, handed over from another process, holds its file open again, unchanged."""
        return self._fh is not None and not self._fh.closed

    # -- the layer tree (layers.walk's order) and model.weights.h5's layout --------------------
    def _map_layers(self, h5) -> list[ArchiveLayerInfo]:
        top = self.output_config
        if top.get("class_name") not in MODEL_CLASSES or top.get("compile_config") not in (None, {}):
            raise NotApplicable("not a functional or Sequential model, or a compiled one")
        _check_model_entry(top)
        layers: list[ArchiveLayerInfo] = []
        expected: set[str] = set()
        # Every group and array the file links, by its path, opened once: looked up by path instead,
        # h5py would open each group on the way again (through the archive's file object), about a third
        # of opening the archive of a 400-layer model. (What only a soft link reaches is not here, and
        # the archive then does not stand in for the model.)
        objects: dict = {"": h5}
        h5.visititems(objects.__setitem__)
        self._visit(objects, top, "", "", (), layers, expected)
        found = {name for name, obj in objects.items() if hasattr(obj, "shape")}
        if found != expected:
            raise NotApplicable("model.weights.h5 holds arrays no layer accounts for")
        return layers

    def _visit(self, objects, model_entry, group, prefix, ancestors, out, expected) -> None:
        config = model_entry["config"]
        if config.get("trainable") is not True:
            raise NotApplicable("a frozen model (its flag overrides its layers')")
        _check_policy(config)
        self._check_group(objects, group, {"layers", "vars"}, 0, config["name"])
        entries = layers_of(model_entry)
        if model_entry["class_name"] == "Sequential" and entries and entries[0]["class_name"] == "InputLayer":
            entries = entries[1:]  # Sequential.layers leaves out its InputLayer, and so does the h5 file
        used: dict[str, int] = {}
        for entry in entries:
            cls = entry["class_name"]
            base = snake_case(cls)
            key = base if base not in used else f"{base}_{used[base] + 1}"
            used[base] = used.get(base, -1) + 1
            sub = f"{group}/layers/{key}" if group else f"layers/{key}"
            cfg = entry["config"]
            name = cfg["name"]
            if cls in MODEL_CLASSES and isinstance(cfg.get("layers"), list):
                _check_model_entry(entry)
                self._visit(objects, entry, sub, f"{prefix}{name}/", ancestors + (cls,), out, expected)
                continue
            if entry.get("module") != "keras.layers" or entry.get("registered_name") is not None:
                raise NotApplicable(f"layer class {cls} from {entry.get('module')}")
            if cls == "InputLayer":
                if model_entry["class_name"] == "Sequential":
                    raise NotApplicable("an InputLayer inside a Sequential stack")
                self._check_group(objects, sub, {"vars"}, 0, name)
                continue
            names = variable_names(cls, cfg)
            if names is None:
                raise NotApplicable(f"layer class {cls}")
            _check_policy(cfg)
            _check_settings(cfg, name)
            if not isinstance(cfg.get("trainable"), bool):
                raise NotApplicable("a layer without a trainable flag")
            self._check_group(objects, sub, {"vars"}, len(names), name)
            shapes = expected_shapes(cls, cfg, (entry.get("build_config") or {}).get("input_shape")) \
                if names else []
            if shapes is None:
                raise NotApplicable(f"{name}: cannot tell the shapes of its variables from its config")
            variables = []
            for n, (var_name, want) in enumerate(zip(names, shapes)):
                var = self._variable(objects[f"{sub}/vars/{n}"], var_name, f"{sub}/vars/{n}")
                if var.shape != want:
                    _refuse_beyond_memory(self.path, name, var_name, want, var)
                    raise NotApplicable(f"{name}: {var_name} has shape {var.shape} in the file, the config "
                                        f"makes it {want} (Keras refuses to load it)")
                dtype = variable_dtype(cls, cfg, var_name)
                if var.dtype != dtype:  # (an edit in the stored dtype would not be the one Keras's gives)
                    raise NotApplicable(f"{name}: {var_name} is stored as {var.dtype}, the config makes it "
                                        f"{dtype} (Keras casts it when loading)")
                variables.append(var)
                expected.add(f"{sub}/vars/{n}")
            out.append(ArchiveLayerInfo(f"{prefix}{name}", ArchiveLayer(entry, variables), ancestors))

    @staticmethod
    def _check_group(objects: dict, group: str, members: set, count: int, name: str) -> None:
        """``objects``: the file's groups and arrays by path ("" the file itself)."""
        node = objects[group]
        if set(node.keys()) != members:
            raise NotApplicable(f"h5 group {group or '/'} holds {sorted(node.keys())}")
        vars_group = objects[f"{group}/vars" if group else "vars"]
        if vars_group.attrs.get("name") != name or sorted(vars_group.keys()) != sorted(str(i) for i in range(count)):
            raise NotApplicable(f"h5 group {group or '/'} does not match layer {name!r}")

    def _variable(self, ds, name: str, key: str) -> ArchiveVariable:
        import h5py
        dtype = ds.dtype
        if dtype.kind not in "fiu" or not dtype.isnative or len(ds.attrs):
            raise NotApplicable(f"{key}: dtype {dtype}")
        plist = ds.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or plist.get_external_count():
            raise NotApplicable(f"{key}: chunked, filtered or external storage")
        offset = ds.id.get_offset()
        var = ArchiveVariable(self, name, key, tuple(int(d) for d in ds.shape), dtype, offset)
        if var.nbytes and (offset is None or ds.id.get_storage_size() != var.nbytes):
            raise NotApplicable(f"{key}: storage not allocated as expected")
        return var

    # -- arrays ---------------------------------------------------------------------------------
    # An assigned array stays in memory while the arrays held there add up to no more than the largest
    # array read so far (computing that one already needed it twice over, old and new), so holding them
    # adds at most half to the peak; beyond that they go to a spill file, which costs a write and a read.
    SPILL_FLOOR = 64 << 20

    def read(self, var: ArchiveVariable, take: bool = False, rows: tuple | None = None) -> np.ndarray:
        """The variable's current values, in a new array; with ``take``, a new array assigned before is
        handed over rather than copied (the caller assigns its result back); with ``rows=(start,
        stop)``, only those rows along the first axis. Deferred changes are applied to what is read."""
        changes = self._changes.get(var.key)
        if not changes:
            return self._read_stored(var, take, rows)
        if rows is None:
            values = self._read_stored(var, take)
            _run_passes([c.begin() for c in changes], values.reshape(-1), var.np_dtype.itemsize)
            if take:  # the caller assigns the result back, with the changes in it
                del self._changes[var.key]
                self._cursors.pop(var.key, None)
            return values
        return self._read_rows_changed(var, changes, *rows)

    def _read_rows_changed(self, var: ArchiveVariable, changes, start: int, stop: int) -> np.ndarray:
        """Rows of a variable with deferred changes. Reads by rows go in order (variables.copy_variables),
        and a pass must see the blocks in order: a cursor carries the passes from one read to the next;
        a read out of order starts them again from the first row."""
        cursor = self._cursors.get(var.key)
        if cursor is None or cursor.row != start:
            cursor = _Cursor([c.begin() for c in changes])
            self._cursors[var.key] = cursor
            for a, b in _row_steps(var, 0, start):  # the rows before, through the passes and dropped
                cursor.feed(self._read_stored(var, rows=(a, b)), b)
        values = self._read_stored(var, rows=(start, stop))
        cursor.feed(values, stop)
        if stop >= var.shape[0]:
            cursor.end()
            del self._cursors[var.key]
        return values

    def _read_stored(self, var: ArchiveVariable, take: bool = False, rows: tuple | None = None) -> np.ndarray:
        """The values as stored (the input's, or those assigned), without the deferred changes."""
        pending = self._patches.get(var.key)
        shape, skip, nbytes = var.shape, 0, var.nbytes
        if rows is not None:
            start, stop = rows
            row_bytes = var.nbytes // var.shape[0] if var.shape and var.shape[0] else 0
            shape, skip, nbytes = (stop - start,) + var.shape[1:], start * row_bytes, (stop - start) * row_bytes
        if isinstance(pending, np.ndarray):
            if rows is not None:
                return pending[rows[0]:rows[1]].copy()
            if not take:
                return pending.copy()
            del self._patches[var.key]
            self._in_memory -= pending.nbytes
            return pending
        buffer = np.empty(nbytes, np.uint8)  # not bytearray(): that would write every page twice
        if pending is not None:
            read_exact(self._spill.fileno(), buffer, pending[0] + skip)
        elif nbytes:
            read_exact(self._fh.fileno(), buffer, self.h5_start + var.offset + skip)
        self._largest = max(self._largest, nbytes)
        return buffer.view(var.np_dtype).reshape(shape)

    def defer(self, var: ArchiveVariable, change) -> None:
        self._changes.setdefault(var.key, []).append(change)
        self._cursors.pop(var.key, None)

    def write(self, var: ArchiveVariable, value) -> None:
        value = np.asarray(value)
        if not value.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            value = value.copy(order="C")
        if value.dtype != var.np_dtype or value.shape != var.shape:  # a defect in a pass
            raise ValueError(f"{var.key}: a {value.dtype} array of shape {value.shape}")
        self._changes.pop(var.key, None)  # the new values replace whatever was deferred
        self._cursors.pop(var.key, None)
        previous = self._patches.pop(var.key, None)
        if isinstance(previous, np.ndarray):
            self._in_memory -= previous.nbytes
        if self._in_memory + var.nbytes <= max(self._largest, self.SPILL_FLOOR):
            self._patches[var.key] = value
            self._in_memory += var.nbytes
            return
        try:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(prefix="modelxform-spill-")
            spill_offset = os.fstat(self._spill.fileno()).st_size
            _write_spill(self._spill.fileno(), value, spill_offset)
        except OSError:  # a spill file that cannot be written (a full disk) only costs memory
            self._patches[var.key] = value
            self._in_memory += var.nbytes
            return
        self._patches[var.key] = (spill_offset, var.nbytes)

    # -- writing ----------------------------------------------------------------------------------
    def save(self, output, provenance) -> None:
        """Write the edited archive to ``output`` atomically, as files.save_model would write the
        edited model: same members, same normalisation, provenance last. ``provenance(sha256)`` makes
        the record once the input's digest is known."""
        from . import files

        files.write_atomically(pathlib.Path(output), lambda tmp: self._write_zip(tmp, provenance))

    def _write_zip(self, tmp: pathlib.Path, provenance) -> None:
        from . import files
        moment = files.build_time()
        stamp = moment.strftime("%Y-%m-%d@%H:%M:%S")
        date_time = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)

        def info(name, compress):
            return files.member_info(name, date_time, compress)

        config = self.current_config()
        metadata_json = json.dumps({"keras_version": self.keras_version, "date_saved": stamp})
        self.hash_input()
        writeback = None
        with zipfile.ZipFile(tmp, "w") as dst:
            dst.writestr(info(METADATA_MEMBER, zipfile.ZIP_STORED), metadata_json.encode())
            dst.writestr(info(CONFIG_MEMBER, zipfile.ZIP_STORED), json.dumps(config).encode())
            zinfo = info(WEIGHTS_MEMBER, zipfile.ZIP_STORED)
            zinfo.file_size = self.h5_size  # what writestr sets before it writes
            with dst.open(zinfo, "w") as out:
                if files.member_writer_settable(out):
                    dst.fp.flush()
                    base = dst.fp.tell()
                    preallocate(dst.fp.fileno(), base, self.h5_size)
                    writeback = Writeback(dst.fp.fileno(), self.h5_size)  # (disk writes overlap the work left)
                    crc = self._write_weights_at(dst.fp.fileno(), base, writeback)
                    writeback.kick(after_running=True)  # while the input's digest is awaited
                    dst.fp.seek(base + self.h5_size)
                    files.set_member_written(out, self.h5_size, crc)
                else:
                    self._write_weights_through(out)
            record = provenance(self.input_sha256())
            dst.writestr(info(files.PROVENANCE_MEMBER, zipfile.ZIP_DEFLATED),
                         json.dumps(record, indent=1, sort_keys=True).encode())
        if writeback is not None:
            writeback.finish()

    def _touched(self) -> list:
        """The variables whose bytes the written file changes, in file order."""
        by_key = {v.key: v for info in self.layers for v in info.layer.weights}
        keys = {k for k in self._patches} | {k for k, c in self._changes.items() if c}
        return sorted((by_key[k] for k in keys if by_key[k].nbytes), key=lambda v: v.offset)

    def _weights_pieces(self, touched: list, on_old=None, buffers: int = 1):
        """model.weights.h5 as written, in order: ``(offset, size, None)`` for a range kept from the
        input's, ``(offset, size, new)`` for changed bytes (a memoryview of a block, valid until
        ``buffers`` more pieces were made: the blocks take turns in that many buffers). An array changes
        a block at a time: what was assigned to it (in memory or in the spill file), or its input
        values, through its deferred changes — in the buffer they were read into. ``on_old(offset,
        old)``, if given, sees the input's bytes of each changed piece before they change
        (streams.EditedCrc.replace_old); it may answer something to ``wait()`` for before they do (the
        input's digest hashing them from the buffer, digests.FileDigest.offer): the piece is then
        changed once the next one is read, so that the two overlap, and takes one buffer more."""
        passes: list = []

        def changed(var, offset, n, block, first, last, hashing):
            nonlocal passes
            if hashing is not None:
                hashing.wait()
            if first:
                passes = [c.begin() for c in self._changes.get(var.key, ())]
            if passes:
                values = block.view(var.np_dtype)
                for pass_ in passes:
                    pass_(values)
            if last:
                for pass_ in passes:
                    pass_.end()
            return offset, n, memoryview(block).cast("B")

        held = None  # a block read whose old bytes are being hashed: changed after the next is read
        for piece in self._weights_read(touched, on_old, buffers):
            if held is not None:
                yield changed(*held)
                held = None
            if len(piece) == 3:  # a kept range
                yield piece
            elif piece[-1] is not None:
                held = piece
            else:
                yield changed(*piece)
        if held is not None:
            yield changed(*held)

    def _weights_read(self, touched: list, on_old, buffers: int):
        """_weights_pieces' reading: ``(offset, size, None)`` for a kept range, ``(var, offset, n,
        block, first, last, hashing)`` for a block of a changed array before its changes (``hashing``:
        what on_old answered, to wait for before the block changes)."""
        fd = self._fh.fileno()
        rotation = spare = None
        turn = 0
        position = 0
        for var in touched:
            offset = var.offset
            if offset > position:
                yield position, offset - position, None
            pending = self._patches.get(var.key)
            changes = bool(self._changes.get(var.key))
            step = max(1, BLOCK_BYTES // var.np_dtype.itemsize) * var.np_dtype.itemsize
            if rotation is None:
                rotation = [np.empty(BLOCK_BYTES, np.uint8) for _ in range(max(1, buffers))]
            flat = pending.reshape(-1).view(np.uint8) if isinstance(pending, np.ndarray) else None
            for at in range(0, var.nbytes, step):
                n = min(step, var.nbytes - at)
                buffer = rotation[turn]
                turn = (turn + 1) % len(rotation)
                where = self.h5_start + offset + at
                hashing = None
                if pending is None:  # the input's values, changed where they were read
                    read_exact(fd, buffer[:n], where)
                    if on_old is not None:
                        hashing = on_old(offset + at, memoryview(buffer)[:n])
                    block = buffer[:n]
                else:
                    if on_old is not None:
                        if spare is None:  # (the old bytes of an array assigned whole: rare)
                            spare = np.empty(BLOCK_BYTES, np.uint8)
                        read_exact(fd, spare[:n], where)
                        done = on_old(offset + at, memoryview(spare)[:n])
                        if done is not None:  # (one spare buffer: waited for at once)
                            done.wait()
                    if flat is None:
                        read_exact(self._spill.fileno(), buffer[:n], pending[0] + at)
                        block = buffer[:n]
                    elif changes:  # the passes change a private copy of what was assigned
                        buffer[:n] = flat[at:at + n]
                        block = buffer[:n]
                    else:
                        block = flat[at:at + n]
                yield var, offset + at, n, block, at == 0, at + n >= var.nbytes, hashing
            position = offset + var.nbytes
        if position < self.h5_size:
            yield position, self.h5_size - position, None

    def _write_weights_at(self, out_fd: int, base: int, writeback: Writeback) -> int:
        """Write model.weights.h5 into ``out_fd`` at ``base``: kept ranges copied file to file (in the
        kernel where it can), changed bytes written once. Returns the member's CRC-32, worked out from the
        input's and the changed ranges' old and new bytes (streams.EditedCrc), without reading the kept
        ones. (Computing it over the written bytes would read a little less when most bytes change, but
        would give damaged input bytes a valid CRC: this way the damage stays detectable.) ``writeback``
        (a streams.Writeback) is told of every piece written. The input's digest, if it is still being
        taken, hashes the changed arrays' old bytes from the blocks they are read into rather than read
        them again (digests.FileDigest.share)."""
        touched = self._touched()
        fd = self._fh.fileno()
        edited = EditedCrc(self.h5_crc, self.h5_size)
        digest = self._digest
        start = self.h5_start
        shared = digest is not None and digest.share([(start + v.offset, start + v.offset + v.nbytes) for v in touched])

        def on_old(offset, old):
            edited.replace_old(offset, old)
            return digest.offer(start + offset, old) if shared else None
        # The pieces are made (read, changed, the CRC of their old bytes) in a thread, a piece ahead of
        # this loop, which writes them (and works out the CRC of the new bytes): two cores on one file.
        # A piece's block stays untouched until three more are made: the one written, the one waiting
        # in the queue and the one being made; four while the digest hashes blocks (the one read meanwhile).
        made = Ahead(self._weights_pieces(touched, on_old=on_old, buffers=Ahead.DEPTH + (3 if shared else 2)))
        # (on two cores, the edit's threads keep off the core that hashes the input meanwhile)
        apart = digest.apart() if digest is not None else contextlib.nullcontext()
        try:
            with apart, made:
                for offset, size, new in made:
                    if new is None:
                        copy_range(fd, start + offset, size, out_fd, base + offset)
                    else:
                        write_all(out_fd, new, base + offset)
                        edited.replace_new(offset, new)
                    writeback.wrote(size)
        finally:
            if shared:
                digest.withdraw()
        return edited.value

    def _write_weights_through(self, out) -> None:
        """The same bytes through a writable file object (which works out the CRC as they pass)."""
        fd = self._fh.fileno()
        buffer = None
        for offset, size, new in self._weights_pieces(self._touched()):
            if new is not None:
                write_pieces(out, new)
                continue
            buffer = buffer or bytearray(min(BLOCK_BYTES, size))
            done = 0
            while done < size:
                n = min(len(buffer), size - done)
                view = memoryview(buffer)[:n]
                read_exact(fd, view, self.h5_start + offset + done)
                write_pieces(out, view)
                done += n


def _refuse_beyond_memory(path, layer: str, var_name: str, want: tuple, var) -> None:
    """A ModelFileError where the config makes a variable larger than this machine's memory (the file
    holding another shape): Keras would create it before finding the mismatch, and fail after a long
    wait with TensorFlow's out-of-memory message (17 s for a Dense of 1e11 units)."""
    from .memory import bytes_text, memory_limit
    size = math.prod(int(d) for d in want) * var.np_dtype.itemsize
    limit = memory_limit()
    if limit is not None and size > limit:
        from ..errors import ModelFileError
        raise ModelFileError(f"{path}: the config makes the {var_name} of layer {layer!r} {want}, {bytes_text(size)}, "
                             f"more than this machine's memory ({bytes_text(limit)}); the file holds {var.shape}")


class _MemberCrc(threading.Thread):
    """The CRC-32 of ``size`` bytes of a file from ``start`` (streams.crc_of_range), read through a
    descriptor of its own (a duplicate: the archive may be closed meanwhile); preadv and zlib-ng's CRC
    release the GIL."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__(name="modelxform-crc32", daemon=True)
        self._fd, self._start, self._size = os.dup(fd), start, size
        self._stopped = False
        self._crc, self._error = None, None

    def run(self) -> None:
        try:
            self._crc = crc_of_range(self._fd, self._start, self._size, stopped=lambda: self._stopped)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc
        finally:
            os.close(self._fd)

    def stop(self) -> None:
        self._stopped = True
        self.join()

    def result(self) -> int:
        self.join()
        if self._error is not None:
            from ..errors import ModelFileError
            raise ModelFileError(f"cannot read {WEIGHTS_MEMBER} to check it: {self._error}") from None
        return self._crc


def _write_spill(fd: int, value: np.ndarray, offset: int) -> None:
    write_all(fd, value, offset)


# Arrays change a block of this many bytes at a time (deferred changes, and the saved file). A block
# small enough to stay in a core's cache (2 MiB of L2 on the benchmark machine) is read into, changed,
# CRC'd and written from there, not from memory: a weight-only edit's first run on a 2 GiB file took
# 1.87 s with blocks of 16 MiB and 1.78-1.80 s with 1 MiB or 512 KiB (medians of six alternating rounds;
# the input's digest, hashing on the other core, shares the memory's bandwidth), and holds 15 MiB
# less per buffer. The values do not depend on it (the passes draw noise in blocks of their own).
BLOCK_BYTES = 1 << 20


def _run_passes(passes, flat: np.ndarray, itemsize: int) -> None:
    """Run deferred changes over a whole flat array, a block at a time (a pass that draws random
    numbers holds a block's worth of them, not the array's)."""
    step = max(1, BLOCK_BYTES // itemsize)
    for pass_ in passes:
        for at in range(0, flat.size, step):
            pass_(flat[at:at + step])
        pass_.end()


def _row_steps(var: ArchiveVariable, start: int, stop: int):
    row = max(1, var.nbytes // var.shape[0]) if var.shape and var.shape[0] else 1
    step = max(1, BLOCK_BYTES // row)
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


class _Cursor:
    """Deferred changes part-way through a variable read by rows."""

    def __init__(self, passes):
        self.passes, self.row = passes, 0

    def feed(self, values: np.ndarray, stop: int) -> None:
        flat = values.reshape(-1)
        for pass_ in self.passes:
            pass_(flat)
        self.row = stop

    def end(self) -> None:
        for pass_ in self.passes:
            pass_.end()
