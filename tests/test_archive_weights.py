"""Weight-only recipes on the .keras archive, without TensorFlow (engine/context.py, keras_io/archive.py).

The engine on a model loaded with Keras is the reference: every weight-only statement kind runs on the
archive (apply_file, which must not build a Keras model) and on the loaded model (Recipe.apply) for the
sample CNN, a "zoo" model holding every layer class of archive_module.VARIABLE_TABLE that has variables,
the nested and Sequential samples and six keras.applications architectures (weights=None, small inputs,
each built once per module), and the two must agree on the report, config.json, every array (bit for
bit), the provenance record and the bytes of the file.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import FACTORIES, run_cli
from modelxform import apply_file, compile_recipe, plan_file, session
from modelxform import diff as diff_module
from modelxform.keras_io import archive as archive_module
from modelxform.keras_io import digests as digests_module
from modelxform.keras_io.files import load_model, read_provenance, save_model, sha256_file
from modelxform.errors import ModelxformError
from modelxform.provenance import entry, extend
from modelxform.keras_io.layers import walk

keras = pytest.importorskip("keras")

SEED = 11


# ---- model files, each built and saved once per module --------------------------------------------------

def _randomize(model, seed):
    """Distinct, seeded values in every variable (BatchNormalization statistics included), so that an
    array written in the wrong place, or pruned in the wrong order, cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    for info in walk(model):
        arrays = info.layer.get_weights()
        if not arrays:
            continue
        new = []
        for a in arrays:
            if a.dtype.kind == "f":
                values = rng.uniform(0.5, 1.5, a.shape) * rng.choice([-1, 1], a.shape)
                if info.type_name == "BatchNormalization" or info.type_name == "Normalization":
                    values = np.abs(values)  # variances stay positive
                new.append(values.astype(a.dtype))
            else:
                new.append(a)
        info.layer.set_weights(new)


def _zoo():
    """One layer of every class in archive_module.VARIABLE_TABLE that owns variables, in the flag combinations
    that change which variables exist, plus float16/float64/mixed_float16 layers and a nested block."""
    L = keras.layers
    image = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(4, 3, use_bias=False, padding="same", name="conv_nobias")(image)
    x = L.BatchNormalization(center=False, name="bn_nocenter")(x)
    x = L.BatchNormalization(scale=False, name="bn_noscale")(x)
    x = L.DepthwiseConv2D(3, use_bias=True, padding="same", name="depthwise_bias")(x)
    x = L.SeparableConv2D(6, 3, padding="same", name="separable")(x)
    x = L.SeparableConv2D(6, 3, padding="same", use_bias=False, name="separable_nobias")(x)
    x = L.Conv2DTranspose(4, 3, name="transpose")(x)
    x = L.PReLU(name="prelu")(x)
    x = L.GroupNormalization(groups=2, name="groupnorm")(x)
    x = L.GroupNormalization(groups=2, center=False, name="groupnorm_nocenter")(x)
    x = L.Conv3D(2, 1, name="conv3d")(L.Reshape((14, 14, 4, 1), name="to_3d")(x))
    x = L.Conv3DTranspose(2, 1, use_bias=False, name="transpose3d")(x)
    x = L.GlobalAveragePooling3D(name="gap3d")(x)
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    t = L.Embedding(20, 6, name="embedding")(tokens)
    t = L.Conv1D(5, 3, name="conv1d")(t)
    t = L.SeparableConv1D(5, 3, name="separable1d")(t)
    t = L.DepthwiseConv1D(2, name="depthwise1d")(t)
    t = L.Conv1DTranspose(4, 2, name="transpose1d")(t)
    t = L.LayerNormalization(name="layernorm")(t)
    t = L.LayerNormalization(center=False, name="layernorm_nocenter")(t)
    t = L.RMSNormalization(name="rmsnorm")(t)
    t = L.GlobalMaxPooling1D(name="gmp1d")(t)
    block = keras.Sequential([keras.Input((6,)), L.Dense(6, name="block_dense"),
                              L.BatchNormalization(name="block_bn")], name="block")
    h = L.Concatenate(name="concat")([x, t])
    h = L.Normalization(name="normalization")(h)
    h = L.Dense(6, name="dense")(h)
    h = block(h)
    h = L.Dense(5, dtype="float64", name="dense_f64")(h)
    h = L.Dense(5, dtype="float16", name="dense_f16")(h)
    h = L.Dense(4, dtype="mixed_float16", name="dense_mixed")(h)
    out = L.Dense(3, use_bias=False, name="head")(h)
    return keras.Model([image, tokens], out, name="zoo")


def _applications():
    A = keras.applications
    small = dict(input_shape=(32, 32, 3), weights=None, classes=10)
    return {"vgg16": lambda: A.VGG16(**small), "resnet50": lambda: A.ResNet50(**small),
            "mobilenetv2": lambda: A.MobileNetV2(**small), "densenet121": lambda: A.DenseNet121(**small),
            "inceptionv3": lambda: A.InceptionV3(input_shape=(75, 75, 3), weights=None, classes=10),
            "efficientnetb0": lambda: A.EfficientNetB0(**small)}


BUILDERS = {"cnn": FACTORIES["cnn"], "sequential": FACTORIES["sequential"], "nested": FACTORIES["nested"],
            "zoo": _zoo, **_applications()}


class Subject:
    """A model file and the model loaded from it (as the CLI would load it)."""

    def __init__(self, path):
        self.path = path
        self.model = load_model(path)
        self.layers = walk(self.model)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast-models")
    cache: dict[str, Subject] = {}

    def get(name: str) -> Subject:
        if name not in cache:
            model = BUILDERS[name]()
            _randomize(model, len(cache) + 1)
            path = folder / f"{name}.keras"
            save_model(model, path)  # as a user's file: fresh from Keras, no provenance
            cache[name] = Subject(path)
        return cache[name]
    return get


# ---- the engine as reference ----------------------------------------------------------------------------

def engine_apply(subject, recipe, out, seed=SEED, params=None):
    new_model, report = recipe.apply(subject.model, seed=seed, params=params)
    record = extend(read_provenance(subject.path), entry(recipe, report, sha256_file(subject.path)))
    save_model(new_model, out, provenance=record)
    return report


def h5_arrays(path) -> dict[str, np.ndarray]:
    import h5py
    with zipfile.ZipFile(path) as zf:
        data = zf.read("model.weights.h5")
    out = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return out


