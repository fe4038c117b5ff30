"""Graph surgery (GitHub issue 3): insert, remove, swap, shuffle, cut, append, set FIELD = VALUE, rename,
load weights, tap into nested models and assert equivalent.

Every test checks numbers (activations recomputed by hand, bit-identical weights, exact shapes in messages,
error lines), never just "it ran". Expected values are computed from the input models themselves.
The keras.applications part at the end is marked slow; each architecture is built once for the module.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import (
    assert_bit_identical, make_cnn, make_multi_io, make_nested, make_sequential, make_shared, position,
    position_of, run_cli, weights_by_path,
)
from modelxform import ApplyError, AssertionFailed, compile_recipe, load_recipe

keras = pytest.importorskip("keras")

from modelxform.keras_io import graph as graph_module  # noqa: E402  (after keras)
from modelxform.keras_io.layers import walk  # noqa: E402
from modelxform.keras_io.backend import keras_backend  # noqa: E402

SEED = 7


# ---- helpers ---------------------------------------------------------------------------------------

def apply(text, model, seed=SEED, filename="x.recipe"):
    return compile_recipe(text, filename).apply(model, seed=seed)


def layer_at(model, path):
    return {info.path: info.layer for info in walk(model)}[path]


def names(model):
    return [layer.name for layer in model.layers]


def producers(layer, node=0):
    """Names of the layers whose outputs feed call ``node`` of ``layer``."""
    return [t._keras_history.operation.name for t in layer._inbound_nodes[node].input_tensors]


def consumers(model, name):
    """Names of the top-level layers that read ``name``'s output (any call)."""
    out = []
    for layer in model.layers:
        for k in range(len(layer._inbound_nodes)):
            if name in producers(layer, k) and layer.name not in out:
                out.append(layer.name)
    return out


def output_names(model):
    return [t._keras_history.operation.name for t in model.outputs]


def shape_text(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def random_input(model, seed=0, batch=4):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal([batch] + [int(d) for d in tuple(t.shape)[1:]]).astype("float32")
              for t in model.inputs]
    return arrays if len(arrays) > 1 else arrays[0]


def outputs(model, x):
    out = model(x, training=False)
    return [keras.ops.convert_to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def activation(model, layer_name, x):
    """The activation of a top-level layer of the ORIGINAL model on ``x``."""
    probe = keras.Model(model.inputs, model.get_layer(layer_name).output)
    return np.asarray(probe(x, training=False))


def snapshot(model):
    """What apply must leave alone on its input: structure, classes, flags and weight bytes."""
    return (type(model).__name__, names(model), [tuple(t.shape) for t in model.outputs],
            {info.path: (type(info.layer).__name__, bool(info.layer.trainable),
                         [np.asarray(w).tobytes() for w in info.layer.get_weights()])
             for info in walk(model)})


def assert_kept_weights(before: dict, new, skip=()):
    """Every layer of ``before`` (weights_by_path of the input) that is not in ``skip`` is in ``new`` with
    bit-identical weights."""
    after = weights_by_path(new)
    for path, arrays in before.items():
        if path in skip:
            continue
        assert path in after, path
        assert_bit_identical(arrays, after[path])


def close(a, b, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, "float64"), np.asarray(b, "float64"), rtol=0, atol=atol)


ACT = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "softmax": lambda z: _softmax(z),
}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dense_np(layer, h, activation_name=None):
    """A Dense layer computed with numpy (float64) from its own arrays and configured activation."""
    kernel, bias = (np.asarray(w, "float64") for w in layer.get_weights())
    act = activation_name or layer.get_config()["activation"]
    return ACT[act](np.asarray(h, "float64") @ kernel + bias)


def _init(seed):
    return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 1000))


HIDDEN = ("h1", "h2", "h3", "h4")
HIDDEN_ACT = {"h1": "relu", "h2": "tanh", "h3": "sigmoid", "h4": "elu"}


def make_chain(width=6):
    """x(6) -> h1 relu -> h2 tanh -> h3 sigmoid -> h4 elu -> out(3): four shape-compatible Dense layers."""
    inp = keras.Input((width,), name="x")
    h = inp
    for k, name in enumerate(HIDDEN):
        h = keras.layers.Dense(width, activation=HIDDEN_ACT[name], name=name, **_init(100 + k))(h)
    out = keras.layers.Dense(3, name="out", **_init(200))(h)
    return keras.Model(inp, out, name="chain")


def chain_np(model, order, x):
    """The chain's output with its hidden layers (and their own weights) applied in ``order``."""
    h = x
    for name in order:
        h = dense_np(model.get_layer(name), h)
    return dense_np(model.get_layer("out"), h)


def make_dropouts():
    """x(5) -> a -> Dropout p(0.1) -> b -> Dropout q(0.4) -> out(2)."""
    inp = keras.Input((5,), name="x")
    h = keras.layers.Dense(5, activation="relu", name="a", **_init(300))(inp)
    h = keras.layers.Dropout(0.1, name="p")(h)
    h = keras.layers.Dense(5, activation="tanh", name="b", **_init(301))(h)
    h = keras.layers.Dropout(0.4, name="q")(h)
    out = keras.layers.Dense(2, name="out", **_init(302))(h)
    return keras.Model(inp, out, name="dropouts")


# ---- insert ----------------------------------------------------------------------------------------------

# layers that are the identity at inference: inserting one must not change the outputs
IDENTITY_INSERTS = [
    ("Dropout(rate=0.5)", "after", "dense_1"),
    ("Dropout(rate=0.5)", "before", "dense_2"),
    ("GaussianNoise(stddev=0.3)", "before", "conv2d_1"),
    ("GaussianDropout(rate=0.2)", "after", "conv2d_2"),
    ("SpatialDropout2D(rate=0.3)", "after", "max_pooling2d"),
    ("ActivityRegularization(l1=0.01)", "before", "flatten"),
    ("Dropout(rate=0.1)", "after", "dense_3"),  # after the output layer: the new layer is the output
]


@pytest.mark.parametrize("call, where, anchor", IDENTITY_INSERTS)
def test_insert_identity_at_inference_layer(call, where, anchor):
    model = make_cnn()
    before_snap, before = snapshot(model), weights_by_path(model)
    ctor = call[:-1] + ', name="extra")'
    new, report = apply(f"insert {ctor} {where} {anchor}", model)

    cls = call.split("(")[0]
    extra = new.get_layer("extra")
    assert type(extra) is getattr(keras.layers, cls)
    old_names = names(model)
    i = old_names.index(anchor)
    expected_order = old_names[:i + 1] + ["extra"] + old_names[i + 1:] if where == "after" else \
        old_names[:i] + ["extra"] + old_names[i:]
    assert names(new) == expected_order

    if where == "after":
        assert producers(extra) == [anchor]
        assert consumers(new, anchor) == ["extra"]
        assert consumers(new, "extra") == consumers(model, anchor)
        for c in consumers(model, anchor):
            assert producers(new.get_layer(c)) == ["extra"]
        if anchor in output_names(model):
            assert output_names(new) == ["extra"]
    else:
        assert producers(extra) == producers(model.get_layer(anchor))
        assert producers(new.get_layer(anchor)) == ["extra"]
    if anchor not in output_names(model):
        assert output_names(new) == output_names(model)

    x = random_input(model, seed=1)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)
    assert_kept_weights(before, new)
    assert set(weights_by_path(new)) == set(before) | {"extra"}
    assert report.statements[0].layers == ["extra"]
    assert report.statements[0].changes[0] == f"added extra ({cls}) {where} {anchor}"
    assert snapshot(model) == before_snap


def test_insert_layer_with_weights_gets_seeded_fresh_weights_and_rewires():
    model = make_cnn()
    before = weights_by_path(model)
    text = 'insert Dense(units=32, activation="relu", name="fc_extra") after dense_1'
    new, _ = apply(text, model)
    again, _ = apply(text, model)
    extra = new.get_layer("fc_extra")
    assert [w.shape for w in extra.get_weights()] == [(32, 32), (32,)]
    kernel, bias = extra.get_weights()  # Dense's own initializers: glorot_uniform, zeros
    assert np.abs(kernel).max() <= np.sqrt(6 / (32 + 32)) and np.abs(kernel).min() < np.abs(kernel).max()
    assert kernel.std() > 0.5 * np.sqrt(6 / (32 + 32)) / np.sqrt(3)
    assert not bias.any()
    assert_bit_identical(extra.get_weights(), again.get_layer("fc_extra").get_weights())
    other, _ = apply(text, model, seed=SEED + 1)
    assert extra.get_weights()[0].tobytes() != other.get_layer("fc_extra").get_weights()[0].tobytes()
    assert_kept_weights(before, new)
    # the output is the original network with the new layer's function in the middle
    x = random_input(model, seed=2)
    h = dense_np(extra, activation(model, "dense_1", x))
    h = dense_np(new.get_layer("dense_2"), h)
    close(outputs(new, x)[0], dense_np(new.get_layer("dense_3"), h), atol=1e-5)


