"""The models Keras users fine-tune today: attention sublayers, dict and integer inputs, and keras_hub
Backbone and Task models (Functional subclasses whose config holds constructor arguments), built small
from config with random weights (never downloaded)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FACTORIES, position, position_of, run_cli
from modelxform import ApplyError, AssertionFailed, apply_file, compile_recipe, load_model, plan_file
from modelxform.errors import ExitCode
from modelxform.keras_io.files import load_model as keras_load, save_model
from modelxform.keras_io.layers import walk

keras = pytest.importorskip("keras")

SEED = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """files(kind) -> the path of a .keras file of that model, built and saved once per module."""
    folder = tmp_path_factory.mktemp("hub-models")
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = folder / f"{kind}.keras"
            save_model(FACTORIES[kind](), made[kind])
        return made[kind]
    return get


def arrays(model) -> dict:
    return {f"{i.path}/{v.name}": np.asarray(v.numpy()) for i in walk(model) for v in i.weights}


def apply(text, path, out, **kw):
    return apply_file(compile_recipe(text, "r.recipe"), path, out, seed=SEED, **kw)


def bert_probe(batch=2, length=7):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(0, 100, (batch, length)).astype("int32"),
            "segment_ids": rng.integers(0, 2, (batch, length)).astype("int32"),
            "padding_mask": np.ones((batch, length), "int32")}


def trainable_paths(model) -> set:
    return {v.path for v in model.trainable_weights}


# ---- attention sublayers -------------------------------------------------------------------------------

def test_attention_sublayers_are_selectable_and_reinitialised_independently(files, tmp_path):
    path = files("attention")
    before = arrays(keras_load(path))
    assert [i.path for i in walk(keras_load(path))] == ["mha/query", "mha/key", "mha/value", "mha/attention_output",
                                                      "norm", "head"]
    plan = plan_file(compile_recipe("select where type=EinsumDense\nassert count == 4\n"), path)
    assert plan.statements[0].layers == ["mha/query", "mha/key", "mha/value", "mha/attention_output"]
    result = apply("select where type=MultiHeadAttention\nreinit kernel\n", path, tmp_path / "r.keras")
    assert result.plan.statements[0].layers == ["mha/query", "mha/key", "mha/value", "mha/attention_output"]
    after = arrays(keras_load(tmp_path / "r.keras"))
    q, k, v = (after[f"mha/{n}/kernel"] for n in ("query", "key", "value"))
    # three variables all called `kernel`, three independent streams: no two alike, none as before
    assert not np.array_equal(q, k) and not np.array_equal(q, v) and not np.array_equal(k, v)
    assert all(not np.array_equal(after[f"mha/{n}/kernel"], before[f"mha/{n}/kernel"])
               for n in ("query", "key", "value", "attention_output"))
    for key in ("mha/query/bias", "norm/gamma", "head/kernel"):
        assert after[key].tobytes() == before[key].tobytes()
    # the same seed again: the same bytes
    apply("select where type=MultiHeadAttention\nreinit kernel\n", path, tmp_path / "again.keras")
    assert (tmp_path / "again.keras").read_bytes() == (tmp_path / "r.keras").read_bytes()


def test_noise_streams_are_keyed_by_each_variables_path(files, tmp_path):
    path = files("attention")
    before = arrays(keras_load(path))
    apply("select mha\nadd noise normal(stddev=1) to kernel\n", path, tmp_path / "n.keras")
    after = arrays(keras_load(tmp_path / "n.keras"))
    deltas = [after[f"mha/{n}/kernel"] - before[f"mha/{n}/kernel"] for n in ("query", "key", "value")]
    assert not np.allclose(deltas[0], deltas[1]) and not np.allclose(deltas[1], deltas[2])
    assert abs(float(np.std(deltas[0])) - 1.0) < 0.2


def test_structural_statements_refuse_a_sublayer_and_say_why(files, tmp_path):
    path = files("attention")
    for text in ("replace mha/query with Dense(units=16)", "tap mha/query", 'insert Dropout(rate=0.1) after mha/key'):
        with pytest.raises(ApplyError) as info:
            apply(text + "\n", path, tmp_path / "x.keras")
        assert "is a sublayer of mha (MultiHeadAttention)" in info.value.message, info.value.message
        assert info.value.line == 1
    assert not (tmp_path / "x.keras").exists()


def test_a_frozen_attention_layer_keeps_its_flag_through_load_model(files, tmp_path):
    """Keras saves a MultiHeadAttention's trainable flag but its loader leaves the sublayers' variables
    trainable; the report says so, and modelxform.load_model puts the flag back."""
    path = files("attention")
    result = apply("select mha\nfreeze\n", path, tmp_path / "f.keras")
    assert result.plan.statements[1].changes == ["mha: trainable True -> False (its 4 layers)"]
    assert "its loader does not pass it on" in result.plan.statements[1].notes[0]
    ours = load_model(tmp_path / "f.keras")
    assert trainable_paths(ours) == {"head/kernel", "head/bias", "norm/gamma", "norm/beta"}
    plain = keras.saving.load_model(tmp_path / "f.keras")
    assert any(p.startswith("mha/") for p in trainable_paths(plain)), \
        "Keras now restores a composite layer's flag: the note and load_model's fix-up can go"


def test_a_sublayers_flag_is_refused_by_apply_and_shown_by_plan(files, tmp_path):
    path = files("attention")
    recipe = compile_recipe("select mha/query\nfreeze\n", "r.recipe")
    plan = plan_file(recipe, path)
    assert "apply refuses this: mha/query is a sublayer of mha" in "\n".join(plan.lines())
    r = run_cli("apply", _write(tmp_path, "select mha/query\nfreeze\n"), path, "-o", tmp_path / "o.keras")
    assert r.status == ExitCode.APPLY
    assert "r.recipe:2:1: error: `freeze`: mha/query is a sublayer of mha, and Keras saves no sublayer's " \
           "trainable flag, so a written file would lose it; nothing was written" in r.err
    assert not (tmp_path / "o.keras").exists()


def _write(folder, text):
    path = folder / "r.recipe"
    path.write_text(text)
    return path


# ---- dict and integer inputs ------------------------------------------------------------------------------

def test_structural_statements_on_dict_inputs(files, tmp_path):
    path = files("dict_inputs")
    text = "insert Dropout(rate=0.5) after cat\ntap hidden\nassert equivalent\n"
    plan = plan_file(compile_recipe(text, "r.recipe"), path)
    assert plan.after[0] == plan.before[0] + 1
    result = apply(text, path, tmp_path / "d.keras")
    assert "holds: largest difference 0" in result.plan.statements[-1].notes[0]
    model = keras_load(tmp_path / "d.keras")
    assert isinstance(model.input, dict) and sorted(model.input) == ["a", "b"]
    probe = {"a": np.ones((2, 4), "float32"), "b": np.full((2, 3), 2.0, "float32")}
    original = keras_load(path)
    hidden = keras.Model(original.input, original.get_layer("hidden").output)(probe)
    out, tapped = model(probe)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(original(probe)))
    np.testing.assert_array_equal(np.asarray(tapped), np.asarray(hidden))
    appended = apply('append Dense(units=3, name="extra") after out\n', path, tmp_path / "e.keras")
    assert appended.plan.after[0] == appended.plan.before[0] + 1
    assert keras_load(tmp_path / "e.keras")(probe).shape == (2, 3)
    cut = apply("cut after hidden\n", path, tmp_path / "c.keras")
    assert cut.plan.after[0] == 2 and sorted(keras_load(tmp_path / "c.keras").input) == ["a", "b"]


def test_assert_equivalent_probes_integer_inputs_within_the_embedding(files, tmp_path):
    path = files("tokens")
    result = apply("insert Dropout(rate=0.5) after emb\nassert equivalent\n", path, tmp_path / "t.keras")
    assert "holds: largest difference 0" in result.plan.statements[1].notes[0]
    text = "select score\nscale kernel 3\nassert equivalent\n"
    with pytest.raises(AssertionFailed) as info:
        apply(text, path, tmp_path / "u.keras")
    assert "assert equivalent failed: outputs differ" in info.value.message
    assert position(info.value) == position_of(text, "assert")


# ---- keras_hub ------------------------------------------------------------------------------------------

hub = pytest.importorskip("keras_hub")


def test_freeze_all_but_the_last_block_needs_unwrap_and_then_holds(files, tmp_path):
    path = files("bert")
    text = 'select all\nfreeze\nselect "transformer_layer_1/*"\nunfreeze\n'
    with pytest.raises(ApplyError) as info:
        apply(text, path, tmp_path / "no.keras")
    assert "is inside the model, whose own flag is False" in info.value.message
    assert "unwrap" in info.value.hint
    assert position(info.value) == position_of(text, "unfreeze")
    result = apply("unwrap\n" + text, path, tmp_path / "ft.keras")
    assert "transformer_layer_1: trainable False -> True (its 8 layers)" in result.plan.statements[-1].changes
    model = load_model(tmp_path / "ft.keras")
    assert trainable_paths(model) == {v.path for v in model.get_layer("transformer_layer_1").weights}
    assert len(trainable_paths(model)) == 16
    original = keras_load(path)
    np.testing.assert_allclose(np.asarray(keras.tree.flatten(model(bert_probe()))[0]),
                               np.asarray(keras.tree.flatten(original(bert_probe()))[0]), atol=1e-6)


def test_noise_on_the_query_and_value_projections_only(files, tmp_path):
    path = files("bert")
    before = arrays(keras_load(path))
    result = apply('select "*/query", "*/value"\nadd noise normal(stddev=0.1) to kernel\n', path, tmp_path / "n.keras")
    assert len(result.plan.statements[0].layers) == 4
    after = arrays(keras_load(tmp_path / "n.keras"))
    changed = sorted(k for k in before if before[k].tobytes() != after[k].tobytes())
    assert changed == sorted(f"transformer_layer_{b}/self_attention_layer/{p}/kernel"
                             for b in (0, 1) for p in ("query", "value"))


def test_unwrap_and_tap_a_middle_block(files, tmp_path):
    path = files("bert")
    result = apply("unwrap\ntap transformer_layer_0\n", path, tmp_path / "feat.keras")
    assert result.plan.statements[0].changes == [
        "the model: BertBackbone -> Functional (the BertBackbone class is dropped; its layers and weights stay)"]
    model = keras_load(tmp_path / "feat.keras")
    assert type(model).__name__ == "Functional" and sorted(model.output) == [
        "pooled_output", "sequence_output", "transformer_layer_0"]
    original = keras_load(path)
    middle = keras.Model(original.input, original.get_layer("transformer_layer_0").output)
    np.testing.assert_allclose(np.asarray(model(bert_probe())["transformer_layer_0"]),
                               np.asarray(middle(bert_probe())), atol=1e-6)


def test_a_new_head_on_a_classifier(files, tmp_path):
    path = files("bert_classifier")
    text = 'unwrap\nreplace logits with Dense(units=3, name="logits")\nassert output shape == (None, 3)\n'
    result = apply(text, path, tmp_path / "h.keras")
    assert "logits: Dense -> Dense" in result.plan.statements[1].changes[0]
    before, after = arrays(keras_load(path)), arrays(keras_load(tmp_path / "h.keras"))
    for key in before:
        if key.startswith("bert_backbone/"):
            assert before[key].tobytes() == after[key].tobytes(), key
    assert after["logits/kernel"].shape == (64, 3)


def test_insert_then_assert_equivalent_and_verify(files, tmp_path):
    path = files("bert")
    text = "unwrap\ninsert Dropout(rate=0.2) after transformer_layer_0\nassert equivalent\n"
    result = apply(text, path, tmp_path / "eq.keras")
    assert "holds: largest difference 0" in result.plan.statements[-1].notes[0]
    r = run_cli("verify", tmp_path / "eq.keras", "--input", path)
    assert r.status == 0 and "verified" in r.out, r.out + r.err


def test_verify_a_weight_edit_of_a_task(files, tmp_path):
    """Loading a Task twice in one process used to rename its optimizer (adam -> adam_1)."""
    path = files("bert_classifier")
    apply('select "*/query"\nadd noise normal(stddev=0.01) to kernel\n', path, tmp_path / "q.keras")
    r = run_cli("verify", tmp_path / "q.keras", "--input", path)
    assert r.status == 0 and "verified" in r.out, r.out + r.err


def test_a_backbone_in_a_users_model_freezes_as_a_whole(files, tmp_path):
    path = files("wrapped_bert")
    result = apply("select bert_backbone\nfreeze\n", path, tmp_path / "w.keras")
    assert result.plan.statements[1].changes == ["bert_backbone: trainable True -> False (its 23 layers)"]
    reloaded = keras_load(tmp_path / "w.keras")
    assert not reloaded.get_layer("bert_backbone").trainable
    assert trainable_paths(reloaded) == {"head/kernel", "head/bias"}
    with pytest.raises(ApplyError) as info:
        apply("select bert_backbone/pooled_dense\nset trainable = False\n", path, tmp_path / "s.keras")
    assert "bert_backbone (BertBackbone), a model class whose saved config holds its constructor arguments" \
        in info.value.message
    assert "unwrap bert_backbone" in info.value.hint


def test_set_on_a_layer_inside_a_backbone_is_refused_at_the_set_statement(files, tmp_path):
    text = "select bert_backbone/pooled_dense\nset trainable = False\n"
    with pytest.raises(ApplyError, match="a model class whose saved config holds its constructor arguments") as info:
        apply(text, files("wrapped_bert"), tmp_path / "s.keras")
    assert position(info.value) == position_of(text, "set")


def test_gpt2s_attention_is_named_when_bert_s_is_asked_for(files, tmp_path):
    """A recipe written for BERT (`type=MultiHeadAttention`) on GPT-2, whose attention layers are
    keras_hub's CachedMultiHeadAttention: the error names that class."""
    text = "select where type=MultiHeadAttention\nlora rank 4\n"
    with pytest.raises(ApplyError) as info:
        apply(text, files("gpt2_lm"), tmp_path / "g.keras")
    assert info.value.message == ("where type=MultiHeadAttention matches no layer "
                                  "(did you mean 'type=CachedMultiHeadAttention'?)")
    assert position(info.value) == position_of(text, "select")