def member(path, name) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def assert_same_result(fast_out, engine_out, source):
    """Identical config.json, every array bit-identical, identical provenance, identical bytes."""
    assert member(fast_out, "config.json") == member(engine_out, "config.json")
    fast, engine = h5_arrays(fast_out), h5_arrays(engine_out)
    assert fast.keys() == engine.keys()
    for key in engine:
        assert fast[key].dtype == engine[key].dtype and fast[key].shape == engine[key].shape, key
        assert fast[key].tobytes() == engine[key].tobytes(), f"{key} differs"
    assert json.loads(member(fast_out, "modelxform.json")) == json.loads(member(engine_out, "modelxform.json"))
    assert member(fast_out, "metadata.json") == member(engine_out, "metadata.json")
    assert fast_out.read_bytes() == engine_out.read_bytes()
    # and the recipe did change something, so that agreeing means something
    before = h5_arrays(source)
    assert any(before[k].tobytes() != engine[k].tobytes() for k in engine)


def archive_apply(recipe, path, out, seed=SEED, params=None):
    """apply_file, which must have run on the archive without building a Keras model (the path that
    needs no TensorFlow)."""
    with _declines() as reasons:
        result = apply_file(recipe, path, out, seed=seed, params=params or {})
    assert result.source == "archive", f"the archive could not stand in for the file: {reasons}"
    assert not result.built, "a weight-only recipe built the Keras model"
    return result


def differential(subject, text, tmp_path, seed=SEED, params=None):
    recipe = compile_recipe(text, "fast.recipe")
    fast_out, engine_out = tmp_path / "fast.keras", tmp_path / "engine.keras"
    report = archive_apply(recipe, subject.path, fast_out, seed, params).plan
    engine_report = engine_apply(subject, recipe, engine_out, seed, params)
    assert report.to_dict() == engine_report.to_dict()
    assert report.before == report.after == (len(subject.layers), int(subject.model.count_params()))
    assert_same_result(fast_out, engine_out, subject.path)
    # a plan (dry run) reports the same and writes nothing
    before = sorted(tmp_path.iterdir())
    plan = plan_file(recipe, subject.path, seed=seed, params=params or {})
    assert sorted(tmp_path.iterdir()) == before
    assert plan.dry_run and plan.to_dict() == recipe.plan(subject.model, seed=seed, params=params).to_dict()
    return report


@contextlib.contextmanager
def _declines(module: str = "modelxform.session"):
    """Collects the reasons why the archive cannot stand in for a model file (session's debug log)."""
    import logging
    reasons: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: reasons.append(record.getMessage())
    logger = logging.getLogger(module)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def recipe_for(layers) -> str:
    """Every weight-only statement kind, with selections that exist in this model (derived from it)."""
    weighted = [i for i in layers if i.layer.weights]
    has = lambda name: [i for i in weighted if any(v.name == name for v in i.layer.weights)]  # noqa: E731
    types = collections.Counter(i.type_name for i in layers)
    dense = [i for i in layers if i.type_name == "Dense"]
    biased = has("bias")
    first_name = weighted[0].name
    params = sorted(i.params() for i in weighted)
    median = params[len(params) // 2]
    lines = [
        'recipe "fast-differential" version "1.0.0"',
        "seed 5",
        "param factor = 0.75",
        "param sparsity = 30",
        "param c = 0.1",
        "select all",
        "freeze",
        f'select "{first_name[:3]}*"',
        "unfreeze",
        "select random 25% where has weights and params > 100",
        "scale weights $factor",
        f"select where has weights and params >= {median}",
        "add noise normal(stddev=0.01) to kernel",
        "add noise normal(stddev=0.01) to kernel",
        f"select random {min(3, len(weighted))} where has weights",
        "add noise uniform(low=-0.01, high=0.01) to weights",
        f"select last {min(3, len(weighted))} where has weights",
        "clip weights -0.9 0.9",
        "prune weights 50%",
        "select where type=Dense",
        f"assert count == {len(dense)}",
        "prune kernel $sparsity%",
        f"select layer {biased[-1].path}",
        "set bias to zeros",
        "set bias to ones",
        "set bias to constant($c)",
        f'select where name ~ "^{re.escape(biased[0].name)}$"',
        "set bias to Constant(value=-2)",
        "set bias to constant(3)",
        "select first 1 where trainable and has weights",
        "freeze",
        "select where not trainable and type=Dense",
        "unfreeze",
    ]
    if types["BatchNormalization"]:
        lines += [f"select random {min(3, types['BatchNormalization'])} where type=BatchNormalization",
                  "scale moving_variance 1.5", "add noise normal(mean=0.1, stddev=0.001) to moving_mean",
                  "set beta to zeros", "clip weights 0.6 1.4"]
    if types["DepthwiseConv2D"]:
        lines += ["select type DepthwiseConv2D", "prune kernel 20%"]
    return "\n".join(lines) + "\n"


# ---- differential tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "nested", "sequential", "zoo"])
def test_small_models_agree_with_the_engine(subjects, name, tmp_path):
    subject = subjects(name)
    differential(subject, recipe_for(subject.layers), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_applications()))
def test_applications_agree_with_the_engine(subjects, name, tmp_path):
    subject = subjects(name)
    report = differential(subject, recipe_for(subject.layers), tmp_path)
    assert any(s.changes for s in report.statements)


@pytest.mark.parametrize("name", ["cnn", "zoo"])
def test_spilled_arrays_agree_with_the_engine(subjects, name, tmp_path, monkeypatch):
    """With no memory floor, assigned arrays beyond the largest one read go to the spill file (and an
    array assigned twice is read back from it)."""
    monkeypatch.setattr(archive_module.Archive, "SPILL_FLOOR", 0)
    spills = []
    real = archive_module.tempfile.TemporaryFile
    monkeypatch.setattr(archive_module.tempfile, "TemporaryFile", lambda *a, **k: spills.append(1) or real(*a, **k))
    subject = subjects(name)
    differential(subject, recipe_for(subject.layers), tmp_path)
    assert spills


def test_zoo_every_variable_of_every_class(subjects, tmp_path):
    """`weights` reaches every float variable of every class (float16/64 and mixed included), explicit
    names reach the rest, and constants narrow through float32 as keras.initializers.Constant does."""
    subject = subjects("zoo")
    text = ("param v = 0.3333333333333333\nselect all\nscale weights 0.5\nadd noise normal(stddev=0.1) to weights\n"
            "select type Normalization\nscale count 2\nscale variance 3\n"
            "select where has weights\nset weights to constant(0.1)\n"
            "select dense_f16, dense_f64\nset bias to constant($v)\nclip kernel -0.3 0.3\n")
    report = differential(subject, text, tmp_path)
    touched = {line.split(":")[0] for s in report.statements[1:3] for line in s.changes}
    assert [str(s.statement) for s in report.statements[1:3]] == ["scale weights 0.5",
                                                                  "add noise normal(stddev=0.1) to weights"]
    assert touched == {i.path for i in subject.layers if i.layer.weights}
    f64 = h5_arrays(tmp_path / "fast.keras")
    bias64 = [a for k, a in f64.items() if a.dtype == np.float64 and a.ndim == 1]
    # keras.initializers.Constant casts a Python float to float32 first, then to the variable's dtype
    assert bias64 and all(np.all(a == np.float64(np.float32(1 / 3))) for a in bias64)
    assert all(np.all(a != 1 / 3) for a in bias64)


