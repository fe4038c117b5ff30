"""Deployment graph transforms (issue 15): fold batchnorm, set input shape, prune channels; Keras habits in
constructors (positional arguments) and `insert … after` a shared layer.

Every test checks numbers: folded kernels recomputed by hand, outputs compared with `assert equivalent`
and directly, kept weights bit-identical, pruned arrays equal to the kept slices, masks recomputed from
the norms, refusals by message, line and exit status. The keras.applications part at the end is marked
slow; each architecture is built once for the module, at 32x32.
"""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from conftest import (
    ROOT, assert_bit_identical, make_cnn, make_multi_io, make_nested, make_shared, position, position_of,
    run_cli, weights_by_path,
)
from modelxform import ApplyError, AssertionFailed, RecipeError, compile_recipe, load_recipe

keras = pytest.importorskip("keras")

from modelxform.keras_io.files import load_model, save_model, sha256_file  # noqa: E402
from modelxform.keras_io.layers import walk  # noqa: E402

L = keras.layers


def apply(text, model, seed=7):
    return compile_recipe(text, "x.recipe").apply(model, seed=seed)


def layer_names(model):
    return [info.path for info in walk(model)]


def run(model, x):
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def randomize_batchnorm(model, seed, gamma=(0.5, 1.5), beta=0.3, mean=0.3):
    """Seeded random BatchNormalization statistics, as a trained model's: Keras's defaults (gamma 1, beta 0,
    mean 0, variance 1) make a fold nearly the identity, and comparing outputs would prove little."""
    rng = np.random.default_rng(seed)
    draw = {"gamma": lambda n: rng.uniform(*gamma, n), "beta": lambda n: rng.normal(0, beta, n),
            "moving_mean": lambda n: rng.normal(0, mean, n), "moving_variance": lambda n: rng.uniform(0.5, 2.0, n)}
    for info in walk(model):
        if isinstance(info.layer, L.BatchNormalization):
            n = info.layer.moving_mean.shape[0]
            info.layer.set_weights([draw[v.name](n).astype("float32") for v in info.layer.weights])
    return model


def init(seed):
    return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                bias_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=seed + 100))


def make_foldable():
    """Every kind of layer a BatchNormalization folds into, and every reason to skip one."""
    inp = keras.Input((12, 12, 3), name="img")
    x = L.Conv2D(8, 3, use_bias=False, name="c1", kernel_initializer=keras.initializers.GlorotUniform(1))(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw", **{k.replace("kernel", "depthwise"): v
                                                              for k, v in init(2).items()})(x)
    x = L.BatchNormalization(name="bn2")(x)
    y = L.SeparableConv2D(6, 3, padding="same", name="sep", depthwise_initializer=keras.initializers.GlorotUniform(3),
                          pointwise_initializer=keras.initializers.GlorotUniform(4),
                          bias_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=5))(x)
    y = L.BatchNormalization(name="bn3")(y)
    z = L.Conv2D(6, 3, padding="same", activation="relu", name="c2", **init(6))(x)
    z = L.BatchNormalization(name="bn_after_relu")(z)
    s = L.Add(name="add")([y, z])
    s = L.BatchNormalization(name="bn_after_add")(s)
    t = L.Conv2D(6, 1, name="c3", **init(7))(s)
    t1 = L.BatchNormalization(name="bn_shared_input")(t)
    t2 = L.GlobalMaxPooling2D(name="gmp")(t)
    g = L.GlobalAveragePooling2D(name="gap")(t1)
    g = L.Concatenate(name="cat")([g, t2])
    d = L.Dense(5, name="d", **init(8))(g)
    d = L.BatchNormalization(name="bn5")(d)
    return randomize_batchnorm(keras.Model(inp, d, name="foldable"), 11)


@pytest.fixture(scope="module")
def foldable():
    return make_foldable()


def fold_by_hand(kernel, bias, bn, depthwise=False):
    """The folded kernel and bias, computed the textbook way (float64)."""
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    k = np.asarray(kernel, np.float64)
    k = k * (scale.reshape(k.shape[-2], k.shape[-1]) if depthwise else scale)
    b = ((0.0 if bias is None else np.asarray(bias, np.float64)) - mean) * scale + beta
    return k, b


# ==== fold batchnorm =======================================================================================

