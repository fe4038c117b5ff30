"""New and reinitialised weights are drawn with numpy (keras_io/initializers.py), so that they are the
same bytes on every Keras backend: these tests hold them to what Keras's own initializers promise
(shapes, bounds, standard deviations, orthogonality), to Keras's own values under its numpy backend,
and to the seeding rules of docs/language.md#randomness."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_cnn
from modelxform import compile_recipe
from modelxform.keras_io import initializers as inits
from modelxform.keras_io.initializers import initial_values, numpy_values

keras = pytest.importorskip("keras")
I = keras.initializers

# (initializer expression, shapes) — evaluated here and in a KERAS_BACKEND=numpy subprocess
KERAS_CASES = [
    ("GlorotUniform(5)", [(3, 4), (3, 3, 16, 8)]),
    ("GlorotNormal(5)", [(3, 4), (3, 3, 16, 8)]),
    ("HeNormal(7)", [(40, 30)]),
    ("HeUniform(7)", [(40, 30)]),
    ("LecunNormal(9)", [(5, 5, 2, 3)]),
    ("LecunUniform(9)", [(7,)]),
    ("RandomNormal(0.1, 0.3, seed=3)", [(20, 10)]),
    ("RandomUniform(-2, 3, seed=4)", [(20, 10)]),
    ("TruncatedNormal(0.5, 2.0, seed=11)", [(300, 7)]),
    ("VarianceScaling(2.0, 'fan_out', 'untruncated_normal', seed=2**31 - 2)", [(6, 9)]),
    ("VarianceScaling(0.5, 'fan_avg', 'uniform', seed=1, input_axes=[0], output_axes=[1, 2])", [(4, 5, 6)]),
    ("Zeros()", [(3, 4)]),
    ("Ones()", [(3, 4)]),
    ("Constant(0.3)", [(3, 4)]),
    ("Identity(2.0)", [(3, 4)]),
]

DIGESTS = """
import hashlib, json, sys
import numpy as np
import keras
from keras.initializers import *
cases = json.loads(sys.argv[1])
print(json.dumps([[hashlib.sha256(np.asarray(eval(expr)(tuple(shape), dtype="float32")).tobytes()).hexdigest()
                   for shape in shapes] for expr, shapes in cases]))
"""


@pytest.mark.slow
def test_the_values_are_those_keras_draws_under_its_numpy_backend():
    """Keras's numpy backend draws with numpy.random.default_rng([seed, 0]); so does modelxform, whatever
    the backend: the same bytes (Orthogonal aside, below)."""
    pytest.importorskip("scipy")  # (Keras's numpy backend needs it)
    env = dict(os.environ, KERAS_BACKEND="numpy")
    proc = subprocess.run([sys.executable, "-c", DIGESTS, json.dumps(KERAS_CASES)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [[hashlib.sha256(numpy_values(eval(expr, vars(I)), shape, "float32", None).tobytes()).hexdigest()
             for shape in shapes] for expr, shapes in KERAS_CASES]
    mismatched = [expr for (expr, _), a, b in zip(KERAS_CASES, ours, theirs) if a != b]
    assert mismatched == []


def test_orthogonal_is_orthogonal_and_runs_its_qr_in_float64():
    for shape in [(6, 6), (4, 10), (3, 3, 4, 5)]:
        q = numpy_values(I.Orthogonal(gain=1.5, seed=5), shape, "float32", None)
        assert q.shape == shape and q.dtype == np.float32
        flat = q.reshape(-1, shape[-1]).astype("float64")
        small = flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T
        np.testing.assert_allclose(small, 1.5 ** 2 * np.eye(len(small)), atol=1e-5)
    a = inits._normal(inits.generator(5), (6, 6), 0.0, 1.0, np.float32)
    q, r = np.linalg.qr(a.astype("float64"))
    want = (q * np.sign(np.diag(r))).astype("float32")
    assert numpy_values(I.Orthogonal(seed=5), (6, 6), "float32", None).tobytes() == want.tobytes()


@pytest.mark.parametrize("expr,distribution,std", [
    # (initializer, what its values are, the standard deviation it promises) for a (400, 600) kernel
    ("GlorotUniform(1)", "uniform", math.sqrt(2 / 1000)),
    ("HeUniform(1)", "uniform", math.sqrt(2 / 400)),
    ("LecunUniform(1)", "uniform", math.sqrt(1 / 400)),
    ("GlorotNormal(1)", "truncated", math.sqrt(2 / 1000)),
    ("HeNormal(1)", "truncated", math.sqrt(2 / 400)),
    ("LecunNormal(1)", "truncated", math.sqrt(1 / 400)),
    ("VarianceScaling(3.0, 'fan_out', 'untruncated_normal', seed=1)", "normal", math.sqrt(3 / 600)),
    ("RandomNormal(0.0, 0.05, seed=1)", "normal", 0.05),
    ("RandomUniform(-0.05, 0.05, seed=1)", "uniform", 0.05 / math.sqrt(3)),
])
def test_the_values_have_the_distribution_the_initializer_promises(expr, distribution, std):
    values = numpy_values(eval(expr, vars(I)), (400, 600), "float32", None).astype("float64")
    assert values.shape == (400, 600)
    assert abs(values.mean()) < 5 * std / math.sqrt(values.size)
    assert values.std() == pytest.approx(std, rel=0.01)
    if distribution == "uniform":  # within ±limit, limit = std·√3, and filling it
        limit = std * math.sqrt(3)
        assert np.abs(values).max() <= limit * (1 + 1e-6)
        assert np.abs(values).max() > 0.999 * limit
    elif distribution == "truncated":  # Keras divides by .8796, so that the truncated std is the promised one
        assert np.abs(values).max() <= 2 * std / 0.87962566103423978 * (1 + 1e-6)
    else:
        assert np.abs(values).max() > 3 * std


def test_truncated_normal_keeps_values_within_two_standard_deviations_of_the_mean():
    values = numpy_values(I.TruncatedNormal(mean=1.0, stddev=0.5, seed=2), (200, 200), "float32", None)
    assert values.min() >= 0.0 and values.max() <= 2.0
    assert values.min() < 0.02 and values.max() > 1.98


def test_values_do_not_depend_on_the_block_size(monkeypatch):
    """Large arrays are drawn a block at a time; numpy's Generator gives the same stream either way."""
    cases = [I.GlorotUniform(3), I.HeNormal(3), I.RandomNormal(seed=3), I.Orthogonal(seed=3),
             I.TruncatedNormal(seed=3)]
    whole = [numpy_values(init, (97, 31), "float32", None) for init in cases]
    monkeypatch.setattr(inits, "BLOCK", 100)
    blocked = [numpy_values(init, (97, 31), "float32", None) for init in cases]
    assert [a.tobytes() for a in whole] == [b.tobytes() for b in blocked]