def test_chained_archive_outputs_match_a_chained_engine(subjects, tmp_path):
    """An output written from the archive (config already normalised, provenance present) as the input
    of another run."""
    subject = subjects("cnn")
    first = compile_recipe("select where type=Dense\nscale kernel 0.5\n", "one.recipe")
    second = compile_recipe("select all\nfreeze\nselect random where has weights\nadd noise uniform() to bias\n",
                            "two.recipe")
    mid_fast, mid_engine = tmp_path / "mid_fast.keras", tmp_path / "mid_engine.keras"
    archive_apply(first, subject.path, mid_fast)
    engine_apply(subject, first, mid_engine)
    assert mid_fast.read_bytes() == mid_engine.read_bytes()
    out_fast, out_engine = tmp_path / "out_fast.keras", tmp_path / "out_engine.keras"
    archive_apply(second, mid_fast, out_fast)
    engine_apply(Subject(mid_engine), second, out_engine)
    assert_same_result(out_fast, out_engine, mid_engine)
    assert len(read_provenance(out_fast)["chain"]) == 2


def test_in_place_and_params_through_the_cli(subjects, tmp_path, monkeypatch):
    """The CLI prints the same report either way; --in-place replaces the input atomically."""
    subject = subjects("cnn")
    recipe = tmp_path / "p.recipe"
    recipe.write_text("param f = 0.5\nselect where type=Dense\nscale kernel $f\nselect all\nfreeze\n")
    model = tmp_path / "m.keras"
    model.write_bytes(subject.path.read_bytes())
    fast = run_cli("apply", recipe, model, "--in-place", "--seed", "3", "--param", "f=0.25")
    assert fast.status == 0, fast.err
    fast_bytes = model.read_bytes()
    model.write_bytes(subject.path.read_bytes())
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    slow = run_cli("apply", recipe, model, "--in-place", "--seed", "3", "--param", "f=0.25")
    assert slow.status == 0, slow.err
    assert fast.out == slow.out and "× 0.25" in fast.out
    assert fast_bytes == model.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "p.recipe"]


def test_cli_json_report_and_verify(subjects, tmp_path, monkeypatch):
    subject = subjects("cnn")
    recipe = tmp_path / "j.recipe"
    recipe.write_text("select random 2 where has weights\nadd noise normal(stddev=0.1) to weights\n")
    out = tmp_path / "out.keras"
    fast = run_cli("apply", recipe, subject.path, "-o", out, "--json")
    assert fast.status == 0, fast.err
    verified = run_cli("verify", out, "--input", subject.path)  # re-made by the engine: identical bytes
    assert verified.status == 0, verified.out + verified.err
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    slow = run_cli("apply", recipe, subject.path, "-o", tmp_path / "slow.keras", "--json")
    assert json.loads(fast.out) | {"output": None} == json.loads(slow.out) | {"output": None}
    assert out.read_bytes() == (tmp_path / "slow.keras").read_bytes()


def test_versions_recorded_without_keras_are_keras_own():
    """Provenance records the versions read from the installed distributions (no import needed): they
    are the versions the imported modules report."""
    import importlib

    from modelxform.keras_io.backend import library_versions
    versions = library_versions()
    backend = keras.backend.backend()
    assert versions["backend"] == backend
    assert (versions["keras"], versions[backend], versions["numpy"]) == \
        (keras.__version__, importlib.import_module(backend).__version__, np.__version__)


# ---- the table of variable names ---------------------------------------------------------------------

def _table_cases():
    L = keras.layers
    return [
        (lambda: L.Dense(3), (2, 4)), (lambda: L.Dense(3, use_bias=False), (2, 4)),
        (lambda: L.Conv1D(3, 2), (1, 5, 2)), (lambda: L.Conv2D(3, 2, use_bias=False), (1, 5, 5, 2)),
        (lambda: L.Conv3D(3, 2), (1, 4, 4, 4, 2)), (lambda: L.Conv1DTranspose(3, 2), (1, 5, 2)),
        (lambda: L.Conv2DTranspose(3, 2), (1, 5, 5, 2)),
        (lambda: L.Conv3DTranspose(3, 2, use_bias=False), (1, 4, 4, 4, 2)),
        (lambda: L.DepthwiseConv1D(2), (1, 5, 2)), (lambda: L.DepthwiseConv2D(2, use_bias=False), (1, 5, 5, 2)),
        (lambda: L.SeparableConv1D(3, 2), (1, 5, 2)), (lambda: L.SeparableConv2D(3, 2, use_bias=False), (1, 5, 5, 2)),
        (lambda: L.BatchNormalization(), (1, 4)), (lambda: L.BatchNormalization(center=False), (1, 4)),
        (lambda: L.BatchNormalization(scale=False, center=False), (1, 4)),
        (lambda: L.LayerNormalization(), (1, 4)), (lambda: L.LayerNormalization(center=False), (1, 4)),
        (lambda: L.LayerNormalization(scale=False), (1, 4)),
        (lambda: L.GroupNormalization(groups=2), (1, 4)), (lambda: L.GroupNormalization(groups=2, scale=False), (1, 4)),
        (lambda: L.RMSNormalization(), (1, 4)), (lambda: L.Embedding(10, 3), (1, 5)), (lambda: L.PReLU(), (1, 4)),
        (lambda: L.Normalization(), (1, 4)), (lambda: L.Normalization(mean=0.0, variance=1.0), (1, 4)),
        (lambda: L.Activation("relu"), (1, 4)), (lambda: L.ActivityRegularization(), (1, 4)),
        (lambda: L.Add(), [(1, 4), (1, 4)]), (lambda: L.AlphaDropout(0.5), (1, 4)),
        (lambda: L.Average(), [(1, 4), (1, 4)]),
        (lambda: L.AveragePooling1D(2), (1, 4, 2)), (lambda: L.AveragePooling2D(2), (1, 4, 4, 2)),
        (lambda: L.AveragePooling3D(2), (1, 4, 4, 4, 2)), (lambda: L.Concatenate(), [(1, 4), (1, 4)]),
        (lambda: L.Cropping1D(1), (1, 4, 2)), (lambda: L.Cropping2D(1), (1, 4, 4, 2)),
        (lambda: L.Cropping3D(1), (1, 4, 4, 4, 2)), (lambda: L.Dot(axes=1), [(1, 4), (1, 4)]),
        (lambda: L.Dropout(0.5, seed=3), (1, 4)), (lambda: L.ELU(), (1, 4)), (lambda: L.Flatten(), (1, 2, 2)),
        (lambda: L.GaussianDropout(0.5), (1, 4)), (lambda: L.GaussianNoise(0.1), (1, 4)),
        (lambda: L.GlobalAveragePooling1D(), (1, 4, 2)), (lambda: L.GlobalAveragePooling2D(), (1, 4, 4, 2)),
        (lambda: L.GlobalAveragePooling3D(), (1, 4, 4, 4, 2)), (lambda: L.GlobalMaxPooling1D(), (1, 4, 2)),
        (lambda: L.GlobalMaxPooling2D(), (1, 4, 4, 2)), (lambda: L.GlobalMaxPooling3D(), (1, 4, 4, 4, 2)),
        (lambda: L.Identity(), (1, 4)), (lambda: L.LeakyReLU(), (1, 4)), (lambda: L.Masking(), (1, 4, 2)),
        (lambda: L.MaxPooling1D(2), (1, 4, 2)), (lambda: L.MaxPooling2D(2), (1, 4, 4, 2)),
        (lambda: L.MaxPooling3D(2), (1, 4, 4, 4, 2)), (lambda: L.Maximum(), [(1, 4), (1, 4)]),
        (lambda: L.Minimum(), [(1, 4), (1, 4)]), (lambda: L.Multiply(), [(1, 4), (1, 4)]),
        (lambda: L.Permute((2, 1)), (1, 4, 2)), (lambda: L.ReLU(), (1, 4)), (lambda: L.RepeatVector(2), (1, 4)),
        (lambda: L.Rescaling(0.5), (1, 4)), (lambda: L.Reshape((2, 2)), (1, 4)), (lambda: L.Softmax(), (1, 4)),
        (lambda: L.SpatialDropout1D(0.5), (1, 4, 2)), (lambda: L.SpatialDropout2D(0.5), (1, 4, 4, 2)),
        (lambda: L.SpatialDropout3D(0.5), (1, 4, 4, 4, 2)), (lambda: L.Subtract(), [(1, 4), (1, 4)]),
        (lambda: L.UnitNormalization(), (1, 4)), (lambda: L.UpSampling1D(), (1, 4, 2)),
        (lambda: L.UpSampling2D(), (1, 4, 4, 2)), (lambda: L.UpSampling3D(), (1, 4, 4, 4, 2)),
        (lambda: L.ZeroPadding1D(), (1, 4, 2)), (lambda: L.ZeroPadding2D(), (1, 4, 4, 2)),
        (lambda: L.ZeroPadding3D(), (1, 4, 4, 4, 2)),
    ]


