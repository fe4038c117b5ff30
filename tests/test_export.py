"""Export for serving (modelxform/export.py, `modelxform export`): a TensorFlow SavedModel that
tf.saved_model.load reads back and that computes what the Keras model computes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import FACTORIES, make_cnn, run_cli

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from modelxform.errors import ModelFileError  # noqa: E402
from modelxform.export import PROVENANCE_PATH, export_savedmodel, read_export_provenance  # noqa: E402
from modelxform.keras_io.files import save_model  # noqa: E402

pytestmark = pytest.mark.slow


def random_inputs(model, seed=0, batch=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]


def as_list(y):
    if isinstance(y, dict):
        return [np.asarray(y[k]) for k in sorted(y)]
    if isinstance(y, (list, tuple)):
        return [np.asarray(v) for v in y]
    return [np.asarray(y)]


def leftovers(folder, name):
    return [p for p in os.listdir(folder) if p.startswith(f".{name}.")]


def test_savedmodel_serves_what_keras_computes(tmp_path):
    model = make_cnn()
    dest = tmp_path / "serving" / "1"
    dest.parent.mkdir()
    assert export_savedmodel(model, dest) == dest
    assert (dest / "saved_model.pb").is_file() and (dest / "variables").is_dir()
    assert leftovers(dest.parent, "1") == []
    loaded = tf.saved_model.load(str(dest))
    (x,) = random_inputs(model)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(loaded.serve(x)), expected, atol=1e-5, rtol=0)
    # the serving signature TensorFlow Serving calls
    sig = loaded.signatures["serving_default"]
    (out,) = sig(tf.constant(x)).values()
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
    assert not np.allclose(expected, expected[:1])  # the outputs depend on the input: the check means something


def stored_values(folder) -> dict:
    """The SavedModel's checkpoint: stored name -> number of values."""
    reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
    return {k: int(np.prod(s)) for k, s in reader.get_variable_to_shape_map().items() if "VARIABLE_VALUE" in k}


@pytest.mark.parametrize("kind", ["cnn", "multi_io", "nested"])
def test_savedmodel_stores_each_variable_once(tmp_path, kind):
    """Keras's model.export stores every weight twice with the TensorFlow backend (keras-team/keras#23553):
    twice the files, and twice the variables' memory in whatever loads them. modelxform's export stores
    each once, and the loaded object still lists the model's variables."""
    model = FACTORIES[kind]()
    dest = tmp_path / kind
    export_savedmodel(model, dest)
    stored = stored_values(dest)
    # (model.variables: the weights and any other state, such as a Dropout's seed)
    assert sum(stored.values()) == sum(int(np.prod(v.shape)) for v in model.variables) >= model.count_params() > 0, stored
    loaded = tf.saved_model.load(str(dest))
    assert (len(loaded.variables), len(loaded.trainable_variables), len(loaded.non_trainable_variables)) == \
        (len(model.variables), len(model.trainable_variables), len(model.non_trainable_variables))
    values = sorted((v.shape.as_list(), np.asarray(v).tobytes()) for v in loaded.variables)
    assert values == sorted((list(v.shape), np.asarray(v).tobytes()) for v in model.variables)
    xs = random_inputs(model, seed=3)
    for g, e in zip(as_list(loaded.serve(xs if len(xs) > 1 else xs[0])),
                    as_list(model(xs if len(xs) > 1 else xs[0], training=False))):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def test_a_keras_without_the_export_pieces_used_gets_its_own_export(tmp_path, monkeypatch):
    """Where Keras lacks what keras_io.savedmodel uses (an older Keras 3), the model is exported with
    model.export as it stands: the SavedModel serves what the model computes."""
    from keras.src.export import export_utils
    monkeypatch.delattr(export_utils, "get_input_signature")
    model = make_cnn()
    dest = tmp_path / "served"
    export_savedmodel(model, dest)
    loaded = tf.saved_model.load(str(dest))
    (x,) = random_inputs(model)
    np.testing.assert_allclose(np.asarray(loaded.serve(x)), np.asarray(model(x, training=False)), atol=1e-5, rtol=0)


def test_multi_input_multi_output_and_nested(tmp_path):
    for kind in ("multi_io", "nested"):
        model = FACTORIES[kind]()
        dest = tmp_path / kind
        export_savedmodel(model, dest)
        loaded = tf.saved_model.load(str(dest))
        xs = random_inputs(model, seed=1)
        expected = as_list(model(xs if len(xs) > 1 else xs[0], training=False))
        got = as_list(loaded.serve(xs if len(xs) > 1 else xs[0]))
        assert len(got) == len(expected) == len(model.outputs)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def test_cli_export_keeps_provenance_and_refuses_to_overwrite(tmp_path):
    base = tmp_path / "cnn.keras"
    save_model(make_cnn(), base)
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select dense_3\nscale weights 0.5\n")
    applied = tmp_path / "applied.keras"
    assert run_cli("apply", recipe, base, "-o", applied).status == 0
    dest = tmp_path / "exported"
    r = run_cli("export", applied, dest)
    assert r.status == 0, r.err
    assert f"wrote {dest} (TensorFlow SavedModel" in r.out
    assert "inputs: image (None, 28, 28, 1)" in r.out and "outputs: (None, 10)" in r.out
    record = read_export_provenance(dest)
    assert record["chain"][-1]["statements"][-1].startswith("scale weights 0.5")
    assert json.loads((dest / PROVENANCE_PATH).read_text()) == record
    model = keras.saving.load_model(applied)
    (x,) = random_inputs(model, seed=2)
    served = tf.saved_model.load(str(dest))  # kept in a name: TF frees the variables of a temporary
    np.testing.assert_allclose(np.asarray(served.serve(x)), np.asarray(model(x, training=False)), atol=1e-5, rtol=0)

    # an existing, non-empty folder is refused and left alone; --force replaces it
    before = sorted(os.listdir(dest))
    r = run_cli("export", base, dest)
    assert r.status == 3
    assert "folder exists and is not empty" in r.err and "--force" in r.err
    assert sorted(os.listdir(dest)) == before and read_export_provenance(dest) == record
    r = run_cli("export", base, dest, "--force")
    assert r.status == 0, r.err
    assert read_export_provenance(dest) is None  # base.keras has no record: this is the new export
    assert leftovers(tmp_path, "exported") == []