def test_fold_batchnorm_folds_each_kind_and_says_why_it_skips(foldable):
    model = foldable
    x = np.random.default_rng(0).standard_normal((3, 12, 12, 3)).astype("float32")
    new, plan = apply("fold batchnorm\nassert equivalent tolerance 1e-5", model)
    report = plan.statements[0]
    assert report.changes[:4] == [
        "bn1 folded into c1 (Conv2D, bias added): params 216 + 32 -> 224",
        "bn2 folded into dw (DepthwiseConv2D): params 160 + 64 -> 160",
        "bn3 folded into sep (SeparableConv2D): params 246 + 24 -> 246",
        "bn5 folded into d (Dense): params 65 + 20 -> 65",
    ]
    assert report.notes == [
        "skipped bn_after_relu: it follows c2's relu activation",
        "skipped bn_after_add: it follows add (Add), not a convolution or Dense layer",
        "skipped bn_shared_input: c3's output also goes to gmp",
    ]
    before, after = model.count_params(), new.count_params()
    assert report.changes[4] == f"folded 4 BatchNormalization layers, skipped 3; model params {before:,} -> {after:,}"
    assert after == before - (32 + 64 + 24 + 20) + 8
    assert [n for n in layer_names(new) if n.startswith("bn")] == ["bn_after_relu", "bn_after_add", "bn_shared_input"]
    assert plan.statements[1].notes[0].startswith("holds: largest difference")
    np.testing.assert_allclose(run(new, x)[0], run(model, x)[0], atol=1e-5, rtol=0)
    # the arrays are the textbook fold, to float32 rounding
    for into, bn, depthwise, has_bias in (("c1", "bn1", False, False), ("dw", "bn2", True, True),
                                          ("d", "bn5", False, True)):
        old_w = model.get_layer(into).get_weights()
        k, b = fold_by_hand(old_w[0], old_w[1] if has_bias else None, model.get_layer(bn), depthwise)
        new_w = new.get_layer(into).get_weights()
        assert new_w[0].dtype == np.float32 and new_w[0].shape == old_w[0].shape
        np.testing.assert_allclose(new_w[0], k, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(new_w[1], b, rtol=1e-6, atol=1e-6)
    sep_old, sep_new = model.get_layer("sep").get_weights(), new.get_layer("sep").get_weights()
    k, b = fold_by_hand(sep_old[1], sep_old[2], model.get_layer("bn3"))
    assert_bit_identical([sep_new[0]], [sep_old[0]])  # the depthwise part is not touched
    np.testing.assert_allclose(sep_new[1], k, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sep_new[2], b, rtol=1e-6, atol=1e-6)
    # every other layer keeps its weights bit for bit
    old, kept = weights_by_path(model), weights_by_path(new)
    for path in set(kept) - {"c1", "dw", "sep", "d"}:
        assert_bit_identical(kept[path], old[path])


def test_fold_batchnorm_after_a_select_folds_only_what_is_selected(foldable):
    new, plan = apply("select bn1, d\nfold batchnorm", foldable)
    report = plan.statements[1]
    assert [c.split(" (")[0] for c in report.changes[:-1]] == ["bn1 folded into c1", "bn5 folded into d"]
    assert report.notes == []
    assert "bn2" in layer_names(new) and "bn1" not in layer_names(new) and "bn5" not in layer_names(new)
    new, plan = apply("select bn_after_add\nfold batchnorm", foldable)
    assert plan.statements[1].notes == ["skipped bn_after_add: it follows add (Add), not a convolution or Dense layer"]
    assert layer_names(new) == layer_names(foldable)
    with pytest.raises(ApplyError) as info:
        apply("select gap\nfold batchnorm", foldable)
    assert "the selection holds no BatchNormalization layer" in info.value.message
    assert (info.value.line, info.value.column) == (2, 1)


def test_fold_batchnorm_on_a_model_without_any_is_an_error():
    with pytest.raises(ApplyError) as info:
        apply("fold batchnorm", make_cnn())
    assert info.value.message == "fold batchnorm: the model has no BatchNormalization layer"
    assert position(info.value) == position_of("fold batchnorm", "fold")


def test_fold_batchnorm_inside_nested_models_and_sequential_stacks():
    model = randomize_batchnorm(make_nested(), 3)
    new, plan = apply("fold batchnorm\nassert equivalent tolerance 1e-5", model)
    assert plan.statements[0].changes[0].startswith("backbone/block/bn_a folded into backbone/block/conv_a (Conv2D)")
    assert "backbone/block/bn_a" not in layer_names(new)
    assert type(new.get_layer("backbone").get_layer("block")).__name__ == "Sequential"
    seq = keras.Sequential([keras.Input((6,)), L.Dense(4, name="fc", **init(1)), L.BatchNormalization(name="bn"),
                            L.Dense(2, name="out", **init(2))], name="seq")
    randomize_batchnorm(seq, 4)
    new, plan = apply("fold batchnorm\nassert equivalent tolerance 1e-5", seq)
    assert isinstance(new, keras.Sequential) and layer_names(new) == ["fc", "out"]


def test_fold_batchnorm_on_the_archive_gives_the_bytes_of_the_keras_path(tmp_path, monkeypatch):
    src = tmp_path / "m.keras"
    save_model(make_foldable(), src)
    recipe = tmp_path / "fold.recipe"
    recipe.write_text("fold batchnorm\nassert equivalent tolerance 1e-5\n")
    outs = []
    for n, env in enumerate(("1", "1", "0")):
        monkeypatch.setenv("MODELXFORM_FASTPATH", env)
        out = tmp_path / f"out{n}.keras"
        r = run_cli("apply", recipe, src, "-o", out)
        assert r.status == 0, r.err
        outs.append(sha256_file(out))
    assert outs[0] == outs[1] == outs[2]  # reproducible, and the same with the input model loaded
    record = json.loads(zipfile.ZipFile(tmp_path / "out0.keras").read("modelxform.json"))
    lines = record["chain"][-1]["statements"]
    assert lines[0].startswith("fold batchnorm :: bn1 folded into c1 (Conv2D, bias added)")
    assert "folded 4 BatchNormalization layers, skipped 3" in lines[0]
    assert "(skipped bn_after_add: it follows add (Add), not a convolution or Dense layer)" in r.out
    assert "bn1" not in layer_names(load_model(tmp_path / "out0.keras"))


# ==== set input shape ======================================================================================

def test_set_input_shape_keeps_every_weight_bit_identical():
    model = make_foldable()
    new, plan = apply("set input shape (None, 20, 20, 3)\nassert output shape == (None, 5)", model)
    assert tuple(new.inputs[0].shape) == (None, 20, 20, 3)
    assert tuple(new.get_layer("c1").output.shape) == (None, 18, 18, 8)
    assert plan.statements[0].changes == ["input img: (None, 12, 12, 3) -> (None, 20, 20, 3); weights unchanged"]
    old, kept = weights_by_path(model), weights_by_path(new)
    assert old.keys() == kept.keys()
    for path in old:
        assert_bit_identical(kept[path], old[path])
    x = np.random.default_rng(1).standard_normal((2, 20, 20, 3)).astype("float32")
    assert np.all(np.isfinite(run(new, x)[0]))


def test_set_input_shape_fixes_the_batch_and_the_sequence():
    new, _ = apply("set input shape (1, 28, 28, 1)\nassert output shape == (1, 10)", make_cnn())
    assert tuple(new.inputs[0].shape) == (1, 28, 28, 1)
    seq = keras.Sequential([keras.Input((None, 4)), L.Conv1D(3, 2, name="conv", **init(1)),
                            L.GlobalAveragePooling1D(name="gap")], name="seq")
    new, _ = apply("set input shape (None, 16, 4)\nassert output shape == (None, 3)", seq)
    assert tuple(new.inputs[0].shape) == (None, 16, 4) and tuple(new.get_layer("conv").output.shape) == (None, 15, 3)
    assert_bit_identical(new.get_layer("conv").get_weights(), seq.get_layer("conv").get_weights())


def test_set_input_shape_reshapes_nested_models_to_what_they_receive():
    model = make_nested()
    new, _ = apply("set input shape (None, 16, 16, 3)\nassert output shape == (None, 3)", model)
    backbone = new.get_layer("backbone")
    assert tuple(backbone.inputs[0].shape) == (None, 16, 16, 3)
    assert tuple(backbone.get_layer("block").inputs[0].shape) == (None, 14, 14, 4)
    for path, arrays in weights_by_path(model).items():
        assert_bit_identical(weights_by_path(new)[path], arrays)


def test_set_input_shape_refuses_weights_sized_by_the_input(tmp_path):
    with pytest.raises(ApplyError) as info:
        apply("select all\nset input shape (None, 32, 32, 1)", make_cnn())
    err = info.value
    assert err.message == ("`set input shape (None, 32, 32, 1)`: the weights of dense_1 (Dense) depend on the input "
                           "size: kernel (1936, 32) would need (2704, 32); nothing was written")
    assert (err.line, err.column) == (2, 1)
    # from the command line: exit status 4, and no file
    src, out = tmp_path / "cnn.keras", tmp_path / "out.keras"
    save_model(make_cnn(), src)
    (tmp_path / "r.recipe").write_text("set input shape (None, 32, 32, 1)\n")
    r = run_cli("apply", tmp_path / "r.recipe", src, "-o", out)
    assert r.status == 4
    assert "the weights of dense_1 (Dense) depend on the input size" in r.err
    assert not out.exists()


def test_set_input_shape_names_a_fixed_reshape():
    inp = keras.Input((8, 8, 3), name="img")
    x = L.Conv2D(4, 3, name="conv", **init(1))(inp)
    x = L.Flatten(name="flat")(x)
    x = L.Reshape((6, 6, 4), name="fixed")(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D(name="gap")(x))
    with pytest.raises(ApplyError) as info:
        apply("set input shape (None, 16, 16, 3)", model)
    msg = info.value.message
    assert "layer fixed (Reshape)" in msg  # the layer, read off Keras's functional.process_node
    assert "input_shape=(784,), target_shape=(6, 6, 4)" in msg
    assert position(info.value) == position_of("set input shape (None, 16, 16, 3)", "set")


def test_set_input_shape_on_models_with_several_inputs():
    model = make_multi_io()
    with pytest.raises(ApplyError) as info:
        apply("set input shape (None, 6)", model)
    assert info.value.message == "the model has 2 inputs (x1, x2); say which: set input N shape …"
    assert position(info.value) == position_of("set input shape (None, 6)", "set")
    new, plan = apply("set input 1 shape (None, 3)\nset input 0 shape (2, 6)\nassert output 1 shape == (2, 1)",
                      model)
    assert [tuple(t.shape) for t in new.inputs] == [(2, 6), (None, 3)]
    assert plan.statements[0].notes == ["input x2 already has the shape (None, 3)"]
    with pytest.raises(ApplyError) as info:
        apply("set input 2 shape (None, 3)", model)
    assert info.value.message == "the model has 2 inputs; there is no input 2"
    assert position(info.value) == position_of("set input 2 shape (None, 3)", "set")
    with pytest.raises(ApplyError) as info:
        apply("set input 0 shape (None, 6, 1)", model)
    assert info.value.message == "input x1 has 2 dimensions (None, 6); (None, 6, 1) has 3"
    assert position(info.value) == position_of("set input 0 shape (None, 6, 1)", "set")


# ==== prune channels =======================================================================================

def make_branchy(zero=()):
    """Two convolutions meeting at an Add (one residual group), then BatchNormalization, a depthwise
    convolution, a Concatenate, pooling and Flatten into a Dense layer. ``zero``: channels of the group
    made exactly zero all the way down (kernels, biases, BN shift, the depthwise biases)."""
    inp = keras.Input((8, 8, 3), name="img")
    a = L.Conv2D(6, 1, name="a", **init(1))(inp)
    b = L.Conv2D(6, 3, padding="same", name="b", **init(2))(inp)
    s = L.Add(name="add")([a, b])
    s = L.BatchNormalization(name="bn")(s)
    s = L.ReLU(name="relu")(s)
    d = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw", depthwise_initializer=
                          keras.initializers.GlorotUniform(3),
                          bias_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=4))(s)
    c = L.Conv2D(4, 1, name="c", **init(5))(s)
    cat = L.Concatenate(name="cat")([d, c])
    p = L.MaxPooling2D(2, name="pool")(cat)
    f = L.Flatten(name="flat")(p)
    out = L.Dense(3, name="head", **init(6))(f)
    model = randomize_batchnorm(keras.Model(inp, out, name="branchy"), 7)
    if zero:
        zero = list(zero)
        for name in ("a", "b"):
            k, bias = model.get_layer(name).get_weights()
            k[..., zero] = 0
            bias[zero] = 0
            model.get_layer(name).set_weights([k, bias])
        g, beta, mean, var = model.get_layer("bn").get_weights()
        beta[zero], mean[zero] = 0, 0
        model.get_layer("bn").set_weights([g, beta, mean, var])
        k, bias = model.get_layer("dw").get_weights()
        bias.reshape(6, 2)[zero] = 0
        model.get_layer("dw").set_weights([k, bias])
    return model