def test_variable_table_matches_keras():
    """For every class in the table, the names it gives are the built layer's variables in order (the
    order model.weights.h5 stores them in), and every class in the table is exercised here."""
    seen = set()
    for make, shape in _table_cases():
        layer = make()
        layer.build(shape)
        name = type(layer).__name__
        seen.add(name)
        assert archive_module.variable_names(name, layer.get_config()) == [v.name for v in layer.weights], name
        if not isinstance(shape, list):  # merge layers (several inputs) have no variables
            assert archive_module.expected_shapes(name, layer.get_config(), shape) == \
                [tuple(v.shape) for v in layer.weights], name
    assert seen == archive_module.VARIABLE_TABLE
    assert archive_module.variable_names("MultiHeadAttention", {}) is None
    assert archive_module.variable_names("Dense", {"use_bias": True, "lora_rank": 4}) is None
    assert archive_module.variable_names("BatchNormalization", {"scale": True, "center": True, "renorm": True}) is None


# ---- when a statement needs Keras ----------------------------------------------------------------------

NEEDS_KERAS = [
    "select all\nreinit weights\n",
    "select where type=Dense\nset kernel to he_normal\n",
    "select where type=Dense\nset bias to constant(True)\n",
    "select all\nscale weights 0.5\nselect all\nassert params < 1M\n",
    "select where type=Dense\nscale kernel 2\nassert output shape == (None, 10)\n",
    "select where type=Dense\nprune kernel 50%\nreplace MaxPooling2D with AveragePooling2D\n",
    "select where type=Dense\nscale kernel 0.5\ntap conv2d_1\n",
]


@pytest.mark.parametrize("text", NEEDS_KERAS)
def test_a_statement_that_needs_keras_builds_the_archive_once(subjects, tmp_path, text):
    """Weight statements before it change the archive's arrays; the model built from the archive then
    gives the same file as the model loaded with Keras from the start."""
    subject = subjects("cnn")
    recipe = compile_recipe(text, "k.recipe")
    result = apply_file(recipe, subject.path, tmp_path / "a.keras", seed=SEED)
    assert result.source == "archive" and result.built
    engine_report = engine_apply(subject, recipe, tmp_path / "e.keras")
    assert result.plan.to_dict() == engine_report.to_dict()
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "e.keras").read_bytes()


ERRORS = [
    "select where type=Conv3D\nfreeze\n",
    "select all\nassert count == 99\n",
    "select where type=Flatten\nscale weights 2\n",
    "select where type=Dense\nset bias to zeros(1)\n",
    "select where type=Dense\nscale kernel 2\nselect where type=Dense\nreinit nothing\n",
]


@pytest.mark.parametrize("text", ERRORS)
def test_errors_are_the_same_on_the_archive_and_the_loaded_model(subjects, tmp_path, monkeypatch, text):
    recipe = tmp_path / "e.recipe"
    recipe.write_text(text)
    archive = run_cli("apply", recipe, subjects("cnn").path, "-o", tmp_path / "a.keras")
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    loaded = run_cli("apply", recipe, subjects("cnn").path, "-o", tmp_path / "b.keras")
    assert archive.status in (1, 4) and (archive.status, archive.out, archive.err) == \
        (loaded.status, loaded.out, loaded.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.recipe"]


# ---- files the archive cannot stand in for -----------------------------------------------------------------

def _custom_layer_file(path):
    @keras.saving.register_keras_serializable(package="mxtest_fast")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return 2 * x
    inp = keras.Input((3,))
    save_model(keras.Model(inp, Twice(name="twice")(keras.layers.Dense(2, name="d")(inp))), path)


def _lambda_file(path):
    inp = keras.Input((3,))
    keras.Model(inp, keras.layers.Lambda(lambda x: x + 1, name="plus")(inp)).save(path)


def _compiled_file(path):
    model = FACTORIES["sequential"]()
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((2, 8)), np.zeros((2, 4)), verbose=0)
    model.save(path)


def _shared_policy_file(path):
    """A regularizer object shared by two layers: Keras shares it again on load (not a dtype policy)."""
    reg = keras.regularizers.L2(0.01)
    inp = keras.Input((3,))
    x = keras.layers.Dense(3, kernel_regularizer=reg, name="a")(inp)
    save_model(keras.Model(inp, keras.layers.Dense(3, kernel_regularizer=reg, name="b")(x)), path)


def _h5_file(path):
    save_model(FACTORIES["shared"](), path.with_suffix(".h5"))
    return path.with_suffix(".h5")