def test_tied_embeddings_are_shown_and_unwrap_refuses_them(files, tmp_path):
    path = files("gpt2_lm")
    r = run_cli("inspect", path)
    assert r.status == 0
    assert "shared (called more than once): gpt2_backbone/token_embedding ×2" in r.out
    assert "output 0: gpt2_backbone/token_embedding (None, None, 100)" in r.out
    with pytest.raises(ApplyError) as info:
        apply("unwrap\n", path, tmp_path / "u.keras")
    assert "token_embedding is used inside gpt2_backbone and again in the graph around it" in info.value.message
    assert position(info.value) == position_of("unwrap\n", "unwrap")


def test_a_layer_that_cannot_rebuild_from_its_config_fails_unwrap_in_one_line(files, tmp_path):
    """keras_hub 0.32's ViTPatchingAndEmbedding writes config keys its constructor refuses."""
    r = run_cli("apply", _write(tmp_path, "unwrap\n"), files("vit"), "-o", tmp_path / "v.keras")
    assert r.status == ExitCode.APPLY
    assert r.err.startswith(f"{tmp_path / 'r.recipe'}:1:1: error: `unwrap`: the edited model does not build")
    assert "Traceback" not in r.err and not (tmp_path / "v.keras").exists()


def test_reinit_knows_keras_hubs_initializers_and_says_where_none_is_known(files, tmp_path):
    result = apply("select position_embedding\nreinit weights\n", files("bert"), tmp_path / "p.keras")
    assert result.plan.statements[1].changes == [
        "position_embedding: embeddings (32, 64) reinitialised with its own initializer"]
    plan = None
    text = "select vit_patching_and_embedding\nreinit weights\n"
    with pytest.raises(ApplyError) as info:
        plan = plan_file(compile_recipe(text, "r.recipe"), files("vit"))
    assert plan is None
    assert "no initializer is known for vit_patching_and_embedding: class_token" in info.value.message
    assert position(info.value) == position_of(text, "reinit")


