"""Tiny model factories and helpers shared by the tests.

Models are built here, in the test process, with seeded initializers: nothing is downloaded and
nothing large is committed.
"""
from __future__ import annotations

import atexit
import io
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the digest cache (keras_io/digests.py) of this run's processes, not the user's
os.environ["MODELXFORM_CACHE_DIR"] = tempfile.mkdtemp(prefix="modelxform-test-cache-")
atexit.register(shutil.rmtree, os.environ["MODELXFORM_CACHE_DIR"], ignore_errors=True)
# the width the CLI's tables are laid out for (console.py: the terminal's, at least 100), the same in every
# run: without it a terminal narrower than 120 columns that runs ./dev test — pytest captures sys.stdout,
# not sys.__stdout__, which shutil.get_terminal_size asks — wraps table cells the tests read whole
os.environ["COLUMNS"] = "120"

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _keras():
    from modelxform.keras_io.files import import_keras
    return import_keras()


def _init(seed):
    keras = _keras()
    return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                bias_initializer=keras.initializers.RandomNormal(seed=seed + 1000))


def make_cnn():
    """The design card's CNN (conv2d_1, MaxPooling2D, conv2d_2, flatten, three Dense)."""
    from modelxform.samples import cnn
    return cnn()


def make_sequential():
    keras = _keras()
    return keras.Sequential([
        keras.Input((8,), name="features"),
        keras.layers.Dense(16, activation="relu", name="fc1", **_init(1)),
        keras.layers.Dropout(0.5, name="dropout_1"),
        keras.layers.Dense(4, name="fc2", **_init(2)),
    ], name="seq")