@pytest.mark.parametrize("make,reason", [
    (lambda p: save_model(FACTORIES["subclassed"](), p), "not a functional or Sequential model"),
    (_h5_file, "(not a .keras file: never opened as an archive)"),
    (_custom_layer_file, "layer class Twice"),
    (_lambda_file, "a config that safe mode refuses"),
    (_compiled_file, "a compiled one"),
    (_shared_policy_file, "a shared L2 (of shared objects, only dtype policies are read)"),
    (lambda p: p.write_bytes(b"not a zip") and None, "BadZipFile"),
], ids=["subclassed", "h5-input", "custom-layer", "lambda", "compiled", "shared-regularizer", "not-a-zip"])
def test_declines_files_it_cannot_promise(tmp_path, make, reason):
    """Such files are loaded with Keras (which reads them, or says what is wrong with them)."""
    from modelxform.keras_io.archive import Archive
    path = make(tmp_path / "model.keras") or tmp_path / "model.keras"
    with _declines() as reasons:
        try:
            source = session.open_model(path, unsafe=True)
        except ModelxformError:
            source = None  # Keras refused it too
    assert not isinstance(source, Archive)
    if path.suffix == ".keras":
        assert len(reasons) == 1 and reason in reasons[0], reasons
    else:
        assert reasons == []


def test_declines_arrays_that_do_not_fit_the_config(subjects, tmp_path):
    """Keras refuses to load an archive whose arrays do not fit its config; the fast path must not
    write one from it either."""
    source = subjects("cnn").path
    damaged = tmp_path / "damaged.keras"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                layer = next(l for l in config["config"]["layers"] if l["config"]["name"] == "dense_3")
                layer["config"]["units"] += 1
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with _declines() as reasons, pytest.raises(
            ModelxformError, match=r"damaged\.keras: the weights do not fit the model: layer 'dense_3' \(Dense\): "
                                   r"dense_3/kernel has shape \(16, 10\) in the file, but the model needs \(16, 11\)"):
        session.open_model(damaged)
    assert len(reasons) == 1 and "dense_3: kernel has shape (16, 10) in the file" in reasons[0], reasons
    recipe_file = tmp_path / "s.recipe"
    recipe_file.write_text("select where type=Dense\nscale kernel 0.5\n")
    r = run_cli("apply", recipe_file, damaged, "-o", tmp_path / "out.keras")
    assert r.status == 3 and "dense_3" in r.err, r.err
    assert not (tmp_path / "out.keras").exists()


def test_a_full_disk_while_spilling_keeps_the_arrays_in_memory(subjects, tmp_path, monkeypatch, caplog):
    """A spill file that cannot be written is no defect: the arrays stay in memory, the result is the
    same, and nothing (no warning, no traceback) reaches the user."""
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(archive_module.Archive, "SPILL_FLOOR", 0)
    monkeypatch.setattr(archive_module, "_write_spill", full)
    subject = subjects("cnn")
    with caplog.at_level("DEBUG"):
        differential(subject, recipe_for(subject.layers), tmp_path)
    assert [r for r in caplog.records if r.levelno >= 30] == []


def test_a_full_disk_while_writing_leaves_the_previous_output(subjects, tmp_path, monkeypatch):
    import errno

    from modelxform.errors import ModelFileError
    real, calls = archive_module.copy_range, []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)
    monkeypatch.setattr(archive_module, "copy_range", fail_second)
    out = tmp_path / "out.keras"
    out.write_bytes(b"previous output")
    recipe = compile_recipe("select where type=Dense\nscale kernel 0.5\n")
    with pytest.raises(ModelFileError, match="out.keras: cannot write: No space left on device"):
        apply_file(recipe, subjects("cnn").path, out, seed=SEED)
    assert out.read_bytes() == b"previous output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.keras"]


def test_h5_output_other_backend_and_disabled(subjects, tmp_path, monkeypatch):
    """An .h5 output is written by Keras (the archive is built at the end); the archive stands in for
    the model whatever Keras's backend; MODELXFORM_FASTPATH=0 loads the model with Keras from the start."""
    from modelxform.keras_io.archive import Archive
    recipe = compile_recipe("select all\nfreeze\n")
    path = subjects("cnn").path
    result = apply_file(recipe, path, tmp_path / "out.h5", seed=SEED)
    assert result.source == "archive" and result.built
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with session.open_model(path) as source:
        assert isinstance(source, Archive)
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    assert not isinstance(session.open_model(path), Archive)
    monkeypatch.delenv(session.DISABLE_ENV)
    result = apply_file(recipe, path, tmp_path / "out.keras", seed=SEED)
    assert result.source == "archive" and not result.built


# ---- no TensorFlow --------------------------------------------------------------------------------------

