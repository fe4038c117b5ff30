"""Every recipe in recipes/ compiles, is canonically formatted, and does what it says on the sample CNN."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, assert_bit_identical, make_cnn, weights_by_path
from modelxform import compile_recipe, load_recipe
from modelxform.lang.fmt import format_text

RECIPES = sorted(p for p in (ROOT / "recipes").iterdir() if p.suffix in (".recipe", ".yaml"))
# which model each recipe is written for; a new recipe must be added here (and so gets tested)
TARGETS = {"example": "cnn", "freeze-features": "cnn", "perturb-dense": "cnn", "feature-extractor": "cnn",
           "new-head": "cnn", "resnet50-finetune": "resnet50", "resnet50-features": "resnet50",
           "dropout-before-classifier": "cnn", "resnet50-headless": "resnet50", "bert-finetune": "bert_classifier",
           "resnet50-deploy": "resnet50", "lora-attention": "bert", "int8-deploy": "attention"}

_MODELS = {}


def target_model(path):
    kind = TARGETS[path.stem]
    if kind not in _MODELS:
        if kind == "cnn":
            _MODELS[kind] = make_cnn()
        elif kind == "bert_classifier":
            pytest.importorskip("keras_hub")
            from conftest import make_bert_classifier
            _MODELS[kind] = make_bert_classifier()
        elif kind == "bert":
            pytest.importorskip("keras_hub")
            from conftest import make_bert
            _MODELS[kind] = make_bert()
        elif kind == "attention":
            from conftest import make_attention
            _MODELS[kind] = make_attention()
        else:
            import keras
            _MODELS[kind] = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    return _MODELS[kind]


@pytest.fixture(scope="module")
def cnn():
    return make_cnn()


def test_every_recipe_has_a_target_model():
    assert sorted(p.stem for p in RECIPES) == sorted(TARGETS)


def test_there_are_recipes():
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_versioned_formatted_and_round_trips(path):
    recipe = load_recipe(path)
    header = recipe.program.header()
    assert header is not None and header.version, f"{path.name} needs `recipe \"…\" version \"…\"`"
    assert recipe.warnings == []
    text = path.read_text()
    if path.suffix == ".recipe":  # YAML recipes keep their comments, which canonical YAML cannot hold
        assert format_text(text, str(path)) == text, "run: modelxform fmt recipes/*.recipe"
    else:
        assert compile_recipe(format_text(text, str(path)), str(path)).program == recipe.program
    assert compile_recipe(str(recipe.program), str(path.with_suffix(".recipe"))).program == recipe.program


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_applies_deterministically(path):
    recipe = load_recipe(path)
    model = target_model(path)
    first, report = recipe.apply(model, seed=7)
    second, _ = recipe.apply(model, seed=7)
    a, b = weights_by_path(first), weights_by_path(second)
    assert a.keys() == b.keys()
    for key in a:
        assert_bit_identical(a[key], b[key])
    assert len(report.statements) == sum(1 for s in recipe.program.flat() if type(s).__name__ not in
                                         ("RecipeHeader", "Requires", "Seed", "Param", "Include"))


def test_freeze_features_freezes_convs_and_reinitialises_only_the_classifier(cnn):
    new, _ = load_recipe(ROOT / "recipes" / "freeze-features.recipe").apply(cnn, seed=7)
    before, after = weights_by_path(cnn), weights_by_path(new)
    assert not new.get_layer("conv2d_1").trainable and not new.get_layer("conv2d_2").trainable
    assert new.get_layer("dense_1").trainable and new.get_layer("dense_3").trainable
    for path in ("conv2d_1", "conv2d_2", "dense_1", "dense_2"):
        assert_bit_identical(before[path], after[path])
    assert not np.array_equal(before["dense_3"][0], after["dense_3"][0])
    # the new values come from the layer's own configured initializer, seeded by the documented rule:
    # seed, the statement's canonical text, its occurrence, the layer path and the variable name; drawn
    # as Keras's numpy backend draws them, whatever the backend (docs/language.md#randomness)
    import keras
    from modelxform.keras_io.initializers import numpy_values
    from modelxform.rng import derive_seed
    config = cnn.get_layer("dense_3").get_config()
    for index, var in enumerate(("kernel", "bias")):
        init = keras.initializers.get(config[f"{var}_initializer"])
        seed = derive_seed(7, "reinit weights", 0, "dense_3", var) % (2**31 - 1)
        expected = numpy_values(init, after["dense_3"][index].shape, "float32", seed)
        assert after["dense_3"][index].tobytes() == expected.tobytes()


def test_perturb_dense_prunes_half_of_every_dense_kernel(cnn):
    new, _ = load_recipe(ROOT / "recipes" / "perturb-dense.recipe").apply(cnn)
    for name in ("dense_1", "dense_2", "dense_3"):
        kernel = new.get_layer(name).get_weights()[0]
        assert np.count_nonzero(kernel == 0) >= kernel.size // 2
        assert kernel.min() >= -1 and kernel.max() <= 1
    assert_bit_identical(weights_by_path(cnn)["conv2d_1"], weights_by_path(new)["conv2d_1"])


def test_feature_extractor_outputs_are_the_two_activations(cnn):
    new, _ = load_recipe(ROOT / "recipes" / "feature-extractor.recipe").apply(cnn)
    import keras
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype("float32")
    probe = keras.Model(cnn.inputs, [cnn.get_layer("conv2d_1").output, cnn.get_layer("conv2d_2").output])
    want = probe.predict(x, verbose=0)
    got = new.predict(x, verbose=0)
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_new_head_has_the_parameterised_number_of_classes(cnn):
    recipe = load_recipe(ROOT / "recipes" / "new-head.recipe")
    new, _ = recipe.apply(cnn)
    assert tuple(new.outputs[0].shape) == (None, 5)
    new3, _ = recipe.apply(cnn, params={"classes": "3"})
    assert tuple(new3.outputs[0].shape) == (None, 3)
    assert new.get_layer("dropout").rate == 0.5
    assert_bit_identical(weights_by_path(cnn)["dense_2"], weights_by_path(new)["dense_2"])


def test_resnet50_finetune_trains_only_the_last_stage_and_a_fresh_classifier(tmp_path):
    from modelxform.keras_io.files import save_model, sha256_file
    path = ROOT / "recipes" / "resnet50-finetune.recipe"
    model = target_model(path)
    new, _ = load_recipe(path).apply(model, seed=11)
    trainable = {layer.name for layer in new.layers if layer.trainable and layer.weights}
    assert trainable == {l.name for l in model.layers if l.weights and (l.name.startswith("conv5_") or
                                                                        l.name == "predictions")}
    before, after = weights_by_path(model), weights_by_path(new)
    for name in before:
        if name != "predictions":
            assert_bit_identical(before[name], after[name])
    assert not np.array_equal(before["predictions"][0], after["predictions"][0])
    # byte-stable: two runs, two saves, one sha256
    again, _ = load_recipe(path).apply(model, seed=11)
    save_model(new, tmp_path / "a.keras")
    save_model(again, tmp_path / "b.keras")
    assert sha256_file(tmp_path / "a.keras") == sha256_file(tmp_path / "b.keras")


def test_resnet50_features_taps_three_stages():
    path = ROOT / "recipes" / "resnet50-features.yaml"
    model = target_model(path)
    new, _ = load_recipe(path).apply(model)
    assert [tuple(o.shape) for o in new.outputs] == [(None, 4, 4, 512), (None, 2, 2, 1024), (None, 1, 1, 2048)]
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype("float32")
    import keras
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in
                                       ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out")])
    for got, want in zip(new.predict(x, verbose=0), probe.predict(x, verbose=0)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_dropout_before_classifier_keeps_predictions(cnn):
    new, _ = load_recipe(ROOT / "recipes" / "dropout-before-classifier.recipe").apply(cnn)
    layer = new.get_layer("head_dropout")
    assert layer.rate == 0.3
    assert new.get_layer("dense_3").input is layer.output
    before, after = weights_by_path(cnn), weights_by_path(new)
    for path in before:
        assert_bit_identical(before[path], after[path])


def test_resnet50_headless_is_a_frozen_pooled_backbone():
    path = ROOT / "recipes" / "resnet50-headless.recipe"
    model = target_model(path)
    new, _ = load_recipe(path).apply(model)
    assert "predictions" not in [l.name for l in new.layers] and "avg_pool" not in [l.name for l in new.layers]
    assert not any(l.trainable for l in new.layers if l.weights)
    x = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype("float32")
    import keras
    probe = keras.Model(model.inputs, model.get_layer("conv5_block3_out").output)
    want = np.asarray(probe(x)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(new(x)), want, rtol=0, atol=1e-5)


def test_bert_finetune_trains_the_last_block_and_a_new_head(tmp_path):
    pytest.importorskip("keras_hub")
    import modelxform
    from conftest import make_bert_classifier
    from modelxform.keras_io.files import save_model
    save_model(make_bert_classifier(), tmp_path / "clf.keras")
    result = modelxform.apply_file(ROOT / "recipes" / "bert-finetune.recipe", tmp_path / "clf.keras",
                                   tmp_path / "out.keras")
    model = modelxform.load_model(tmp_path / "out.keras")
    trainable = {v.path for v in model.trainable_weights}
    block = {v.path for v in model.get_layer("bert_backbone").get_layer("transformer_layer_1").weights}
    assert trainable == block | {"logits/kernel", "logits/bias"}
    assert model.get_layer("logits").units == 3
    assert result.plan.after[1] == result.plan.before[1] + 65  # a third class: 64 more weights and a bias


def test_resnet50_deploy_folds_every_batchnorm_and_fixes_the_input():
    import keras
    path = ROOT / "recipes" / "resnet50-deploy.recipe"
    model = target_model(path)
    new, plan = load_recipe(path).apply(model)
    assert not [l for l in new.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert sum(1 for c in plan.statements[0].changes if " folded into " in c) == 53
    assert plan.statements[0].notes == []
    assert tuple(new.inputs[0].shape) == (1, 224, 224, 3) and tuple(new.outputs[0].shape) == (1, 10)
    # the same model at 224x224 without the fold, on one image
    reference, _ = compile_recipe("set input shape (1, 224, 224, 3)").apply(model)
    x = np.random.default_rng(3).standard_normal((1, 224, 224, 3)).astype("float32")
    want = np.asarray(reference(x, training=False))
    np.testing.assert_allclose(np.asarray(new(x, training=False)), want, rtol=0,
                               atol=1e-4 * max(1, np.abs(want).max()))


# the fine-tuning prep recipes, each applied to a keras_hub backbone and to a model of Keras layers

@pytest.fixture(scope="module")
def prep_inputs(tmp_path_factory):
    pytest.importorskip("keras_hub")
    from conftest import make_attention, make_bert
    from modelxform.keras_io.files import save_model
    folder = tmp_path_factory.mktemp("prep")
    out = {}
    for kind, factory in (("bert", make_bert), ("attention", make_attention)):
        out[kind] = folder / f"{kind}.keras"
        save_model(factory(), out[kind])
    return out


ATTENTION_PATHS = {"bert": [f"transformer_layer_{n}/self_attention_layer/{w}" for n in (0, 1) for w in ("query", "value")],
                   "attention": ["mha/query", "mha/value"]}


@pytest.mark.parametrize("kind", ["bert", "attention"])
def test_lora_attention_adapts_every_query_and_value(prep_inputs, kind, tmp_path):
    import modelxform
    out = tmp_path / "lora.keras"
    result = modelxform.apply_file(ROOT / "recipes" / "lora-attention.recipe", prep_inputs[kind], out)
    model = modelxform.load_model(out)
    from modelxform.keras_io.layers import walk
    lora = {i.path: (i.layer.lora_rank, i.layer.lora_alpha) for i in walk(model) if getattr(i.layer, "lora_enabled", False)}
    assert lora == {p: (8, 16) for p in ATTENTION_PATHS[kind]}
    assert any(line.startswith("    trainable parameters: ") for line in result.plan.lines())


@pytest.mark.parametrize("kind", ["bert", "attention"])
def test_int8_deploy_quantizes_every_dense_and_einsum_dense(prep_inputs, kind, tmp_path):
    import keras
    import modelxform
    out = tmp_path / "int8.keras"
    modelxform.apply_file(ROOT / "recipes" / "int8-deploy.recipe", prep_inputs[kind], out)
    model = keras.saving.load_model(out)
    from modelxform.keras_io.layers import walk
    modes = {type(i.layer).__name__: set() for i in walk(model)}
    for i in walk(model):
        modes[type(i.layer).__name__].add(getattr(i.layer, "quantization_mode", None))
    assert modes["EinsumDense"] == {"int8"} and modes["Dense"] == {"int8"}
    assert modes["LayerNormalization"] == {None}
    if kind == "bert":  # (the attention model's file is mostly HDF5's own structure)
        assert out.stat().st_size < 0.6 * prep_inputs[kind].stat().st_size
