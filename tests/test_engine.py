"""Engine behaviour on the small hand-built models of conftest.py.

Every test checks numbers (weights, activations, flags, spans), never just "it ran". Expected values are
computed from the input model itself, the same way the recipe describes them.
"""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from conftest import (
    assert_bit_identical, make_cnn, make_multi_io, make_nested, make_sequential, make_shared,
    make_subclassed, position, position_of, weights_by_path,
)
from modelxform import AssertionFailed, ApplyError, ModelxformError, UsageError, compile_recipe

keras = pytest.importorskip("keras")

from modelxform.keras_io.layers import walk  # noqa: E402  (after keras, which conftest imports lazily)

SEED = 7


# ---- helpers ---------------------------------------------------------------------------------------

def apply(text, model, seed=SEED, params=None):
    return compile_recipe(text, "x.recipe").apply(model, seed=seed, params=params)


def plan(text, model, seed=SEED, params=None):
    return compile_recipe(text, "x.recipe").plan(model, seed=seed, params=params)


def selected(text, model, seed=SEED):
    """The layers the first statement (a select) resolved to."""
    return plan(text, model, seed=seed).statements[0].layers


def paths(model):
    return [info.path for info in walk(model)]


def layer_at(model, path):
    return {info.path: info.layer for info in walk(model)}[path]


def var(model, path, name):
    for v in layer_at(model, path).weights:
        if v.name == name:
            return np.asarray(v.numpy())
    raise KeyError(f"{path} has no variable {name}")


def snapshot(model):
    """Everything apply must leave alone on its input: weights (bytes), classes and trainable flags."""
    return {info.path: (type(info.layer).__name__, bool(info.layer.trainable),
                        [w.tobytes() for w in (np.asarray(a) for a in info.layer.get_weights())])
            for info in walk(model)}, type(model).__name__, len(getattr(model, "outputs", None) or [])


def scaled(old, factor):
    return old * np.asarray(factor, old.dtype)


def random_input(model, seed=0, batch=3):
    rng = np.random.default_rng(seed)
    try:
        shapes = [[int(d) for d in tuple(t.shape)[1:]] for t in model.inputs]
    except AttributeError:  # a subclassed model has no symbolic inputs: use its first kernel's fan-in
        shapes = [[int(walk(model)[0].layer.kernel.shape[0])]]
    arrays = [rng.standard_normal([batch] + shape).astype("float32") for shape in shapes]
    return arrays if len(arrays) > 1 else arrays[0]


def outputs(model, x):
    out = model(x, training=False)
    if isinstance(out, (list, tuple)):
        return [np.asarray(o) for o in out]
    return [np.asarray(out)]


def activation(model, layer_name, x):
    """The activation of a top-level layer of the ORIGINAL model on ``x``."""
    probe = keras.Model(model.inputs, model.get_layer(layer_name).output)
    return np.asarray(probe(x, training=False))


def assert_unchanged_except(before, after, changed: set):
    """Every layer not in ``changed`` has bit-identical weights in ``after``."""
    wa, wb = weights_by_path(before), weights_by_path(after)
    for path, arrays in wa.items():
        if path in changed:
            continue
        assert path in wb, path
        assert_bit_identical(arrays, wb[path])


def roundtrip(model, tmp_path, name="m.keras"):
    path = tmp_path / name
    model.save(path)
    return keras.models.load_model(path)


# ---- the design card example -------------------------------------------------------------------------

DESIGN_CARD = ("select random where type=Dense; scale weights 0.8; "
               "replace MaxPooling2D with AveragePooling2D; tap conv2d_1")


def _reference_design_card(model, scaled_layer, x):
    """The design card's result computed independently: the original layers, one Dense with its arrays
    times 0.8, and an AveragePooling2D with the MaxPooling2D's settings."""
    h = x
    for layer in model.layers[1:]:
        if isinstance(layer, keras.layers.MaxPooling2D):
            cfg = layer.get_config()
            h = keras.layers.AveragePooling2D(pool_size=cfg["pool_size"], strides=cfg["strides"],
                                              padding=cfg["padding"], data_format=cfg["data_format"])(h)
        elif layer.name == scaled_layer:
            copy = type(layer).from_config(layer.get_config())
            copy.build(h.shape)
            copy.set_weights([scaled(np.asarray(w), 0.8) for w in layer.get_weights()])
            h = copy(h)
        else:
            h = layer(h, training=False)
    return np.asarray(h)


