"""Export for serving (modelxform/export.py, `modelxform export`): a TensorFlow SavedModel that
tf.saved_model.load reads back and that computes what the Keras model computes."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

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
    with pytest.raises(ModelFileError, match=f"{a_file} is not a folder"):
        export_savedmodel(model, a_file / "such" / "dir")
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


def listing(folder) -> set[str]:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture
def exported_folder(tmp_path):
    """e/m.keras (the sample CNN) and e/notes.txt: a folder that holds the model to export."""
    folder = tmp_path / "e"
    folder.mkdir()
    save_model(make_cnn(), folder / "m.keras")
    (folder / "notes.txt").write_text("keep\n")
    return folder


@pytest.mark.parametrize("how", ["plain", "through-a-symlinked-folder", "hard-link", "dir-is-a-symlink"])
def test_export_force_refuses_to_replace_a_folder_that_holds_the_input(tmp_path, exported_folder, how):
    """`export e/m.keras e --force` deleted the folder e, the input model with it, then wrote the
    SavedModel (exit 0). Now refused before any work, exit 2, one line; nothing changes."""
    folder = exported_folder
    model, dest = folder / "m.keras", folder
    if how == "through-a-symlinked-folder":
        (tmp_path / "alias").symlink_to(folder)
        model = tmp_path / "alias" / "m.keras"
    elif how == "hard-link":
        model = tmp_path / "hard.keras"
        os.link(folder / "m.keras", model)
    elif how == "dir-is-a-symlink":
        dest = tmp_path / "alias"
        dest.symlink_to(folder)
    before, files = digest(folder / "m.keras"), listing(tmp_path)
    r = run_cli("export", model, dest, "--force")
    assert r.status == 2, r.err
    held = folder / "m.keras" if how == "hard-link" else model
    assert r.err == (f"error: --force {dest}: the folder holds the input model {held}; refusing to replace it "
                     "(export to another folder)\n")
    assert r.out == "" and digest(folder / "m.keras") == before and listing(tmp_path) == files


@pytest.mark.parametrize("how", ["itself", "symlink"])
def test_export_to_the_input_model_itself_is_refused(tmp_path, exported_folder, how):
    model = exported_folder / "m.keras"
    dest = model
    if how == "symlink":
        dest = tmp_path / "link.keras"
        dest.symlink_to(model)
    before, files = digest(model), listing(tmp_path)
    r = run_cli("export", model, dest, "--force")
    assert r.status == 2, r.err
    assert r.err == f"error: DIR {dest} is the input model; refusing to overwrite it\n"
    assert digest(model) == before and listing(tmp_path) == files


def test_export_makes_the_missing_parent_folders(tmp_path):
    """README's `export out.keras serving/prep/1` failed where serving/prep did not exist (TensorFlow
    Serving reads MODEL/VERSION folders): the parents are made, as mkdir -p does."""
    base = tmp_path / "out.keras"
    save_model(make_cnn(), base)
    dest = tmp_path / "serving" / "prep" / "1"
    r = run_cli("export", base, dest)
    assert r.status == 0, r.err
    assert (dest / "saved_model.pb").is_file()
    assert sorted(listing(tmp_path / "serving"))[:2] == ["prep", "prep/1"]
    assert [p for p in os.listdir(dest.parent) if p.startswith(".")] == []


def test_a_failed_export_removes_the_parent_folders_it_made(tmp_path, monkeypatch):
    from modelxform.keras_io import savedmodel
    base = tmp_path / "out.keras"
    save_model(make_cnn(), base)
    (tmp_path / "serving").mkdir()
    files = listing(tmp_path)

    def broken(model, filepath):
        raise ValueError("simulated failure while tracing")
    monkeypatch.setattr(savedmodel, "write_saved_model", broken)
    r = run_cli("export", base, tmp_path / "serving" / "prep" / "1")
    assert r.status == 3, r.err
    assert r.err == (f"error: {tmp_path / 'serving' / 'prep' / '1'}: cannot export the model as a SavedModel: "
                     "simulated failure while tracing\n")
    assert listing(tmp_path) == files  # serving/ was there before; serving/prep was made, and is gone


EXPORT_PROBE = """\
import sys
from modelxform.cli import main
status = main(sys.argv[1:])
print("STATUS", status)
print("LOADED", "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("case", ["no-model", "not-a-model", "not-empty", "under-a-file", "holds-the-input",
                                  "name-too-long"])