def test_prune_channels_prunes_a_residual_group_jointly_and_shrinks_everything_downstream():
    model = make_branchy()
    w = weights_by_path(model)
    new, plan = apply("select a\nprune channels 50%", model)
    # one mask for the group, chosen from the summed L1 norms of both convolutions
    norms = np.abs(w["a"][0].astype(np.float64)).reshape(-1, 6).sum(0) + \
        np.abs(w["b"][0].astype(np.float64)).reshape(-1, 6).sum(0)
    keep = np.sort(np.argsort(norms, kind="stable")[3:])
    report = plan.statements[1]
    assert report.changes[0] == "pruned jointly (they meet at merge layers): a, b: channels 6 -> 3"
    assert report.changes[1:] == [
        "a: channels 6 -> 3, params 24 -> 12",
        "b: channels 6 -> 3, params 168 -> 84",
        "bn: channels 6 -> 3, params 24 -> 12",
        "dw: channels 12 -> 6, params 120 -> 60",
        "c: input channels 6 -> 3, params 28 -> 16",
        "head: input channels 256 -> 160, params 771 -> 483",
        f"model params {model.count_params():,} -> {new.count_params():,}",
    ]
    got = weights_by_path(new)
    assert_bit_identical(got["a"], [w["a"][0][..., keep], w["a"][1][keep]])
    assert_bit_identical(got["b"], [w["b"][0][..., keep], w["b"][1][keep]])
    assert_bit_identical(got["bn"], [v[keep] for v in w["bn"]])
    assert_bit_identical(got["dw"], [w["dw"][0][..., keep, :], w["dw"][1].reshape(6, 2)[keep].reshape(-1)])
    assert_bit_identical(got["c"], [w["c"][0][..., keep, :], w["c"][1]])
    channels = np.concatenate([np.repeat(np.isin(np.arange(6), keep), 2), np.ones(4, bool)])
    rows = np.tile(channels, 16)  # Flatten of (4, 4, 16): a channel mask per spatial position
    assert_bit_identical(got["head"], [w["head"][0][rows], w["head"][1]])
    assert new.get_layer("a").filters == 3 and tuple(new.get_layer("cat").output.shape) == (None, 8, 8, 10)