def test_design_card_example_numbers(tmp_path):
    model = make_cnn()
    before = weights_by_path(model)
    new, report = apply(DESIGN_CARD, model)

    # exactly one Dense layer scaled by float32(0.8), every array of it; everything else bit-identical
    dense = [p for p in paths(model) if type(layer_at(model, p)).__name__ == "Dense"]
    after = weights_by_path(new)
    hit = [p for p in dense
           if all(np.array_equal(b, scaled(a, 0.8)) for a, b in zip(before[p], after[p]))]
    assert len(hit) == 1
    assert report.statements[0].layers == hit
    assert report.statements[1].layers == hit
    assert_unchanged_except(model, new, set(hit))
    for a, b in zip(before[hit[0]], after[hit[0]]):
        assert a.tobytes() != b.tobytes()

    # same seed, same layer; and the same numbers
    new2, report2 = apply(DESIGN_CARD, model)
    assert report2.statements[0].layers == hit
    for path, arrays in weights_by_path(new2).items():
        assert_bit_identical(arrays, after[path])

    # every MaxPooling2D became an AveragePooling2D with the same settings
    old_pools = {l.name: l for l in model.layers if isinstance(l, keras.layers.MaxPooling2D)}
    assert old_pools
    for name, old in old_pools.items():
        newl = new.get_layer(name)
        assert type(newl) is keras.layers.AveragePooling2D
        for key in ("pool_size", "strides", "padding", "data_format"):
            assert newl.get_config()[key] == old.get_config()[key], key
    assert not [l for l in new.layers if isinstance(l, keras.layers.MaxPooling2D)]
    assert len(new.layers) == len(model.layers)

    # outputs: [original output, conv2d_1], numerically what they should be
    assert len(new.outputs) == 2
    assert tuple(new.outputs[0].shape) == tuple(model.outputs[0].shape)
    assert tuple(new.outputs[1].shape) == tuple(model.get_layer("conv2d_1").output.shape)
    x = random_input(model, seed=3)
    got = outputs(new, x)
    np.testing.assert_allclose(got[1], activation(model, "conv2d_1", x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[0], _reference_design_card(model, hit[0], x), rtol=1e-5, atol=1e-6)
    # the main output really did change (avg pooling + scaling), so the check above is not vacuous
    assert not np.allclose(got[0], outputs(model, x)[0], rtol=0, atol=1e-7)

    # survives a .keras round trip
    loaded = roundtrip(new, tmp_path)
    for path, arrays in weights_by_path(loaded).items():
        assert_bit_identical(arrays, after[path])
    assert type(loaded.get_layer("max_pooling2d")) is keras.layers.AveragePooling2D
    for a, b in zip(outputs(loaded, x), got):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ---- the input model is never modified ------------------------------------------------------------

@pytest.mark.parametrize("factory, text", [
    (make_cnn, "select all; freeze; select where type=Dense; scale weights 0.5; add noise normal(stddev=1) "
               "to kernel; prune kernel 50%; clip bias -0.01 0.01\nreplace MaxPooling2D with AveragePooling2D\n"
               "replace dense_3 with Dense(units=4)\ntap conv2d_2"),
    (make_nested, "select backbone/block; freeze; scale weights 3; set moving_mean to ones\n"
                  "replace backbone/pool with AveragePooling2D"),
    (make_sequential, "select all; reinit weights\nreplace dropout_1 with GaussianDropout(rate=0.1)\ntap fc1"),
    (make_shared, "select all; set kernel to zeros\nreplace shared with Dense(units=5)"),
    (make_subclassed, "select all; freeze; scale kernel 2; add noise uniform(low=0, high=1) to bias"),
])
def test_input_model_is_never_modified(factory, text):
    model = factory()
    before = snapshot(model)
    x = random_input(model)
    out_before = outputs(model, x)
    apply(text, model)
    plan(text, model)
    assert snapshot(model) == before
    for a, b in zip(out_before, outputs(model, x)):
        assert a.tobytes() == b.tobytes()


# ---- weight statements --------------------------------------------------------------------------------

def test_scale_kernel_only_touches_kernel():
    model = make_cnn()
    new, report = apply("select where type=Conv2D; scale kernel -1.5", model)
    convs = ["conv2d_1", "conv2d_2"]
    assert report.statements[1].layers == convs
    for p in convs:
        old = var(model, p, "kernel")
        assert np.array_equal(var(new, p, "kernel"), scaled(old, -1.5))
        assert var(new, p, "bias").tobytes() == var(model, p, "bias").tobytes()
    assert_unchanged_except(model, new, set(convs))


def test_scale_weights_on_batchnorm_scales_every_variable():
    model = make_nested()
    # make every BN variable non-trivial first, then scale: expected = (noisy) * 0.5
    noisy, _ = apply("select bn_a; add noise normal(stddev=0.3) to weights", model)
    new, report = apply("select bn_a; add noise normal(stddev=0.3) to weights; scale weights 0.5", model)
    path = "backbone/block/bn_a"
    names = [v.name for v in layer_at(model, path).weights]
    assert names == ["gamma", "beta", "moving_mean", "moving_variance"]
    for name in names:
        base = var(noisy, path, name)
        assert not np.array_equal(base, var(model, path, name))  # the noise did reach every variable
        assert np.array_equal(var(new, path, name), scaled(base, 0.5))
    assert_unchanged_except(model, new, {path})


@pytest.mark.parametrize("target", ["gamma", "beta", "moving_mean", "moving_variance"])
def test_batchnorm_single_variable_targets(target):
    model = make_nested()
    path = "backbone/block/bn_a"
    new, report = apply(f"select backbone/block/bn_a; set {target} to constant(0.3); scale {target} 2", model)
    want = scaled(np.full(var(model, path, target).shape, 0.3, np.float32), 2)
    assert np.array_equal(var(new, path, target), want)
    for other in ("gamma", "beta", "moving_mean", "moving_variance"):
        if other != target:
            assert var(new, path, other).tobytes() == var(model, path, other).tobytes()
    assert report.statements[1].layers == [path]


def test_target_missing_on_selection_is_an_error_with_hint():
    with pytest.raises(ApplyError) as info:
        apply("select conv2d_1\nscale gamma 2", make_cnn())
    assert "gamma" in info.value.message
    assert info.value.line == 2 and info.value.column == 1
    assert "bias" in info.value.hint and "kernel" in info.value.hint
    with pytest.raises(ApplyError) as info:
        apply("select backbone/block/bn_a; scale kernel 2", make_nested())
    assert "kernel" in info.value.message
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        assert name in info.value.hint


def test_weight_statement_skips_layers_without_the_target():
    model = make_cnn()
    new, report = apply("select all; scale kernel 2", model)
    with_kernel = [p for p in paths(model) if any(v.name == "kernel" for v in layer_at(model, p).weights)]
    assert report.statements[1].layers == with_kernel
    assert any("skipped" in n for n in report.statements[1].notes)
    for p in with_kernel:
        assert np.array_equal(var(new, p, "kernel"), scaled(var(model, p, "kernel"), 2))


def _noise_delta(model, new, path, name):
    return var(new, path, name).astype(np.float64) - var(model, path, name).astype(np.float64)


def test_add_noise_normal_is_seeded_and_has_the_requested_statistics():
    model = make_cnn()
    text = "select dense_1; add noise normal(mean=0.1, stddev=0.05) to kernel"
    a, _ = apply(text, model, seed=1)
    b, _ = apply(text, model, seed=1)
    c, _ = apply(text, model, seed=2)
    assert var(a, "dense_1", "kernel").tobytes() == var(b, "dense_1", "kernel").tobytes()
    assert var(a, "dense_1", "kernel").tobytes() != var(c, "dense_1", "kernel").tobytes()
    delta = _noise_delta(model, a, "dense_1", "kernel")
    assert delta.size == 1936 * 32
    assert abs(delta.mean() - 0.1) < 0.002
    assert abs(delta.std() - 0.05) < 0.002
    # the bias and every other layer are untouched
    assert var(a, "dense_1", "bias").tobytes() == var(model, "dense_1", "bias").tobytes()
    assert_unchanged_except(model, a, {"dense_1"})


def test_add_noise_uniform_bounds_and_statistics():
    model = make_cnn()
    new, _ = apply("select dense_1; add noise uniform(low=-0.2, high=0.3) to kernel", model)
    delta = _noise_delta(model, new, "dense_1", "kernel")
    eps = 1e-6  # float32 rounding of old + noise
    assert delta.min() >= -0.2 - eps and delta.max() <= 0.3 + eps
    assert abs(delta.mean() - 0.05) < 0.003
    assert abs(delta.std() - 0.5 / math.sqrt(12)) < 0.003
    # the two ends of the range are both reached (it is not e.g. a normal clipped into it)
    assert delta.min() < -0.19 and delta.max() > 0.29


def test_add_noise_differs_between_layers_and_variables():
    model = make_cnn()
    new, _ = apply("select conv2d_2, dense_2; add noise normal(stddev=1) to weights", model)
    d1 = _noise_delta(model, new, "conv2d_2", "bias")
    d2 = _noise_delta(model, new, "dense_2", "bias")
    assert d1.shape == d2.shape == (16,)
    assert not np.allclose(d1, d2, atol=1e-3)
    k = _noise_delta(model, new, "dense_2", "kernel").reshape(-1)[:16]
    assert not np.allclose(k, d2, atol=1e-3)


def test_reinit_with_own_initializer():
    model = make_cnn()
    text = "select dense_1; reinit kernel"
    a, _ = apply(text, model, seed=5)
    b, _ = apply(text, model, seed=5)
    c, _ = apply(text, model, seed=6)
    old = var(model, "dense_1", "kernel")
    ka, kb, kc = (var(m, "dense_1", "kernel") for m in (a, b, c))
    assert ka.tobytes() == kb.tobytes()
    assert ka.tobytes() != kc.tobytes()
    assert not np.allclose(ka, old)
    # it is still drawn from the layer's own initializer: GlorotUniform's range and spread
    fan_in, fan_out = old.shape
    limit = math.sqrt(6 / (fan_in + fan_out))
    init = layer_at(model, "dense_1").get_config()["kernel_initializer"]
    assert init["class_name"] == "GlorotUniform"
    assert np.abs(ka).max() <= limit + 1e-7
    assert abs(ka.std() - limit / math.sqrt(3)) < 0.02 * limit
    assert var(a, "dense_1", "bias").tobytes() == var(model, "dense_1", "bias").tobytes()
    assert_unchanged_except(model, a, {"dense_1"})


def test_reinit_batchnorm_moving_mean_uses_its_initializer():
    model = make_nested()
    path = "backbone/block/bn_a"
    new, _ = apply("select bn_a; set moving_mean to constant(0.3); reinit moving_mean", model)
    assert np.array_equal(var(new, path, "moving_mean"), np.zeros_like(var(model, path, "moving_mean")))
    new, _ = apply("select bn_a; set gamma to constant(0.3); reinit gamma", model)
    assert np.array_equal(var(new, path, "gamma"), np.ones_like(var(model, path, "gamma")))


@pytest.mark.parametrize("init, expected", [("zeros", 0.0), ("ones", 1.0), ("constant(0.5)", 0.5)])
def test_reinit_with_explicit_initializer(init, expected):
    model = make_cnn()
    new, _ = apply(f"select conv2d_2, dense_3; reinit weights with {init}", model)
    for p in ("conv2d_2", "dense_3"):
        for name in ("kernel", "bias"):
            got = var(new, p, name)
            assert got.dtype == np.float32
            assert np.array_equal(got, np.full(got.shape, expected, np.float32))
    assert_unchanged_except(model, new, {"conv2d_2", "dense_3"})


@pytest.mark.parametrize("init, expected", [("zeros", 0.0), ("ones", 1.0), ("constant(0.1)", 0.1)])
@pytest.mark.parametrize("target", ["kernel", "bias"])
def test_set_target(init, expected, target):
    model = make_cnn()
    new, _ = apply(f"select where type=Dense; set {target} to {init}", model)
    other = "bias" if target == "kernel" else "kernel"
    for p in ("dense_1", "dense_2", "dense_3"):
        got = var(new, p, target)
        assert np.array_equal(got, np.full(got.shape, expected, np.float32))
        assert var(new, p, other).tobytes() == var(model, p, other).tobytes()
    assert_unchanged_except(model, new, {"dense_1", "dense_2", "dense_3"})


def test_set_with_random_initializer_is_seeded_per_layer():
    model = make_cnn()
    a, _ = apply("select dense_2, dense_3; set bias to random_normal", model, seed=1)
    b, _ = apply("select dense_2, dense_3; set bias to random_normal", model, seed=1)
    assert var(a, "dense_2", "bias").tobytes() == var(b, "dense_2", "bias").tobytes()
    assert not np.allclose(var(a, "dense_2", "bias")[:10], var(a, "dense_3", "bias"))


def test_clip_respects_bounds_and_keeps_inside_values():
    model = make_cnn()
    low, high = -0.02, 0.03
    new, _ = apply(f"select dense_1; clip kernel {low} {high}", model)
    old, got = var(model, "dense_1", "kernel"), var(new, "dense_1", "kernel")
    lo, hi = np.float32(low), np.float32(high)
    below, above = old < lo, old > hi
    inside = ~(below | above)
    assert below.any() and above.any() and inside.any()  # the test exercises all three cases
    assert got.min() >= lo and got.max() <= hi
    assert np.array_equal(got[inside], old[inside])
    assert np.all(got[below] == lo) and np.all(got[above] == hi)
    assert var(new, "dense_1", "bias").tobytes() == var(model, "dense_1", "bias").tobytes()


@pytest.mark.parametrize("path, percent", [("dense_2", 50), ("conv2d_1", 35), ("dense_3", 50)])
def test_prune_zeroes_exactly_the_smallest_magnitudes(path, percent):
    model = make_cnn()
    new, _ = apply(f"select {path}; prune kernel {percent}%", model)
    old, got = var(model, path, "kernel"), var(new, path, "kernel")
    assert np.count_nonzero(old == 0) == 0
    k = math.floor(old.size * percent / 100)
    zeroed = got == 0
    assert zeroed.sum() == k
    # the kept entries are unchanged and are the largest magnitudes
    assert np.array_equal(got[~zeroed], old[~zeroed])
    assert np.abs(old[~zeroed]).min() >= np.abs(old[zeroed]).max()
    # exactly the k smallest
    want = np.sort(np.abs(old).reshape(-1))[:k]
    assert np.array_equal(np.sort(np.abs(old[zeroed])), want)
    assert var(new, path, "bias").tobytes() == var(model, path, "bias").tobytes()
    assert_unchanged_except(model, new, {path})


def test_prune_ties_are_broken_by_position():
    model = make_cnn()
    new, _ = apply("select dense_3; set kernel to ones; prune kernel 50%", model)
    flat = var(new, "dense_3", "kernel").reshape(-1)
    half = flat.size // 2
    assert np.all(flat[:half] == 0) and np.all(flat[half:] == 1)


def test_prune_twice_keeps_the_same_sparsity():
    model = make_cnn()
    once, _ = apply("select dense_2; prune kernel 50%", model)
    twice, _ = apply("select dense_2; prune kernel 50%; prune kernel 50%", model)
    assert var(once, "dense_2", "kernel").tobytes() == var(twice, "dense_2", "kernel").tobytes()


def test_freeze_and_unfreeze_flags_survive_save_load(tmp_path):
    model = make_cnn()
    new, report = apply("select all; freeze; select dense_3, conv2d_1; unfreeze", model)
    want = {p: p in ("dense_3", "conv2d_1") for p in paths(model)}
    assert {p: bool(layer_at(new, p).trainable) for p in paths(new)} == want
    n_trainable = sum(len(layer_at(model, p).trainable_weights) for p in ("dense_3", "conv2d_1"))
    assert len(new.trainable_weights) == n_trainable == 4
    assert report.statements[3].layers == ["conv2d_1", "dense_3"]
    loaded = roundtrip(new, tmp_path)
    assert {p: bool(layer_at(loaded, p).trainable) for p in paths(loaded)} == want
    assert len(loaded.trainable_weights) == 4
    assert_unchanged_except(model, loaded, set())
    assert all(layer_at(model, p).trainable for p in paths(model))


def test_freeze_nested_layers_survives_save_load(tmp_path):
    model = make_nested()
    new, _ = apply("select backbone/block; freeze", model)
    want = {p: not p.startswith("backbone/block/") for p in paths(model)}
    assert {p: bool(layer_at(new, p).trainable) for p in paths(new)} == want
    loaded = roundtrip(new, tmp_path)
    assert {p: bool(layer_at(loaded, p).trainable) for p in paths(loaded)} == want


def test_freeze_is_kept_through_a_later_structural_edit():
    model = make_cnn()
    new, _ = apply("select where type=Conv2D; freeze\nreplace MaxPooling2D with AveragePooling2D", model)
    assert {p: bool(layer_at(new, p).trainable) for p in paths(new)} == \
        {p: not p.startswith("conv2d") for p in paths(model)}
    assert_unchanged_except(model, new, set())


def test_trainable_predicate_sees_earlier_freeze():
    model = make_cnn()
    report = plan("select where type=Dense; freeze; select where not trainable; select where trainable "
                  "and has weights", model)
    assert report.statements[2].layers == ["dense_1", "dense_2", "dense_3"]
    assert report.statements[3].layers == ["conv2d_1", "conv2d_2"]


# ---- randomness ----------------------------------------------------------------------------------------

def test_unrelated_statements_do_not_shift_random_outcomes():
    model = make_cnn()
    alone, r1 = apply("select random 2 where has weights\nadd noise normal(stddev=1) to kernel", model)
    padded, r2 = apply("select conv2d_1\nscale bias 3\nselect random 2 where has weights\n"
                       "add noise normal(stddev=1) to kernel", model)
    assert r1.statements[0].layers == r2.statements[2].layers
    for p in r1.statements[0].layers:
        assert var(alone, p, "kernel").tobytes() == var(padded, p, "kernel").tobytes()


def test_recipe_seed_is_the_default_and_the_argument_overrides_it():
    model = make_cnn()
    recipe = compile_recipe("seed 42\nselect dense_2\nadd noise normal(stddev=1) to kernel", "x.recipe")
    plain = compile_recipe("select dense_2\nadd noise normal(stddev=1) to kernel", "x.recipe")
    by_recipe, report = recipe.apply(model)
    assert report.seed == 42
    assert var(by_recipe, "dense_2", "kernel").tobytes() == \
        var(plain.apply(model, seed=42)[0], "dense_2", "kernel").tobytes()
    overridden, report = recipe.apply(model, seed=5)
    assert report.seed == 5
    assert var(overridden, "dense_2", "kernel").tobytes() == \
        var(plain.apply(model, seed=5)[0], "dense_2", "kernel").tobytes()
    assert var(overridden, "dense_2", "kernel").tobytes() != var(by_recipe, "dense_2", "kernel").tobytes()



def test_a_negative_or_non_integer_seed_argument_is_refused():
    """A record with a negative seed is refused when read (provenance.validate): none may be made, by
    the API (``seed=``) or by ``--seed`` (tests/test_cli.py)."""
    import re

    import numpy as np
    model = make_cnn()
    recipe = compile_recipe("select dense_2\nadd noise normal(stddev=1) to kernel", "x.recipe")
    for seed in (-3, True, 1.5, "7"):
        with pytest.raises(UsageError, match=f"seed must be a whole number ≥ 0, not {re.escape(repr(seed))}"):
            recipe.apply(model, seed=seed)
    assert recipe.apply(model, seed=np.int64(5))[1].seed == 5 == recipe.apply(model, seed=5)[1].seed

# ---- selection -----------------------------------------------------------------------------------------

def _where(model, fn):
    return [info.path for info in walk(model) if fn(info)]


def test_select_all():
    for factory in (make_cnn, make_nested, make_shared):
        model = factory()
        assert selected("select all", model) == paths(model)


@pytest.mark.parametrize("factory, text, expected", [
    (make_cnn, "select conv2d_1, dense_3", ["conv2d_1", "dense_3"]),
    (make_cnn, "select dense_3, conv2d_1", ["conv2d_1", "dense_3"]),  # graph order, not recipe order
    (make_cnn, 'select "dense*"', ["dense_1", "dense_2", "dense_3"]),
    (make_cnn, 'select "conv2d_?", "*pool*"', ["conv2d_1", "max_pooling2d", "conv2d_2"]),
    (make_cnn, "select layer flatten", ["flatten"]),
    (make_cnn, "select type Dense", ["dense_1", "dense_2", "dense_3"]),
    (make_cnn, "select Conv2D", ["conv2d_1", "conv2d_2"]),
    (make_nested, "select backbone/block/conv_a", ["backbone/block/conv_a"]),
    (make_nested, "select conv_a", ["backbone/block/conv_a"]),  # a unique leaf name
    (make_nested, "select backbone",
     ["backbone/conv1", "backbone/block/conv_a", "backbone/block/bn_a", "backbone/pool"]),
    (make_nested, "select backbone/block", ["backbone/block/conv_a", "backbone/block/bn_a"]),
    (make_nested, 'select "backbone/block/*"', ["backbone/block/conv_a", "backbone/block/bn_a"]),
    (make_nested, 'select "*/block"', ["backbone/block/conv_a", "backbone/block/bn_a"]),
])
def test_select_references(factory, text, expected):
    assert selected(text, factory()) == expected


def test_select_nested_model_by_bare_name():
    assert selected("select block", make_nested()) == ["backbone/block/conv_a", "backbone/block/bn_a"]


@pytest.mark.parametrize("factory, text, fn", [
    (make_cnn, "select where type=Dense", lambda i: i.type_name == "Dense"),
    (make_cnn, "select where type==Conv2D", lambda i: i.type_name == "Conv2D"),
    (make_cnn, "select where type in (Conv2D, Dense)", lambda i: i.type_name in ("Conv2D", "Dense")),
    (make_cnn, "select where type=MaxPool2D", lambda i: i.type_name == "MaxPooling2D"),  # alias
    (make_cnn, "select where name=dense_2", lambda i: i.name == "dense_2"),
    (make_nested, 'select where name="backbone/block/conv_a"', lambda i: i.path == "backbone/block/conv_a"),
    (make_nested, 'select where name ~ "^conv"', lambda i: i.name.startswith("conv")),
    (make_cnn, r'select where name ~ "_\d$"', lambda i: i.name[-2] == "_" and i.name[-1].isdigit()),
    (make_nested, "select where type=Sequential", lambda i: i.path.startswith("backbone/block/")),
    (make_cnn, "select where trainable", lambda i: True),
    (make_cnn, "select where params > 1K", lambda i: i.params() > 1000),
    (make_cnn, "select where params >= 1.1K", lambda i: i.params() >= 1100),
    (make_cnn, "select where params < 200", lambda i: i.params() < 200),
    (make_cnn, "select where params == 0", lambda i: i.params() == 0),
    (make_cnn, "select where params != 0", lambda i: i.params() != 0),
    (make_nested, "select where has weights", lambda i: len(i.layer.weights) > 0),
    (make_cnn, "select where not has weights", lambda i: len(i.layer.weights) == 0),
    (make_cnn, "select where type=Dense and params < 1K", lambda i: i.type_name == "Dense" and i.params() < 1000),
    (make_cnn, "select where type=Conv2D or type=Flatten", lambda i: i.type_name in ("Conv2D", "Flatten")),
    (make_cnn, "select where (type=Dense or type=Conv2D) and not name=dense_1",
     lambda i: i.type_name in ("Dense", "Conv2D") and i.name != "dense_1"),
    (make_cnn, "select where type=Dense or type=Conv2D and params > 1K",  # and binds tighter than or
     lambda i: i.type_name == "Dense" or (i.type_name == "Conv2D" and i.params() > 1000)),
    (make_cnn, "select where not not type=Flatten", lambda i: i.type_name == "Flatten"),
])
def test_select_where(factory, text, fn):
    model = factory()
    expected = _where(model, fn)
    assert expected  # the predicate selects something, so the comparison means something
    assert selected(text, model) == expected


def test_select_where_params_counts_are_the_real_counts():
    model = make_cnn()
    counts = {info.path: int(info.layer.count_params()) for info in walk(model)}
    assert counts["dense_1"] == 1936 * 32 + 32
    assert selected("select where params > 1K", model) == [p for p, n in counts.items() if n > 1000]


def test_select_first_and_last():
    model = make_cnn()
    weighted = _where(model, lambda i: len(i.layer.weights) > 0)
    assert selected("select first where has weights", model) == weighted[:1]
    assert selected("select first 2 where has weights", model) == weighted[:2]
    assert selected("select last where has weights", model) == weighted[-1:]
    assert selected("select last 3", model) == paths(model)[-3:]


def test_select_random_count_is_seeded():
    model = make_cnn()
    dense = _where(model, lambda i: i.type_name == "Dense")
    picks = {}
    for seed in range(12):
        got = selected("select random 2 where type=Dense", model, seed=seed)
        assert len(got) == 2 and len(set(got)) == 2 and set(got) <= set(dense)
        assert got == [p for p in dense if p in got]  # graph order
        assert selected("select random 2 where type=Dense", model, seed=seed) == got
        picks[seed] = tuple(got)
    assert len(set(picks.values())) > 1  # the seed matters


def test_select_random_percent():
    model = make_cnn()
    all_paths = paths(model)
    got = selected("select random 50%", model)
    assert len(got) == math.ceil(len(all_paths) * 0.5)
    assert len(set(got)) == len(got) and got == [p for p in all_paths if p in got]
    assert selected("select random 50%", model) == got
    assert len(selected("select random 10%", model)) == 1  # at least one layer
    assert selected("select random 100%", model) == all_paths


def test_select_random_same_statement_twice_draws_independently_but_reproducibly():
    model = make_cnn()
    text = "select random 2 where has weights\nselect random 2 where has weights"
    firsts, seconds = [], []
    for seed in range(8):
        report = plan(text, model, seed=seed)
        firsts.append(tuple(report.statements[0].layers))
        seconds.append(tuple(report.statements[1].layers))
        assert plan(text, model, seed=seed).statements[1].layers == list(seconds[-1])
    assert firsts != seconds


def test_select_random_more_than_available_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("select random 4 where type=Dense", make_cnn())
    assert "4" in info.value.message and "3" in info.value.message
    assert info.value.line == 1


def test_empty_selection_error_lists_layer_types():
    model = make_cnn()
    with pytest.raises(ApplyError) as info:
        apply("select all\n\nselect where type=Conv1D\nfreeze", model)
    err = info.value
    assert "matches no layer" in err.message
    assert (err.line, err.column) == (3, 1)
    counts = collections.Counter(info.type_name for info in walk(model))
    for name, n in counts.items():
        assert f"{name} ×{n}" in err.hint
    assert "x.recipe:3:1" in err.render()


def test_empty_where_on_random_mode_is_an_error():
    text = "select random 2 where type=LSTM"
    with pytest.raises(ApplyError) as info:
        apply(text, make_cnn())
    assert "matches no layer" in info.value.message
    assert position(info.value) == position_of(text, "select")


@pytest.mark.parametrize("text, what, near", [
    ("select where type=Conv1D", "where type=Conv1D", "type=Conv2D"),
    ("select where trainable and type in (Conv3D, LSTM) and not name=x",
     "where trainable and type in (Conv3D, LSTM) and not name=x", "type=Conv2D"),
    ("select first 2 where name=dense_11", "where name=dense_11", "name=dense_1"),
    ("remove where type=MaxPooling1D", "remove where type=MaxPooling1D", "type=MaxPooling2D"),
    ("select where type=LSTM", "where type=LSTM", None),
])
def test_a_predicate_that_matches_nothing_names_a_close_type_or_name(text, what, near):
    """keras_hub's GPT-2 has CachedMultiHeadAttention where BERT has MultiHeadAttention: a type or name
    the model lacks is answered with the model's closest, as a bare `select type X` is."""
    with pytest.raises(ApplyError) as info:
        apply(text, make_cnn())
    assert info.value.message == f"{what} matches no layer" + (f" (did you mean {near!r}?)" if near else "")
    assert position(info.value) == (1, 1)


@pytest.mark.parametrize("text, guess", [
    ("select dense_4", "dense_3"),
    ("select flaten", "flatten"),
    ("select max_pooling", "max_pooling2d"),
])
def test_near_miss_name_suggests(text, guess):
    with pytest.raises(ApplyError) as info:
        apply(text, make_cnn())
    assert f"did you mean {guess!r}" in info.value.message
    assert (info.value.line, info.value.column) == (1, 8)


def test_near_miss_in_replace_and_tap():
    with pytest.raises(ApplyError) as info:
        apply("replace dens_2 with Dense(units=3)", make_cnn())
    assert "did you mean 'dense_2'" in info.value.message
    with pytest.raises(ApplyError) as info:
        apply("tap conv2d_3", make_cnn())
    assert "did you mean" in info.value.message and info.value.line == 1


def test_selection_after_structural_edit_sees_the_edited_model():
    model = make_cnn()
    new, report = apply("replace MaxPooling2D with AveragePooling2D\nselect where type=AveragePooling2D\n"
                        "assert count == 1", model)
    assert report.statements[1].layers == ["max_pooling2d"]


# ---- params --------------------------------------------------------------------------------------------

PARAM_RECIPE = "param f = 0.5\nselect where type=Dense\nscale kernel $f\n"


def test_param_default_and_override():
    model = make_cnn()
    default, r1 = apply(PARAM_RECIPE, model)
    override, r2 = apply(PARAM_RECIPE, model, params={"f": "0.25"})
    numeric, _ = apply(PARAM_RECIPE, model, params={"f": 0.25})
    assert r1.params == {"f": 0.5} and r2.params == {"f": 0.25}
    for p in ("dense_1", "dense_2", "dense_3"):
        old = var(model, p, "kernel")
        assert np.array_equal(var(default, p, "kernel"), scaled(old, 0.5))
        assert np.array_equal(var(override, p, "kernel"), scaled(old, 0.25))
        assert var(numeric, p, "kernel").tobytes() == var(override, p, "kernel").tobytes()


def test_params_in_counts_percent_and_constructor_args():
    model = make_cnn()
    text = ("param n = 2\nparam p = 50\nparam units = 6\nselect first $n where has weights\n"
            "prune kernel $p%\nreplace dense_3 with Dense(units=$units)\n")
    new, report = apply(text, model, params={"n": "1", "units": "4"})
    assert report.statements[0].layers == ["conv2d_1"]  # param statements are not in the report
    k = var(new, "conv2d_1", "kernel")
    assert np.count_nonzero(k == 0) == k.size // 2
    assert var(new, "conv2d_2", "kernel").tobytes() == var(model, "conv2d_2", "kernel").tobytes()
    assert tuple(new.outputs[0].shape) == (None, 4)


def test_unknown_param_override_is_a_usage_error():
    with pytest.raises(UsageError) as info:
        apply(PARAM_RECIPE, make_cnn(), params={"g": "1"})
    assert "'g'" in info.value.message


def test_param_override_of_the_wrong_type_is_a_usage_error():
    with pytest.raises(UsageError, match=r"parameter 'f' is float in the recipe \(0\.5\), but --param gave 'abc'"):
        apply(PARAM_RECIPE, make_cnn(), params={"f": "abc"})


# ---- structure -----------------------------------------------------------------------------------------

def test_replace_by_name_with_constructor():
    model = make_cnn()
    text = 'replace dense_2 with Dense(units=16, activation="tanh")'
    new, report = apply(text, model)
    layer = new.get_layer("dense_2")
    assert type(layer) is keras.layers.Dense
    assert layer.units == 16 and layer.get_config()["activation"] == "tanh"
    assert report.statements[0].layers == ["dense_2"]
    # a new layer: fresh weights from its own initializers, reproducible from the seed
    assert not np.allclose(var(new, "dense_2", "kernel"), var(model, "dense_2", "kernel"))
    assert np.array_equal(var(new, "dense_2", "bias"), np.zeros(16, np.float32))
    again, _ = apply(text, model)
    other, _ = apply(text, model, seed=SEED + 1)
    assert var(again, "dense_2", "kernel").tobytes() == var(new, "dense_2", "kernel").tobytes()
    assert var(other, "dense_2", "kernel").tobytes() != var(new, "dense_2", "kernel").tobytes()
    assert_unchanged_except(model, new, {"dense_2"})
    # the graph runs through the new layer: recompute the head by hand
    x = random_input(model)
    h = activation(model, "dropout", x)
    k, b = var(new, "dense_2", "kernel"), var(new, "dense_2", "bias")
    h2 = np.tanh(h @ k + b)
    logits = h2 @ var(model, "dense_3", "kernel") + var(model, "dense_3", "bias")
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(outputs(new, x)[0], e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_replace_head_with_different_size():
    model = make_cnn()
    new, _ = apply('replace dense_3 with Dense(units=5, activation="softmax")', model)
    assert tuple(new.outputs[0].shape) == (None, 5)
    assert var(new, "dense_3", "kernel").shape == (16, 5)
    assert_unchanged_except(model, new, {"dense_3"})


def test_replace_output_layer_with_a_new_name():
    model = make_cnn()
    new, report = apply('replace dense_3 with Dense(units=10, name="logits")', model)
    names = [l.name for l in new.layers]
    assert "logits" in names and "dense_3" not in names
    assert new.outputs[0] is new.get_layer("logits").output
    assert report.statements[0].layers == ["dense_3"]
    assert_unchanged_except(model, new, {"dense_3"})


@pytest.mark.parametrize("factory, text, old, new_path", [
    (make_cnn, 'replace dense_2 with Dense(units=16, activation="relu", name="fc")', "dense_2", "fc"),
    (make_nested, 'replace backbone/conv1 with Conv2D(filters=4, kernel_size=3, name="c1")',
     "backbone/conv1", "backbone/c1"),
])
def test_replace_inner_layer_with_a_new_name(factory, text, old, new_path):
    model = factory()
    new, _ = apply(text, model)
    assert new_path in paths(new) and old not in paths(new)
    assert len(paths(new)) == len(paths(model))
    assert_unchanged_except(model, new, {old})


def test_replace_with_a_new_name_inside_sequential():
    model = make_sequential()
    new, report = apply('replace fc2 with Dense(units=3, name="head")', model)
    assert isinstance(new, keras.Sequential)
    assert [l.name for l in new.layers] == ["fc1", "dropout_1", "head"]
    assert tuple(new.outputs[0].shape) == (None, 3)
    assert_unchanged_except(model, new, {"fc2"})


def test_report_of_consecutive_replaces_describes_each_statement(monkeypatch):
    import random

    from modelxform.keras_io.graph import GraphEditor
    states, real = [], GraphEditor.models_between

    def watched(self, counts):  # the states between are built; Python's random state is left as it was
        before = random.getstate()
        models = real(self, counts)
        states.append((len(models), random.getstate() == before))
        return models
    monkeypatch.setattr(GraphEditor, "models_between", watched)
    _, report = apply("replace dense_3 with Dense(units=5)\nreplace dense_3 with Dense(units=4)", make_cnn())
    first, second = (s.changes for s in report.statements)
    assert "dense_3: output (None, 10) -> (None, 5), params 170 -> 85" in first, first
    assert "dense_3: output (None, 5) -> (None, 4), params 85 -> 68" in second, second
    assert not any("together" in c for c in first + second)
    assert states == [(1, True)]


def test_report_of_consecutive_structural_statements_follows_the_model_through_them():
    """Each of several structural statements rebuilt at once is described by the model before and after
    its own edits: a layer inserted, the head replaced, an output tapped."""
    model = make_cnn()
    new, report = apply('insert Dense(units=32, name="mid") after dense_1\n'
                        "replace dense_3 with Dense(units=5)\n"
                        "tap mid", model)
    insert, replace, tap = (s.changes for s in report.statements)
    assert "mid (new): output (None, 32), params 1,056" in insert, insert  # 32 * 32 + 32
    assert "dense_3: output (None, 10) -> (None, 5), params 170 -> 85" in replace, replace
    # the outputs before the tap are those the replace left, not the input model's
    assert "model outputs: (None, 5) -> (None, 5), (None, 32)" in tap, tap
    assert [tuple(o.shape) for o in new.outputs] == [(None, 5), (None, 32)]
    x = random_input(model)
    np.testing.assert_allclose(outputs(new, x)[1], activation(new, "mid", x), rtol=0, atol=0)


def test_report_of_replaces_that_keep_shapes_needs_no_state_between(monkeypatch):
    """Replaces of different layers by layers of the same output shape and parameters (a pooling for
    another, a Dropout for another) leave every layer as it was in the states between: they are
    described from the states before and after them all, without building the states between."""
    from modelxform.keras_io.graph import GraphEditor

    def refuse(self, counts):
        raise AssertionError("the states between were built")
    monkeypatch.setattr(GraphEditor, "models_between", refuse)
    _, report = apply("replace MaxPooling2D with AveragePooling2D\nreplace dropout with Dropout(rate=0.1)",
                      make_cnn())
    pooling, dropout = (s.changes for s in report.statements)
    assert any(c.startswith("max_pooling2d: output (None, 13, 13, 8) -> (None, 13, 13, 8), params 0 -> 0")
               for c in pooling), pooling
    assert any(c.startswith("dropout: output") and c.endswith("params 0 -> 0") for c in dropout), dropout
    assert not any("together" in c for c in pooling + dropout)
    # and where the last statement is another kind, on other layers: the design card's recipe
    _, report = apply("replace MaxPooling2D with AveragePooling2D\ntap conv2d_1", make_cnn())
    pooling, tap = (s.changes for s in report.statements)
    assert "max_pooling2d: output (None, 13, 13, 8) -> (None, 13, 13, 8), params 0 -> 0" in pooling, pooling
    assert "model outputs: (None, 10) -> (None, 10), (None, 26, 26, 8)" in tap, tap
    _, report = apply("replace dropout with Dropout(rate=0.1)\nreplace dense_3 with Dense(units=5)", make_cnn())
    assert "dense_3: output (None, 10) -> (None, 5), params 170 -> 85" in report.statements[1].changes
    # where a replace before the last changes a shape (the head's), or the last is on a replaced layer:
    # built
    for recipe in ("replace dense_3 with Dense(units=5)\nreplace dropout with Dropout(rate=0.1)",
                   "replace dropout with Dropout(rate=0.1)\nreplace dropout with Dropout(rate=0.2)",
                   "replace MaxPooling2D with AveragePooling2D\ntap max_pooling2d"):
        with pytest.raises(AssertionError, match="the states between were built"):
            apply(recipe, make_cnn())


@pytest.mark.parametrize("kind,recipe", [
    ("cnn", "replace MaxPooling2D with AveragePooling2D\ntap conv2d_1"),
    ("cnn", "replace dropout with Dropout(rate=0.1)\nreplace dense_3 with Dense(units=5)"),
    ("cnn", 'replace MaxPooling2D with AveragePooling2D\ninsert Dense(units=8, name="mid") after dense_3'),
    ("nested", "replace MaxPooling2D with AveragePooling2D\nreplace head with Dense(units=3)\ntap gap"),
    ("nested", "replace backbone/block/bn_a with BatchNormalization()\nreplace gap with GlobalMaxPooling2D()"),
])
def test_report_without_the_states_between_is_what_they_would_say(monkeypatch, kind, recipe):
    """Where the states before and after several structural statements are taken to say what each did
    (context._each_kept_what_it_was), the report is the one the states between, built, give."""
    from modelxform.engine import context
    make = {"cnn": make_cnn, "nested": make_nested}[kind]
    _, report = apply(recipe, make())
    kept = context._each_kept_what_it_was
    seen = []
    monkeypatch.setattr(context, "_each_kept_what_it_was", lambda *a: seen.append(kept(*a)) or False)
    _, built = apply(recipe, make())
    assert seen == [True]  # (the case is one the shortcut takes)
    assert [s.changes for s in report.statements] == [s.changes for s in built.statements]


@pytest.mark.parametrize("kind,recipe,built", [
    ("cnn", 'cut after conv2d_2\nappend GlobalAveragePooling2D(name="features")', 0),
    ("cnn", 'cut after dense_2\nappend Dense(units=4, name="head")\ntap dense_1', 1),
    ("cnn", 'insert Dropout(rate=0.1, name="extra") after dense_1\nappend Dense(units=4, name="head")', 1),
    ("cnn", 'insert Dense(units=32, name="mid") after dense_1\nreplace mid with Dense(units=32)', 1),
    ("nested", 'remove backbone/block/bn_a\nappend Dense(units=2, name="head2")', 0),
])
def test_report_reads_only_the_states_between_it_needs(monkeypatch, kind, recipe, built):
    """A statement that rebuilt nothing and tapped nothing (cut, remove) needs no state after it, and one
    whose layers are all new (append, insert) none before it: the report is the one every state between
    gives, with ``built`` of them built."""
    from modelxform.engine import context
    from modelxform.keras_io.graph import GraphEditor
    make = {"cnn": make_cnn, "nested": make_nested}[kind]
    counts, real = [], GraphEditor.models_between

    def counted(self, wanted):
        counts.append(len(wanted))
        return real(self, wanted)
    monkeypatch.setattr(GraphEditor, "models_between", counted)
    _, report = apply(recipe, make())
    assert counts == [built]
    monkeypatch.setattr(context, "_states_needed", lambda pending, first: list(range(1, len(pending))))
    _, every = apply(recipe, make())
    assert counts[1] == recipe.count("\n")
    assert [s.changes for s in report.statements] == [s.changes for s in every.statements]
    assert not any("together" in c for s in report.statements for c in s.changes)


def test_report_of_statements_rebuilt_together_says_so_where_a_state_does_not_build(monkeypatch):
    from modelxform.keras_io.graph import GraphEditor
    monkeypatch.setattr(GraphEditor, "models_between", lambda self, counts: [None] * len(counts))
    _, report = apply("replace dense_3 with Dense(units=5)\nreplace dense_3 with Dense(units=4)", make_cnn())
    first, second = (s.changes for s in report.statements)
    line = ("dense_3: output (None, 10) -> (None, 4), params 170 -> 68 "
            "(after rebuilding 2 structural statements together)")
    assert line in first and line in second, (first, second)


def test_replace_name_clash_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply('replace dense_3 with Dense(units=10, name="dense_1")', make_cnn())
    assert "already used" in info.value.message
    assert info.value.line == 1


def test_replace_selected_with_constructor():
    model = make_cnn()
    new, report = apply("select where type=Dropout\nreplace selected with Dropout(rate=0.2)", model)
    assert report.statements[1].layers == ["dropout"]
    assert new.get_layer("dropout").rate == pytest.approx(0.2)
    assert model.get_layer("dropout").rate == pytest.approx(0.25)


def test_replace_selected_after_a_pending_structural_edit():
    model = make_cnn()
    new, report = apply("select where type=Dropout\ntap conv2d_1\nreplace selected with GaussianDropout(rate=0.2)",
                        model)
    layer = new.get_layer("dropout")
    assert type(layer) is keras.layers.GaussianDropout and layer.rate == pytest.approx(0.2)
    assert report.statements[2].layers == ["dropout"]
    assert len(new.outputs) == 2  # the tap queued before it is kept
    x = random_input(model)
    got = outputs(new, x)
    np.testing.assert_allclose(got[0], outputs(model, x)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], activation(model, "conv2d_1", x), rtol=0, atol=1e-6)


def test_replace_selected_twice():
    model = make_cnn()
    new, _ = apply("select where type=Dropout\nreplace selected with Dropout(rate=0.2)\n"
                   "select where type=Dropout\nreplace selected with GaussianDropout(rate=0.3)", model)
    layer = new.get_layer("dropout")
    assert type(layer) is keras.layers.GaussianDropout and layer.rate == pytest.approx(0.3)
    assert_unchanged_except(model, new, set())


def test_replace_selected_with_bare_type():
    model = make_cnn()
    new, _ = apply("select where type=MaxPooling2D\nreplace selected with AveragePooling2D", model)
    assert type(new.get_layer("max_pooling2d")) is keras.layers.AveragePooling2D


def test_replace_shared_layer_stays_shared():
    model = make_shared()
    new, report = apply("replace shared with Dense(units=5)", model)
    shared = [l for l in new.layers if l.name == "shared"]
    assert len(shared) == 1
    layer = shared[0]
    assert len(layer._inbound_nodes) == 2
    assert len(walk(new)) == len(walk(model))
    assert len(new.weights) == len(model.weights)
    assert not np.allclose(var(new, "shared", "kernel"), var(model, "shared", "kernel"))
    assert_unchanged_except(model, new, {"shared"})
    # both branches use the same (new) weights: out(shared(a) + shared(b))
    a, b = random_input(model, seed=1)
    k, bias = var(new, "shared", "kernel"), var(new, "shared", "bias")
    want = ((a @ k + bias) + (b @ k + bias)) @ var(model, "out", "kernel") + var(model, "out", "bias")
    got_ab = outputs(new, [a, b])[0]
    got_ba = outputs(new, [b, a])[0]
    np.testing.assert_allclose(got_ab, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_ab, got_ba, rtol=1e-6, atol=1e-6)


def test_weight_statement_on_shared_layer_affects_both_calls():
    model = make_shared()
    new, _ = apply("select shared; scale kernel 2", model)
    a, b = random_input(model, seed=4)
    k, bias = scaled(var(model, "shared", "kernel"), 2), var(model, "shared", "bias")
    want = ((a @ k + bias) + (b @ k + bias)) @ var(model, "out", "kernel") + var(model, "out", "bias")
    np.testing.assert_allclose(outputs(new, [a, b])[0], want, rtol=1e-5, atol=1e-6)


def test_replace_inside_nested_models_keeps_them_nested(tmp_path):
    model = make_nested()
    new, report = apply("replace backbone/pool with AveragePooling2D\n"
                        'replace backbone/block/conv_a with Conv2D(filters=4, kernel_size=3, padding="same")',
                        model)
    backbone = new.get_layer("backbone")
    assert isinstance(backbone, keras.Model) and type(backbone).__name__ == "Functional"
    block = backbone.get_layer("block")
    assert isinstance(block, keras.Sequential)
    assert type(backbone.get_layer("pool")) is keras.layers.AveragePooling2D
    assert paths(new) == paths(model)
    assert_unchanged_except(model, new, {"backbone/block/conv_a"})
    assert not np.allclose(var(new, "backbone/block/conv_a", "kernel"), var(model, "backbone/block/conv_a", "kernel"))
    # recompute the model with the original pieces and the replaced ones
    x = random_input(model)
    h = model.get_layer("backbone").get_layer("conv1")(x)
    h = block.get_layer("conv_a")(h)
    h = model.get_layer("backbone").get_layer("block").get_layer("bn_a")(h, training=False)
    h = keras.layers.AveragePooling2D(2)(h)
    h = model.get_layer("gap")(h)
    want = np.asarray(model.get_layer("head")(h))
    np.testing.assert_allclose(outputs(new, x)[0], want, rtol=1e-5, atol=1e-6)
    loaded = roundtrip(new, tmp_path)
    assert isinstance(loaded.get_layer("backbone").get_layer("block"), keras.Sequential)
    np.testing.assert_allclose(outputs(loaded, x)[0], want, rtol=1e-5, atol=1e-6)


def test_sequential_stays_sequential_after_replace(tmp_path):
    model = make_sequential()
    new, _ = apply("replace dropout_1 with GaussianDropout(rate=0.3)", model)
    assert isinstance(new, keras.Sequential)
    assert [type(l).__name__ for l in new.layers] == ["Dense", "GaussianDropout", "Dense"]
    assert new.get_layer("dropout_1").rate == pytest.approx(0.3)
    assert_unchanged_except(model, new, set())
    x = random_input(model)
    np.testing.assert_array_equal(outputs(new, x)[0], outputs(model, x)[0])
    assert isinstance(roundtrip(new, tmp_path), keras.Sequential)


def test_tap_on_sequential_gives_functional_with_two_outputs(tmp_path):
    model = make_sequential()
    new, report = apply("tap fc1", model)
    assert not isinstance(new, keras.Sequential)
    assert type(new).__name__ == "Functional"
    assert len(new.outputs) == 2
    x = random_input(model)
    got = outputs(new, x)
    np.testing.assert_allclose(got[0], outputs(model, x)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], np.asarray(model.get_layer("fc1")(x)), rtol=0, atol=1e-6)
    assert_unchanged_except(model, new, set())
    loaded = roundtrip(new, tmp_path)
    for a, b in zip(outputs(loaded, x), got):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_tap_only_keeps_just_the_taps():
    model = make_cnn()
    new, report = apply("tap conv2d_1, conv2d_2 only", model)
    assert len(new.outputs) == 2
    x = random_input(model)
    got = outputs(new, x)
    np.testing.assert_allclose(got[0], activation(model, "conv2d_1", x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], activation(model, "conv2d_2", x), rtol=0, atol=1e-6)
    assert report.statements[0].layers == ["conv2d_1", "conv2d_2"]