def test_insert_before_a_merge_layer_is_an_error():
    model = make_shared()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply("select all\nfreeze\ninsert Dropout(rate=0.1) before add", model)
    err = info.value
    assert "merge" in err.message and "'add'" in err.message
    assert f"{len(producers(model.get_layer('add')))} inputs" in err.message
    assert (err.line, err.column) == (3, 1)
    assert snapshot(model) == before


def test_insert_after_a_shared_layer_follows_every_call():
    """(issue 15: it was an error) The new layer is applied after each call and is itself shared;
    tests/test_deploy.py checks the outputs by hand."""
    model = make_shared()
    new, _ = apply("insert Dropout(rate=0.1) after shared\nassert equivalent", model)
    calls = len(model.get_layer("shared")._inbound_nodes)
    assert len(new.get_layer("shared")._inbound_nodes) == calls == len(new.get_layer("dropout")._inbound_nodes)
    assert [producers(new.get_layer("dropout"), k) for k in range(calls)] == [["shared"]] * calls
    assert producers(new.get_layer("add")) == ["dropout", "dropout"]


def test_insert_before_a_shared_layer_is_an_error():
    model = make_shared()
    text = "insert Dropout(rate=0.1) before shared"
    with pytest.raises(ApplyError) as info:
        apply(text, model)
    assert "shared" in info.value.message
    assert f"{len(model.get_layer('shared')._inbound_nodes)} times" in info.value.message
    assert position(info.value) == position_of(text, "insert")


def test_insert_after_an_unknown_layer_suggests():
    text = "insert Dropout(rate=0.1) after dens_1"
    with pytest.raises(ApplyError) as info:
        apply(text, make_cnn())
    assert "no layer named 'dens_1'" in info.value.message
    assert "did you mean 'dense_1'" in info.value.message
    assert position(info.value) == position_of(text, "dens_1")


def test_insert_into_a_nested_sequential_keeps_it_nested_and_sequential():
    model = make_nested()
    before = weights_by_path(model)
    new, report = apply('insert Dropout(rate=0.4, name="inner_drop") after backbone/block/conv_a', model)
    backbone = new.get_layer("backbone")
    block = backbone.get_layer("block")
    assert isinstance(backbone, keras.Model) and isinstance(block, keras.Sequential)
    assert names(block) == ["conv_a", "inner_drop", "bn_a"]
    assert report.statements[0].layers == ["backbone/block/inner_drop"]
    assert_kept_weights(before, new)
    x = random_input(model, seed=3)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)


# ---- remove ----------------------------------------------------------------------------------------------

def test_remove_dropout_rewires_and_keeps_outputs():
    model = make_cnn()
    before_snap, before = snapshot(model), weights_by_path(model)
    new, report = apply("remove dropout", model)
    assert names(new) == [n for n in names(model) if n != "dropout"]
    assert producers(new.get_layer("dense_2")) == ["dense_1"]
    x = random_input(model, seed=4)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)
    assert_kept_weights(before, new, skip={"dropout"})
    shape = shape_text(model.get_layer("dropout").input.shape)
    assert report.statements[0].changes == [f"removed dropout {shape}"]
    assert snapshot(model) == before_snap


@pytest.mark.parametrize("layer", ["flatten", "max_pooling2d", "conv2d_2", "dense_3"])
def test_remove_shape_changing_layer_is_an_error_with_both_shapes(layer):
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply(f"select all\nremove {layer}", model)
    err = info.value
    old = model.get_layer(layer)
    in_shape, out_shape = shape_text(old.input.shape), shape_text(old.output.shape)
    assert in_shape != out_shape
    assert layer in err.message
    assert in_shape in err.message and out_shape in err.message
    # the consumers expect the layer's output shape and would receive its input shape
    assert err.message.index(out_shape) < err.message.index(in_shape)
    assert err.line == 2
    assert snapshot(model) == before


def test_remove_selected_and_remove_where_remove_every_match():
    model = make_cnn()
    before = weights_by_path(model)
    setup = 'insert Dropout(rate=0.3, name="extra") after dense_2\n'
    n = len([i for i in walk(model)])
    x = random_input(model, seed=5)
    for text in ("select where type=Dropout\nremove selected", "remove where type=Dropout", "remove dropout, extra"):
        new, report = apply(setup + text + "\nselect all\nassert count == " + str(n - 1), model)
        assert not [l for l in new.layers if isinstance(l, keras.layers.Dropout)], text
        assert names(new) == [m for m in names(model) if m != "dropout"], text
        assert producers(new.get_layer("dense_2")) == ["dense_1"]
        assert producers(new.get_layer("dense_3")) == ["dense_2"]
        remove_report = [s for s in report.statements if str(s.statement).startswith("remove")][0]
        assert sorted(remove_report.layers) == ["dropout", "extra"], text
        close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)
        assert_kept_weights(before, new, skip={"dropout"})


def test_remove_where_matching_nothing_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("select all\nremove where type=Conv3D", make_cnn())
    assert "matches no layer" in info.value.message
    assert info.value.line == 2


def test_remove_selected_then_acting_on_the_selection_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("select where type=Dropout\nremove selected\nscale kernel 2", make_cnn())
    assert "none of the selected layers is left" in info.value.message
    assert info.value.line == 3


def test_remove_a_merge_layer_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("remove add", make_shared())
    assert "merge" in info.value.message and "'add'" in info.value.message
    assert position(info.value) == position_of("remove add", "remove")


def test_remove_a_shared_layer_replaces_each_call_by_its_input():
    model = make_shared()
    before = weights_by_path(model)
    new, _ = apply("remove shared", model)
    assert "shared" not in names(new)
    assert producers(new.get_layer("add")) == ["a", "b"]
    xa, xb = random_input(model, seed=6)
    close(outputs(new, [xa, xb])[0], dense_np(model.get_layer("out"), xa.astype("float64") + xb), atol=1e-5)
    assert_kept_weights(before, new, skip={"shared"})


def test_remove_a_nested_model_with_equal_input_and_output_shapes():
    model = make_nested()
    before = weights_by_path(model)
    block = model.get_layer("backbone").get_layer("block")
    assert tuple(block.input.shape) == tuple(block.output.shape)
    new, _ = apply("remove backbone/block", model)
    backbone = new.get_layer("backbone")
    assert names(backbone)[1:] == ["conv1", "pool"]
    assert producers(backbone.get_layer("pool")) == ["conv1"]
    assert_kept_weights(before, new, skip={"backbone/block/conv_a", "backbone/block/bn_a"})
    x = random_input(model, seed=30)
    old_bb = model.get_layer("backbone")
    h = old_bb.get_layer("pool")(old_bb.get_layer("conv1")(x))
    h = np.asarray(h, "float64").mean(axis=(1, 2))
    close(outputs(new, x)[0], dense_np(model.get_layer("head"), h), atol=1e-5)


def test_insert_with_a_name_that_is_taken_is_an_error():
    model = make_cnn()
    for text in ('insert Dropout(rate=0.1, name="dense_1") after dense_2', 'append Dense(units=3, name="dense_1")'):
        try:
            new, _ = apply(text, model)
        except ApplyError as exc:
            assert "dense_1" in exc.message
        else:
            raise AssertionError(f"{text!r} built a model with layers {names(new)}")


# ---- swap ------------------------------------------------------------------------------------------------

def test_swap_two_compatible_dense_layers_moves_them_with_their_weights():
    model = make_chain()
    before_snap, before = snapshot(model), weights_by_path(model)
    new, report = apply("swap h2 h3", model)
    assert names(new) == ["x", "h1", "h3", "h2", "h4", "out"]
    assert producers(new.get_layer("h3")) == ["h1"]
    assert producers(new.get_layer("h2")) == ["h3"]
    assert producers(new.get_layer("h4")) == ["h2"]
    for name in HIDDEN:  # each layer keeps its own arrays and activation
        assert new.get_layer(name).get_config()["activation"] == HIDDEN_ACT[name]
    assert_kept_weights(before, new)
    x = random_input(model, seed=7).astype("float64")
    expected = chain_np(model, ["h1", "h3", "h2", "h4"], x)
    close(outputs(new, x)[0], expected, atol=1e-5)
    assert not np.allclose(expected, chain_np(model, list(HIDDEN), x), atol=1e-4)  # the order matters
    assert sorted(report.statements[0].changes) == sorted(["the place of h2 now holds h3",
                                                           "the place of h3 now holds h2"])
    assert snapshot(model) == before_snap