def test_pruning_only_all_zero_channels_is_lossless():
    model = make_branchy(zero=(1, 4))
    new, plan = apply("select b\nprune channels 34%\nassert equivalent tolerance 1e-6", model)
    assert plan.statements[1].changes[1] == "a: channels 6 -> 4, params 24 -> 16"
    x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(run(new, x)[0], run(model, x)[0], atol=1e-6, rtol=0)
    # and pruning a channel that carries something is not
    text = "select b\nprune channels 50%\nassert equivalent"
    with pytest.raises(AssertionFailed, match="assert equivalent failed: outputs differ by up to") as info:
        apply(text, model)
    assert position(info.value) == position_of(text, "assert")


def test_prune_channels_refuses_what_it_cannot_propagate_through():
    with pytest.raises(ApplyError) as info:
        apply("select head\nprune channels 50%", make_branchy())
    assert info.value.message == "prune channels: cannot prune head: head's output is an output of the model"
    assert (info.value.line, info.value.column) == (2, 1)

    inp = keras.Input((8, 8, 6), name="img")
    x = L.Conv2D(6, 3, padding="same", name="conv", **init(1))(inp)
    x = L.Add(name="add")([x, inp])
    model = keras.Model(inp, L.GlobalAveragePooling2D(name="gap")(x))
    with pytest.raises(ApplyError) as info:
        apply("select conv\nprune channels 50%", model)
    assert info.value.message == ("prune channels: cannot prune conv: add (Add) joins it with the input img, "
                                  "which is not pruned")

    inp = keras.Input((8, 8, 3), name="img")
    x = L.Conv2D(6, 3, name="conv", **init(1))(inp)
    y = L.LayerNormalization(name="ln")(x)
    z = L.Reshape((6, 36), name="mix")(L.Conv2D(6, 3, name="conv2", **init(2))(inp))
    model = keras.Model(inp, [L.GlobalAveragePooling2D(name="gap")(y), L.Flatten(name="f")(z)])
    with pytest.raises(ApplyError) as info:
        apply("select conv\nprune channels 50%", model)
    assert info.value.message == "prune channels: cannot prune conv: ln (LayerNormalization) cannot be shrunk to match"
    with pytest.raises(ApplyError) as info:
        apply("select conv2\nprune channels 50%", model)
    assert info.value.message == "prune channels: cannot prune conv2: mix (Reshape) does not keep the channel axis"

    with pytest.raises(ApplyError) as info:
        apply("select shared\nprune channels 50%", make_shared())
    assert info.value.message == "prune channels: cannot prune shared: it is called 2 times (a shared layer)"

    with pytest.raises(ApplyError) as info:
        apply("select flatten, dropout\nprune channels 50%", make_cnn())
    assert info.value.message == ("prune channels acts on Conv and Dense layers, and the selection holds none "
                                  "(it holds Dropout, Flatten)")