NO_TF_PROBE = """\
import sys
from modelxform.cli import main
status = main(sys.argv[1:])
print("STATUS", status)
print("LOADED", "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("command", ["apply", "plan"])
def test_weight_only_apply_and_plan_do_not_import_tensorflow(subjects, tmp_path, command):
    subject = subjects("cnn")
    recipe = tmp_path / "w.recipe"
    recipe.write_text("select where type=Dense\nscale kernel 0.8\nselect all\nfreeze\n"
                      "select where type=Conv2D\nset bias to constant(0.1)\nassert count == 2\n")
    argv = ["apply", recipe.name, str(subject.path), "-o", "out.keras"] if command == "apply" else \
        ["plan", recipe.name, str(subject.path)]
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "STATUS 0" in proc.stdout, proc.stdout + proc.stderr
    assert "LOADED False False" in proc.stdout, proc.stdout
    assert "dense_1: kernel (1936, 32) × 0.8" in proc.stdout
    if command == "apply":
        out = tmp_path / "out.keras"
        assert zipfile.is_zipfile(out) and "modelxform.json" in zipfile.ZipFile(out).namelist()
        assert np.all(~np.array([l.trainable for l in load_model(out).layers if l.weights]))
    else:
        assert "dry run: nothing was written" in proc.stdout



def test_verify_re_makes_a_weight_only_output_without_tensorflow(subjects, tmp_path):
    """verify re-makes a weight-only output as apply made it, on the archive: neither Keras nor
    TensorFlow is imported (a 6 GB model loaded whole with Keras was a 20 GB peak)."""
    subject = subjects("cnn")
    recipe = tmp_path / "w.recipe"
    recipe.write_text("select where type=Dense\nscale kernel 0.8\nselect all\nfreeze\n")
    made = run_cli("apply", recipe, subject.path, "-o", tmp_path / "out.keras")
    assert made.status == 0, made.err
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, "verify", "out.keras", "--input", str(subject.path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "STATUS 0" in proc.stdout, proc.stdout + proc.stderr
    assert "out.keras: verified" in proc.stdout
    assert "LOADED False False" in proc.stdout, proc.stdout


def test_verify_re_makes_a_chain_on_the_archive_reading_each_input_once(subjects, tmp_path, monkeypatch):
    """A chain of a structural and a weight-only recipe is re-made the way apply made it: every step
    from the archive (no model loaded whole with Keras), each step's input hashed once by verify itself
    (the archive does not hash it again: the original in a thread beside the first step, step 1's output
    before the second), and the result is identical; a tampered byte is still found."""
    from modelxform.keras_io import files
    subject = subjects("cnn")
    structural = tmp_path / "s.recipe"
    structural.write_text("select where type=Conv2D\nadd noise normal(stddev=0.01) to kernel\n"
                          "append Dense(units=3, name=\"extra_head\")\n")
    weight_only = tmp_path / "w.recipe"
    weight_only.write_text("select where type=Dense\nscale kernel 0.5\n")
    step1, step2 = tmp_path / "step1.keras", tmp_path / "step2.keras"
    apply_file(structural, subject.path, step1, seed=SEED)
    apply_file(weight_only, step1, step2, seed=SEED)

    def whole_load(*args, **kwargs):
        raise AssertionError("verify loaded a model whole with Keras")
    hashed, archive_hashes = [], []
    real = files.sha256_with_identity
    monkeypatch.setattr(files, "load_model", whole_load)
    monkeypatch.setattr(files, "sha256_with_identity", lambda path, **kw: hashed.append(path) or real(path, **kw))
    real_start = digests_module.FileDigest.start
    monkeypatch.setattr(digests_module.FileDigest, "start", lambda self: archive_hashes.append(self) or real_start(self))
    differences, notes = session.verify_file(step2, subject.path)
    assert differences == [] and notes[-1] == f"re-made step2.keras from {subject.path} in 2 step(s): identical"
    assert [pathlib.Path(p).name for p in hashed] == ["step1.keras"]
    assert len(archive_hashes) == 1  # (the original's, begun by verify and handed to the first step)
    assert archive_hashes[0].identity == digests_module.file_identity(subject.path.stat())
    assert archive_hashes[0].result() == files.sha256_file(subject.path)

    tampered = tmp_path / "tampered.keras"
    data = bytearray(step2.read_bytes())
    with zipfile.ZipFile(step2) as zf:
        info = zf.getinfo("model.weights.h5")
    # (the member's last byte: the last value of the last array written, the new head's bias)
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.undo()
    differences, _ = session.verify_file(tampered, subject.path)
    assert len(differences) == 1 and differences[0].startswith("extra_head: bias differs"), differences


@pytest.mark.parametrize("name", ["cnn", "nested", "shared", "multi_io", "attention", "tokens", "subclassed",
                                  "zoo", "resnet50", "bert"])
def test_inspect_builds_from_the_archive_what_keras_loads(subjects, name, tmp_path, monkeypatch):
    """inspect shows the model built from the archive, its large variables without their values, as
    apply builds it: the same layers, shapes, flags, sharing, nesting and variables (--json --weights) as
    the model Keras loads whole (MODELXFORM_FASTPATH=0). A frozen attention block keeps its flags; a
    subclassed model, which the archive declines, is loaded as before."""
    if name in BUILDERS:
        path = subjects(name).path
    else:
        model = FACTORIES[name]()
        path = tmp_path / f"{name}.keras"
        save_model(model, path)
        if name == "attention":  # a frozen composite layer, as modelxform writes it
            frozen = tmp_path / "frozen.recipe"
            frozen.write_text("select mha\nfreeze\n")
            apply_file(frozen, path, tmp_path / "frozen.keras")
            path = tmp_path / "frozen.keras"
    fast = run_cli("inspect", path, "--json", "--weights")
    assert fast.status == 0, fast.err
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    slow = run_cli("inspect", path, "--json", "--weights")
    assert slow.status == 0, slow.err
    assert json.loads(fast.out) == json.loads(slow.out)
    if name == "attention":
        assert {row["path"]: row["trainable"] for row in json.loads(fast.out)["layers"]}["mha/query"] is False


def test_inspect_loads_the_file_where_the_archive_cannot_be_built(subjects, monkeypatch):
    """Where building the model from its archive fails, inspect (and diff, plan --html) loads the file
    with Keras instead, and shows the same."""
    from modelxform.keras_io import graph
    path = subjects("cnn").path
    built = run_cli("inspect", path, "--json", "--weights")
    failures = []

    def fail(self, old_layers):
        failures.append(len(old_layers))
        raise RuntimeError("this build fails")
    monkeypatch.setattr(graph.GraphEditor, "build", fail)
    loaded = run_cli("inspect", path, "--json", "--weights")
    assert loaded.status == built.status == 0, loaded.err
    assert failures and json.loads(loaded.out) == json.loads(built.out)


def test_inspect_leaves_large_arrays_in_the_file(tmp_path, monkeypatch):
    """inspect on the archive makes its large variables without values and never fills them (arrays of
    more than 1 KiB count as large here): a 6 GiB model is inspected in the runtime's memory."""
    from modelxform.keras_io import variables
    path = tmp_path / "wide.keras"
    _large_dense_model(path, inputs=64, units=32)
    monkeypatch.setattr(variables, "LARGE_ARRAY", 1 << 10)
    lazy, filled = [], []
    real_init, real_fill = variables.FromSource.__init__, variables._fill_by_rows
    monkeypatch.setattr(variables.FromSource, "__init__",
                        lambda self, source, var: lazy.append(var.path) or real_init(self, source, var))
    monkeypatch.setattr(variables, "_fill_by_rows", lambda var, *a: filled.append(var.path) or real_fill(var, *a))
    shown = run_cli("inspect", path, "--weights")
    assert shown.status == 0, shown.err
    assert lazy == ["wide/kernel"] and filled == []
    assert "(64, 32)" in shown.out
    with session.model_to_look_at(path) as model:  # (the check can fail: reading a value fills it)
        assert np.asarray(model.get_layer("wide").kernel.numpy()).shape == (64, 32)
    assert filled == ["wide/kernel"]


DIFF_CASES = {
    "cnn": "select where type=Conv2D\nadd noise normal(stddev=0.01) to kernel\n"
           "append Dense(units=3, name=\"extra_head\")\n",
    "zoo": "select where has weights\nscale weights 0.5\nselect dense\nrename to \"dense_renamed\"\n",
    "resnet50": "replace MaxPooling2D with AveragePooling2D\nselect where type=BatchNormalization\nfreeze\n",
    "attention": "select mha\nfreeze\nselect head\ncast bfloat16\n",
    "tokens": "select where type=Dense\nquantize int8\n",
}