def test_inspect_folds_blocks_with_depth(files):
    import json
    r = run_cli("inspect", files("bert_classifier"), "--depth", "2", "--json")
    assert r.status == 0
    rows = {row["path"]: row for row in json.loads(r.out)["layers"]}
    assert len(rows) == 11 and sum(row["params"] for row in rows.values()) == 79_938
    assert rows["bert_backbone/transformer_layer_0"]["type"] == "TransformerEncoder (8 layers)"
    assert rows["bert_backbone/transformer_layer_0"]["params"] == 33_472
    everything = json.loads(run_cli("inspect", files("bert_classifier"), "--json").out)["layers"]
    assert "bert_backbone/transformer_layer_0/self_attention_layer/query" in [row["path"] for row in everything]


def test_a_written_keras_hub_model_loads_in_a_fresh_process(files, tmp_path):
    """keras_hub is imported by Keras itself when a file names its classes (never by modelxform)."""
    import subprocess
    import sys
    apply('unwrap\nselect "transformer_layer_0/*"\nfreeze\n', files("bert"), tmp_path / "f.keras")
    code = ("import modelxform, sys; m = modelxform.load_model(sys.argv[1]); "
            "print(type(m).__name__, len(m.trainable_weights), 'keras_hub' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.keras")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["Functional", "23", "True"]