def test_prune_channels_on_the_sample_cnn_reports_and_skips():
    model = make_cnn()
    new, plan = apply("select conv2d_2, flatten\nprune channels 50%\nassert params < 33K", model)
    report = plan.statements[1]
    assert report.changes[:2] == ["conv2d_2: channels 16 -> 8, params 1,168 -> 584",
                                  "dense_1: input channels 1936 -> 968, params 61,984 -> 31,008"]
    assert report.notes == ["skipped 1 selected layer(s) that are not Conv or Dense: flatten"]
    assert new.get_layer("dense_1").kernel.shape == (968, 32)
    assert_bit_identical(new.get_layer("dense_2").get_weights(), model.get_layer("dense_2").get_weights())


def test_prune_channels_with_a_parameter_and_zero_percent():
    model = make_cnn()
    new, plan = apply("param p = 0\nselect conv2d_1\nprune channels $p%", model)
    for path, arrays in weights_by_path(model).items():
        assert_bit_identical(weights_by_path(new)[path], arrays)
    text = "select all\nprune channels 100%"
    with pytest.raises(RecipeError) as info:
        compile_recipe(text)
    assert "from 0% to under 100%" in info.value.message
    assert position(info.value) == position_of(text, "100%")


# ==== Keras habits =========================================================================================