def test_swap_two_dropouts():
    model = make_dropouts()
    new, _ = apply("swap p q", model)
    assert names(new) == ["x", "a", "q", "b", "p", "out"]
    assert new.get_layer("p").rate == pytest.approx(0.1) and new.get_layer("q").rate == pytest.approx(0.4)
    assert producers(new.get_layer("q")) == ["a"] and producers(new.get_layer("b")) == ["q"]
    assert producers(new.get_layer("p")) == ["b"] and producers(new.get_layer("out")) == ["p"]
    x = random_input(model, seed=8)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)


def test_swap_incompatible_layers_is_an_error_with_exact_shapes():
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply("swap dense_1 dense_2", model)
    m = re.fullmatch(r"(\w+) expects \(None, (\d+)\) but would receive \(None, (\d+)\)", info.value.message)
    assert m, info.value.message
    assert position(info.value) == position_of("swap dense_1 dense_2", "swap")
    layer, expects, receives = m.group(1), int(m.group(2)), int(m.group(3))
    # dense_2 moved to dense_1's place: it takes dense_1's output width, it would get flatten's
    assert layer == "dense_2"
    assert expects == model.get_layer("dense_2").input.shape[-1]
    assert receives == model.get_layer("flatten").output.shape[-1]
    assert expects != receives
    assert snapshot(model) == before


def test_swap_into_a_place_of_another_rank_names_the_rank_and_both_shapes():
    """`swap pool2 flatten` on a LeNet: the pool would receive the flattened vector (issue 17: this
    leaked numpy's "operands could not be broadcast together with shapes (0,) (2,)")."""
    inp = keras.Input((28, 28, 1), name="img")
    x = keras.layers.Conv2D(6, 3, name="conv1", **_init(1))(inp)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, name="conv2", **_init(2))(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="fc", **_init(3))(x))
    with pytest.raises(ApplyError) as info:
        apply("select all\nswap pool2 flatten", model)
    built_for = tuple(model.get_layer("pool2").input.shape)
    receives = tuple(model.get_layer("conv2").output.shape)
    assert built_for == receives == (None, 11, 11, 16)  # flatten, in pool2's place, flattens this
    assert info.value.message == ("pool2 (MaxPooling2D) takes 4-dimensional input, like the (None, 11, 11, 16) it "
                                  "was built for, but in flatten's place it would receive (None, 1936)")
    assert (info.value.line, info.value.column) == (2, 1)
    assert "broadcast" not in info.value.render()


def test_swap_a_layer_keras_cannot_compute_says_so_and_keeps_keras_reason_as_a_hint():
    inp = keras.Input((12,), name="x")
    y = keras.layers.Reshape((3, 4), name="r")(inp)
    y = keras.layers.Flatten(name="f")(y)
    y = keras.layers.Dense(5, name="d", **_init(4))(y)
    y = keras.layers.Dropout(0.1, name="drop")(y)
    model = keras.Model(inp, keras.layers.Dense(2, name="out", **_init(5))(y))
    with pytest.raises(ApplyError) as info:
        apply("swap r drop", model)
    assert info.value.message == "r (Reshape) cannot take (None, 5) in drop's place (it was built for (None, 12))"
    assert info.value.hint.startswith("Keras says: ")
    assert (info.value.line, info.value.column) == (1, 1)


def test_swap_with_itself_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("swap dense_1 dense_1", make_cnn())
    assert info.value.message == "swap dense_1 with itself changes nothing"
    assert position(info.value) == position_of("swap dense_1 dense_1", "swap")


# ---- shuffle ---------------------------------------------------------------------------------------------

def _hidden_order(model):
    return [n for n in names(model) if n in HIDDEN]


def _order_from_report(report_changes):
    """The hidden layers' order that a shuffle's report describes ("the place of A now holds B")."""
    order = list(HIDDEN)
    for line in report_changes:
        place, holder = re.fullmatch(r"the place of (\w+) now holds (\w+)", line).groups()
        order[HIDDEN.index(place)] = holder
    return order


def _check_shuffled_chain(model, new, before, x):
    """The hidden layers of ``new`` are a permutation of the chain's places, wired in a chain, with their
    own weights; the output is the chain computed by hand in that order. Returns the order."""
    order = _hidden_order(new)
    assert sorted(order) == sorted(HIDDEN)
    assert names(new)[0] == "x" and names(new)[-1] == "out"
    assert producers(new.get_layer(order[0])) == ["x"]
    for prev, cur in zip(order, order[1:]):
        assert producers(new.get_layer(cur)) == [prev]
    assert producers(new.get_layer("out")) == [order[-1]]
    assert_kept_weights(before, new)
    close(outputs(new, x)[0], chain_np(model, order, x), atol=1e-5)
    return order


SHUFFLE_HIDDEN = 'select where name ~ "^h"\nshuffle'


def test_shuffle_is_seeded_and_reproducible():
    model = make_chain()
    before = weights_by_path(model)
    x = random_input(model, seed=9).astype("float64")
    orders = {}
    # seeds 0 and 2 draw different permutations (checked below against the built model)
    for seed in (0, 2):
        new, report = apply(SHUFFLE_HIDDEN, model, seed=seed)
        orders[seed] = _check_shuffled_chain(model, new, before, x)
        assert orders[seed] == _order_from_report(report.statements[1].changes)
        assert orders[seed] != list(HIDDEN)
        again, _ = apply(SHUFFLE_HIDDEN, model, seed=seed)
        assert _hidden_order(again) == orders[seed]
        assert outputs(again, x)[0].tobytes() == outputs(new, x)[0].tobytes()
    assert orders[0] != orders[2]  # different seeds, different permutations


def test_shuffle_of_four_compatible_layers_builds_for_every_seed():
    model = make_chain()
    before = weights_by_path(model)
    x = random_input(model, seed=9).astype("float64")
    seen = set()
    for seed in range(8):
        new, _ = apply(SHUFFLE_HIDDEN, model, seed=seed)
        seen.add(tuple(_check_shuffled_chain(model, new, before, x)))
    assert len(seen) > 1


def test_shuffle_builds_the_permutation_it_reports():
    model = make_chain()
    for seed in (0, 1):
        new, report = apply(SHUFFLE_HIDDEN, model, seed=seed)
        assert _hidden_order(new) == _order_from_report(report.statements[1].changes), seed


def test_shuffle_of_non_adjacent_layers_leaves_the_others_in_place():
    model = make_chain()
    before = weights_by_path(model)
    x = random_input(model, seed=9).astype("float64")
    seen = {}
    for seed in range(10):
        new, report = apply("select h1, h3\nshuffle", model, seed=seed)
        order = _check_shuffled_chain(model, new, before, x)
        assert order in (["h1", "h2", "h3", "h4"], ["h3", "h2", "h1", "h4"])
        if order[0] == "h1":
            assert report.statements[1].notes == ["the permutation left every layer in place"]
        else:
            assert sorted(report.statements[1].changes) == ["the place of h1 now holds h3",
                                                            "the place of h3 now holds h1"]
        seen.setdefault(tuple(order), seed)
    assert len(seen) == 2  # some seeds swap them, some do not
    swapped = seen[("h3", "h2", "h1", "h4")]
    a, _ = apply("select h1, h3\nshuffle", model, seed=swapped)
    b, _ = apply("select h1, h3\nshuffle", model, seed=swapped)
    assert outputs(a, x)[0].tobytes() == outputs(b, x)[0].tobytes()


def test_shuffle_of_incompatible_layers_is_refused_unless_the_permutation_is_the_identity():
    model = make_cnn()
    before = snapshot(model)
    refused = 0
    for seed in range(6):
        try:
            new, report = apply("select where type=Dense\nshuffle", model, seed=seed)
        except ApplyError as exc:
            assert re.fullmatch(r"\w+ expects \(None, \d+\) but would receive \(None, \d+\)", exc.message), exc.message
            assert exc.line == 2
            refused += 1
        else:
            assert report.statements[1].notes == ["the permutation left every layer in place"]
            assert names(new) == names(model)
    assert refused >= 1
    assert snapshot(model) == before


def test_shuffle_needs_two_layers():
    with pytest.raises(ApplyError) as info:
        apply("select dense_1\nshuffle", make_cnn())
    assert "at least two" in info.value.message and info.value.line == 2


