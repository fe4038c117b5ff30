"""Initial values for new and reinitialised weights, drawn with numpy: the same bytes on every backend.

A Keras initializer draws its random values with the backend's generator, so the same seeded
``GlorotUniform(seed=5)`` gives different arrays under TensorFlow, JAX and PyTorch. modelxform's outputs
must not depend on the backend (docs/language.md#randomness), so the values of Keras's own initializers
are computed here from the initializer's settings and the seed, the way Keras computes them under its
numpy backend: ``numpy.random.default_rng([seed, 0])``, the same formulas (fans, limits, the truncation
at two standard deviations) and, for the random ones, the same numbers as ``KERAS_BACKEND=numpy`` gives
(tests/test_initializers.py checks both). Orthogonal is the exception: its QR factorisation runs in
float64 here (Keras: in the variable's dtype), which keeps the float32 result from depending on the
LAPACK build's rounding.

Any other initializer (a custom one, ``STFT``) is called through Keras: its values are those of the
backend in use, and a random one differs from backend to backend.

Large arrays are drawn a block at a time into the result (numpy's Generator gives the same stream in
blocks as at once), so that a new 392 MiB kernel costs one float32 copy, not a float64 one besides.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

BLOCK = 1 << 20  # values drawn at a time


def np_dtype(dtype) -> np.dtype:
    """numpy's dtype for a Keras dtype name (bfloat16 and the float8 types through ml_dtypes)."""
    name = str(getattr(dtype, "name", dtype))
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # a Keras dependency
        return np.dtype(getattr(ml_dtypes, name))