def test_positional_constructor_arguments_follow_the_class_signature():
    model = make_cnn()
    a, _ = apply('replace dense_3 with Dense(10, activation="softmax")\ninsert Dropout(0.5) after dense_1\n'
                 'insert Activation("linear") after dense_2', model)
    b, _ = apply('replace dense_3 with Dense(units=10, activation="softmax")\ninsert Dropout(rate=0.5) after dense_1\n'
                 'insert Activation(activation="linear") after dense_2', model)
    assert a.get_config() == b.get_config()
    # (a new layer's seeded weights derive from the statement's text, which differs: kept layers compare)
    for path, arrays in weights_by_path(a).items():
        if path != "dense_3":
            assert_bit_identical(arrays, weights_by_path(b)[path])
    assert a.get_layer("dropout_1").rate == 0.5
    assert str(compile_recipe('insert Dropout(0.5) after dense_1').program) == "insert Dropout(0.5) after dense_1\n"
    with pytest.raises(ApplyError) as info:
        apply("insert Dropout(0.5, rate=0.3) after dense_1", model)
    assert info.value.message == "Dropout(0.5, rate=0.3): Dropout's argument 'rate' is given by position and by name"
    assert position(info.value) == position_of("insert Dropout(0.5, rate=0.3) after dense_1", "insert")
    with pytest.raises(ApplyError) as info:
        apply('insert Activation("relu", 1) after dense_1', model)
    assert info.value.message == 'Activation("relu", 1): Activation takes 1 positional argument (activation), not 2'
    assert position(info.value) == position_of('insert Activation("relu", 1) after dense_1', "insert")


def test_positional_noise_arguments_are_mean_and_stddev():
    model = make_cnn()
    a, _ = apply("select all\nadd noise normal(0.1, 0.01) to kernel\nadd noise uniform(-0.1, 0.1) to bias", model)
    b, _ = apply("select all\nadd noise normal(mean=0.1, stddev=0.01) to kernel\n"
                 "add noise uniform(low=-0.1, high=0.1) to bias", model)
    # the random streams are keyed by the statement's text, so equal values need equal texts: compare
    # the drawn noise's statistics and the second statement's shape instead of bits
    assert not np.array_equal(a.get_layer("dense_1").kernel, model.get_layer("dense_1").kernel)
    diff = np.asarray(a.get_layer("dense_1").kernel) - np.asarray(model.get_layer("dense_1").kernel)
    assert abs(diff.mean() - 0.1) < 2e-3 and abs(diff.std() - 0.01) < 1e-3
    other = np.asarray(b.get_layer("dense_1").kernel) - np.asarray(model.get_layer("dense_1").kernel)
    assert abs(other.mean() - 0.1) < 2e-3 and abs(other.std() - 0.01) < 1e-3
    bias = np.asarray(a.get_layer("dense_1").bias) - np.asarray(model.get_layer("dense_1").bias)
    assert bias.min() >= -0.1 and bias.max() <= 0.1