# ---- cut after ---------------------------------------------------------------------------------------------

def test_cut_after_makes_a_headless_backbone():
    model = make_cnn()
    before = weights_by_path(model)
    new, report = apply("cut after flatten", model)
    assert names(new) == names(model)[:names(model).index("flatten") + 1]
    assert output_names(new) == ["flatten"]
    assert tuple(new.outputs[0].shape) == tuple(model.get_layer("flatten").output.shape)
    x = random_input(model, seed=10)
    close(outputs(new, x)[0], activation(model, "flatten", x), atol=1e-6)
    dropped = sorted(set(names(model)) - set(names(new)))
    assert dropped == ["dense_1", "dense_2", "dense_3", "dropout"]
    assert report.statements[0].changes[0] == f"output is now flatten; dropped {len(dropped)} layer(s): " \
                                              + ", ".join(dropped)
    assert_kept_weights({p: w for p, w in before.items() if p not in dropped}, new)
    assert set(weights_by_path(new)) == set(before) - set(dropped)


def test_cut_then_append_a_new_head():
    model = make_cnn()
    new, _ = apply('cut after dense_1\nappend Dense(units=4, activation="tanh", name="head")', model)
    assert names(new)[-2:] == ["dense_1", "head"]
    x = random_input(model, seed=11)
    close(outputs(new, x)[0], dense_np(new.get_layer("head"), activation(model, "dense_1", x)), atol=1e-5)


def test_cut_after_a_layer_inside_a_nested_model_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("cut after backbone/block/conv_a", make_nested())
    assert "backbone/block/conv_a" in info.value.message
    assert position(info.value) == position_of("cut after backbone/block/conv_a", "cut")


def test_cut_after_a_nested_model_keeps_it_nested():
    model = make_nested()
    new, _ = apply("cut after backbone", model)
    assert names(new) == ["image", "backbone"]
    assert isinstance(new.get_layer("backbone"), keras.Model)
    x = random_input(model, seed=12)
    close(outputs(new, x)[0], np.asarray(model.get_layer("backbone")(x, training=False)), atol=1e-6)


# ---- append ------------------------------------------------------------------------------------------------

def test_append_adds_a_new_output_layer():
    model = make_cnn()
    before = weights_by_path(model)
    new, report = apply('append Dense(units=5, name="extra")', model)
    assert tuple(new.outputs[0].shape) == (None, 5)
    assert output_names(new) == ["extra"] and producers(new.get_layer("extra")) == ["dense_3"]
    x = random_input(model, seed=13)
    close(outputs(new, x)[0], dense_np(new.get_layer("extra"), outputs(model, x)[0]), atol=1e-5)
    assert_kept_weights(before, new)
    assert report.statements[0].changes[0] == "added extra (Dense) on the output"


def test_append_after_a_non_output_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("append Dense(units=5) after dense_2", make_cnn())
    assert "dense_2 is not an output" in info.value.message
    assert "dense_3" in info.value.message
    assert position(info.value) == position_of("append Dense(units=5) after dense_2", "append")


def test_append_on_a_multi_output_model_needs_after():
    model = make_multi_io()
    with pytest.raises(ApplyError) as info:
        apply("append Dense(units=3)", model)
    assert f"{len(model.outputs)} outputs" in info.value.message
    assert ", ".join(output_names(model)) in info.value.message  # lists them: out1, out2
    assert position(info.value) == position_of("append Dense(units=3)", "append")

    before = weights_by_path(model)
    new, _ = apply('append Dense(units=3, name="extra") after out2', model)
    assert output_names(new) == ["out1", "extra"]
    assert [tuple(t.shape) for t in new.outputs] == [tuple(model.outputs[0].shape), (None, 3)]
    x = random_input(model, seed=14)
    old = outputs(model, x)
    got = outputs(new, x)
    close(got[0], old[0], atol=1e-6)
    close(got[1], dense_np(new.get_layer("extra"), old[1]), atol=1e-5)
    assert_kept_weights(before, new)


# ---- set FIELD = VALUE -------------------------------------------------------------------------------------

def test_set_activation_recomputes_the_output_by_hand():
    model = make_cnn()
    before = weights_by_path(model)
    new, report = apply('select dense_1\nset activation = "tanh"', model)
    assert new.get_layer("dense_1").get_config()["activation"] == "tanh"
    assert model.get_layer("dense_1").get_config()["activation"] == "relu"
    assert_kept_weights(before, new)
    assert set(weights_by_path(new)) == set(before)
    x = random_input(model, seed=15)
    h = dense_np(model.get_layer("dense_1"), activation(model, "flatten", x), "tanh")
    h = dense_np(model.get_layer("dense_2"), h)
    expected = dense_np(model.get_layer("dense_3"), h)
    got = outputs(new, x)[0]
    close(got, expected, atol=1e-5)
    assert not np.allclose(got, outputs(model, x)[0], rtol=0, atol=1e-4)
    assert report.statements[1].changes[0] == 'dense_1: activation "relu" -> "tanh"'


def test_set_dropout_rate_keeps_outputs_and_weights():
    model = make_cnn()
    before = weights_by_path(model)
    new, _ = apply("select where type=Dropout\nset rate = 0.75", model)
    assert new.get_layer("dropout").rate == pytest.approx(0.75)
    assert_kept_weights(before, new)
    x = random_input(model, seed=16)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)


def test_set_without_a_shape_change_keeps_weights():
    model = make_cnn()
    before = weights_by_path(model)
    units = model.get_layer("dense_1").units
    new, _ = apply(f"select dense_1\nset units = {units}", model)
    assert_kept_weights(before, new)


def _reshaped_by_units(model, layer):
    """The layers whose weight shapes change with ``layer``'s width: it, and the first layer with weights
    downstream of it (dense_1 -> dropout -> dense_2)."""
    out, current = {layer}, layer
    while True:
        [current] = consumers(model, current)
        if model.get_layer(current).weights:
            return out | {current}


def test_set_units_without_reinit_is_an_error_at_the_set_line():
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply("select dense_1\nset units = 20\nselect all\nfreeze", model)
    err = info.value
    assert (err.line, err.column) == (2, 1)
    listed = re.search(r"weight shapes of (.+?), so", err.message)
    assert listed, err.message
    assert set(listed.group(1).split(", ")) == _reshaped_by_units(model, "dense_1") == {"dense_1", "dense_2"}
    assert snapshot(model) == before


def test_set_units_with_reinit_of_only_some_layers_names_the_rest():
    with pytest.raises(ApplyError) as info:
        apply("select dense_1\nset units = 20\nselect dense_1\nreinit weights", make_cnn())
    assert info.value.line == 2
    listed = re.search(r"weight shapes of (.+?), so", info.value.message).group(1)
    assert listed.split(", ") == ["dense_2"]


def test_set_units_with_reinit_changes_the_shapes():
    model = make_cnn()
    before = weights_by_path(model)
    text = "select dense_1\nset units = 20\nselect dense_1, dense_2\nreinit weights"
    new, _ = apply(text, model)
    fan_in = model.get_layer("dense_1").kernel.shape[0]
    assert [w.shape for w in new.get_layer("dense_1").get_weights()] == [(fan_in, 20), (20,)]
    assert [w.shape for w in new.get_layer("dense_2").get_weights()] == \
        [(20, model.get_layer("dense_2").units), (model.get_layer("dense_2").units,)]
    assert tuple(new.outputs[0].shape) == tuple(model.outputs[0].shape)
    assert_kept_weights(before, new, skip={"dense_1", "dense_2"})
    again, _ = apply(text, model)  # the reinitialised arrays are seeded
    for path in ("dense_1", "dense_2"):
        assert_bit_identical(weights_by_path(new)[path], weights_by_path(again)[path])
    x = random_input(model, seed=17)
    h = dense_np(new.get_layer("dense_1"), activation(model, "flatten", x))
    h = dense_np(new.get_layer("dense_2"), h)
    close(outputs(new, x)[0], dense_np(new.get_layer("dense_3"), h), atol=1e-5)


def test_set_units_then_rename_then_reinit_by_the_new_name():
    model = make_cnn()
    new, _ = apply('select dense_1\nset units = 20\nselect all\nfreeze\nselect dense_1\nrename to "fc"\n'
                   "select fc, dense_2\nreinit weights", model)
    assert new.get_layer("fc").kernel.shape == (model.get_layer("dense_1").kernel.shape[0], 20)


