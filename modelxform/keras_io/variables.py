"""Giving a built model's variables their values: the only code that reaches into Keras variables.

A structural edit rebuilds the model from its edited config; its variables are then filled from the
model before the edit (Keras variables) or straight from a .keras archive (archive.ArchiveVariable).
Two things keep that cheap: the rebuild creates its variables without random initial values
(:class:`LazyVariables`, which uses Keras's stateless scope), and a large array moves a block of rows
at a time, so that no second full copy of it is made. Both use Keras internals, and each backend's own
way of writing a tensor in place or adopting a buffer (TensorFlow, JAX, torch); each use says why, and
tests/test_keras_io.py fails loudly when a Keras release changes them (tests/test_backends.py runs
them under JAX).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ApplyError


class LazyVariables:
    """Build a model without giving its variables initial values: they are about to be overwritten
    (with the kept layers' arrays, or seeded values for new layers), and Keras's random initial values
    cost time and, for a large array, a few transient copies of it (VGG16: 1 s and 1.2 GB). Inside,
    Keras creates variables as it does in a stateless scope — deferred, with their initializer kept;
    copy_variables() gives them their values; initialise_the_rest() runs the initializers of any left
    (a Dropout's seed state). Uses Keras internals (keras.src.backend.common): where they are missing,
    __enter__ raises and the caller builds the ordinary way."""

    def __enter__(self):
        from keras.src.backend.common import global_state
        from keras.src.backend.common.stateless_scope import StatelessScope
        self._state = global_state
        self._before = list(global_state.get_global_attribute("uninitialized_variables") or [])
        self._scope = StatelessScope(initialize_variables=False)
        self._scope.__enter__()
        self.created: list = []
        return self

    def __exit__(self, *exc):
        self._scope.__exit__(*exc)
        after = self._state.get_global_attribute("uninitialized_variables") or []
        known = {id(v) for v in self._before}
        self.created = [v for v in after if id(v) not in known]
        self._state.set_global_attribute("uninitialized_variables", self._before)
        return False

    def initialise_the_rest(self) -> None:
        for var in self.created:
            if var._value is None and not isinstance(getattr(var, "_initializer", None), FromSource):
                var._deferred_initialize()


class FromSource:
    """The initializer of a rebuilt model's large variable whose values stay in the input .keras archive
    (an archive.ArchiveVariable, deferred changes and all) until something needs them. Saving the model
    streams them from the archive into the written file (files._write_keras_archive) without ever
    giving the variable a value: a structural edit of a 2 GB model copies each array once, file to
    file. Anything else that reads the variable (a later weight statement, a forward pass, an .h5
    save) calls this, which gives the variable its values from the archive once, then returns them.
    The archive must still be open then (Archive.close gives every such variable its values first)."""

    def __init__(self, source, var):
        import weakref
        self.source = source
        self._var = weakref.ref(var)
        source.archive.lazy_variables.append(self._var)

    def __call__(self, shape=None, dtype=None):
        var = self._var()
        if var is None or var._value is not None or var._initializer is not self:
            return np.asarray(self.source.numpy())
        materialise(var)
        return var._value


def pending_source(var):
    """The archive variable a rebuilt model's variable still takes its values from, or None when it
    holds them (or was never lazy)."""
    init = getattr(var, "_initializer", None)
    if isinstance(init, FromSource) and getattr(var, "_value", True) is None:
        return init.source
    return None


def materialise(var) -> None:
    """Give a variable that is still FromSource its values (a block of rows at a time when large)."""
    init = getattr(var, "_initializer", None)
    if not isinstance(init, FromSource) or var._value is not None:
        return
    _fill_by_rows(var, tuple(var.shape), init.source.read_rows)


# Arrays larger than this are moved a block of rows at a time (into a rebuilt model's variables, and
# from them into the saved file), so that no second full copy of, say, VGG16's 392 MiB fc1 kernel is made.
LARGE_ARRAY = 64 << 20
BLOCK_BYTES = 16 << 20


def row_blocks(shape: tuple, itemsize: int):
    """(start, stop) row ranges of about BLOCK_BYTES each over the first axis of ``shape``."""
    row = itemsize * math.prod(shape[1:])
    step = max(1, BLOCK_BYTES // max(1, row))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def is_large(shape: tuple, dtype) -> bool:
    return len(shape) >= 1 and math.prod(shape) * numpy_dtype(dtype).itemsize > LARGE_ARRAY


def numpy_dtype(name) -> np.dtype:
    """A Keras dtype name as a numpy dtype (bfloat16 and float8 through ml_dtypes, as Keras does)."""
    name = str(name)
    if name == "bfloat16" or name.startswith("float8"):
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def as_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` in the variable's dtype: a `cast` rebuild fills bfloat16 variables from float32 arrays
    (numpy's rounding to nearest even, as TensorFlow's cast)."""
    target = numpy_dtype(dtype)
    return array if array.dtype == target else array.astype(target)


def copy_variables(weights: list, sources, name: str = "") -> None:
    """Give the variables ``weights`` (a layer's, in order) the values of ``sources`` (the variables of
    the layer before the edit: Keras variables, or archive.ArchiveVariable), a block of rows at a time
    for large arrays. ``name``: the layer, for messages."""
    if len(weights) != len(sources):
        raise ApplyError(f"layer {name}: {len(sources)} arrays for {len(weights)} variables")
    for var, source in zip(weights, sources):
        shape = tuple(var.shape)
        if tuple(source.shape) != shape:
            raise ApplyError(f"layer {name}: {var.name} has shape {shape}, the array {tuple(source.shape)}")
        if not is_large(shape, var.dtype):
            _set_variable(var, as_dtype(np.asarray(source.numpy()), var.dtype))
            continue
        in_file = pending_source(source) or (source if hasattr(source, "archive") else None)
        if in_file is not None and _deferred(var) and str(in_file.dtype) == str(var.dtype):
            var._initializer = FromSource(in_file, var)  # its values stay in the file until needed
            continue
        if pending_source(source) is not None:
            materialise(source)
        read_rows = getattr(source, "read_rows", None) or (lambda a, b: read_variable_rows(source, a, b))
        _fill_by_rows(var, shape, read_rows)


def _backend() -> str:
    import keras
    return keras.backend.backend()


def _fill_by_rows(var, shape: tuple, read_rows) -> None:
    """Fill ``var`` with ``read_rows(start, stop)``, a block of rows at a time, holding one full copy of
    the array (the variable's), not two."""
    blocks = row_blocks(shape, numpy_dtype(var.dtype).itemsize)
    if _backend() == "tensorflow":
        import tensorflow as tf
        if _deferred(var):
            with tf.init_scope():  # (a variable made inside a tf.function is lifted out of it)
                var._initialize(tf.zeros(shape, dtype=var.dtype))
            var._initializer = None
        for start, stop in blocks:
            # scatter_update writes those rows in place (a slice assignment would copy the whole array)
            var._value.scatter_update(tf.IndexedSlices(as_dtype(read_rows(start, stop), var.dtype),
                                                       tf.range(start, stop)))
        return
    # Elsewhere the rows go into a host buffer that the backend then adopts without copying it (JAX's
    # device_put of a 64-byte-aligned buffer, torch.from_numpy); assigning a block at a time through
    # the backend's ops copies the whole array per block (jax: 6.7 s and +1.2 GiB for 400 MiB).
    host = _aligned_empty(shape, numpy_dtype(var.dtype))
    for start, stop in blocks:
        host[start:stop] = as_dtype(read_rows(start, stop), var.dtype)
    tensor = _adopt(host)
    if tensor is host:
        _set_variable(var, host)
    elif _deferred(var):
        var._initialize(tensor)
        var._initializer = None
    else:
        var.assign(tensor)
    del host, tensor  # the backend owns that memory now (JAX assumes nobody writes to it again)


def _aligned_empty(shape: tuple, dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an ``align``-byte boundary (XLA's CPU client wraps
    such a buffer instead of copying it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _adopt(host: np.ndarray):
    """A backend tensor over ``host``'s memory where the backend can wrap it (JAX on CPU, torch), else
    a copy of it (JAX on an accelerator: a transfer), else ``host`` itself."""
    backend = _backend()
    if backend == "jax":
        import jax
        return jax.device_put(host)  # zero-copy on CPU for an aligned buffer; a transfer to a GPU
    if backend == "torch":
        import torch
        if host.dtype.name == "bfloat16":  # torch.from_numpy knows no ml_dtypes type: share the bits
            return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        try:
            return torch.from_numpy(host)
        except TypeError:
            return host
    return host


def read_variable_rows(var, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a Keras variable, read on their own (reading the whole variable as a
    numpy array would copy all of it first, for every block)."""
    source = pending_source(var)
    if source is not None:  # a variable whose values are still in the archive (FromSource)
        return source.read_rows(start, stop)
    backend = _backend()
    if backend == "tensorflow":
        import tensorflow as tf
        return np.asarray(var._value.sparse_read(tf.range(start, stop)))  # a gather of those rows
    value = var.value
    if backend == "jax":
        devices = value.devices() if hasattr(value, "devices") else ()
        if all(getattr(d, "platform", "") == "cpu" for d in devices):
            return np.asarray(value)[start:stop]  # a read-only view of the buffer on a CPU
        return np.asarray(value[start:stop])
    if backend == "torch":
        import torch
        rows = value.detach()[start:stop].cpu()
        if rows.dtype == torch.bfloat16:  # (numpy knows bfloat16 only through ml_dtypes)
            import ml_dtypes
            return rows.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return rows.numpy()
    import keras
    return np.asarray(keras.ops.convert_to_numpy(value[start:stop]))


def _deferred(var) -> bool:
    return getattr(var, "_value", True) is None and getattr(var, "_initializer", None) is not None


def _set_variable(var, value) -> None:
    """``var.assign(value)``, also for a variable LazyVariables left without a value: Keras's own
    deferred initialisation (``_initialize``) with ``value`` instead of the initializer's."""
    if not _deferred(var):
        var.assign(value)
        return
    if _backend() == "tensorflow":
        import tensorflow as tf
        with tf.init_scope():
            var._initialize(value)
    else:
        # JaxVariable._initialize keeps what it is given (a numpy array would stay one): convert first,
        # as Keras's _initialize_with_initializer does; torch's wraps the tensor in a Parameter
        var._initialize(var._convert_to_tensor(value, dtype=var.dtype))
    var._initializer = None


class _Array:
    """An array as a source for copy_variables."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape = self.array.shape

    def numpy(self):
        return self.array

    def read_rows(self, start: int, stop: int):
        return self.array[start:stop]


def set_variables(weights: list, arrays, name: str = "") -> None:
    """``layer.set_weights(arrays)`` for the variables ``weights``, also for a layer built by
    LazyVariables whose variables hold no value yet."""
    copy_variables(weights, [_Array(a) for a in arrays], name)


# ---- a variable's values to compare, where they are ------------------------------------------------------

class StoredValues:
    """A large variable's values, left where they are (in the variable, or in the .keras file of a model
    built from its archive) and read a block of rows at a time (read_variable_rows): a diff of two 6 GiB
    models holds a few blocks, not four copies of the weights."""

    def __init__(self, var):
        self.var = var
        self.shape = tuple(int(d) for d in var.shape)
        self.dtype = numpy_dtype(var.dtype)
        self.source = pending_source(var)  # the array of a .keras archive it still takes its values from
        self._digest = None

    def same_array(self, other) -> bool:
        """Whether both take their values from the same array of the same open archive (a model and
        the model rebuilt from it, as plan --html compares them): the same values, without reading them."""
        return isinstance(other, StoredValues) and self.source is not None and self.source is other.source \
            and self.dtype == other.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(read_variable_rows(self.var, start, stop))

    def digest(self) -> str:
        if self._digest is None:
            import hashlib
            h = hashlib.sha256()
            for block in value_blocks(self, self.dtype.itemsize):
                h.update(as_bytes(block))
            self._digest = h.hexdigest()
        return self._digest


def values_of(var):
    """A variable's values to compare (diff's snapshots, verify's details): a copy, or StoredValues for a
    large one."""
    if is_large(tuple(var.shape), var.dtype):
        return StoredValues(var)
    return np.array(var.numpy(), copy=True)


def value_blocks(values, itemsize: int):
    """``values`` (an array or StoredValues) a block of rows at a time, blocks cut for ``itemsize``."""
    for start, stop in row_blocks(values.shape, itemsize):
        yield values.rows(start, stop) if isinstance(values, StoredValues) else values[start:stop]


def paired_blocks(x, y):
    """Two arrays of one shape (numpy arrays or StoredValues) side by side: whole where both are in
    memory, else a block of rows of each at a time (cut for the larger itemsize, so that they align)."""
    if not (isinstance(x, StoredValues) or isinstance(y, StoredValues)):
        return [(x, y)]
    itemsize = max(x.dtype.itemsize, y.dtype.itemsize)
    return zip(value_blocks(x, itemsize), value_blocks(y, itemsize))


def as_bytes(array: np.ndarray) -> np.ndarray:
    """An array's bytes, without a copy where it is contiguous, as a buffer hashlib takes (numpy exports
    no buffer of ml_dtypes' bfloat16 and float8 arrays, but of their bytes viewed as uint8)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