def test_insert_after_a_shared_layer_follows_every_call_and_stays_shared():
    model = make_shared()
    new, plan = apply('insert Dense(5, activation="relu", name="post") after shared', model)
    shared, post = new.get_layer("shared"), new.get_layer("post")
    assert len(shared._inbound_nodes) == 2 and len(post._inbound_nodes) == 2
    assert [n.input_tensors[0]._keras_history.operation.name for n in post._inbound_nodes] == ["shared", "shared"]
    assert [t._keras_history.operation.name for t in new.get_layer("add")._inbound_nodes[0].input_tensors] == \
        ["post", "post"]
    assert len(post.weights) == 2  # one layer: one set of weights for both calls
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((3, 5)).astype("float32") for _ in range(2))
    expected = new.get_layer("out")(post(shared(a)) + post(shared(b)))
    np.testing.assert_allclose(run(new, [a, b])[0], np.asarray(expected), atol=1e-6)
    for path, arrays in weights_by_path(model).items():
        assert_bit_identical(weights_by_path(new)[path], arrays)
    assert plan.statements[0].changes[0] == "added post (Dense) after shared"
    new, _ = apply("insert Dropout(0.2) after shared\nassert equivalent", model)
    assert len(new.get_layer("dropout")._inbound_nodes) == 2


# ==== plan, HTML, YAML, recipes ============================================================================

def test_plan_html_marks_folded_pruned_and_reshaped_layers(tmp_path):
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    import re
    src = tmp_path / "m.keras"
    save_model(make_foldable(), src)
    (tmp_path / "r.recipe").write_text("fold batchnorm\nset input shape (1, 12, 12, 3)\n")
    report = tmp_path / "plan.html"
    r = run_cli("plan", tmp_path / "r.recipe", src, "--html", report)
    assert r.status == 0, r.err
    text = report.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="mx-data">(.*?)</script>', text, re.S).group(1))
    nodes = {n["path"]: n for n in data["nodes"].values()}
    assert nodes["bn1"]["tags"] == ["removed"] and nodes["c1"]["tags"][0] == "weights"
    assert nodes["img"]["tags"] == ["config"]
    assert "bn_after_add" in nodes and nodes["bn_after_add"]["tags"] == []