def test_set_units_then_replace_the_reshaped_consumer():
    model = make_cnn()
    new, _ = apply('select dense_1\nset units = 20\nselect dense_1\nreinit weights\n'
                   'replace dense_2 with Dense(units=16, activation="relu")', model)
    assert new.get_layer("dense_2").kernel.shape == (20, 16)


def test_set_units_then_cut_the_reshaped_layers_away():
    model = make_cnn()
    same_batch, _ = apply("select dense_1\nset units = 20\ncut after flatten", model)
    assert output_names(same_batch) == ["flatten"]
    new, _ = apply("select dense_1\nset units = 20\nselect all\nfreeze\ncut after flatten", model)
    assert names(new) == names(same_batch)


def test_set_an_invalid_value_is_an_error_at_its_line():
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply('select dense_1\nset activation = "no_such_activation"', model)
    assert info.value.line == 2
    assert snapshot(model) == before


def test_set_an_unknown_field_suggests():
    with pytest.raises(ApplyError) as info:
        apply("select dense_1\nset unitz = 20", make_cnn())
    assert "'unitz'" in info.value.message and "did you mean 'units'" in info.value.message
    assert info.value.line == 2


# ---- rename ------------------------------------------------------------------------------------------------

def test_rename_to_moves_the_weights_and_later_statements_use_the_new_name():
    model = make_cnn()
    before = weights_by_path(model)
    new, report = apply('select dense_1\nrename to "fc"\nselect fc\nscale kernel 2', model)
    assert "dense_1" not in names(new) and names(new).index("fc") == names(model).index("dense_1")
    assert producers(new.get_layer("dropout")) == ["fc"]
    kernel, bias = new.get_layer("fc").get_weights()
    assert kernel.tobytes() == (before["dense_1"][0] * np.float32(2)).tobytes()
    assert bias.tobytes() == before["dense_1"][1].tobytes()
    assert_kept_weights(before, new, skip={"dense_1"})
    assert report.statements[1].changes == ["dense_1 -> fc"]
    assert report.statements[2].layers == ["fc"]


def test_rename_prefix_keeps_every_weight():
    model = make_cnn()
    before = weights_by_path(model)
    new, _ = apply('select Dense\nrename prefix "p_"', model)
    dense = [l.name for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert names(new) == [("p_" + n if n in dense else n) for n in names(model)]
    after = weights_by_path(new)
    for name in dense:
        assert_bit_identical(before[name], after["p_" + name])
    assert_kept_weights(before, new, skip=set(dense))
    assert output_names(new) == ["p_dense_3"]
    x = random_input(model, seed=18)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)


def test_rename_inside_a_nested_model():
    model = make_nested()
    before = weights_by_path(model)
    new, _ = apply('select backbone/block/conv_a\nrename to "stem"\nselect backbone/block/stem\nassert count == 1',
                   model)
    assert names(new.get_layer("backbone").get_layer("block")) == ["stem", "bn_a"]
    assert_bit_identical(before["backbone/block/conv_a"], weights_by_path(new)["backbone/block/stem"])


def test_rename_clash_is_an_error():
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        apply('select dense_1\nrename to "dense_2"', model)
    assert "'dense_2'" in info.value.message and "dense_1" in info.value.message
    assert info.value.line == 2
    assert snapshot(model) == before


def test_rename_to_with_two_selected_layers_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply('select dense_1, dense_2\nrename to "x"', make_cnn())
    assert "exactly one" in info.value.message and "not 2" in info.value.message
    assert info.value.line == 2


# ---- load weights ------------------------------------------------------------------------------------------

