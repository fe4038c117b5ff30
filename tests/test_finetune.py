"""lora, merge lora, quantize and cast (issue 14): what each does to the selected layers, what the
file written keeps, what Keras's own loader gives back and what modelxform.load_model restores, and the
Keras behaviours they depend on (each checked here, so that a Keras release that changes one fails
loudly)."""
from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest

from conftest import make_attention, make_bert, make_bert_classifier, position, position_of
from modelxform import ModelxformError, apply_file, compile_recipe, load_model
from modelxform.keras_io.files import save_model, sha256_file
from modelxform.keras_io.initializers import initial_values
from modelxform.rng import derive_seed

QUERY, VALUE = "mha/query", "mha/value"


def _keras():
    from modelxform.keras_io.files import import_keras
    return import_keras()


def layers_by_path(model) -> dict:
    from modelxform.keras_io.layers import walk
    return {i.path: i.layer for i in walk(model)}


def probe(model, seed=0):
    from modelxform.keras_io.graph import call_model, probe_inputs
    inputs = probe_inputs(model, np.random.default_rng(seed), batch=2)
    return inputs, call_model(model, inputs)


def make_wide():
    """Dense(256) -> LayerNorm -> Dense(256) -> Dense(8): large enough that a cast shows in the file size."""
    keras = _keras()
    x = keras.Input((64,), name="x")
    init = dict(kernel_initializer=keras.initializers.GlorotUniform(seed=5))
    h = keras.layers.Dense(256, name="d1", **init)(x)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(256, name="d2", **init)(h)
    return keras.Model(x, keras.layers.Dense(8, name="out", **init)(h), name="wide")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    out = {}
    for name, factory in (("attention", make_attention), ("wide", make_wide)):
        out[name] = folder / f"{name}.keras"
        save_model(factory(), out[name])
    out["folder"] = folder
    return out


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    pytest.importorskip("keras_hub")
    path = tmp_path_factory.mktemp("finetune-bert") / "bert.keras"
    save_model(make_bert(), path)
    return path


def run(text, source, output, **kw):
    return apply_file(compile_recipe(text, "r.recipe"), source, output, **kw)


# ---- lora ------------------------------------------------------------------------------------------

LORA = 'seed 7\nselect "mha/query", "mha/value", head\nlora rank 4 alpha 8\nassert equivalent\n'


@pytest.fixture(scope="module")
def lora_file(files):
    out = files["folder"] / "attention-lora.keras"
    result = run(LORA, files["attention"], out)
    return out, result


def test_lora_seeds_a_zeroes_b_freezes_the_base_and_keeps_the_outputs(files, lora_file):
    keras = _keras()
    out, result = lora_file
    model = load_model(out)
    layers = layers_by_path(model)
    for path in (QUERY, VALUE, "head"):
        layer = layers[path]
        assert layer.lora_enabled and layer.lora_rank == 4 and layer.lora_alpha == 8
        # A's values are numpy's He-uniform (the same on every backend), seeded from the recipe's seed
        seed = derive_seed(7, "lora rank 4 alpha 8", 0, path, "lora_kernel_a") % (2**31 - 1)
        expected = initial_values(keras.initializers.HeUniform(), tuple(layer.lora_kernel_a.shape), "float32", seed)
        assert np.asarray(layer.lora_kernel_a).tobytes() == expected.tobytes()
        assert not np.any(np.asarray(layer.lora_kernel_b))
        assert not layer._kernel.trainable and layer.lora_kernel_a.trainable and layer.lora_kernel_b.trainable
    lines = result.plan.lines()
    assert any("mha/query: LoRA rank 4, alpha 8 (scale 2): lora_kernel_a (16, 2, 4) seeded he_uniform, "
               "lora_kernel_b (4, 8) zeros; kernel (16, 2, 8) frozen" in line for line in lines)
    before = sum(int(np.prod(v.shape)) for v in load_model(files["attention"]).trainable_weights)
    after = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert f"    trainable parameters: {before:,} -> {after:,}" in lines
    assert any("holds: largest difference 0" in line for line in lines)  # assert equivalent: exactly
    inputs, want = probe(load_model(files["attention"]))
    from modelxform.keras_io.graph import call_model
    assert np.array_equal(call_model(model, inputs)[0], want[0])