@pytest.mark.parametrize("name", sorted(DIFF_CASES))
def test_diff_of_archives_is_the_diff_of_the_loaded_models(subjects, name, tmp_path, monkeypatch):
    """diff builds both models from their archives (large variables left in the files): the same
    report (--json) as from the models Keras loads whole (MODELXFORM_FASTPATH=0), for structural,
    weight-only, flag, rename, cast and quantize edits."""
    if name in BUILDERS:
        path = subjects(name).path
    else:
        path = tmp_path / f"{name}.keras"
        save_model(FACTORIES[name](), path)
    recipe = tmp_path / "edit.recipe"
    recipe.write_text(DIFF_CASES[name])
    out = tmp_path / "out.keras"
    apply_file(recipe, path, out, seed=SEED)
    fast = run_cli("diff", path, out, "--json")
    monkeypatch.setenv(session.DISABLE_ENV, "0")
    slow = run_cli("diff", path, out, "--json")
    assert fast.status == slow.status == 1, fast.err + slow.err
    assert json.loads(fast.out) == json.loads(slow.out)


@pytest.mark.parametrize("large", [False, True])
def test_diff_finds_a_renamed_bfloat16_layer(tmp_path, monkeypatch, large):
    """A renamed layer is matched by its values' digest, also for bfloat16 arrays (whose bytes numpy
    exports only viewed as integers), whether they are copied or left in the file (large: over 1 KiB)."""
    from modelxform.keras_io import variables
    path = tmp_path / "wide.keras"
    _large_dense_model(path, inputs=256, units=64)
    cast, rename = tmp_path / "cast.recipe", tmp_path / "rename.recipe"
    cast.write_text("select wide\ncast bfloat16\n")
    rename.write_text("select wide\nrename to \"renamed_wide\"\n")
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    apply_file(cast, path, a, seed=SEED)
    apply_file(rename, a, b, seed=SEED)
    if large:
        monkeypatch.setattr(variables, "LARGE_ARRAY", 1 << 10)
    shown = run_cli("diff", a, b, "--json")
    assert shown.status == 1, shown.err
    report = json.loads(shown.out)
    assert report["renamed"] == [{"from": "wide", "to": "renamed_wide"}] and report["changed"] == []


def test_diff_compares_large_arrays_a_block_at_a_time(tmp_path, monkeypatch):
    """Large variables (more than 512 bytes here) are compared where they are, a block of rows at a
    time, never copied whole (snapshot's StoredValues), and the report is the one of whole arrays: the
    same changes, a renamed layer found by its values' digest, unchanged arrays not listed, the same
    maximum difference, and the relative L2 to the last few bits (its sums are taken block by block)."""
    from modelxform.keras_io import variables
    path = tmp_path / "wide.keras"
    _large_dense_model(path, inputs=256, units=64)  # kernels of 64 KiB (wide) and 1 KiB (head)
    recipe = tmp_path / "edit.recipe"
    recipe.write_text("select head\nadd noise normal(stddev=0.01) to kernel\nselect wide\n"
                      "rename to \"renamed_wide\"\n")
    out = tmp_path / "out.keras"
    apply_file(recipe, path, out, seed=SEED)
    whole = json.loads(run_cli("diff", path, out, "--json").out)
    monkeypatch.setattr(variables, "LARGE_ARRAY", 512)
    monkeypatch.setattr(variables, "BLOCK_BYTES", 256)  # 16 rows of the head's 64 x 4 kernel per block
    stored, rows_read = [], []
    real_init, real_rows = diff_module.StoredValues.__init__, diff_module.StoredValues.rows

    def init(self, var):
        stored.append(var.path)
        real_init(self, var)

    def rows(self, start, stop):
        rows_read.append(stop - start)
        return real_rows(self, start, stop)
    monkeypatch.setattr(diff_module.StoredValues, "__init__", init)
    monkeypatch.setattr(diff_module.StoredValues, "rows", rows)
    blocks = run_cli("diff", path, out, "--json")
    assert blocks.status == 1, blocks.err
    streamed = json.loads(blocks.out)
    assert sorted(stored) == ["head/kernel", "head/kernel", "renamed_wide/kernel", "wide/kernel"]
    assert rows_read and max(rows_read) == 16
    assert whole["renamed"] == streamed["renamed"] == [{"from": "wide", "to": "renamed_wide"}]
    (change,) = whole["changed"]
    (streamed_change,) = streamed["changed"]
    assert change["path"] == "head" and [w["name"] for w in change["weights"]] == ["kernel"]  # (bias kept)
    kernel, streamed_kernel = change["weights"][0], streamed_change["weights"][0]
    assert kernel["max_abs_diff"] > 0 and streamed_kernel["max_abs_diff"] == kernel["max_abs_diff"]
    assert streamed_kernel["relative_l2"] == pytest.approx(kernel["relative_l2"], rel=1e-12)
    streamed_kernel["relative_l2"] = kernel["relative_l2"]
    assert streamed == whole

# ---- arrays that stream (issue 19) ----------------------------------------------------------------------
# Elementwise statements (scale, clip, add noise, set … to a constant) on the archive change an array as it
# streams into the written file, a block at a time; the kept ranges of model.weights.h5 are copied file to
# file, and the member's CRC follows from the input's (keras_io/streams.py). The file must be the one the
# engine writes, however the arrays are cut.

@pytest.mark.parametrize("name", ["cnn", "zoo"])
def test_arrays_streamed_in_small_blocks_agree_with_the_engine(subjects, name, tmp_path, monkeypatch):
    """Blocks of 256 bytes (every kernel in many pieces; an odd noise block, so that no block boundary lines
    up with another) give the engine's file, report and provenance."""
    from modelxform.statements import weights
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 256)
    monkeypatch.setattr(weights, "NOISE_BLOCK", 97)
    subject = subjects(name)
    assert max(int(np.prod(v.shape)) * 4 for info in subject.layers for v in info.layer.weights) > 8 * 256
    differential(subject, recipe_for(subject.layers), tmp_path)


def test_a_block_is_made_in_a_thread_and_left_alone_while_it_is_written(subjects, tmp_path, monkeypatch):
    """The next blocks are read and changed in a thread while the last one is written (streams.Ahead):
    a block's bytes do not change while they are written, however far the thread runs ahead, and the
    file is the engine's."""
    import threading
    import time

    from modelxform.keras_io import streams
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 4096)
    real_write, real_old = archive_module.write_all, streams.EditedCrc.replace_old
    makers, changed = set(), []

    def slow_write(fd, data, offset):
        before = bytes(data)
        time.sleep(0.002)  # (the thread makes the next blocks meanwhile)
        if bytes(data) != before:
            changed.append(offset)
        real_write(fd, data, offset)

    def replace_old(self, offset, old):
        makers.add(threading.current_thread().name)
        real_old(self, offset, old)
    monkeypatch.setattr(archive_module, "write_all", slow_write)
    monkeypatch.setattr(streams.EditedCrc, "replace_old", replace_old)
    subject = subjects("cnn")
    differential(subject, "select all\nscale weights 0.5\nadd noise normal(stddev=0.01) to kernel\n", tmp_path)
    assert makers == {"modelxform-ahead"}
    assert not changed, f"blocks changed while written at {changed[:5]}"