def _recipe_file(tmp_path, text, name="r.recipe"):
    path = tmp_path / "recipes" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_load_weights_from_a_file_next_to_the_recipe(tmp_path, monkeypatch):
    from modelxform.keras_io.files import save_model
    from modelxform.samples import cnn
    (tmp_path / "recipes").mkdir()
    source = cnn(seed=5)
    save_model(source, tmp_path / "recipes" / "src.keras")
    recipe = _recipe_file(tmp_path, 'select Dense\nload weights from "src.keras"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path is relative to the recipe file, not the working folder

    model = make_cnn()
    before = weights_by_path(model)
    new, report = load_recipe(recipe).apply(model, seed=SEED)
    src = weights_by_path(source)
    after = weights_by_path(new)
    dense = ["dense_1", "dense_2", "dense_3"]
    for path in dense:
        assert_bit_identical(after[path], src[path])
        assert after[path][0].tobytes() != before[path][0].tobytes()
    assert_kept_weights(before, new, skip=set(dense))  # the convolutions were not selected
    assert report.statements[1].changes == [f"{p} <- src.keras:{p} (by path)" for p in dense]


def _source_for_nested(head_units=3):
    """conv1 at the top level (so only its name matches backbone/conv1), head at the same path; nothing
    for block/conv_a and block/bn_a."""
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1", **_init(500))(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(head_units, name="head", **_init(501))(x)
    return keras.Model(inp, out, name="source")


def test_load_weights_matches_by_path_then_name_and_reports_the_rest(tmp_path):
    from modelxform.keras_io.files import save_model
    (tmp_path / "recipes").mkdir()
    source = _source_for_nested()
    save_model(source, tmp_path / "recipes" / "src.keras")
    recipe = _recipe_file(tmp_path, 'select all\nload weights from "src.keras"\n')
    model = make_nested()
    before = weights_by_path(model)
    new, report = load_recipe(recipe).apply(model, seed=SEED)
    after, src = weights_by_path(new), weights_by_path(source)
    assert_bit_identical(after["backbone/conv1"], src["conv1"])
    assert_bit_identical(after["head"], src["head"])
    unmatched = ["backbone/block/conv_a", "backbone/block/bn_a"]
    assert_kept_weights(before, new, skip={"backbone/conv1", "head"})
    stmt = report.statements[1]
    assert stmt.changes == ["backbone/conv1 <- src.keras:conv1 (by name)", "head <- src.keras:head (by path)"]
    assert any(all(p in note for p in unmatched) for note in stmt.notes), stmt.notes

    strict = _recipe_file(tmp_path, 'select all\nload weights from "src.keras" strict\n', "strict.recipe")
    with pytest.raises(ApplyError) as info:
        load_recipe(strict).apply(model, seed=SEED)
    assert all(p in info.value.message for p in unmatched)
    assert "backbone/conv1" not in info.value.message and "head" not in info.value.message.replace("src.keras", "")
    assert info.value.line == 2


def test_load_weights_with_a_shape_mismatch_is_an_error_naming_the_layer(tmp_path):
    from modelxform.keras_io.files import save_model
    (tmp_path / "recipes").mkdir()
    save_model(_source_for_nested(head_units=5), tmp_path / "recipes" / "src.keras")
    recipe = _recipe_file(tmp_path, 'select head\nload weights from "src.keras"\n')
    model = make_nested()
    before = snapshot(model)
    with pytest.raises(ApplyError) as info:
        load_recipe(recipe).apply(model, seed=SEED)
    msg = info.value.message
    assert "head" in msg and "(4, 3)" in msg and "(4, 5)" in msg
    assert info.value.line == 2
    assert snapshot(model) == before


def test_load_weights_from_a_missing_file_is_an_error_at_its_line(tmp_path):
    from modelxform import ModelxformError
    recipe = _recipe_file(tmp_path, 'select all\nload weights from "nope.keras"\n')
    with pytest.raises(ModelxformError) as info:
        load_recipe(recipe).apply(make_cnn(), seed=SEED)
    assert "nope.keras" in info.value.message
    assert info.value.line == 2


# ---- tap into a nested model -------------------------------------------------------------------------------

def test_tap_a_layer_inside_a_nested_model():
    model = make_nested()
    before = weights_by_path(model)
    new, report = apply("tap backbone/block/bn_a", model)
    backbone = new.get_layer("backbone")
    assert isinstance(backbone, keras.Model) and not isinstance(backbone, keras.Sequential)
    block = backbone.get_layer("block")  # a Sequential has one output: it becomes a functional model
    assert isinstance(block, keras.Model) and not isinstance(block, keras.Sequential)
    assert [type(layer).__name__ for layer in new.layers] == [type(layer).__name__ for layer in model.layers]
    assert [info.path for info in walk(new)] == [info.path for info in walk(model)]
    assert_kept_weights(before, new)
    assert len(new.outputs) == 2
    old_bb = model.get_layer("backbone")
    bn = old_bb.get_layer("block").get_layer("bn_a")
    assert tuple(new.outputs[1].shape) == tuple(bn.output.shape)

    x = random_input(model, seed=19)
    got = outputs(new, x)
    close(got[0], outputs(model, x)[0], atol=1e-6)  # the original output is unchanged
    # the inner activation, computed independently: conv1 -> conv_a -> bn_a (inference)
    h = old_bb.get_layer("conv1")(x)
    h = old_bb.get_layer("block").get_layer("conv_a")(h)
    inner = np.asarray(bn(h, training=False))
    close(got[1], inner, atol=1e-6)
    # ... and by hand, to be sure bn_a is not the identity here
    gamma, beta, mean, var = (np.asarray(w, "float64") for w in bn.get_weights())
    close(got[1], (np.asarray(h, "float64") - mean) / np.sqrt(var + bn.epsilon) * gamma + beta, atol=1e-5)
    assert report.statements[0].changes[0] == "added as outputs: backbone/block/bn_a"


# ---- assert equivalent -------------------------------------------------------------------------------------

def test_assert_equivalent_holds_after_removing_dropout():
    new, report = apply("remove dropout\nassert equivalent", make_cnn())
    assert "dropout" not in names(new)
    backend = keras_backend()
    assert report.statements[1].notes == [f"holds: largest difference 0 (tolerance 1e-05, the default for {backend} on CPU)"]
    assert report.statements[1].record == ["holds (the default tolerance)"]


BN_INSERT = "insert BatchNormalization() before dense_2"


def _bn_differences(model, n=256):
    """Per-sample maximum |difference| between the model with BN_INSERT and the model, on random inputs."""
    with_bn, _ = apply(BN_INSERT, model)
    x = random_input(model, seed=20, batch=n)
    diff = np.abs(outputs(with_bn, x)[0].astype("float64") - outputs(model, x)[0])
    return diff.reshape(n, -1).max(axis=1)


def test_assert_equivalent_fails_for_batchnorm_with_default_statistics():
    model = make_cnn()
    per_sample = _bn_differences(model)
    assert per_sample.max() > 1e-5  # BN at inference divides by sqrt(1 + epsilon): not the identity
    with pytest.raises(AssertionFailed) as info:
        apply(BN_INSERT + "\nassert equivalent", model)
    err = info.value
    m = re.fullmatch(r"assert equivalent failed: outputs differ by up to (\S+) \(tolerance 1e-05, the default for "
                     rf"{keras_backend()} on CPU\)", err.message)
    assert m, err.message
    reported = float(m.group(1))
    assert reported > 1e-5
    assert per_sample.min() / 2 <= reported <= per_sample.max() * 2
    assert (err.line, err.column) == (2, 1)


def test_assert_equivalent_with_a_tolerance():
    model = make_cnn()
    per_sample = _bn_differences(model)
    assert per_sample.max() < 1e-2
    new, report = apply(BN_INSERT + "\nassert equivalent tolerance 1e-2", model)
    note = report.statements[1].notes[0]
    m = re.fullmatch(r"holds: largest difference (\S+) \(tolerance 0\.01, the recipe's\)", note)
    assert m, note
    assert 1e-5 < float(m.group(1)) < 1e-2
    text = BN_INSERT + f"\nassert equivalent tolerance {float(m.group(1)) / 2:.3g}"
    with pytest.raises(AssertionFailed, match=r"assert equivalent failed: outputs differ by up to \S+ "
                                              r"\(tolerance \S+, the recipe's\)") as info:
        apply(text, model)
    assert position(info.value) == position_of(text, "assert")


def test_assert_equivalent_after_a_cut_reports_the_shape_change():
    model = make_cnn()
    text = "cut after flatten\nassert equivalent"
    with pytest.raises(AssertionFailed) as info:
        apply(text, model)
    assert "output 0 has shape" in info.value.message
    assert str(model.get_layer("flatten").output.shape[-1]) in info.value.message
    assert position(info.value) == position_of(text, "assert")


# ---- Sequential stays Sequential ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, order, same_output", [
    ('insert Dropout(rate=0.2, name="extra") after fc1', ["fc1", "extra", "dropout_1", "fc2"], True),
    ('insert GaussianNoise(stddev=0.2, name="extra") before fc2', ["fc1", "dropout_1", "extra", "fc2"], True),
    ("remove dropout_1", ["fc1", "fc2"], True),
    ('append Dense(units=3, name="extra")', ["fc1", "dropout_1", "fc2", "extra"], False),
    ("cut after fc1", ["fc1"], False),
    ('select fc1\nrename to "first"', ["first", "dropout_1", "fc2"], True),
])
def test_sequential_stays_sequential(text, order, same_output):
    model = make_sequential()
    before = weights_by_path(model)
    new, _ = apply(text, model)
    assert isinstance(new, keras.Sequential)
    assert names(new) == order
    renamed = {"first": "fc1"}
    after = weights_by_path(new)
    for name in order:
        if renamed.get(name, name) in before:
            assert_bit_identical(after[name], before[renamed.get(name, name)])
    x = random_input(model, seed=21)
    got = outputs(new, x)[0]
    if same_output:
        close(got, outputs(model, x)[0], atol=1e-6)
    elif "append" in text:
        close(got, dense_np(new.get_layer("extra"), outputs(model, x)[0]), atol=1e-5)
    else:
        close(got, dense_np(model.get_layer("fc1"), x), atol=1e-5)


# ---- multi-input / multi-output and shared layers ----------------------------------------------------------

def test_multi_io_insert_and_remove():
    model = make_multi_io()
    before = weights_by_path(model)
    new, _ = apply('insert Dropout(rate=0.2, name="d1") after concat\n'
                   'insert Dropout(rate=0.2, name="d2") before out2\nassert equivalent', model)
    assert producers(new.get_layer("d1")) == ["concat"]
    assert producers(new.get_layer("out1")) == ["d1"]
    assert producers(new.get_layer("d2")) == ["d1"] and producers(new.get_layer("out2")) == ["d2"]
    assert output_names(new) == output_names(model)
    assert len(new.inputs) == 2
    x = random_input(model, seed=22)
    for a, b in zip(outputs(new, x), outputs(model, x)):
        close(a, b, atol=1e-6)
    assert_kept_weights(before, new)

    back, _ = apply('insert Dropout(rate=0.2, name="d1") after concat\nremove d1\nassert equivalent', model)
    assert names(back) == names(model)


def test_shared_layer_stays_shared_after_surgery():
    model = make_shared()
    before = weights_by_path(model)
    new, _ = apply('insert Dropout(rate=0.2, name="extra") after add\nassert equivalent', model)
    shared = [l for l in new.layers if l.name == "shared"]
    assert len(shared) == 1
    assert len(shared[0]._inbound_nodes) == 2
    assert producers(shared[0], 0) == ["a"] and producers(shared[0], 1) == ["b"]
    assert producers(new.get_layer("add")) == ["shared", "shared"]
    assert producers(new.get_layer("extra")) == ["add"] and producers(new.get_layer("out")) == ["extra"]
    assert_kept_weights(before, new)
    x = random_input(model, seed=23)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)

    removed, _ = apply('insert Dropout(rate=0.2, name="extra") after add\nremove extra\n'
                       'select shared\nset activation = "relu"', model)
    assert len(removed.get_layer("shared")._inbound_nodes) == 2
    assert_kept_weights(before, removed)
    xa, xb = x
    s = lambda v: dense_np(model.get_layer("shared"), v, "relu")  # noqa: E731
    close(outputs(removed, x)[0], dense_np(model.get_layer("out"), s(xa) + s(xb)), atol=1e-5)


# ---- results survive a .keras round trip ------------------------------------------------------------------

@pytest.mark.parametrize("factory, text", [
    (make_nested, "tap backbone/block/bn_a"),
    (make_nested, 'select backbone/block/conv_a\nrename to "stem"\ninsert Dropout(rate=0.2) before stem'),
    (make_sequential, 'insert Dropout(rate=0.2, name="extra") after fc1\nappend Dense(units=3)'),
    (make_shared, 'insert Dropout(rate=0.1, name="extra") after add'),
    (make_chain, "swap h1 h4"),
    (make_cnn, 'select Dense\nrename prefix "p_"\nselect p_dense_1\nset activation = "tanh"\ncut after p_dense_2'),
])
def test_surgery_results_survive_save_and_load(factory, text, tmp_path):
    model = factory()
    new, _ = apply(text, model)
    path = tmp_path / "out.keras"
    new.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(new)
    assert [info.path for info in walk(loaded)] == [info.path for info in walk(new)]
    for p, arrays in weights_by_path(new).items():
        assert_bit_identical(arrays, weights_by_path(loaded)[p])
    x = random_input(model, seed=25)
    for a, b in zip(outputs(loaded, x), outputs(new, x)):
        assert a.tobytes() == b.tobytes()