def test_the_file_keeps_the_factors_and_plain_keras_loads_it_as_documented(lora_file):
    keras = _keras()
    out, _ = lora_file
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["metadata.json", "config.json", "model.weights.h5", "modelxform.lora.h5",
                                 "modelxform.json"]
    restored = layers_by_path(load_model(out))
    plain = layers_by_path(keras.saving.load_model(out))  # the trap: what Keras's own loader gives
    # a sublayer (MultiHeadAttention's query) loses LoRA altogether
    assert not getattr(plain[QUERY], "lora_enabled", False)
    # a graph node keeps LoRA, but both factors are zero and alpha is the rank again (Keras's Dense bug)
    head = plain["head"]
    assert head.lora_enabled and head.lora_alpha == 4
    assert not np.any(np.asarray(head.lora_kernel_a)) and not np.any(np.asarray(head.lora_kernel_b))
    # modelxform.load_model puts back what the file keeps
    assert restored["head"].lora_alpha == 8 and np.any(np.asarray(restored["head"].lora_kernel_a))
    assert restored[QUERY].lora_enabled and np.any(np.asarray(restored[QUERY].lora_kernel_a))


def _train_step(model, loss_of):
    import tensorflow as tf
    keras = _keras()
    inputs, _ = probe(model, seed=1)
    structure = getattr(model, "_inputs_struct", None)
    feed = keras.tree.pack_sequence_as(structure, inputs) if isinstance(structure, dict) else inputs[0]
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    with tf.GradientTape() as tape:
        loss = loss_of(model(feed, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    optimizer.apply(grads, model.trainable_weights)


def test_one_training_step_on_the_reloaded_model_changes_the_factors(lora_file):
    keras = _keras()
    out, _ = lora_file
    model = load_model(out)
    before = {p: np.asarray(l.lora_kernel_b).copy() for p, l in layers_by_path(model).items()
              if getattr(l, "lora_enabled", False)}
    _train_step(model, lambda y: keras.ops.sum(keras.ops.square(y)))
    for path, b in before.items():
        assert not np.array_equal(np.asarray(layers_by_path(model)[path].lora_kernel_b), b), path
    # with Keras's loader both factors are zero: the gradient of each is zero, and nothing moves
    plain = keras.saving.load_model(out)
    _train_step(plain, lambda y: keras.ops.sum(keras.ops.square(y)))
    head = plain.get_layer("head")
    assert not np.any(np.asarray(head.lora_kernel_a)) and not np.any(np.asarray(head.lora_kernel_b))


def test_lora_on_a_keras_hub_backbone_is_restored_and_trains(bert_file, tmp_path):
    keras = _keras()
    out = tmp_path / "bert-lora.keras"
    run('select "*/query", "*/value"\nlora rank 4\nassert equivalent\n', bert_file, out)
    plain = keras.saving.load_model(out)
    assert not any(getattr(l, "lora_enabled", False) for l in plain._flatten_layers())  # a Backbone loses it
    model = load_model(out)
    lora = {p for p, l in layers_by_path(model).items() if getattr(l, "lora_enabled", False)}
    assert lora == {f"transformer_layer_{n}/self_attention_layer/{w}" for n in (0, 1) for w in ("query", "value")}
    path = "transformer_layer_0/self_attention_layer/query"
    before = np.asarray(layers_by_path(model)[path].lora_kernel_b).copy()
    _train_step(model, lambda y: keras.ops.sum(keras.ops.square(y["pooled_output"])))
    assert not np.array_equal(np.asarray(layers_by_path(model)[path].lora_kernel_b), before)


def test_lora_refuses_what_it_cannot_do_naming_the_layer(files):
    cases = [('select norm\nlora rank 2\n', "norm (LayerNormalization) cannot have LoRA adapters"),
             ('select head\nlora rank 2\nlora rank 2\n', "head already has LoRA adapters (rank 2)"),
             ('select head\nfreeze\nlora rank 2\n', "head's LoRA factors would not train: it is frozen"),
             ('select mha\nfreeze\nselect "mha/query"\nlora rank 2\n', "mha/query's LoRA factors would not train: "
                                                                       "mha around it is frozen"),
             ('select head\nquantize int8\nlora rank 2\n', "head is quantized (int8): add LoRA before `quantize`"),
             ('select head\nlora rank 2\nquantize int8\n', "head has LoRA adapters: `merge lora` first"),
             ('select head\nmerge lora\n', "none of the selected layers has LoRA adapters"),
             ('select head\nlora rank 2\ncast bfloat16\n', "head has LoRA adapters: cast before `lora`"),
             ('select head\nquantize int8\ncast bfloat16\n', "head is quantized (int8_from_float32): cast before"),
             ('select head\ncast float16\nquantize int8\n',  # Keras's own refusal, before anything changes
              "Quantization mode='int8' doesn't work well with compute_dtype='float16'")]
    for text, message in cases:
        with pytest.raises(ModelxformError) as info:
            run(text, files["attention"], None, dry_run=True)
        assert message in info.value.message, text
        # the refused statement: the last one
        assert position(info.value) == (len(text.splitlines()), 1), text


def test_an_h5_output_cannot_keep_the_factors(files, tmp_path):
    with pytest.raises(ModelxformError, match="keeps only in a .keras file"):
        run('select head\nlora rank 2\n', files["attention"], tmp_path / "out.h5")


# ---- merge lora --------------------------------------------------------------------------------------

def test_merge_lora_folds_the_factors_and_keeps_the_outputs(files, tmp_path):
    keras = _keras()
    trained = tmp_path / "trained.keras"
    run('select "mha/query", head\nlora rank 4 alpha 8\nadd noise normal(stddev=0.05) to lora_kernel_b\n',
        files["attention"], trained)
    lora_model = load_model(trained)
    layers = layers_by_path(lora_model)
    assert np.any(np.asarray(layers["head"].lora_kernel_b))
    with zipfile.ZipFile(trained) as zf:  # B is not zero: the file keeps the unmerged kernel too
        import h5py
        with h5py.File(io.BytesIO(zf.read("modelxform.lora.h5")), "r") as h5:
            assert sorted(h5["0"].keys()) == ["a", "b", "kernel"]
    base = np.asarray(layers["head"]._kernel).copy()
    inputs, want = probe(lora_model)
    merged = tmp_path / "merged.keras"
    result = run('select all\nmerge lora\n', trained, merged)
    assert "    head: LoRA rank 4, alpha 8 merged into its kernel; LoRA removed" in result.plan.lines()
    for model in (load_model(merged), keras.saving.load_model(merged)):
        from modelxform.keras_io.graph import call_model
        np.testing.assert_array_equal(call_model(model, inputs)[0], want[0])
        head = layers_by_path(model)["head"]
        assert not head.lora_enabled and [v.name for v in head.weights] == ["kernel", "bias"]
        assert head.kernel.trainable
        assert not np.array_equal(np.asarray(head.kernel), base)
    with zipfile.ZipFile(merged) as zf:
        assert "modelxform.lora.h5" not in zf.namelist()


# ---- quantize ------------------------------------------------------------------------------------------

def test_quantize_acts_on_the_selected_paths_only(files, tmp_path):
    """Keras's own filter matches names: every attention block has a `query`. A path selects one."""
    keras = _keras()
    out = tmp_path / "q.keras"
    result = run('select "mha/query", head\nquantize int8\n', files["attention"], out)
    model = keras.saving.load_model(out)  # Keras's own loader: the same policies
    from modelxform.keras_io.layers import walk
    modes = {i.path: getattr(i.layer, "quantization_mode", None) for i in walk(model)}
    assert modes == {QUERY: "int8", "mha/key": None, VALUE: None, "mha/attention_output": None, "norm": None,
                     "head": "int8"}
    lines = result.plan.lines()
    assert "    mha/query: float32 -> int8_from_float32, 1,088 -> 384 bytes" in lines
    assert "    bytes of the quantized layers: 1.36 KB -> 480 B" in lines
    query = layers_by_path(model)[QUERY]
    assert [(v.name, str(v.dtype)) for v in query.weights] == [("bias", "float32"), ("kernel", "int8"),
                                                               ("kernel_scale", "float32")]
    inputs, want = probe(load_model(files["attention"]))
    from modelxform.keras_io.graph import call_model
    assert np.abs(call_model(model, inputs)[0] - want[0]).max() < 0.05


def test_keras_own_quantize_of_attention_writes_a_file_keras_cannot_load(tmp_path):
    """Why quantize records a sublayer's policy in a DTypePolicyMap on the layer around it: Keras's
    MultiHeadAttention saves no policy of its sublayers (if a Keras release fixes this, the workaround
    may go)."""
    keras = _keras()
    import warnings
    model = make_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize("int8")
    model.save(tmp_path / "keras-int8.keras")
    with pytest.raises(ValueError, match="expected 2 variables, but received 0"):
        keras.saving.load_model(tmp_path / "keras-int8.keras")


def test_quantize_int4_with_a_block_size_and_float8(files, tmp_path):
    keras = _keras()
    out = tmp_path / "int4.keras"
    run('select "mha/*"\nquantize int4 block size 8\nselect head\nquantize float8\n', files["attention"], out)
    layers = layers_by_path(keras.saving.load_model(out))
    query = layers[QUERY]
    from modelxform.keras_io.finetune import policy_name
    assert policy_name(query) == "int4/8_from_float32"  # (its own entry of the attention layer's map)
    kernel = next(v for v in query.weights if v.name == "kernel")
    assert str(kernel.dtype) == "int8" and tuple(kernel.shape) == (16, 8)  # (16, 2·8) packed two per byte
    assert layers["head"].quantization_mode == "float8"


def test_quantize_a_keras_hub_backbone_reloads_and_saves_again(bert_file, tmp_path):
    keras = _keras()
    out = tmp_path / "bert-int8.keras"
    run('select where type in (Dense, EinsumDense)\nquantize int8\n', bert_file, out)
    plain = keras.saving.load_model(out)
    assert sum(1 for l in plain._flatten_layers() if l.quantization_mode == "int8") == 13
    # the Keras 3.15 bug: a loaded quantized Backbone cannot be saved again by Keras
    with pytest.raises(ValueError, match="Invalid dtype: object"):
        plain.save(tmp_path / "again.keras")
    # modelxform.load_model gives each layer its own policy: it saves, and reloads the same
    model = load_model(out)
    model.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    assert sum(1 for l in again._flatten_layers() if l.quantization_mode == "int8") == 13
    # and a second recipe on the quantized file can quantize more and write it
    more = tmp_path / "more.keras"
    run('select token_embedding, segment_embedding\nquantize int8\n', out, more)
    assert sum(1 for l in keras.saving.load_model(more)._flatten_layers() if l.quantization_mode) == 15
    text = 'select "*_embedding"\nquantize int8\n'
    with pytest.raises(ModelxformError, match="position_embedding \\(PositionEmbedding\\) cannot be quantized") as info:
        run(text, out, None, dry_run=True)
    assert position(info.value) == position_of(text, "quantize")


def test_quantize_and_cast_refuse_a_keras_hub_task_head(tmp_path):
    pytest.importorskip("keras_hub")
    path = tmp_path / "clf.keras"
    save_model(make_bert_classifier(), path)
    for statement in ("quantize int8", "cast bfloat16"):
        text = f"select logits\n{statement}\n"
        with pytest.raises(ModelxformError) as info:
            run(text, path, None, dry_run=True)
        assert "logits is inside the model (BertTextClassifier), whose saved config does not record its layers' " \
               "dtype policies" in info.value.message
        assert position(info.value) == position_of(text, statement.split()[0])
    out = tmp_path / "clf-int8.keras"
    run('select "bert_backbone/*/query"\nquantize int8\n', path, out)
    keras = _keras()
    reloaded = keras.saving.load_model(out)
    assert sorted(l.path for l in reloaded._flatten_layers() if l.quantization_mode) == \
        ["transformer_layer_0/self_attention_layer/query", "transformer_layer_1/self_attention_layer/query"]


def test_float8_is_refused_for_embeddings():
    keras = _keras()
    ids = keras.Input((5,), dtype="int32", name="ids")
    model = keras.Model(ids, keras.layers.Embedding(20, 4, name="emb")(ids))
    text = "select emb\nquantize float8\n"
    with pytest.raises(ModelxformError, match="emb \\(Embedding\\) cannot be quantized to float8") as info:
        compile_recipe(text).plan(model)
    assert position(info.value) == position_of(text, "quantize")


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    """A Dense model quantized to int8 by Keras itself: the kind of file the archive must decline."""
    keras = _keras()
    x = keras.Input((8,), name="x")
    model = keras.Model(x, keras.layers.Dense(4, name="out")(keras.layers.Dense(16, name="fc")(x)))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the InputLayer "has no quantize method")
        model.quantize("int8")
    path = tmp_path_factory.mktemp("int8") / "int8.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("fastpath", ["1", "0"])
@pytest.mark.parametrize("statement", ["scale kernel 0.5", "add noise normal(stddev=0.1) to weights",
                                       "prune kernel_scale 50%", "set kernel to zeros", "clip weights -1 1"])
def test_weight_statements_refuse_quantized_variables_on_every_path(int8_file, monkeypatch, statement, fastpath):
    monkeypatch.setenv("MODELXFORM_FASTPATH", fastpath)
    with pytest.raises(ModelxformError) as info:
        run(f"select fc\n{statement}\n", int8_file, None, dry_run=True)
    assert "fc is quantized (int8)" in info.value.message and "not a float weight" in info.value.message
    assert info.value.line == 2


def test_the_archive_declines_quantized_layers_and_a_bias_may_still_change(int8_file, tmp_path):
    from modelxform.keras_io.archive import Archive, NotApplicable
    with pytest.raises(NotApplicable, match=r"^a shared Int8QuantizationConfig \(of shared objects, only dtype "
                                            r"policies are read\)$"):
        Archive(int8_file)
    result = run("select fc\nscale bias 2\n", int8_file, tmp_path / "out.keras")
    assert result.source == "keras"


def test_a_weight_statement_after_quantize_is_refused_in_a_plan_too(files):
    text = "select head\nquantize int8\nscale kernel 0.5\n"
    with pytest.raises(ModelxformError, match="head is quantized \\(int8\\)") as info:
        run(text, files["attention"], None, dry_run=True)
    assert position(info.value) == position_of(text, "scale")


# ---- cast --------------------------------------------------------------------------------------------------

def test_cast_stores_bfloat16_as_bfloat16_reloads_and_shrinks_the_file(files, tmp_path):
    keras = _keras()
    import h5py
    out = tmp_path / "bf16.keras"
    result = run("select d1, d2\ncast bfloat16\n", files["wide"], out)
    assert "    d1: float32 -> bfloat16, 66,560 -> 33,280 bytes" in result.plan.lines()
    with zipfile.ZipFile(out) as zf:
        with h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as h5:
            kernel = h5["layers/dense/vars/0"]
            assert kernel.attrs["dtype"] == "bfloat16" and kernel.dtype.itemsize == 2
            assert h5["layers/dense_2/vars/0"].dtype == np.float32  # out: not selected
    assert out.stat().st_size < 0.6 * files["wide"].stat().st_size
    model = keras.saving.load_model(out)
    for name, policy in (("d1", "bfloat16"), ("d2", "bfloat16"), ("norm", "float32"), ("out", "float32")):
        layer = model.get_layer(name)
        assert layer.dtype_policy.name == policy and str(layer.kernel.dtype if hasattr(layer, "kernel")
                                                             else layer.gamma.dtype) == policy
    source = load_model(files["wide"])
    expected = np.asarray(source.get_layer("d1").kernel).astype(np.asarray(model.get_layer("d1").kernel).dtype)
    assert np.asarray(model.get_layer("d1").kernel).tobytes() == expected.tobytes()  # rounded as numpy rounds
    inputs, want = probe(source)
    from modelxform.keras_io.graph import call_model
    assert np.abs(call_model(model, inputs)[0].astype(np.float32) - want[0]).max() < 0.1


def test_cast_mixed_keeps_float32_variables(files, tmp_path):
    keras = _keras()
    out = tmp_path / "mixed.keras"
    run("select d1\ncast mixed_bfloat16\n", files["wide"], out)
    layer = keras.saving.load_model(out).get_layer("d1")
    assert layer.dtype_policy.name == "mixed_bfloat16" and str(layer.kernel.dtype) == "float32"
    assert layer.compute_dtype == "bfloat16"


def test_cast_sublayers_of_attention_and_of_a_backbone(files, bert_file, tmp_path):
    keras = _keras()
    out = tmp_path / "att-bf16.keras"
    run('select "mha/query"\ncast bfloat16\n', files["attention"], out)
    dtypes = {v.path: str(v.dtype) for v in keras.saving.load_model(out).weights}
    assert dtypes["mha/query/kernel"] == "bfloat16" and dtypes["mha/key/kernel"] == "float32"
    out = tmp_path / "bert-bf16.keras"
    run('select "transformer_layer_0/*"\ncast bfloat16\n', bert_file, out)
    dtypes = {v.path: str(v.dtype) for v in keras.saving.load_model(out).weights}
    assert dtypes["transformer_layer_0/self_attention_layer/query/kernel"] == "bfloat16"
    assert dtypes["transformer_layer_1/self_attention_layer/query/kernel"] == "float32"
    # then quantize other layers of the mapped Backbone: both kept
    mixed = tmp_path / "bert-mixed.keras"
    run('select "transformer_layer_1/self_attention_layer/*", "transformer_layer_0/self_attention_layer/key"\n'
        'quantize int8\n', out, mixed)
    reloaded = keras.saving.load_model(mixed)
    assert sum(1 for l in reloaded._flatten_layers() if l.quantization_mode == "int8") == 5
    assert {v.path: str(v.dtype) for v in reloaded.weights}[
        "transformer_layer_0/feedforward_intermediate_dense/kernel"] == "bfloat16"


def test_cast_all_of_a_backbone_halves_it(bert_file, tmp_path):
    keras = _keras()
    out = tmp_path / "bert-all.keras"
    run("select all\ncast bfloat16\n", bert_file, out)
    model = keras.saving.load_model(out)
    assert {str(v.dtype) for v in model.weights} == {"bfloat16"}
    assert model.dtype_policy.name == "bfloat16"
    assert out.stat().st_size < 0.7 * bert_file.stat().st_size


# ---- all four: bytes, provenance, plan, diff, report --------------------------------------------------

RECIPES = ['select "mha/query", head\nlora rank 4\n', 'select "mha/query", head\nquantize int8\n',
           'select "mha/query", head\ncast bfloat16\n', 'select head\nlora rank 2\nmerge lora\n']


@pytest.mark.parametrize("text", RECIPES, ids=["lora", "quantize", "cast", "merge"])
def test_outputs_are_reproducible_and_carry_provenance(files, tmp_path, text):
    from modelxform.keras_io.files import read_provenance
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    run(text, files["attention"], a, seed=3)
    time.sleep(2.1)  # nothing in the file may depend on the clock (HDF5 stamps objects unless told not to; zip times: 2 s)
    run(text, files["attention"], b, seed=3)
    assert sha256_file(a) == sha256_file(b)
    record = read_provenance(a)
    statements = record["chain"][-1]["statements"]
    assert any(line.startswith(text.splitlines()[1]) for line in statements)


def test_diff_shows_policy_dtype_and_lora_changes(files, tmp_path):
    from modelxform.diff import diff_files
    q, c, lo = tmp_path / "q.keras", tmp_path / "c.keras", tmp_path / "l.keras"
    run('select head\nquantize int8\n', files["attention"], q)
    run('select head\ncast bfloat16\n', files["attention"], c)
    run('select head\nlora rank 2 alpha 4\n', files["attention"], lo)
    lines = diff_files(files["attention"], q).lines()
    assert lines == ["changed   head (Dense)", "            dtype policy: float32 -> int8_from_float32",
                     "            kernel (16, 4): float32 -> int8", "            kernel_scale (4,) float32: added"]
    assert diff_files(files["attention"], q).counts()["dtype policy changed"] == 1
    lines = diff_files(files["attention"], c).lines()
    assert "            dtype policy: float32 -> bfloat16" in lines
    assert any(line.startswith("            kernel (16, 4): float32 -> bfloat16, max |diff|") for line in lines)
    lines = diff_files(files["attention"], lo).lines()
    assert "            LoRA: none -> rank 2, alpha 4" in lines
    assert "            lora_kernel_a (16, 2) float32: added" in lines


def test_the_report_marks_quantized_cast_and_lora_layers(files, tmp_path):
    from modelxform.diff import diff_files
    from modelxform.report_html import build_view, statements_from_report
    out = tmp_path / "all.keras"
    result = run('select "mha/query"\ncast bfloat16\nselect "mha/value"\nlora rank 2\nselect head\nquantize int8\n',
                 files["attention"], out)
    view = build_view(diff_files(files["attention"], out), title="t",
                      statements=statements_from_report(result.plan))
    tags = {n.path: n.tags for n in view.nodes if n.kind == "layer"}
    assert tags[QUERY][0] == "cast" and tags[VALUE][0] == "lora" and tags["head"][0] == "quantized"
    assert tags["mha/key"] == []
    assert [s["tag"] for s in statements_from_report(result.plan)] == ["cast", "lora", "quantized"]


def test_plan_reports_without_writing(files):
    from modelxform import plan_file
    plan = plan_file(compile_recipe('select head\nquantize int4\n'), files["attention"])
    assert any("head: float32 -> int4/128_from_float32" in line for line in plan.lines())


@pytest.mark.parametrize("text", ['select where type=Dense\nlora rank 2\n', 'select dense_1, dense_3\nquantize int8\n',
                                  'select where type in (Conv2D, Dense)\ncast bfloat16\n',
                                  'select dense_2\nlora rank 2\nmerge lora\n'],
                         ids=["lora", "quantize", "cast", "merge"])
def test_both_ways_in_give_the_same_bytes(model_file, monkeypatch, tmp_path, text):
    """From the archive (built once, without Keras's loader) and from the model loaded with Keras."""
    source = model_file("cnn")
    run(text, source, tmp_path / "archive.keras")
    monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    run(text, source, tmp_path / "keras.keras")
    assert sha256_file(tmp_path / "archive.keras") == sha256_file(tmp_path / "keras.keras")


def test_cast_and_lora_in_sequential_and_nested_models(model_file, tmp_path):
    keras = _keras()
    out = tmp_path / "seq-out.keras"
    run("select fc1\ncast float16\nselect fc2\nlora rank 2\n", model_file("sequential"), out)
    model = load_model(out)
    assert str(model.get_layer("fc1").kernel.dtype) == "float16" and model.get_layer("fc2").lora_enabled
    out = tmp_path / "nested-out.keras"
    run("select backbone/block/conv_a\ncast bfloat16\nselect head\nquantize int8\n", model_file("nested"), out)
    layers = layers_by_path(keras.saving.load_model(out))
    assert str(layers["backbone/block/conv_a"].kernel.dtype) == "bfloat16"
    assert str(layers["backbone/conv1"].kernel.dtype) == "float32" and layers["head"].quantization_mode == "int8"


def test_the_keras_internals_used_are_there():
    """keras_io/finetune.py and files.py (the loader) reach into these; a Keras release without them must fail here."""
    keras = _keras()
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.saving import saving_lib
    for name in ("_model_from_config", "_load_state", "_raise_loading_failure", "H5IOStore"):
        assert callable(getattr(saving_lib, name)), name
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    assert isinstance(dense._dtype_policy, keras.DTypePolicy) and dense._kernel is not None
    assert issubclass(keras.layers.Conv2D, BaseConv)
    emb = keras.layers.Embedding(5, 2)
    emb.build((None,))
    emb.enable_lora(1)
    assert emb._embeddings is not None and emb.lora_embeddings_a.shape == (5, 1)


def test_the_loader_reads_the_weights_in_place_and_loads_what_keras_loads(tmp_path, monkeypatch):
    import modelxform.keras_io.files as files_module
    keras = _keras()
    path = tmp_path / "wide.keras"
    save_model(make_wide(), path)
    seen = []
    from keras.src.saving import saving_lib
    original = saving_lib.H5IOStore.__init__

    def spy(self, path_or_io, *args, **kwargs):
        seen.append(type(path_or_io).__name__)
        original(self, path_or_io, *args, **kwargs)
    monkeypatch.setattr(saving_lib.H5IOStore, "__init__", spy)
    model = files_module.load_model(path)
    assert seen == ["BytesIO"]  # (an empty one: WindowStore opens the window instead)
    assert isinstance(model, keras.Model)
    want = keras.saving.load_model(path)
    assert model.get_config() == want.get_config()
    assert [v.path for v in model.weights] == [v.path for v in want.weights]
    for a, b in zip(model.weights, want.weights):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # a file whose weights do not fit is refused as Keras refuses it
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = data.replace(b'"units": 8', b'"units": 4', 1)
            dst.writestr(item, data)
    with pytest.raises(ModelxformError, match="the weights do not fit the model"):
        files_module.load_model(other)