def test_tap_glob_and_multi_io():
    model = make_multi_io()
    new, _ = apply('tap "da"', model)
    assert len(new.outputs) == 3
    x = random_input(model)
    got = outputs(new, x)
    for a, b in zip(got[:2], outputs(model, x)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    probe = keras.Model(model.inputs, model.get_layer("da").output)
    np.testing.assert_allclose(got[2], np.asarray(probe(x)), rtol=0, atol=1e-6)


def test_tap_shared_layer_adds_one_output_per_call():
    model = make_shared()
    new, _ = apply("tap shared", model)
    assert len(new.outputs) == 3
    a, b = random_input(model, seed=2)
    got = outputs(new, [a, b])
    k, bias = var(model, "shared", "kernel"), var(model, "shared", "bias")
    np.testing.assert_allclose(got[0], outputs(model, [a, b])[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], a @ k + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], b @ k + bias, rtol=1e-5, atol=1e-6)


def test_tap_nested_model():
    model = make_nested()
    new, _ = apply("tap backbone", model)
    x = random_input(model)
    got = outputs(new, x)
    np.testing.assert_allclose(got[1], np.asarray(model.get_layer("backbone")(x)), rtol=0, atol=1e-6)
    assert isinstance(new.get_layer("backbone"), keras.Model)


