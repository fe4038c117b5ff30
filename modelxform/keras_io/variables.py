"""Giving a built model's variables their values: the only code that reaches into Keras variables.

A structural edit rebuilds the model from its edited config; its variables are then filled from the
model before the edit (Keras variables) or straight from a .keras archive (archive.ArchiveVariable).
Two things keep that cheap: the rebuild creates its variables without random initial values
(:class:`LazyVariables`, which uses Keras's stateless scope), and a large array moves a block of rows
at a time, so that no second full copy of it is made. Both use Keras and TensorFlow internals; each use
says why, and tests/test_keras_io.py fails loudly when a Keras release changes them.
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
    import tensorflow as tf
    shape = tuple(var.shape)
    with tf.init_scope():
        var._initialize(tf.zeros(shape, dtype=var.dtype))
    var._initializer = None
    for start, stop in row_blocks(shape, np.dtype(var.dtype).itemsize):
        var._value.scatter_update(tf.IndexedSlices(init.source.read_rows(start, stop), tf.range(start, stop)))


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
    return len(shape) >= 1 and math.prod(shape) * np.dtype(dtype).itemsize > LARGE_ARRAY


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
            _set_variable(var, np.asarray(source.numpy()))
            continue
        in_file = pending_source(source) or (source if hasattr(source, "archive") else None)
        if in_file is not None and _deferred(var) and np.dtype(in_file.dtype) == np.dtype(var.dtype):
            var._initializer = FromSource(in_file, var)  # its values stay in the file until needed
            continue
        if pending_source(source) is not None:
            materialise(source)
        import tensorflow as tf
        if _deferred(var):
            with tf.init_scope():
                var._initialize(tf.zeros(shape, dtype=var.dtype))
            var._initializer = None
        read_rows = getattr(source, "read_rows", None) or (lambda a, b: read_variable_rows(source, a, b))
        for start, stop in row_blocks(shape, np.dtype(var.dtype).itemsize):
            # scatter_update writes those rows in place (a slice assignment would copy the whole array)
            var._value.scatter_update(tf.IndexedSlices(read_rows(start, stop), tf.range(start, stop)))


def read_variable_rows(var, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a Keras variable, read on their own (a gather of those rows; slicing the
    variable would read all of it first)."""
    source = pending_source(var)
    if source is not None:
        return source.read_rows(start, stop)
    import tensorflow as tf
    return np.asarray(var._value.sparse_read(tf.range(start, stop)))


def _deferred(var) -> bool:
    return getattr(var, "_value", True) is None and getattr(var, "_initializer", None) is not None


def _set_variable(var, value) -> None:
    if _deferred(var):
        import tensorflow as tf
        with tf.init_scope():
            var._initialize(value)
        var._initializer = None
    else:
        var.assign(value)


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