def test_cli_export_builds_the_model_from_the_archive(tmp_path, monkeypatch):
    """`export` of a .keras file builds the model as apply does, its large arrays left in the file until
    the export reads them (keras_io.variables.FromSource), and serves what Keras's loaded model computes,
    each variable stored once."""
    from modelxform.keras_io import variables
    from modelxform.keras_io.graph import GraphEditor
    monkeypatch.setattr(variables, "LARGE_ARRAY", 4096)  # the CNN's 61952-value Dense kernel stays in the file
    built = []
    real_build = GraphEditor.build
    monkeypatch.setattr(GraphEditor, "build", lambda self, *a, **k: built.append(1) or real_build(self, *a, **k))
    base = tmp_path / "cnn.keras"
    save_model(make_cnn(), base)
    dest = tmp_path / "exported"
    r = run_cli("export", base, dest)
    assert r.status == 0, r.err
    assert built  # (not loaded with Keras)
    model = keras.saving.load_model(base)
    assert sum(stored_values(dest).values()) == sum(int(np.prod(v.shape)) for v in model.variables)
    (x,) = random_inputs(model, seed=4)
    served = tf.saved_model.load(str(dest))
    np.testing.assert_array_equal(np.asarray(served.serve(x)), np.asarray(model(x, training=False)))


def test_cli_export_of_a_lora_file_serves_what_the_file_computes(tmp_path):
    """A file `lora` wrote keeps the factors beside the merged kernels Keras saves; the model export builds
    from the archive has them back (modelxform.load_model's model), not counted twice: the SavedModel
    serves what Keras's own loading of the file computes."""
    import modelxform
    base = tmp_path / "cnn.keras"
    save_model(make_cnn(), base)
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select where type=Dense\nlora rank 2\n")
    assert run_cli("apply", recipe, base, "-o", tmp_path / "lora.keras").status == 0
    model = modelxform.load_model(tmp_path / "lora.keras")
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if getattr(layer, "lora_enabled", False):  # factors as training would leave them
            layer.lora_kernel_a.assign(0.05 * rng.standard_normal(layer.lora_kernel_a.shape).astype("float32"))
            layer.lora_kernel_b.assign(0.05 * rng.standard_normal(layer.lora_kernel_b.shape).astype("float32"))
    trained = tmp_path / "trained.keras"
    save_model(model, trained)
    dest = tmp_path / "served"
    r = run_cli("export", trained, dest)
    assert r.status == 0, r.err
    (x,) = random_inputs(model, seed=6)
    expected = np.asarray(keras.saving.load_model(trained)(x, training=False))
    before = np.asarray(keras.saving.load_model(base)(x, training=False))
    assert np.abs(expected - before).max() > 1e-3  # the factors change what the model computes
    served = tf.saved_model.load(str(dest))
    np.testing.assert_allclose(np.asarray(served.serve(x)), expected, atol=1e-6, rtol=0)


def test_export_errors(tmp_path):
    model = make_cnn()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ModelFileError, match="is a file"):
        export_savedmodel(model, a_file)
    with pytest.raises(ModelFileError, match="does not exist"):
        export_savedmodel(model, tmp_path / "no" / "such" / "dir")
    r = run_cli("export", tmp_path / "missing.keras", tmp_path / "out")
    assert r.status == 3 and "missing.keras: no such file" in r.err
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from modelxform.keras_io import savedmodel
    model = make_cnn()

    def broken(model, filepath):
        os.makedirs(filepath)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as fh:
            fh.write(b"half")
        raise ValueError("simulated failure while tracing")
    monkeypatch.setattr(savedmodel, "write_saved_model", broken)
    with pytest.raises(ModelFileError, match="cannot export the model as a SavedModel: simulated failure"):
        export_savedmodel(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_apply_writes_a_savedmodel(tmp_path):
    base = tmp_path / "cnn.keras"
    save_model(make_cnn(), base)
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select dense_3\nscale weights 0.5\n")
    dest = tmp_path / "served"
    r = run_cli("apply", recipe, base, "-o", dest, "--format", "savedmodel")
    assert r.status == 0, r.err
    record = read_export_provenance(dest)
    assert record["chain"][-1]["statements"][-1].startswith("scale weights 0.5")
    keras_out = tmp_path / "same.keras"
    assert run_cli("apply", recipe, base, "-o", keras_out).status == 0
    model = keras.saving.load_model(keras_out)
    (x,) = random_inputs(model, seed=3)
    served = tf.saved_model.load(str(dest))
    np.testing.assert_allclose(np.asarray(served.serve(x)), np.asarray(model(x, training=False)), atol=1e-5, rtol=0)
