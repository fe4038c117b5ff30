"""Realism: recipes on keras.applications architectures (weights=None, 32x32 inputs, nothing downloaded).

Each architecture is built once per module. Its BatchNormalization statistics are then set to seeded
random values, as a trained model's would be: with Keras's defaults (gamma 1, beta 0, mean 0, variance 1)
the activations of these deep nets vanish, their outputs barely depend on the input, and comparing
outputs would prove nothing. ``test_fixtures_are_informative`` checks that they do depend on it.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from conftest import assert_bit_identical, weights_by_path
from modelxform import compile_recipe

keras = pytest.importorskip("keras")

from modelxform.keras_io.layers import walk  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 3


def _randomize_batchnorm(model, seed, gamma=(0.5, 1.5), beta=0.1):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(*gamma, n).astype("float32"), rng.normal(0, beta, n).astype("float32"),
                               rng.normal(0, 0.1, n).astype("float32"), rng.uniform(0.5, 2.0, n).astype("float32")])


def _digest(model) -> str:
    h = hashlib.sha256()
    for info in walk(model):
        h.update(info.path.encode())
        h.update(type(info.layer).__name__.encode())
        h.update(b"T" if info.layer.trainable else b"F")
        for w in info.layer.get_weights():
            h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


class Subject:
    def __init__(self, model):
        self.model = model
        self.x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
        self.y = np.asarray(model(self.x, training=False))
        self.weights = weights_by_path(model)
        self.digest = _digest(model)
        self.edges = edges(model)
        self.types = collections.Counter(type(l).__name__ for l in model.layers)

    def apply(self, text, seed=SEED):
        return compile_recipe(text, "app.recipe").apply(self.model, seed=seed)


@pytest.fixture(scope="module")
def resnet():
    model = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10,
                                        classifier_activation=None)
    _randomize_batchnorm(model, 0)
    return Subject(model)


@pytest.fixture(scope="module")
def mobilenet():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10,
                                           classifier_activation=None)
    # larger gammas, so that many ReLU6 layers actually clip at 6 (a lost max_value would show)
    _randomize_batchnorm(model, 1, gamma=(2.0, 4.0), beta=0.3)
    return Subject(model)


@pytest.fixture(autouse=True)
def _inputs_never_modified(request):
    yield
    for name in ("resnet", "mobilenet"):
        if name in request.fixturenames:
            subject = request.getfixturevalue(name)
            assert _digest(subject.model) == subject.digest, f"apply changed the input {name} model"


# ---- helpers ---------------------------------------------------------------------------------------

def _histories(obj, out):
    if isinstance(obj, dict):
        hist = obj.get("keras_history")
        if hist is not None:
            out.append(hist[0])
        for value in obj.values():
            _histories(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _histories(value, out)
    return out


def edges(model) -> dict:
    """Layer name -> names of the layers that feed it, from the functional config (connectivity)."""
    return {entry["config"]["name"]: _histories(entry.get("inbound_nodes", []), [])
            for entry in model.get_config()["layers"]}


def predict(model, x):
    return np.asarray(model(x, training=False))


def assert_structure_preserved(subject, new):
    assert len(new.layers) == len(subject.model.layers)
    assert [l.name for l in new.layers] == [l.name for l in subject.model.layers]
    assert edges(new) == subject.edges
    assert tuple(new.outputs[0].shape) == tuple(subject.model.outputs[0].shape)
    assert len(new.outputs) == len(subject.model.outputs) == 1
    counts = collections.Counter(type(l).__name__ for l in new.layers)
    assert counts["Add"] == subject.types["Add"] > 0


def assert_weights_unchanged_except(subject, new, changed=lambda path, index: False):
    after = weights_by_path(new)
    assert set(after) == set(subject.weights)
    for path, arrays in subject.weights.items():
        keep = [i for i in range(len(arrays)) if not changed(path, i)]
        assert_bit_identical([arrays[i] for i in keep], [after[path][i] for i in keep])


def roundtrip(model, tmp_path):
    path = tmp_path / "app.keras"
    model.save(path)
    return keras.models.load_model(path)


# ---- the fixtures mean something -------------------------------------------------------------------

def test_fixtures_are_informative(resnet, mobilenet):
    for subject in (resnet, mobilenet):
        y = subject.y
        assert np.all(np.isfinite(y))
        assert np.abs(y[0] - y[1]).max() > 1e-3  # the output depends on the input
    relus = [l for l in mobilenet.model.layers if isinstance(l, keras.layers.ReLU)]
    assert relus and all(l.max_value == 6.0 for l in relus)
    probe = keras.Model(mobilenet.model.inputs, [l.output for l in relus])
    saturated = [np.mean(np.asarray(a) >= 6.0) for a in probe(mobilenet.x, training=False)]
    assert sum(s > 0 for s in saturated) >= 5  # clipping at 6 matters for the output


# ---- ResNet50 -------------------------------------------------------------------------------------------

def _avg_pool_reference(model):
    """The model with every MaxPooling2D swapped for an AveragePooling2D, built by keras.models.clone_model
    (independently of modelxform) and given the original weights."""
    def clone(layer):
        if isinstance(layer, keras.layers.MaxPooling2D):
            cfg = layer.get_config()
            return keras.layers.AveragePooling2D(pool_size=cfg["pool_size"], strides=cfg["strides"],
                                                 padding=cfg["padding"], data_format=cfg["data_format"],
                                                 name=layer.name)
        return layer.__class__.from_config(layer.get_config())
    ref = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.weights:
            ref.get_layer(layer.name).set_weights(layer.get_weights())
    return ref


def test_resnet_replace_maxpooling_with_averagepooling(resnet, tmp_path):
    old = resnet.model
    pools = [l for l in old.layers if isinstance(l, keras.layers.MaxPooling2D)]
    assert pools
    new, report = resnet.apply("replace MaxPooling2D with AveragePooling2D")
    assert report.statements[0].layers == [l.name for l in pools]
    for pool in pools:
        swapped = new.get_layer(pool.name)
        assert type(swapped) is keras.layers.AveragePooling2D
        for key in ("pool_size", "strides", "padding", "data_format"):
            assert swapped.get_config()[key] == pool.get_config()[key]
    assert not [l for l in new.layers if isinstance(l, keras.layers.MaxPooling2D)]
    assert_structure_preserved(resnet, new)
    assert_weights_unchanged_except(resnet, new)

    y = predict(new, resnet.x)
    np.testing.assert_allclose(y, predict(_avg_pool_reference(old), resnet.x), rtol=1e-4, atol=1e-5)
    assert not np.allclose(y, resnet.y, rtol=0, atol=1e-4)  # the swap did change the function

    loaded = roundtrip(new, tmp_path)
    assert type(loaded.get_layer(pools[0].name)) is keras.layers.AveragePooling2D
    assert edges(loaded) == resnet.edges
    np.testing.assert_allclose(predict(loaded, resnet.x), y, rtol=0, atol=1e-6)


def test_resnet_freeze_batchnorm(resnet, tmp_path):
    old = resnet.model
    bn = [l.name for l in old.layers if isinstance(l, keras.layers.BatchNormalization)]
    new, report = resnet.apply("select where type=BatchNormalization; freeze")
    assert report.statements[0].layers == bn and len(bn) == resnet.types["BatchNormalization"]
    flags = {l.name: l.trainable for l in new.layers if l.weights}
    assert flags == {l.name: not isinstance(l, keras.layers.BatchNormalization) for l in old.layers if l.weights}
    assert len(new.trainable_weights) == len(old.trainable_weights) - 2 * len(bn)  # gamma and beta each
    assert len(new.weights) == len(old.weights)
    assert_weights_unchanged_except(resnet, new)
    assert_structure_preserved(resnet, new)
    np.testing.assert_array_equal(predict(new, resnet.x), resnet.y)

    loaded = roundtrip(new, tmp_path)
    assert {l.name: l.trainable for l in loaded.layers if l.weights} == flags
    assert len(loaded.trainable_weights) == len(new.trainable_weights)


def test_resnet_scale_conv_kernels(resnet, tmp_path):
    old = resnet.model
    convs = [l.name for l in old.layers if type(l) is keras.layers.Conv2D]
    new, report = resnet.apply("select where type=Conv2D; scale kernel 0.5")
    assert report.statements[1].layers == convs and len(convs) == resnet.types["Conv2D"]
    for name in convs:
        kernel_index = [v.name for v in old.get_layer(name).weights].index("kernel")
        want = resnet.weights[name][kernel_index] * np.asarray(0.5, np.float32)
        assert np.array_equal(np.asarray(new.get_layer(name).kernel.numpy()), want)
    assert_weights_unchanged_except(resnet, new, lambda path, i: path in convs and i == 0)
    assert_structure_preserved(resnet, new)
    assert not np.allclose(predict(new, resnet.x), resnet.y, rtol=0, atol=1e-4)

    loaded = roundtrip(new, tmp_path)
    expected = weights_by_path(new)
    for path, arrays in weights_by_path(loaded).items():
        assert_bit_identical(arrays, expected[path])


def test_resnet_activation_to_relu_is_an_identity_rebuild(resnet):
    old = resnet.model
    acts = [l.name for l in old.layers if type(l) is keras.layers.Activation]
    assert acts and all(old.get_layer(n).get_config()["activation"] == "relu" for n in acts)
    new, report = resnet.apply("replace Activation with ReLU")
    assert report.statements[0].layers == acts
    assert all(type(new.get_layer(n)) is keras.layers.ReLU for n in acts)
    assert_structure_preserved(resnet, new)
    assert_weights_unchanged_except(resnet, new)
    np.testing.assert_allclose(predict(new, resnet.x), resnet.y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", ["replace ZeroPadding2D with ZeroPadding2D\nreplace Add with Add",
                                  "select all; freeze; unfreeze"])
def test_resnet_no_op_recipes_keep_outputs(resnet, text):
    new, _ = resnet.apply(text)
    assert_structure_preserved(resnet, new)
    assert_weights_unchanged_except(resnet, new)
    assert all(l.trainable for l in new.layers)
    pads = {l.name: l.get_config()["padding"] for l in resnet.model.layers
            if isinstance(l, keras.layers.ZeroPadding2D)}
    assert {n: new.get_layer(n).get_config()["padding"] for n in pads} == pads
    np.testing.assert_allclose(predict(new, resnet.x), resnet.y, rtol=0, atol=1e-6)


# ---- MobileNetV2 ----------------------------------------------------------------------------------------

def test_mobilenet_replace_relu_with_relu(mobilenet, tmp_path):
    old = mobilenet.model
    relus = [l.name for l in old.layers if isinstance(l, keras.layers.ReLU)]
    new, report = mobilenet.apply("replace ReLU with ReLU")
    assert report.statements[0].layers == relus and len(relus) == mobilenet.types["ReLU"]
    for name in relus:
        for key in ("max_value", "negative_slope", "threshold"):
            assert new.get_layer(name).get_config()[key] == old.get_layer(name).get_config()[key]
    assert_structure_preserved(mobilenet, new)
    assert_weights_unchanged_except(mobilenet, new)
    y = predict(new, mobilenet.x)
    np.testing.assert_allclose(y, mobilenet.y, rtol=0, atol=1e-6)

    loaded = roundtrip(new, tmp_path)
    assert edges(loaded) == mobilenet.edges
    np.testing.assert_allclose(predict(loaded, mobilenet.x), y, rtol=0, atol=1e-6)


def test_mobilenet_relu6_to_plain_relu_changes_the_function(mobilenet):
    """The contrast to the identity rebuild above: an explicit ReLU() drops max_value=6, and the
    outputs must show it (so the equality above is not vacuous)."""
    new, _ = mobilenet.apply("replace ReLU with ReLU(max_value=None)")
    assert all(l.max_value is None for l in new.layers if isinstance(l, keras.layers.ReLU))
    assert_structure_preserved(mobilenet, new)
    assert_weights_unchanged_except(mobilenet, new)
    assert not np.allclose(predict(new, mobilenet.x), mobilenet.y, rtol=0, atol=1e-4)


def test_mobilenet_scale_conv_and_depthwise_kernels(mobilenet):
    old = mobilenet.model
    convs = [l.name for l in old.layers if type(l) is keras.layers.Conv2D]
    depth = [l.name for l in old.layers if type(l) is keras.layers.DepthwiseConv2D]
    new, report = mobilenet.apply("select where type=Conv2D; scale kernel 0.5\n"
                                  "select where type=DepthwiseConv2D; scale weights -2")
    assert report.statements[1].layers == convs and report.statements[3].layers == depth
    changed = set(convs) | set(depth)
    for name in convs:
        assert np.array_equal(np.asarray(new.get_layer(name).kernel.numpy()),
                              mobilenet.weights[name][0] * np.asarray(0.5, np.float32))
    for name in depth:
        for a, b in zip(mobilenet.weights[name], new.get_layer(name).get_weights()):
            assert np.array_equal(np.asarray(b), a * np.asarray(-2, np.float32))
    assert_weights_unchanged_except(mobilenet, new,
                                    lambda path, i: path in depth or (path in convs and i == 0))
    assert_structure_preserved(mobilenet, new)
    unchanged = [p for p in mobilenet.weights if p not in changed and mobilenet.weights[p]]
    assert unchanged  # BatchNormalization and the classifier were there to be left alone


def test_mobilenet_freeze_batchnorm_survives_save_load(mobilenet, tmp_path):
    old = mobilenet.model
    new, report = mobilenet.apply("select where type=BatchNormalization; freeze\nassert count == "
                                  f"{mobilenet.types['BatchNormalization']}")
    frozen = {l.name for l in new.layers if not l.trainable}
    assert frozen == {l.name for l in old.layers if isinstance(l, keras.layers.BatchNormalization)}
    np.testing.assert_array_equal(predict(new, mobilenet.x), mobilenet.y)
    loaded = roundtrip(new, tmp_path)
    assert {l.name for l in loaded.layers if not l.trainable} == frozen
    assert edges(loaded) == mobilenet.edges
    assert_weights_unchanged_except(mobilenet, loaded)
    np.testing.assert_allclose(predict(loaded, mobilenet.x), mobilenet.y, rtol=0, atol=1e-6)


def test_mobilenet_plan_matches_apply_without_touching_arrays(mobilenet):
    text = "select random 25% where type=Conv2D; add noise normal(stddev=0.1) to kernel\nreplace ReLU with ReLU"
    recipe = compile_recipe(text, "app.recipe")
    planned = recipe.plan(mobilenet.model, seed=SEED)
    new, applied = recipe.apply(mobilenet.model, seed=SEED)
    assert [s.layers for s in planned.statements] == [s.layers for s in applied.statements]
    chosen = applied.statements[0].layers
    n_conv = mobilenet.types["Conv2D"]
    assert len(chosen) == -(-n_conv * 25 // 100)  # rounded up
    for name in chosen:
        assert not np.array_equal(new.get_layer(name).kernel.numpy(), mobilenet.weights[name][0])
    assert_weights_unchanged_except(mobilenet, new, lambda path, i: path in chosen and i == 0)