def compute_fans(shape, input_axes=None, output_axes=None) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shape, as keras.src.initializers.random_initializers.compute_fans."""
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return int(math.prod(shape[a] for a in input_axes)), int(math.prod(shape[a] for a in output_axes))
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    receptive = math.prod(shape[:-2])
    return int(shape[-2] * receptive), int(shape[-1] * receptive)


def generator(seed: int) -> np.random.Generator:
    """The generator Keras's numpy backend makes for an integer seed (keras.src.random.draw_seed: the
    pair [seed, 0] as uint32)."""
    return np.random.default_rng(np.array([seed & 0xFFFFFFFF, 0], dtype=np.uint32))


def _normal(rng, shape, mean, stddev, dtype) -> np.ndarray:
    out = np.empty(math.prod(shape), dtype)
    for start in range(0, out.size, BLOCK):
        stop = min(start + BLOCK, out.size)
        out[start:stop] = rng.normal(loc=mean, scale=stddev, size=stop - start)
    return out.reshape(shape)


def _uniform(rng, shape, low, high, dtype) -> np.ndarray:
    out = np.empty(math.prod(shape), dtype)
    for start in range(0, out.size, BLOCK):
        stop = min(start + BLOCK, out.size)
        out[start:stop] = rng.uniform(low=low, high=high, size=stop - start)
    return out.reshape(shape)


def _truncated_normal(rng, shape, mean, stddev, dtype) -> np.ndarray:
    """The first values of the normal stream within two standard deviations of the mean (Keras's numpy
    backend draws batches of the array's size until it has enough; the stream is the same)."""
    lower, upper = mean - 2 * stddev, mean + 2 * stddev
    size = math.prod(shape)
    out = np.empty(size, dtype)
    filled = 0
    while filled < size:
        batch = rng.normal(loc=mean, scale=stddev, size=min(BLOCK, size))
        valid = batch[(batch >= lower) & (batch <= upper)][: size - filled]
        out[filled:filled + valid.size] = valid
        filled += valid.size
    return out.reshape(shape)


class NotNumpy(Exception):
    """This initializer is not one whose values are computed here."""


def numpy_values(initializer, shape: tuple, dtype, seed: int | None) -> np.ndarray:
    """The values of one of Keras's built-in initializers, computed with numpy (``seed`` overrides the
    initializer's own; a random initializer without an integer seed raises NotNumpy, as does any
    initializer that is not one of Keras's own)."""
    import keras
    init = keras.initializers
    kind = type(initializer)
    shape = tuple(int(d) for d in shape)
    dtype = np_dtype(dtype)
    if kind is init.Zeros:
        return np.zeros(shape, dtype)
    if kind is init.Ones:
        return np.ones(shape, dtype)
    if kind is init.Constant:
        value = np.asarray(initializer.value)
        # as the archive engine fills (statements/weights._constant_source): a Python float is a
        # float32 first, an int an int32, whatever the variable's dtype
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        elif value.dtype.kind in "iu":
            value = value.astype(np.int32)
        return np.array(np.broadcast_to(value.astype(dtype), shape))
    if kind is init.Identity:
        if len(shape) != 2:
            raise ValueError(f"Identity matrix initializer can only be used for 2D matrices. Received: "
                             f"shape={shape} of rank {len(shape)}.")
        return (np.eye(*shape, dtype=dtype) * initializer.gain).astype(dtype, copy=False)
    randoms = {init.RandomNormal, init.RandomUniform, init.TruncatedNormal, init.Orthogonal, init.VarianceScaling,
               init.GlorotNormal, init.GlorotUniform, init.HeNormal, init.HeUniform, init.LecunNormal,
               init.LecunUniform}
    if kind not in randoms:
        raise NotNumpy(kind.__name__)
    if seed is None:
        seed = initializer.seed
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise NotNumpy(f"{kind.__name__} without an integer seed")
    rng = generator(seed)
    if kind is init.RandomNormal:
        return _normal(rng, shape, initializer.mean, initializer.stddev, dtype)
    if kind is init.TruncatedNormal:
        return _truncated_normal(rng, shape, initializer.mean, initializer.stddev, dtype)
    if kind is init.RandomUniform:
        return _uniform(rng, shape, initializer.minval, initializer.maxval, dtype)
    if kind is init.Orthogonal:
        return _orthogonal(rng, shape, initializer.gain, dtype)
    # VarianceScaling and its subclasses (Glorot, He, Lecun)
    fan_in, fan_out = compute_fans(shape, getattr(initializer, "input_axes", None),
                                   getattr(initializer, "output_axes", None))
    scale = initializer.scale
    if initializer.mode == "fan_in":
        scale /= max(1.0, fan_in)
    elif initializer.mode == "fan_out":
        scale /= max(1.0, fan_out)
    else:
        scale /= max(1.0, (fan_in + fan_out) / 2.0)
    if initializer.distribution == "truncated_normal":
        return _truncated_normal(rng, shape, 0.0, math.sqrt(scale) / 0.87962566103423978, dtype)
    if initializer.distribution == "untruncated_normal":
        return _normal(rng, shape, 0.0, math.sqrt(scale), dtype)
    limit = math.sqrt(3.0 * scale)
    return _uniform(rng, shape, -limit, limit, dtype)


def _orthogonal(rng, shape, gain, dtype) -> np.ndarray:
    if len(shape) < 2:
        raise ValueError(f"The tensor to initialize must be at least two-dimensional. Received: shape={shape} "
                         f"of rank {len(shape)}.")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    a = _normal(rng, (max(rows, cols), min(rows, cols)), 0.0, 1.0, dtype)
    q, r = np.linalg.qr(a.astype(np.float64))
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return (gain * q.reshape(shape)).astype(dtype)


def initial_values(initializer, shape: tuple, dtype, seed: int | None) -> np.ndarray:
    """``initializer(shape, dtype)`` as a numpy array, seeded with ``seed`` (None: the initializer's
    own seed), the same on every backend for Keras's own initializers (see the module's docstring)."""
    try:
        return numpy_values(initializer, shape, dtype, seed)
    except NotNumpy:
        pass
    if seed is not None:
        initializer = seeded(initializer, seed)
    return np.asarray(initializer(tuple(shape), dtype=dtype))


def seeded(initializer, seed_value: int):
    """A copy of ``initializer`` with its seed set (initializers without a seed are returned as is)."""
    params = inspect.signature(type(initializer).__init__).parameters
    if "seed" not in params:
        return initializer
    cfg = initializer.get_config()
    cfg["seed"] = seed_value
    return type(initializer).from_config(cfg)


def computed_here(initializer) -> bool:
    """Whether numpy computes this initializer's values (else Keras does, on the backend in use)."""
    try:
        numpy_values(initializer, (1, 1), "float32", 0)
        return True
    except NotNumpy:
        return False
    except Exception:  # noqa: BLE001 - its own checks (a 2D-only initializer): still computed here
        return True