@pytest.mark.parametrize("way", ["through zipfile", "without copy_file_range"])
def test_other_ways_of_writing_the_weights_give_the_same_file(subjects, tmp_path, monkeypatch, way):
    """Where the zip writer's CRC cannot be set (another Python) the bytes go through it; where the kernel
    cannot copy between the files they go through a buffer: the same file either way."""
    from modelxform.keras_io import files, streams
    if way == "through zipfile":
        monkeypatch.setattr(files, "member_writer_settable", lambda out: False)
    else:
        monkeypatch.setattr(streams, "_kernel_copy", False)
    subject = subjects("cnn")
    differential(subject, recipe_for(subject.layers), tmp_path)


def test_a_stale_crc_in_the_input_stays_detectable(subjects, tmp_path):
    """The output's CRC is worked out from the input's: an input whose weights do not match their CRC
    gives an output whose kept bytes do not match either (as a copy of the file would), not a file that
    hides the damage."""
    subject = subjects("cnn")
    damaged = tmp_path / "damaged.keras"
    data = bytearray(subject.path.read_bytes())
    with zipfile.ZipFile(subject.path) as zf:
        weights = zf.getinfo("model.weights.h5")
        start = weights.header_offset + 30 + len(weights.filename) + len(weights.extra)
    data[start + weights.file_size - 1] ^= 0xFF  # the last byte of the h5 file: no array's
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out.keras"
    archive_apply(compile_recipe("select where type=Dense\nscale kernel 0.5\n"), damaged, out)
    with zipfile.ZipFile(out) as zf, pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        zf.read("model.weights.h5")


def _large_dense_model(path, inputs=2048, units=1024):
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units, name="wide"),
                              keras.layers.Dense(4, name="head")], name="wide_mlp")
    _randomize(model, 3)
    save_model(model, path)
    return model


def test_an_elementwise_recipe_never_holds_a_whole_array(tmp_path, monkeypatch):
    """scale, clip, add noise and set on an 8 MiB kernel, in blocks of 64 KiB: the process's numpy and
    Python allocations stay below a quarter of the kernel's size (the whole array read once would be
    all of it), and the file is the engine's."""
    import tracemalloc

    from modelxform.keras_io import digests
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 64 << 10)
    # (the input's digest reads the file in pieces of digests._CHUNK, 16 MiB, whatever the arrays: as large
    # as this whole 8 MiB file, so scaled down with the blocks)
    monkeypatch.setattr(digests, "_CHUNK", 64 << 10)
    path = tmp_path / "wide.keras"
    _large_dense_model(path)
    subject = Subject(path)
    text = ("select all\nscale weights 0.5\nadd noise normal(stddev=0.01) to kernel\nclip weights -0.6 0.6\n"
            "select head\nset bias to constant(0.25)\n")
    recipe = compile_recipe(text, "stream.recipe")
    archive_apply(recipe, path, tmp_path / "warm.keras")  # (what a first run imports is not the arrays)
    tracemalloc.start()
    try:
        archive_apply(recipe, path, tmp_path / "fast.keras")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kernel = 2048 * 1024 * 4
    assert peak < kernel / 4, f"peak {peak} bytes for a {kernel}-byte kernel"
    engine_apply(subject, recipe, tmp_path / "engine.keras")
    assert_same_result(tmp_path / "fast.keras", tmp_path / "engine.keras", path)


@pytest.mark.parametrize("path", ["weight-only", "structural"])
def test_a_large_output_is_written_to_disk_while_it_is_made(tmp_path, monkeypatch, path):
    """The weights of a large output go to disk in the background as they are written (streams.Writeback,
    every 1 MiB here instead of 256 MiB): at least one sync starts while the weights are being written and
    one once they are all written, all before the file is renamed into place; and the file is the same
    as the engine's."""
    import os

    from modelxform.keras_io import streams
    source = tmp_path / "wide.keras"
    _large_dense_model(source)  # an 8 MiB kernel
    events = []
    real_fdatasync, real_replace = os.fdatasync, os.replace

    class EveryMiB(streams.Writeback):
        def __init__(self, fd, size, every=1 << 20):
            super().__init__(fd, size, every)

        def kick(self, after_running=False):
            events.append("last kick" if after_running else "kick")
            super().kick(after_running)

    def fdatasync(fd):
        events.append("sync")
        real_fdatasync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)
    monkeypatch.setattr(archive_module, "Writeback", EveryMiB)
    monkeypatch.setattr(streams, "Writeback", EveryMiB)
    monkeypatch.setattr(streams, "WRITEBACK_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)
    text = "select where type=Dense\nscale kernel 0.5\n"
    if path == "structural":
        text += "insert Dropout(rate=0.1) before head\n"
    recipe = compile_recipe(text, "writeback.recipe")
    out = tmp_path / "out.keras"
    if path == "weight-only":
        archive_apply(recipe, source, out)
    else:
        apply_file(recipe, source, out, seed=SEED)
    assert events.count("kick") >= 1 and events.count("last kick") == 1
    assert events.count("sync") >= 2
    assert events.index("kick") < events.index("last kick") < max(i for i, e in enumerate(events) if e == "sync") \
        < events.index("rename")
    monkeypatch.undo()
    engine_apply(Subject(source), recipe, tmp_path / "engine.keras")
    assert_same_result(out, tmp_path / "engine.keras", source)


def test_deferred_changes_read_in_any_order_give_the_same_values(subjects):
    """A deferred noise pass read by rows out of order (which restarts it), by rows in order, and whole,
    gives the values of the pass run on the whole array."""
    from modelxform.keras_io.archive import Archive
    subject = subjects("cnn")
    with Archive(subject.path) as arch:
        info = next(i for i in arch.layers if i.path == "dense_1")
        var = info.layer.weights[0]
        original = var.numpy()
        rng = lambda: np.random.default_rng(4)  # noqa: E731

        class Noise:
            def begin(self):
                gen = rng()

                class Pass:
                    def __call__(self, block):
                        block += gen.normal(0, 0.5, block.size).astype(block.dtype).reshape(block.shape)

                    def end(self):
                        pass
                return Pass()
        var.defer(Noise())
        want = original + rng().normal(0, 0.5, original.size).astype(original.dtype).reshape(original.shape)
        assert np.array_equal(var.read_rows(100, 300), want[100:300])
        rows = [var.read_rows(a, min(a + 500, var.shape[0])) for a in range(0, var.shape[0], 500)]
        assert np.array_equal(np.concatenate(rows), want)
        assert np.array_equal(var.numpy(), want) and np.array_equal(var.numpy(), want)
        taken = var.take_array()
        assert np.array_equal(taken, want)
        var.assign(taken * 2)  # assigning replaces the deferred pass
        assert np.array_equal(var.numpy(), want * 2)
