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
    model = make_cnn()

    def broken(filepath, **kwargs):
        os.makedirs(filepath)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as fh:
            fh.write(b"half")
        raise ValueError("simulated failure while tracing")
    monkeypatch.setattr(model, "export", broken)
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