def test_the_report_draws_a_keras_hub_model_connected(files):
    """The graph of a Functional subclass is read through a plain functional model of it; a transformer
    block is a box holding its sublayers, entered at the first and left from the last; keras_hub's
    `x[:, 0, :]` (an operation, not a layer) passes on what it reads."""
    from modelxform.diff import diff, snapshot
    from modelxform.report_html import build_view, to_dot
    model = keras_load(files("bert"))
    view = build_view(diff(snapshot(model), snapshot(model)), title="bert")
    path = {n.id: n.path for n in view.nodes}
    pairs = {(path[s], path[d]) for s, d, _ in view.edges}
    assert ("token_ids", "token_embedding") in pairs
    assert ("embeddings_dropout", "transformer_layer_0/self_attention_layer/query") in pairs
    assert ("transformer_layer_0/feedforward_output_dense", "transformer_layer_1/self_attention_layer/query") in pairs
    assert ("transformer_layer_1/feedforward_output_dense", "pooled_dense") in pairs
    top = [n.path for n in view.nodes if n.kind == "layer" and "/" not in n.path]
    assert all(any(p in pair for pair in pairs) for p in top), "a top-level layer without an edge"
    dot = to_dot(view)
    assert 'label="transformer_layer_0 (TransformerEncoder)"' in dot
    assert 'label="transformer_layer_0/self_attention_layer (MultiHeadAttention)"' in dot


def test_a_path_into_a_subclassed_model_says_why_it_cannot_be_edited(tmp_path):
    from conftest import subclassed_class
    inner = subclassed_class()(name="two_layer")
    x = keras.Input((4,), name="x")
    model = keras.Model(x, keras.layers.Dense(3, name="out")(inner(x)), name="outer")
    save_model(model, tmp_path / "m.keras")
    result = apply("select two_layer/d1\nscale kernel 2\n", tmp_path / "m.keras", tmp_path / "w.keras")
    assert result.plan.statements[1].changes == ["two_layer/d1: kernel (4, 6) × 2"]
    with pytest.raises(ApplyError) as info:
        apply("tap two_layer/d1\n", tmp_path / "m.keras", tmp_path / "t.keras")
    assert info.value.message == ("two_layer/d1 is inside two_layer (TwoLayer), a subclassed model: its forward "
                                  "pass is Python code, not a graph modelxform can edit")
    assert position(info.value) == position_of("tap two_layer/d1\n", "two_layer/d1")