def test_export_checks_its_arguments_before_importing_tensorflow(tmp_path, case):
    """Every check of MODEL and DIR is made before TensorFlow's import (2-3 s), which only the export
    itself needs; each is one line with its exit status."""
    import subprocess
    import sys
    model = tmp_path / "m.keras"
    save_model(make_cnn(), model)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "junk.keras").write_bytes(b"not a zip at all")
    argv, status, message = {
        "no-model": (["missing.keras", "out"], 3, "error: missing.keras: no such file"),
        "not-a-model": (["junk.keras", "out"], 3, "error: junk.keras: not a .keras archive (a .keras file is a zip)"),
        "not-empty": (["m.keras", "full"], 3, "error: full: folder exists and is not empty; refusing to "
                                              "overwrite it (remove it, or pass --force)"),
        "under-a-file": (["m.keras", "m.keras/1"], 3, "error: m.keras/1: m.keras is not a folder"),
        "holds-the-input": (["m.keras", ".", "--force"], 2, "error: --force .: the folder holds the input model "
                                                            "m.keras; refusing to replace it (export to another "
                                                            "folder)"),
        "name-too-long": (["m.keras", "x" * 256], 3, f"error: {'x' * 256}: the name is 256 bytes long; this file "
                                                     "system allows at most 255"),
    }[case]
    files = listing(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", EXPORT_PROBE, "export", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert f"STATUS {status}" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr == message + "\n"
    assert "LOADED False False" in proc.stdout  # no TensorFlow, no Keras
    assert listing(tmp_path) == files


def test_apply_savedmodel_into_a_folder_that_is_not_empty_names_a_remedy_apply_has(tmp_path, monkeypatch):
    """apply said `(remove it, or pass --force)`, but apply has no --force; and it said so only after
    the recipe had run. Now at once, before the model is opened."""
    from modelxform import session
    base = tmp_path / "cnn.keras"
    save_model(make_cnn(), base)
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select dense_3\nscale weights 0.5\n")
    dest = tmp_path / "served"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep\n")
    opened = []
    monkeypatch.setattr(session, "open_model", lambda *a, **k: opened.append(a) or 1 / 0)
    files = listing(tmp_path)
    r = run_cli("apply", recipe, base, "-o", dest, "--format", "savedmodel")
    assert r.status == 3, r.err
    assert r.err == (f"error: {dest}: folder exists and is not empty; refusing to overwrite it "
                     "(remove it, or choose another folder)\n")
    assert opened == [] and listing(tmp_path) == files


def test_apply_savedmodel_usage_errors_say_what_is_wrong(tmp_path, model_file):
    from conftest import run_cli
    model = model_file("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text('recipe "t" version "1"\nselect where type=Dense; scale kernel 0.5\n')
    before = model.read_bytes()
    r = run_cli("apply", recipe, model, "-o", tmp_path / "sm", "--format", "savedmodel", "--in-place")
    assert (r.status, r.err) == (2, "error: --format savedmodel cannot go with --in-place (a SavedModel is a "
                                    "folder, not the input model file); write it with -o DIR\n")  # (-o DIR was given)
    r = run_cli("apply", recipe, model, "--format", "savedmodel")
    assert (r.status, r.err) == (2, "error: --format savedmodel needs -o DIR (a SavedModel is a folder, not the "
                                    "input model file)\n")
    assert model.read_bytes() == before and not (tmp_path / "sm").exists()