def test_yaml_form_of_the_deployment_statements(tmp_path):
    text = ("- fold_batchnorm\n- set_input_shape: {shape: [1, 28, 28, 1]}\n- select: {layers: [conv2d_2]}\n"
            "- prune_channels: {percent: 50}\n- add_noise: {target: kernel, normal: [0, 0.01]}\n"
            "- insert:\n    layer: {Dropout: [0.5]}\n    after: dense_1\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    program = load_recipe(path).program
    assert str(program) == ("fold batchnorm\nset input shape (1, 28, 28, 1)\nselect conv2d_2\nprune channels 50%\n"
                            "add noise normal(0, 0.01) to kernel\ninsert Dropout(0.5) after dense_1\n")


def test_the_resnet50_deploy_recipe_folds_then_fixes_the_input():
    recipe = load_recipe(ROOT / "recipes" / "resnet50-deploy.recipe")
    kinds = [type(s).__name__ for s in recipe.program.flat() if s.role != "header"]
    assert kinds == ["FoldBatchNorm", "AssertEquivalent", "SetInputShape"]


# ==== keras.applications ===================================================================================

def _app(factory, seed, pixels=False, **bn):
    keras.utils.set_random_seed(1234 + seed)  # keras.applications draws unseeded initial values
    model = randomize_batchnorm(factory(weights=None, input_shape=(32, 32, 3), classes=10,
                                        classifier_activation=None), seed, **bn)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32") if pixels else \
        rng.standard_normal((2, 32, 32, 3)).astype("float32")
    return model, x


@pytest.fixture(scope="module")
def resnet50():
    return _app(keras.applications.ResNet50, 0)


@pytest.fixture(scope="module")
def mobilenetv2():
    # larger gammas: with the defaults the activations of its last blocks hardly depend on the input
    return _app(keras.applications.MobileNetV2, 1, gamma=(2.0, 4.0))


def _check_fold(model, x, skipped_expected, probe):
    """Fold, with `assert equivalent tolerance 1e-4` in the recipe; then compare the activation of ``probe``
    (a late layer both models have), which must depend on the input for the comparison to mean something
    (the 10 outputs of these nets at 32x32 barely do)."""
    bns = [i.path for i in walk(model) if isinstance(i.layer, L.BatchNormalization)]
    new, plan = apply("fold batchnorm\nassert equivalent tolerance 1e-4", model)
    report = plan.statements[0]
    assert plan.statements[1].notes[0].startswith("holds: largest difference")
    left = [i.path for i in walk(new) if isinstance(i.layer, L.BatchNormalization)]
    assert len(report.notes) == len(left) == skipped_expected(bns)
    assert len(bns) - len(left) == sum(1 for c in report.changes if " folded into " in c)

    def act(m):
        return np.asarray(keras.Model(m.inputs, m.get_layer(probe).output)(x, training=False), np.float64)
    want, got = act(model), act(new)
    scale = max(1.0, np.abs(want).max())
    assert np.abs(want[0] - want[1]).max() > 1e-3 * scale  # informative
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert new.count_params() < model.count_params()
    return new, report


@pytest.mark.slow
def test_fold_batchnorm_resnet50(resnet50):
    model, x = resnet50
    new, report = _check_fold(model, x, lambda bns: 0, "conv5_block3_out")
    assert report.changes[0] == "conv1_bn folded into conv1_conv (Conv2D): params 9,472 + 256 -> 9,472"


@pytest.mark.slow
def test_fold_batchnorm_mobilenetv2(mobilenetv2):
    model, x = mobilenetv2
    _check_fold(model, x, lambda bns: 0, "out_relu")


@pytest.mark.slow
def test_fold_batchnorm_efficientnetb0():
    # gammas chosen so that the output depends on the input (the defaults: hardly) yet stays near 1
    model, x = _app(keras.applications.EfficientNetB0, 2, pixels=True, gamma=(0.8, 1.6))
    _check_fold(model, x, lambda bns: 0, "top_activation")


@pytest.mark.slow
def test_fold_batchnorm_densenet121():
    model, x = _app(keras.applications.DenseNet121, 3)
    # every dense layer's first BatchNormalization reads a Concatenate (or a pooling), and so do the
    # transitions' and the final one: those stay; the stem's and each dense layer's second follow a Conv2D
    new, report = _check_fold(model, x, lambda bns: sum(1 for b in bns if not b.endswith("_1_bn")) - 1, "relu")
    assert all("not a convolution or Dense layer" in n for n in report.notes)


@pytest.mark.slow
def test_prune_channels_resnet50_keeps_residual_groups_consistent(resnet50):
    model, x = resnet50
    new, plan = apply("select where type=Conv2D\nprune channels 25%", model)
    report = plan.statements[1]
    groups = [c for c in report.changes if c.startswith("pruned jointly")]
    assert len(groups) == 4  # one residual group per stage
    assert groups[0] == ("pruned jointly (they meet at merge layers): conv2_block1_0_conv, conv2_block1_3_conv, "
                         "conv2_block2_3_conv, conv2_block3_3_conv: channels 256 -> 192")
    assert new.get_layer("conv2_block1_1_conv").filters == 48 and new.get_layer("conv1_conv").filters == 48
    assert new.get_layer("predictions").kernel.shape == (1536, 10)
    assert np.all(np.isfinite(run(new, x)[0])) and run(new, x)[0].shape == (2, 10)
    assert new.count_params() < 0.6 * model.count_params()


@pytest.mark.slow
def test_prune_channels_mobilenetv2_through_depthwise_convolutions(mobilenetv2):
    model, x = mobilenetv2
    new, plan = apply("select where type=Conv2D\nprune channels 25%", model)
    expand = model.get_layer("block_1_expand")
    assert new.get_layer("block_1_expand").filters == expand.filters - expand.filters // 4
    assert new.get_layer("block_1_depthwise").kernel.shape[-2] == new.get_layer("block_1_expand").filters
    assert run(new, x)[0].shape == (2, 10)