# ---- the command line ----------------------------------------------------------------------------------------

def test_cli_apply_with_surgery_and_load_weights(tmp_path, monkeypatch):
    from modelxform.keras_io.files import load_model, save_model
    from modelxform.samples import cnn
    save_model(cnn(), tmp_path / "m.keras")
    (tmp_path / "recipes").mkdir()
    save_model(cnn(seed=5), tmp_path / "recipes" / "src.keras")
    recipe = _recipe_file(tmp_path, 'insert Dropout(rate=0.2, name="extra") after dense_1\nselect Dense\n'
                                    'load weights from "src.keras"\nrename prefix "p_"\n')
    monkeypatch.chdir(tmp_path)
    r = run_cli("apply", recipe, tmp_path / "m.keras", "-o", tmp_path / "out.keras")
    assert r.status == 0, r.err
    assert "dense_1 <- src.keras:dense_1 (by path)" in r.out
    out = load_model(tmp_path / "out.keras")
    assert names(out) == ["image", "conv2d_1", "max_pooling2d", "conv2d_2", "flatten", "p_dense_1", "extra",
                          "dropout", "p_dense_2", "p_dense_3"]
    src = weights_by_path(cnn(seed=5))
    for name in ("dense_1", "dense_2", "dense_3"):
        assert_bit_identical(weights_by_path(out)["p_" + name], src[name])

    failing = _recipe_file(tmp_path, "insert BatchNormalization() before dense_2\nassert equivalent\n", "f.recipe")
    r = run_cli("apply", failing, tmp_path / "m.keras", "-o", tmp_path / "f.keras")
    assert r.status == 1 and "f.recipe:2:1: error: assert equivalent failed: outputs differ by up to" in r.err
    assert not (tmp_path / "f.keras").exists()

    reshaping = _recipe_file(tmp_path, "select dense_1\nset units = 20\n", "g.recipe")
    r = run_cli("apply", reshaping, tmp_path / "m.keras", "-o", tmp_path / "g.keras")
    assert r.status == 4
    assert "g.recipe:2:1: error: `set units = 20` changes the weight shapes of dense_1, dense_2" in r.err
    assert not (tmp_path / "g.keras").exists()


# ---- one rebuild per run of structural statements ----------------------------------------------------------

TEN = [f'insert Dropout(rate=0.1, name="d{k}") after {anchor}'
       for k, anchor in enumerate(["conv2d_1", "max_pooling2d", "conv2d_2", "flatten", "dense_1", "dense_2",
                                   "dense_3"])] + ["remove dropout", "remove d0", "remove d1"]


def _count_builds(monkeypatch):
    calls = []
    original = graph_module.GraphEditor._build

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(graph_module.GraphEditor, "_build", counting)
    return calls


def test_ten_structural_statements_are_rebuilt_once(monkeypatch):
    model = make_cnn()
    calls = _count_builds(monkeypatch)
    assert len(TEN) == 10
    new, report = apply("\n".join(TEN), model)
    assert len(calls) == 1
    assert_kept_weights(weights_by_path(model), new, skip={"dropout"})
    expected = ["image", "conv2d_1", "max_pooling2d", "conv2d_2", "d2", "flatten", "d3", "dense_1", "d4",
                "dense_2", "d5", "dense_3", "d6"]
    assert names(new) == expected
    x = random_input(model, seed=24)
    close(outputs(new, x)[0], outputs(model, x)[0], atol=1e-6)

    calls.clear()
    split, _ = apply("\n".join(TEN[:5] + ["select all", "freeze"] + TEN[5:]), model)
    assert len(calls) == 2
    assert names(split) == expected
    assert not any(l.trainable for l in split.layers if l.name in names(model)[1:5])


# ---- reproducibility of layers a statement creates ---------------------------------------------------------

def test_unnamed_new_layers_are_reproducible():
    model = make_cnn()
    a, _ = apply("append Dense(units=5)", model)
    b, _ = apply("append Dense(units=5)", model)
    assert names(a) == names(b)
    assert_bit_identical(a.layers[-1].get_weights(), b.layers[-1].get_weights())


# ==== keras.applications ====================================================================================

def _randomize_batchnorm(model, seed, gamma=(0.5, 1.5), beta=0.1):
    """Seeded random BN statistics, as a trained model's would be: with Keras's defaults the activations
    of these deep nets vanish and comparing outputs would prove little. (InceptionV3's BN has no gamma.)"""
    rng = np.random.default_rng(seed)
    draw = {"gamma": lambda n: rng.uniform(*gamma, n), "beta": lambda n: rng.normal(0, beta, n),
            "moving_mean": lambda n: rng.normal(0, 0.1, n), "moving_variance": lambda n: rng.uniform(0.5, 2.0, n)}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([draw[v.name](n).astype("float32") for v in layer.weights])


class App:
    def __init__(self, model, pixels=False):
        self.model = model
        # EfficientNet rescales its input by 1/255 itself: give it pixel values, or its activations hardly vary
        self.x = np.random.default_rng(0).uniform(0, 255, (2, *model.inputs[0].shape[1:])).astype("float32") \
            if pixels else random_input(model, seed=0, batch=2)
        self.y = keras.ops.convert_to_numpy(model(self.x, training=False))
        self.weights = weights_by_path(model)
        self.snapshot = snapshot(model)
        assert np.all(np.isfinite(self.y))

    def apply(self, text, seed=SEED):
        new, report = apply(text, self.model, seed=seed, filename="app.recipe")
        assert snapshot(self.model) == self.snapshot, "apply changed the input model"
        return new, report

    def predict(self, model):
        return keras.ops.convert_to_numpy(model(self.x, training=False))

    def inner(self, model, name):
        """The activation of layer ``name`` of ``model`` on the fixture's input."""
        return keras.ops.convert_to_numpy(keras.Model(model.inputs, model.get_layer(name).output)(self.x, training=False))

    def assert_informative(self, name=None):
        """The output (or layer ``name``'s activation) depends on the input: a comparison of it means something."""
        y = self.y if name is None else self.inner(self.model, name)
        assert np.abs(y[0] - y[1]).max() > 1e-3 * max(1.0, np.abs(y).max()), name


def _app(factory, bn_seed=None, bn=None, pixels=False, **kwargs):
    model = factory(weights=None, classes=10, classifier_activation=None, **kwargs)
    if bn_seed is not None:
        _randomize_batchnorm(model, bn_seed, **(bn or {}))
    return App(model, pixels)