def make_nested():
    """An outer functional model using a functional 'backbone' that itself nests a Sequential 'block'."""
    keras = _keras()
    block = keras.Sequential([keras.Input((6, 6, 4)),
                              keras.layers.Conv2D(4, 3, padding="same", name="conv_a", **_init(10)),
                              keras.layers.BatchNormalization(name="bn_a")], name="block")
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, name="conv1", **_init(11))(inp)
    x = block(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    backbone = keras.Model(inp, x, name="backbone")
    outer_in = keras.Input((8, 8, 3), name="image")
    y = backbone(outer_in)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    y = keras.layers.Dense(3, name="head", **_init(12))(y)
    return keras.Model(outer_in, y, name="outer")


def make_shared():
    """One Dense layer called on two inputs, merged with Add: the layer must stay shared."""
    keras = _keras()
    a = keras.Input((5,), name="a")
    b = keras.Input((5,), name="b")
    shared = keras.layers.Dense(5, name="shared", **_init(20))
    merged = keras.layers.Add(name="add")([shared(a), shared(b)])
    out = keras.layers.Dense(2, name="out", **_init(21))(merged)
    return keras.Model([a, b], out, name="siamese")


def make_multi_io():
    keras = _keras()
    a = keras.Input((6,), name="x1")
    b = keras.Input((3,), name="x2")
    h = keras.layers.Concatenate(name="concat")([keras.layers.Dense(4, name="da", **_init(30))(a), b])
    o1 = keras.layers.Dense(2, name="out1", **_init(31))(h)
    o2 = keras.layers.Dense(1, name="out2", **_init(32))(h)
    return keras.Model([a, b], [o1, o2], name="multi")


def subclassed_class():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="modelxform_tests")
    class TwoLayer(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.d1 = keras.layers.Dense(6, name="d1", **_init(40))
            self.d2 = keras.layers.Dense(2, name="d2", **_init(41))

        def call(self, x):
            return self.d2(self.d1(x))

    return TwoLayer


def make_subclassed():
    model = subclassed_class()(name="two_layer")
    model(np.zeros((1, 4), dtype="float32"))
    return model


FACTORIES = {"cnn": make_cnn, "sequential": make_sequential, "nested": make_nested, "shared": make_shared,
             "multi_io": make_multi_io, "subclassed": make_subclassed}


@pytest.fixture
def model_file(tmp_path):
    """model_file(kind) -> path of a freshly saved .keras file of that sample model."""
    from modelxform.keras_io.files import save_model

    def make(kind: str = "cnn", name: str | None = None, suffix: str = ".keras"):
        path = tmp_path / ((name or kind) + suffix)
        save_model(FACTORIES[kind](), path)
        return path
    return make


# The input models of the pinned output bytes (tests/test_output_bytes.py, tests/test_backends.py).
PINNED_KINDS = ("cnn", "vgg16", "resnet50")


def build_pinned_input(kind: str):
    keras = _keras()
    keras.utils.set_random_seed(1234)  # keras.applications draws unseeded initial values
    if kind == "cnn":
        return make_cnn()
    # a named input: an unnamed one is called input_layer_N, N counting the inputs made in this process
    image = keras.Input((32, 32, 3), name="image")
    if kind == "vgg16":
        return keras.applications.VGG16(weights=None, input_tensor=image, classes=10)
    return keras.applications.ResNet50(weights=None, input_tensor=image, classes=10)


@pytest.fixture(scope="session")
def pinned_inputs(tmp_path_factory):
    """pinned_inputs(kind) -> the path of that pinned input model, built once per session. The CNN is
    the same on every backend; keras.applications' weights are those this process's backend draws."""
    from modelxform.keras_io.files import load_model, save_model
    folder = tmp_path_factory.mktemp("pinned-inputs")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            # a model saved straight after building records its dtype policies' id()s (shared_object_id),
            # which differ from process to process; saved again after loading, its bytes are reproducible
            built = folder / f"{kind}-built.keras"
            save_model(build_pinned_input(kind), built)
            cache[kind] = folder / f"{kind}.keras"
            save_model(load_model(built), cache[kind])
        return cache[kind]
    return get


def weights_by_path(model) -> dict[str, list[np.ndarray]]:
    from modelxform.keras_io.layers import walk
    return {info.path: [np.asarray(w) for w in info.layer.get_weights()] for info in walk(model)}


def assert_bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def position_of(text: str, token: str, line: int | None = None) -> tuple[int, int]:
    """The 1-based (line, column) at which ``token`` first stands as a whole word in recipe ``text``
    (on ``line`` if given): where an error about that token or statement must point. Lines break at
    "\n" as the recipe lexer counts them."""
    import re
    edge = r"(?<![\w$])" if token[:1].isalnum() or token[:1] == "_" else ""
    tail = r"(?![\w])" if token[-1:].isalnum() or token[-1:] == "_" else ""
    pattern = re.compile(edge + re.escape(token) + tail)
    for number, content in enumerate(text.split("\n"), start=1):
        if line is not None and number != line:
            continue
        found = pattern.search(content)
        if found:
            return number, found.start() + 1
    raise AssertionError(f"{token!r} is not in the recipe text{'' if line is None else f' on line {line}'}")


def position(error) -> tuple[int | None, int | None]:
    """The (line, column) an error carries."""
    return error.line, error.column


class Captured:
    def __init__(self, status, out, err):
        self.status, self.out, self.err = status, out, err


def run_cli(*argv, stdin: bytes | None = None) -> Captured:
    """Run the CLI in-process through main(argv), capturing what it prints; ``stdin``: what standard
    input holds."""
    from modelxform.cli import main
    from modelxform.console import Console
    out, err = io.StringIO(), io.StringIO()
    status = main([str(a) for a in argv], Console(out, err, io.BytesIO(stdin) if stdin is not None else None))
    return Captured(status, out.getvalue(), err.getvalue())


def custom_layer_module(folder, module: str, package: str, cls: str, factor: float):
    """Write FOLDER/MODULE.py, which registers a Keras layer class CLS (``x * factor``) under PACKAGE,
    and load it in this process to build models with (the registration does not reach subprocesses,
    which need ``--import MODULE``). Returns the module; it is not left in sys.modules."""
    import importlib.util
    import sys
    (folder / f"{module}.py").write_text(
        "import keras\n\n\n"
        f"@keras.saving.register_keras_serializable(package={package!r})\n"
        f"class {cls}(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        f"        return x * {float(factor)!r}\n")
    spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    finally:
        sys.modules.pop(module, None)
    return loaded


# ---- models people fine-tune today: attention, dict and integer inputs, keras_hub (tests/test_hub.py) ----

def make_attention():
    """A functional model with a MultiHeadAttention (its query, key, value and attention_output are
    EinsumDense sublayers, every kernel named `kernel`) and a Dense head."""
    keras = _keras()
    keras.utils.set_random_seed(50)
    x = keras.Input((6, 16), name="x")
    y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    y = keras.layers.LayerNormalization(name="norm")(y)
    y = keras.layers.Dense(4, name="head", **_init(51))(y)
    return keras.Model(x, y, name="attention")


def make_dict_inputs():
    """Inputs passed as a dict {"a": …, "b": …}, concatenated, then two Dense layers."""
    keras = _keras()
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Concatenate(name="cat")([a, b])
    h = keras.layers.Dense(8, name="hidden", **_init(60))(h)
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(2, name="out", **_init(61))(h), name="dict_inputs")


def make_token_model():
    """Integer token ids into an Embedding of 50 ids, pooled, then a Dense layer."""
    keras = _keras()
    ids = keras.Input((5,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(50, 8, name="emb", embeddings_initializer=keras.initializers.RandomNormal(seed=70))(ids)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(ids, keras.layers.Dense(1, name="score", **_init(71))(h), name="tokens")


HUB = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
           max_sequence_length=32)


def make_bert():
    """keras_hub's BertBackbone, small (2 layers, hidden 64), random weights from a fixed seed."""
    keras = _keras()
    import keras_hub
    keras.utils.set_random_seed(80)
    return keras_hub.models.BertBackbone(**HUB, name="bert_backbone")


def make_bert_classifier():
    keras = _keras()
    import keras_hub
    keras.utils.set_random_seed(81)
    backbone = keras_hub.models.BertBackbone(**HUB, name="bert_backbone")
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None,
                                               name="bert_classifier")


def make_gpt2_lm():
    keras = _keras()
    import keras_hub
    keras.utils.set_random_seed(82)
    backbone = keras_hub.models.GPT2Backbone(**HUB, name="gpt2_backbone")
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None, name="gpt2_lm")


def make_vit():
    keras = _keras()
    import keras_hub
    keras.utils.set_random_seed(83)
    return keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                        hidden_dim=64, mlp_dim=128, name="vit_backbone")


def make_wrapped_bert():
    """A user's functional model around a keras_hub BertBackbone: dict inputs, the pooled output, a head."""
    keras = _keras()
    backbone = make_bert()
    inputs = {name: keras.Input((None,), dtype="int32", name=name)
              for name in ("token_ids", "segment_ids", "padding_mask")}
    pooled = backbone(inputs)["pooled_output"]
    return keras.Model(inputs, keras.layers.Dense(3, name="head", **_init(84))(pooled), name="wrapped")


FACTORIES.update({"attention": make_attention, "dict_inputs": make_dict_inputs, "tokens": make_token_model,
                  "bert": make_bert, "bert_classifier": make_bert_classifier, "gpt2_lm": make_gpt2_lm,
                  "vit": make_vit, "wrapped_bert": make_wrapped_bert})