def test_tap_inside_nested_model_adds_an_output_and_keeps_nesting():
    # (issue 3 made this work; it used to be refused)
    model = make_nested()
    new, _ = apply("tap backbone/conv1", model)
    assert isinstance(new.get_layer("backbone"), keras.Model)
    x = random_input(model)
    probe = keras.Model(model.get_layer("backbone").inputs, model.get_layer("backbone").get_layer("conv1").output)
    got = outputs(new, x)
    np.testing.assert_allclose(got[1], np.asarray(probe(x)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[0], outputs(model, x)[0], rtol=0, atol=1e-6)
    with pytest.raises(ApplyError) as info:
        apply("tap backbone/conv9", model)
    assert "did you mean" in info.value.message
    assert position(info.value) == position_of("tap backbone/conv9", "backbone/conv9")


@pytest.mark.parametrize("replacement", ["Dropout", "GaussianDropout", "Dropout(rate=0.9)",
                                         "GaussianNoise(stddev=0.9)", "AlphaDropout(rate=0.4)"])
def test_lossless_structure_keeps_inference_outputs(replacement):
    model = make_cnn()
    new, _ = apply(f"replace Dropout with {replacement}", model)
    assert type(new.get_layer("dropout")).__name__ == replacement.split("(")[0]
    x = random_input(model)
    np.testing.assert_array_equal(outputs(new, x)[0], outputs(model, x)[0])
    assert_unchanged_except(model, new, set())


def test_bare_replace_carries_settings():
    model = make_sequential()
    new, report = apply("replace Dropout with GaussianDropout", model)
    assert new.get_layer("dropout_1").rate == pytest.approx(model.get_layer("dropout_1").rate)
    assert "rate" in report.statements[0].changes[0]


# ---- subclassed models ---------------------------------------------------------------------------------

def test_subclassed_weight_statements():
    model = make_subclassed()
    new, report = apply("select all; scale kernel 2\nselect d2; prune bias 50%\nselect d1; freeze", model)
    assert type(new) is type(model)
    for p in ("d1", "d2"):
        assert np.array_equal(var(new, p, "kernel"), scaled(var(model, p, "kernel"), 2))
    assert var(new, "d1", "bias").tobytes() == var(model, "d1", "bias").tobytes()
    bias = var(new, "d2", "bias")
    old_bias = var(model, "d2", "bias")
    assert bias.shape == (2,) and np.count_nonzero(old_bias == 0) == 0
    smallest = int(np.argmin(np.abs(old_bias)))
    assert bias[smallest] == 0 and bias[1 - smallest] == old_bias[1 - smallest]
    assert layer_at(new, "d1").trainable is False and layer_at(new, "d2").trainable is True
    assert layer_at(model, "d1").trainable is True
    x = random_input(model)
    want = (x @ var(new, "d1", "kernel") + var(new, "d1", "bias")) @ var(new, "d2", "kernel") + bias
    np.testing.assert_allclose(outputs(new, x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="Keras limitation: a subclassed model's config does not "
                   "hold its sublayers' trainable flags, so they are lost on save/load; modelxform now says so in the "
                   "report and the CLI refuses to write such a file (test_subclassed_freeze_is_flagged_and_not_saved)")
def test_subclassed_freeze_survives_save_load(tmp_path):
    new, _ = apply("select d1; freeze", make_subclassed())
    assert layer_at(new, "d1").trainable is False
    loaded = roundtrip(new, tmp_path)
    assert layer_at(loaded, "d1").trainable is False


def test_subclassed_freeze_is_flagged_and_not_saved(tmp_path):
    from conftest import run_cli
    from modelxform.keras_io.files import save_model
    new, report = apply("select d1; freeze", make_subclassed())
    assert layer_at(new, "d1").trainable is False  # holds in memory (Python API)
    assert any("does not save them" in note for note in report.statements[1].notes)
    model_path = tmp_path / "sub.keras"
    save_model(make_subclassed(), model_path)
    recipe = tmp_path / "f.recipe"
    recipe.write_text("select d1\nfreeze\n")
    r = run_cli("apply", recipe, model_path, "-o", tmp_path / "out.keras")
    assert r.status == 4
    assert f"{recipe}:2:1: error:" in r.err and "would silently lose them" in r.err
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("text", ["replace d1 with Dense(units=6)", "tap d1", "replace Dense with Dense",
                                  "select d1; scale kernel 2\nreplace d2 with Dense(units=2)"])
def test_subclassed_structure_is_refused(text):
    with pytest.raises(ApplyError) as info:
        apply(text, make_subclassed())
    assert "subclassed" in info.value.message
    assert info.value.line == text.count("\n") + 1 and info.value.column == 1


# ---- asserts -------------------------------------------------------------------------------------------

def test_asserts_that_hold():
    model = make_cnn()
    n = int(model.count_params())
    text = (f"select where type=Dense\nassert count == 3\nassert count >= 1\nassert count != 2\n"
            f"assert params == {n}\nassert params < 1M\nassert params > 60K\n"
            f"assert output shape == (None, 10)\nassert output 0 shape != (None, 11)\n"
            f"tap conv2d_1\nassert output 1 shape == (None, 26, 26, 8)\n")
    new, report = apply(text, model)
    assert any("holds" in note for s in report.statements for note in s.notes)
    assert len(new.outputs) == 2


@pytest.mark.parametrize("text, line, column", [
    ("select where type=Dense\nassert count == 2", 2, 1),
    ("select all\n   assert count < 3", 2, 4),
    ("seed 1\n\nassert params < 10K", 3, 1),
    ("select all; assert params > 1M", 1, 13),
    ("assert output shape == (None, 11)", 1, 1),
    ("tap conv2d_1\nassert output 1 shape == (None, 26, 26, 9)", 2, 1),
    ("select where type=Dense; scale kernel 0; assert params <= 60K", 1, 42),
])
def test_asserts_that_fail_report_their_statement(text, line, column):
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(AssertionFailed) as info:
        apply(text, model)
    assert (info.value.line, info.value.column) == (line, column)
    assert info.value.message.startswith("assert failed")
    assert f"x.recipe:{line}:{column}" in info.value.render()
    assert snapshot(model) == before


def test_assert_params_counts_the_edited_model():
    model = make_cnn()
    n = int(model.count_params())
    head = 16 * 10 + 10
    new_head = 16 * 4 + 4
    apply(f"replace dense_3 with Dense(units=4)\nassert params == {n - head + new_head}", model)
    text = f"replace dense_3 with Dense(units=4)\nassert params == {n}"
    edited = n - head + new_head
    with pytest.raises(AssertionFailed, match=rf"assert failed: the model has {edited:,} parameters") as info:
        apply(text, model)
    assert position(info.value) == position_of(text, "assert")


def test_assert_output_index_out_of_range_is_apply_error():
    with pytest.raises(ApplyError) as info:
        apply("assert output 1 shape == (None, 10)", make_cnn())
    assert not isinstance(info.value, AssertionFailed)
    assert info.value.line == 1


# ---- plan ----------------------------------------------------------------------------------------------

PLAN_RECIPE = ("select random 2 where has weights\nadd noise normal(stddev=1) to kernel\nprune kernel 50%\n"
               "select random 50%\nfreeze\nreplace MaxPooling2D with AveragePooling2D\n"
               "select where trainable\nscale weights 2\ntap conv2d_1")


def test_plan_resolves_like_apply_and_changes_nothing():
    from modelxform.engine.runner import run
    from modelxform.keras_io.files import working_copy
    model = make_cnn()
    before = snapshot(model)
    recipe = compile_recipe(PLAN_RECIPE, "x.recipe")
    planned = recipe.plan(model, seed=11)
    _, applied = recipe.apply(model, seed=11)
    assert planned.dry_run and not applied.dry_run
    assert [s.layers for s in planned.statements] == [s.layers for s in applied.statements]
    assert [s.changes for s in planned.statements] == [s.changes for s in applied.statements]
    assert planned.statements[0].layers  # something was selected
    assert snapshot(model) == before
    # the dry run's working model still has the original arrays (its structure is edited)
    ctx, _ = run(recipe, working_copy(model), seed=11, apply=False)
    working = ctx.current_model()
    assert_unchanged_except(model, working, set())
    assert type(working.get_layer("max_pooling2d")) is keras.layers.AveragePooling2D


def test_plan_reports_the_same_errors_as_apply():
    model = make_cnn()
    for text in ("select where type=Conv1D", "replace dense_2 with Dense(units=7)",
                 "select all; assert count == 1"):
        with pytest.raises(ModelxformError) as a:
            apply(text, model)
        with pytest.raises(ModelxformError) as p:
            plan(text, model)
        assert type(a.value) is type(p.value)
        assert (a.value.message, a.value.line, a.value.column) == (p.value.message, p.value.line, p.value.column)


# ---- structural errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, column", [
    ("replace dense_2 with Dense(units=7)", 1, 1),
    ("select all; freeze\nreplace MaxPooling2D with AveragePooling2D\n  replace dense_2 with Dense(units=7)", 3, 3),
    ("replace dense_2 with Dense(units=7)\nreplace MaxPooling2D with AveragePooling2D\nselect all", 1, 1),
    ("tap conv2d_1\nreplace conv2d_2 with Conv2D(filters=3, kernel_size=3)\nselect all", 2, 1),
    ("replace MaxPooling2D with Flatten\nreplace flatten with Reshape(target_shape=(5,))", 1, 1),
])
def test_shape_breaking_edit_blames_its_statement(text, line, column):
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply(text, model)
    assert (info.value.line, info.value.column) == (line, column)
    assert f"x.recipe:{line}:{column}" in info.value.render()
    assert snapshot(model) == before


def test_unknown_layer_type_in_replace():
    with pytest.raises(ApplyError) as info:
        apply("replace dense_2 with Frobnicator(units=7)", make_cnn())
    assert "Frobnicator" in info.value.message and info.value.line == 1


def test_bad_constructor_argument_is_an_apply_error():
    with pytest.raises(ApplyError) as info:
        apply("replace dense_2 with Dense(unitz=7)", make_cnn())
    assert info.value.message == "Dense has no argument 'unitz' (did you mean 'units'?)" and info.value.line == 1


def test_report_of_a_single_structural_statement():
    # (several rebuilt together: test_report_of_consecutive_replaces_describes_each_statement, and where a
    # state between them does not build, test_report_of_statements_rebuilt_together_says_so_…)
    _, single = apply("replace dense_3 with Dense(units=5)", make_cnn())
    assert not any("together" in c for c in single.statements[0].changes)
    assert any("(None, 10) -> (None, 5)" in c and "170 -> 85" in c for c in single.statements[0].changes)