def test_seeds_determine_the_values():
    a = initial_values(I.GlorotUniform(), (30, 20), "float32", 17)
    assert a.tobytes() == initial_values(I.GlorotUniform(), (30, 20), "float32", 17).tobytes()
    assert a.tobytes() == initial_values(I.GlorotUniform(seed=99), (30, 20), "float32", 17).tobytes()
    assert a.tobytes() != initial_values(I.GlorotUniform(), (30, 20), "float32", 18).tobytes()
    # None: the initializer's own seed (a recipe's `glorot_uniform(seed=17)`)
    assert a.tobytes() == initial_values(I.GlorotUniform(seed=17), (30, 20), "float32", None).tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_other_dtypes(dtype):
    values = numpy_values(I.GlorotUniform(1), (8, 8), dtype, None)
    assert values.dtype == inits.np_dtype(dtype)
    assert values.astype("float64").tobytes() == \
        numpy_values(I.GlorotUniform(1), (8, 8), "float64", None).astype(dtype).astype("float64").tobytes()
    assert numpy_values(I.Constant(0.1), (2,), dtype, None).astype("float64").tolist() == \
        [float(np.float32(0.1).astype(inits.np_dtype(dtype)))] * 2


def test_other_initializers_are_called_through_keras_with_the_seed():
    """A custom initializer is Keras's to compute (on the backend in use; docs/language.md#randomness)."""
    class Halves(I.Initializer):
        def __init__(self, seed=None):
            self.seed = seed

        def __call__(self, shape, dtype=None):
            return np.full(shape, 0.5 + (self.seed or 0), dtype=dtype)

        def get_config(self):
            return {"seed": self.seed}

    assert not inits.computed_here(Halves())
    assert inits.computed_here(I.HeNormal()) and inits.computed_here(I.Identity())
    assert initial_values(Halves(), (2, 2), "float32", 3).tolist() == [[3.5, 3.5], [3.5, 3.5]]
    # an unseeded random initializer with no seed given has no numpy stream: Keras draws it
    assert not isinstance(I.GlorotUniform(seed=keras.random.SeedGenerator(1)).seed, int)
    with pytest.raises(inits.NotNumpy, match="^GlorotUniform without an integer seed$"):
        numpy_values(I.GlorotUniform(seed=keras.random.SeedGenerator(1)), (2, 2), "float32", None)


def test_each_variable_of_each_new_layer_has_its_own_stream():
    """Two new layers of the same shape, and the kernel and bias of each, are drawn from independent
    streams (derived from the seed, the statement and the layer and variable path)."""
    recipe = compile_recipe('insert Dense(units=32, name="a", bias_initializer="random_normal") after dense_1\n'
                            'insert Dense(units=32, name="b", bias_initializer="random_normal") after a')
    new, _ = recipe.apply(make_cnn(), seed=7)
    ka, ba = (np.asarray(w) for w in new.get_layer("a").get_weights())
    kb, bb = (np.asarray(w) for w in new.get_layer("b").get_weights())
    assert ka.tobytes() != kb.tobytes() and ba.tobytes() != bb.tobytes()
    assert abs(np.corrcoef(ka.ravel(), kb.ravel())[0, 1]) < 0.1
    assert abs(np.corrcoef(ba.ravel(), ka.ravel()[:32])[0, 1]) < 0.5
    again, _ = recipe.apply(make_cnn(), seed=7)
    assert again.get_layer("a").get_weights()[0].tobytes() == ka.tobytes()
    other, _ = recipe.apply(make_cnn(), seed=8)
    assert other.get_layer("a").get_weights()[0].tobytes() != ka.tobytes()
    limit = math.sqrt(6 / (32 + 32))
    assert np.abs(ka).max() <= limit and np.abs(ka).max() > 0.9 * limit


def test_reinit_draws_the_same_values_as_numpy_gives_for_its_derived_seed():
    """`reinit` with the layer's own initializer: the values are initial_values() for the seed derived
    from the recipe's seed, the statement, the layer and the variable (docs/language.md#randomness)."""
    from modelxform.rng import derive_seed
    new, _ = compile_recipe("select dense_3\nreinit kernel").apply(make_cnn(), seed=5)
    kernel = new.get_layer("dense_3").kernel
    seed = derive_seed(5, "reinit kernel", 0, "dense_3", "kernel") % (2**31 - 1)
    want = initial_values(I.GlorotUniform(), tuple(kernel.shape), "float32", seed)
    assert np.asarray(kernel.numpy()).tobytes() == want.tobytes()