@pytest.fixture(scope="module")
def resnet50():
    return _app(keras.applications.ResNet50, 0, input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def densenet121():
    return _app(keras.applications.DenseNet121, 1, input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def mobilenetv2():
    # larger gammas so that many ReLU6 layers actually clip at 6
    return _app(keras.applications.MobileNetV2, 2, bn={"gamma": (2.0, 4.0), "beta": 0.3},
                input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def efficientnetb0():
    return _app(keras.applications.EfficientNetB0, 3, pixels=True, input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def inceptionv3():
    return _app(keras.applications.InceptionV3, 4, input_shape=(75, 75, 3))


@pytest.fixture(scope="module")
def vgg16():
    return _app(keras.applications.VGG16, None, input_shape=(32, 32, 3))


def _inserted(report, index=0):
    [path] = report.statements[index].layers
    return path


def _check_identity_insert(app, new, report, anchor, where):
    """An identity-at-inference layer inserted next to ``anchor``: rewired, same outputs, same weights, and
    the same activation right after the edit (informative even where the final output hardly varies)."""
    name = _inserted(report)
    old = app.model
    if where == "after":
        assert producers(new.get_layer(name)) == [anchor]
        assert consumers(new, anchor) == [name]
        readers = consumers(old, anchor)
        assert readers and consumers(new, name) == readers
        for c in readers:
            assert producers(new.get_layer(c)) == [name if p == anchor else p for p in producers(old.get_layer(c))]
        after_edit = readers[0]
    else:
        assert producers(new.get_layer(name)) == producers(old.get_layer(anchor))
        assert producers(new.get_layer(anchor)) == [name]
        after_edit = anchor
    assert len(new.layers) == len(old.layers) + 1
    assert_kept_weights(app.weights, new)
    app.assert_informative(after_edit)
    close(app.inner(new, after_edit), app.inner(old, after_edit), atol=1e-5)
    close(app.predict(new), app.y, atol=1e-5)
    assert report.statements[-1].notes[0].startswith("holds: largest difference")


@pytest.mark.slow
def test_resnet50_cut_and_new_head(resnet50):
    old = resnet50.model
    resnet50.assert_informative("conv4_block6_out")
    new, _ = resnet50.apply("cut after conv4_block6_out\nappend GlobalAveragePooling2D()\nappend Dense(units=5)")
    assert tuple(new.outputs[0].shape) == (None, 5)
    cut_at = names(old).index("conv4_block6_out")
    assert names(new)[:cut_at + 1] == names(old)[:cut_at + 1]
    assert len(names(new)) == cut_at + 3
    assert not [n for n in names(new) if n.startswith("conv5_")]
    gap, head = new.layers[-2], new.layers[-1]
    assert isinstance(gap, keras.layers.GlobalAveragePooling2D) and isinstance(head, keras.layers.Dense)
    channels = old.get_layer("conv4_block6_out").output.shape[-1]
    assert head.kernel.shape == (channels, 5)
    kept = {p: w for p, w in resnet50.weights.items() if p in set(names(new))}
    assert_kept_weights(kept, new)
    feat = activation(old, "conv4_block6_out", resnet50.x).astype("float64")
    expected = dense_np(head, feat.mean(axis=(1, 2)))
    close(resnet50.predict(new), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.slow
def test_resnet50_insert_dropout_before_predictions(resnet50):
    new, report = resnet50.apply("insert Dropout(rate=0.3) before predictions\nassert equivalent")
    _check_identity_insert(resnet50, new, report, "predictions", "before")
    assert isinstance(new.get_layer(_inserted(report)), keras.layers.Dropout)
    assert new.get_layer(_inserted(report)).rate == pytest.approx(0.3)


@pytest.mark.slow
def test_densenet121_has_no_dropout_to_remove(densenet121):
    assert not [l for l in densenet121.model.layers if isinstance(l, keras.layers.Dropout)]
    with pytest.raises(ApplyError) as info:
        densenet121.apply("remove where type=Dropout")
    assert "matches no layer" in info.value.message
    assert position(info.value) == position_of("remove where type=Dropout", "remove")


@pytest.mark.slow
def test_densenet121_insert_after_pool4_pool(densenet121):
    # pool4_pool feeds both the next block's BN and its concatenation: both must be rewired
    assert len(consumers(densenet121.model, "pool4_pool")) >= 2
    new, report = densenet121.apply("insert Dropout(rate=0.2) after pool4_pool\nassert equivalent")
    _check_identity_insert(densenet121, new, report, "pool4_pool", "after")


@pytest.mark.slow
def test_mobilenetv2_set_relu_max_value(mobilenetv2):
    relus = [l.name for l in mobilenetv2.model.layers if isinstance(l, keras.layers.ReLU)]
    assert relus
    mobilenetv2.assert_informative()
    new, report = mobilenetv2.apply("select where type=ReLU\nset max_value = 6.0\nassert equivalent")
    assert report.statements[1].layers == relus
    assert all(new.get_layer(n).max_value == 6.0 for n in relus)
    assert_kept_weights(mobilenetv2.weights, new)
    close(mobilenetv2.predict(new), mobilenetv2.y, atol=1e-5)
    # the statement really reaches every ReLU: a lower cap changes the function and fails the assert
    lower, _ = mobilenetv2.apply("select where type=ReLU\nset max_value = 3.0")
    assert all(lower.get_layer(n).max_value == 3.0 for n in relus)
    assert_kept_weights(mobilenetv2.weights, lower)
    assert np.abs(mobilenetv2.predict(lower) - mobilenetv2.y).max() > 1e-3
    text = "select where type=ReLU\nset max_value = 3.0\nassert equivalent"
    with pytest.raises(AssertionFailed, match="assert equivalent failed: outputs differ by up to") as info:
        mobilenetv2.apply(text)
    assert position(info.value) == position_of(text, "assert")


@pytest.mark.slow
def test_efficientnetb0_insert_after(efficientnetb0):
    new, report = efficientnetb0.apply("insert Dropout(rate=0.2) after block3a_project_bn\nassert equivalent")
    _check_identity_insert(efficientnetb0, new, report, "block3a_project_bn", "after")


@pytest.mark.slow
def test_inceptionv3_insert_after(inceptionv3):
    new, report = inceptionv3.apply("insert Dropout(rate=0.2) after mixed5\nassert equivalent")
    _check_identity_insert(inceptionv3, new, report, "mixed5", "after")


@pytest.mark.slow
def test_vgg16_refusals(vgg16):
    with pytest.raises(ApplyError) as info:
        vgg16.apply("swap block1_conv2 block1_conv2")
    assert info.value.message == "swap block1_conv2 with itself changes nothing"
    assert position(info.value) == position_of("swap block1_conv2 block1_conv2", "swap")
    pool = vgg16.model.get_layer("block5_pool")
    with pytest.raises(ApplyError) as info:
        vgg16.apply("remove block5_pool")
    msg = info.value.message
    assert "block5_pool" in msg
    assert shape_text(pool.output.shape) in msg and shape_text(pool.input.shape) in msg
    assert shape_text(pool.output.shape) != shape_text(pool.input.shape)
    assert position(info.value) == position_of("remove block5_pool", "remove")


@pytest.mark.parametrize("text,message", [
    ("select where type=Dense; replace selected with Dense(unitz=1)",
     "Dense has no argument 'unitz' (did you mean 'units'?)"),  # (Keras: "missing … argument: 'units'")
    ("append Dense(units=3, activaton='relu')".replace("'", '"'),
     "Dense has no argument 'activaton' (did you mean 'activation'?)"),
    ("insert Dropout(rat=0.1) before dense_1", "Dropout has no argument 'rat' (did you mean 'rate'?)"),
])
def test_a_constructor_argument_the_class_lacks_is_named(text, message):
    model = make_cnn()
    with pytest.raises(ApplyError) as info:
        apply(text, model)
    assert info.value.message == message
    assert "units" in info.value.hint or "rate" in info.value.hint
    # the statement that constructs the layer
    assert position(info.value) == position_of(text, text.split("; ")[-1].split()[0])


def test_a_constructor_that_fails_for_another_reason_keeps_keras_message():
    with pytest.raises(ApplyError) as info:
        apply("insert Dropout(rate=2.0) before dense_1", make_cnn())
    assert info.value.message == ("Dropout(rate=2.0, name='dropout'): Invalid value received for argument "
                                  "`rate`. Expected a float value between 0 and 1. Received: rate=2.0")
    assert position(info.value) == position_of("insert Dropout(rate=2.0) before dense_1", "insert")


def _notes_of(report, statement: str) -> list:
    return next(s.notes for s in report.statements if str(s.statement) == statement)


def test_insert_after_notes_the_outputs_it_moves_numbered_as_assert_output_counts():
    """A dict-output model's outputs are numbered as Keras flattens them (by sorted key), as `assert
    output N` counts them; a nested model's output is named by its path; after a Sequential's last layer
    the new layer is its output."""
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="h")(x)
    by_key = keras.Model(x, {"z": keras.layers.Dense(2, name="zhead")(h), "a": keras.layers.Dense(5, name="ahead")(h)})
    text = "insert Dense(units=7) after zhead\nassert output 1 shape == (None, 7)\nassert output 0 shape == (None, 5)\n"
    _, report = apply(text, by_key)
    assert _notes_of(report, "insert Dense(units=7) after zhead") == \
        ["the model's output 1, which read zhead, now reads dense"]

    inner_in = keras.Input((4,), name="inner_x")
    i1 = keras.layers.Dense(3, name="i1")(inner_in)
    inner = keras.Model(inner_in, keras.layers.Dense(2, name="i2")(i1), name="inner")
    outer_in = keras.Input((4,), name="outer_x")
    nested = keras.Model(outer_in, keras.layers.Dense(2, name="o")(inner(outer_in)))
    text = "tap inner/i1\ninsert Softmax() after inner/i1\n"
    new, report = apply(text, nested)
    assert _notes_of(report, "insert Softmax() after inner/i1") == ["inner's output 1, which read i1, now reads softmax"]
    got = new(np.random.default_rng(2).normal(size=(3, 4)).astype("float32"))
    np.testing.assert_allclose(np.sum(np.asarray(got[1]), axis=-1), 1.0, rtol=1e-5)  # (the tap now reads the softmax)

    stack = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")])
    _, report = apply("insert Softmax() after d2\ninsert Dropout(rate=0.1) after d1\n", stack)
    assert _notes_of(report, "insert Softmax() after d2") == ["the model's output 0, which read d2, now reads softmax"]
    assert _notes_of(report, "insert Dropout(rate=0.1) after d1") == []
