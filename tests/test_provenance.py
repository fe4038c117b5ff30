"""Byte-identical outputs, provenance inside the model, verify, and randomness that does not drift."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from conftest import ROOT, make_cnn, run_cli, weights_by_path, assert_bit_identical
from modelxform import compile_recipe
from modelxform.keras_io.files import PROVENANCE_MEMBER, load_model, read_provenance, save_model, sha256_file

EXAMPLE = ROOT / "recipes" / "example.recipe"
PERTURB = ROOT / "recipes" / "perturb-dense.recipe"


def test_saving_twice_seconds_apart_gives_the_same_bytes(tmp_path):
    model = make_cnn()
    save_model(model, tmp_path / "a.keras")
    time.sleep(2.1)  # zip timestamps have a two-second resolution
    save_model(model, tmp_path / "b.keras")
    assert sha256_file(tmp_path / "a.keras") == sha256_file(tmp_path / "b.keras")


def test_source_date_epoch_sets_the_recorded_date(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # 2023-11-14 22:13:20 UTC
    save_model(make_cnn(), tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        assert json.loads(zf.read("metadata.json"))["date_saved"] == "2023-11-14@22:13:20"
        assert {i.date_time for i in zf.infolist()} == {(2023, 11, 14, 22, 13, 20)}


def test_apply_twice_gives_identical_files_and_a_provenance_member(tmp_path, model_file):
    model = model_file("cnn")
    for name in ("a", "b"):
        assert run_cli("apply", EXAMPLE, model, "-o", tmp_path / f"{name}.keras", "--seed", 7).status == 0
    assert sha256_file(tmp_path / "a.keras") == sha256_file(tmp_path / "b.keras")
    with zipfile.ZipFile(tmp_path / "a.keras") as zf:
        assert PROVENANCE_MEMBER in zf.namelist()
    import keras
    assert len(keras.models.load_model(tmp_path / "a.keras").outputs) == 2  # plain Keras still loads it
    record = read_provenance(tmp_path / "a.keras")
    (step,) = record["chain"]
    recipe = compile_recipe(EXAMPLE.read_text(), str(EXAMPLE))
    assert step["recipe"]["text"] == recipe.program.inlined_text()
    import hashlib
    assert step["recipe"]["sha256"] == hashlib.sha256(step["recipe"]["text"].encode()).hexdigest()
    assert (step["recipe"]["name"], step["recipe"]["version"]) == ("design-card-example", "1.0.0")
    assert step["input_sha256"] == sha256_file(model)
    assert step["seed"] == 7 and step["params"] == {}
    assert set(step["versions"]) >= {"modelxform", "keras", "tensorflow", "numpy"}
    assert [s.split(" :: ")[0] for s in step["statements"]] == [
        "select random where type=Dense", "scale weights 0.8", "replace MaxPooling2D with AveragePooling2D",
        "tap conv2d_1"]


def test_chain_of_three_recipes_and_verify(tmp_path, model_file):
    original = model_file("cnn")
    a, b, c = (tmp_path / f"{n}.keras" for n in "abc")
    assert run_cli("apply", EXAMPLE, original, "-o", a, "--seed", 7).status == 0
    assert run_cli("apply", PERTURB, a, "-o", b, "--param", "sparsity=25").status == 0
    assert run_cli("apply", ROOT / "recipes" / "freeze-features.recipe", b, "-o", c).status == 0
    record = read_provenance(c)
    assert [s["recipe"]["name"] for s in record["chain"]] == ["design-card-example", "perturb-dense", "freeze-features"]
    assert [s["input_sha256"] for s in record["chain"]] == [sha256_file(p) for p in (original, a, b)]
    assert record["chain"][1]["params"] == {"sparsity": 25, "stddev": 0.01}

    shown = run_cli("provenance", c)
    assert shown.status == 0
    assert "1. recipe design-card-example version 1.0.0" in shown.out
    assert "3. recipe freeze-features version 1.0.0" in shown.out
    assert "seed 42, params sparsity=25, stddev=0.01" in shown.out
    raw = run_cli("provenance", c, "--json")
    assert json.loads(raw.out) == record

    ok = run_cli("verify", c, "--input", original)
    assert ok.status == 0, ok.out + ok.err
    assert "verified" in ok.out

    wrong = run_cli("verify", c, "--input", a)
    assert wrong.status == 1 and "is not the file this model was made from" in wrong.out


def _tampered(tmp_path, model_file):
    """(original, output of PERTURB whose dense_2 kernel was then moved by 1e-3, record kept)."""
    original = model_file("cnn")
    out = tmp_path / "out.keras"
    assert run_cli("apply", PERTURB, original, "-o", out).status == 0
    model = load_model(out)
    kernel = model.get_layer("dense_2").kernel
    kernel.assign(np.asarray(kernel.numpy()) + np.float32(1e-3))
    save_model(model, out, provenance=read_provenance(out))
    return original, out


def test_verify_names_a_tampered_weight(tmp_path, model_file):
    original, out = _tampered(tmp_path, model_file)
    r = run_cli("verify", out, "--input", original)
    assert r.status == 1
    assert "dense_2: kernel differs (max abs difference 0.001)" in r.out


def test_h5_output_carries_its_record_inside(tmp_path, model_file):
    """The record is an attribute of the HDF5 file (Keras ignores it), so model and record are written and
    renamed together (issue 16); a sidecar OUT.provenance.json of an earlier version is still read."""
    import h5py
    from modelxform.keras_io.files import H5_PROVENANCE_ATTRIBUTE
    original = model_file("cnn")
    out = tmp_path / "out.h5"
    side = tmp_path / "out.provenance.json"
    side.write_text("{}")  # an earlier version's record of an earlier file
    assert run_cli("apply", EXAMPLE, original, "-o", out, "--seed", 7).status == 0
    assert not side.exists()  # removed: no longer true
    with h5py.File(out, "r") as f:
        record = json.loads(f.attrs[H5_PROVENANCE_ATTRIBUTE])
    assert record == read_provenance(out)
    assert record["chain"][0]["input_sha256"] == sha256_file(original)
    assert run_cli("verify", out, "--input", original).status == 0
    # an .h5 file written before, with its record beside it
    with h5py.File(out, "r+") as f:
        del f.attrs[H5_PROVENANCE_ATTRIBUTE]
    side.write_text(json.dumps(record))
    assert read_provenance(out) == record
    assert run_cli("verify", out, "--input", original).status == 0


def test_provenance_command_does_not_import_tensorflow(tmp_path, model_file):
    original = model_file("cnn")
    out = tmp_path / "out.keras"
    assert run_cli("apply", EXAMPLE, original, "-o", out).status == 0
    code = ("import sys; from modelxform.cli import main; status = main(['provenance', sys.argv[1]]); "
            "print('TF' if {'tensorflow', 'keras'} & set(sys.modules) else 'no TF', status)")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "no TF 0"


def test_provenance_of_a_model_without_record(model_file):
    r = run_cli("provenance", model_file("cnn"))
    assert r.status == 2 and "has no modelxform provenance record" in r.err


# ---- randomness that does not drift ------------------------------------------------------------

def _apply(text, seed=5):
    return compile_recipe(text).apply(make_cnn_cached(), seed=seed)


_CNN = []


def make_cnn_cached():
    if not _CNN:
        _CNN.append(make_cnn())
    return _CNN[0]


def test_an_unrelated_statement_does_not_change_the_others():
    base = "select random where type=Dense\nadd noise normal(stddev=0.1) to kernel\n"
    with_extra = "select where type=Conv2D\nscale kernel 2\n" + base
    a, report_a = _apply(base)
    b, report_b = _apply(with_extra)
    assert report_a.statements[0].layers == report_b.statements[2].layers  # same random pick
    picked = report_a.statements[0].layers[0]
    assert_bit_identical(weights_by_path(a)[picked], weights_by_path(b)[picked])


def test_identical_statements_draw_differently_and_seed_matters():
    one, _ = _apply("select where type=Dense\nadd noise normal(stddev=0.1) to kernel\n")
    two, _ = _apply("select where type=Dense\nadd noise normal(stddev=0.1) to kernel\n"
                    "add noise normal(stddev=0.1) to kernel\n")
    base = weights_by_path(make_cnn_cached())["dense_3"][0]
    first = weights_by_path(one)["dense_3"][0] - base
    both = weights_by_path(two)["dense_3"][0] - base
    assert not np.allclose(both, 2 * first)  # the second draw is not a copy of the first
    other_seed, _ = _apply("select where type=Dense\nadd noise normal(stddev=0.1) to kernel\n", seed=6)
    assert not np.array_equal(weights_by_path(other_seed)["dense_3"][0], weights_by_path(one)["dense_3"][0])


def test_noise_of_a_layer_does_not_depend_on_which_other_layers_are_selected():
    # per-layer draws depend on the seed, the statement, its occurrence, the layer path and variable:
    # not on how many other layers the selection holds or where the layer sits in it
    a, _ = _apply("select where type=Dense\nadd noise uniform(low=-1, high=1) to kernel\n")
    b, _ = _apply("select dense_3\nadd noise uniform(low=-1, high=1) to kernel\n")
    assert_bit_identical(weights_by_path(a)["dense_3"], weights_by_path(b)["dense_3"])
    assert not np.array_equal(weights_by_path(a)["dense_3"][0], weights_by_path(make_cnn_cached())["dense_3"][0])


# ---- the archive writer: the normalised form written at once -------------------------------------------

@pytest.mark.parametrize("kind", ["cnn", "sequential", "nested", "shared", "multi_io"])
def test_the_archive_is_written_at_once_as_keras_save_then_normalising_would(tmp_path, kind, monkeypatch):
    from conftest import FACTORIES
    from modelxform.keras_io import files as model_io
    model = FACTORIES[kind]()
    record = {"format": "test", "chain": []}
    save_model(model, tmp_path / "direct.keras", provenance=record)
    # the way it was written before: model.save (which, for a model that fits in memory, writes the
    # weights file into memory with h5py's file-object driver), then the archive rewritten
    monkeypatch.setattr(model_io, "_write_keras_archive", lambda *args: False)
    save_model(model, tmp_path / "two-step.keras", provenance=record)
    assert (tmp_path / "direct.keras").read_bytes() == (tmp_path / "two-step.keras").read_bytes()
    loaded = load_model(tmp_path / "direct.keras")
    for path, arrays in weights_by_path(model).items():
        assert_bit_identical(arrays, weights_by_path(loaded)[path])


def test_a_model_with_assets_is_saved_by_keras_and_loads_back(tmp_path):
    from modelxform.keras_io import files as model_io
    keras = model_io.import_keras()
    lookup = keras.layers.StringLookup(name="lookup")
    lookup.adapt(np.array(["a", "b", "c", "a"]))  # an adapted vocabulary is saved as an asset file
    words = keras.Input((1,), dtype="string", name="words")
    model = keras.Model(words, lookup(words), name="lookup_model")
    assert model_io._write_keras_archive(model, tmp_path / "probe.keras", None) is False  # assets: Keras's way
    assert not (tmp_path / "probe.keras").exists()
    save_model(model, tmp_path / "m.keras", provenance={"format": "test", "chain": []})
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        names = zf.namelist()
    assert names[:3] == ["metadata.json", "config.json", "model.weights.h5"] and names[-1] == PROVENANCE_MEMBER
    assert any(n.startswith("assets/") for n in names)
    loaded = load_model(tmp_path / "m.keras")
    assert loaded.get_layer("lookup").get_vocabulary() == lookup.get_vocabulary()
    assert sorted(lookup.get_vocabulary()) == ["[UNK]", "a", "b", "c"]


def test_noise_drawn_in_blocks_is_the_noise_drawn_at_once(monkeypatch):
    from modelxform.statements import weights
    text = "select where type=Dense\nadd noise normal(mean=0.5, stddev=0.1) to kernel\n" \
           "add noise uniform(low=-1, high=2) to bias\n"
    whole, _ = _apply(text)
    monkeypatch.setattr(weights, "NOISE_BLOCK", 7)  # blocks that do not divide any array's size
    blocks, _ = _apply(text)
    for path, arrays in weights_by_path(whole).items():
        assert_bit_identical(arrays, weights_by_path(blocks)[path])
    # and the noise is there: kernels and biases moved
    base = weights_by_path(make_cnn_cached())
    assert not np.array_equal(weights_by_path(whole)["dense_3"][1], base["dense_3"][1])


def test_weight_passes_leave_the_input_model_alone():
    model = make_cnn_cached()
    before = weights_by_path(model)
    new, _ = compile_recipe("select all\nscale weights 0.5\nclip weights -0.01 0.01\nprune weights 50%\n"
                            "add noise normal(stddev=1) to weights\n").apply(model, seed=1)
    for path, arrays in weights_by_path(model).items():
        assert_bit_identical(arrays, before[path])
    assert not np.array_equal(weights_by_path(new)["dense_3"][0], before["dense_3"][0])


# ---- a digest taken earlier in the run (a batch's main process hashes its inputs first) ------------------

def test_a_file_digest_is_reused_only_while_the_file_is_unchanged(tmp_path):
    import os

    from modelxform.keras_io.files import known_sha256, sha256_with_identity
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100_000)
    digest = sha256_with_identity(path)
    assert digest[0] == sha256_file(path) and digest[1] is not None
    assert known_sha256(path, digest) == digest[0]
    with open(path, "rb") as fh:  # by descriptor too (the archive asks about the file it holds open)
        assert known_sha256(fh.fileno(), digest) == digest[0]
    st = os.stat(path)
    time.sleep(0.01)
    with open(path, "r+b") as fh:  # the same size, one byte changed, and the mtime set back
        fh.write(b"y")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    assert known_sha256(path, digest) is None  # the ctime moved: read it again
    replaced = tmp_path / "other.bin"
    replaced.write_bytes(b"x" * 100_000)
    os.replace(replaced, path)  # another file under the same name, with the old content
    assert known_sha256(path, digest) is None
    assert known_sha256(path, None) is None and known_sha256(path, (digest[0], None)) is None


@pytest.mark.parametrize("recipe, suffix", [("select where type=Dense; scale kernel 0.5", ".keras"),
                                            ("select where type=Dense; scale kernel 0.5; append Dense(units=2)", ".keras"),
                                            ("select where type=Dense; scale kernel 0.5", ".h5")])
def test_apply_uses_a_digest_taken_earlier_only_while_it_holds(tmp_path, model_file, monkeypatch, recipe, suffix):
    """A weight-only and a structural edit of a .keras file, and an .h5 file (loaded by Keras) alike:
    the recorded input sha256 is the known one without reading the file again, and the output bytes are
    those of a plain apply; a digest whose file changed since is not used."""
    from modelxform import apply_file
    from modelxform.keras_io import digests, files
    model_file = model_file("cnn", suffix=suffix)
    plain = apply_file(compile_recipe(recipe), model_file, tmp_path / f"plain{suffix}", seed=1)
    digest = files.sha256_with_identity(model_file)
    hashed = []
    monkeypatch.setattr(digests.FileDigest, "start", lambda self: hashed.append(self) or threading_start(self))
    monkeypatch.setattr(files, "sha256_remembered", lambda p: hashed.append(p) or sha256_file(p))
    reused = apply_file(compile_recipe(recipe), model_file, tmp_path / f"reused{suffix}", seed=1, input_digest=digest)
    assert hashed == []
    assert sha256_file(reused.output) == sha256_file(plain.output)
    assert read_provenance(reused.output)["chain"][-1]["input_sha256"] == digest[0]
    stale = ("0" * 64, digest[1][:3] + (digest[1][3] - 1,) + digest[1][4:])  # recorded at another mtime
    again = apply_file(compile_recipe(recipe), model_file, tmp_path / f"again{suffix}", seed=1, input_digest=stale)
    assert hashed  # read again
    assert read_provenance(again.output)["chain"][-1]["input_sha256"] == sha256_file(model_file)


def threading_start(thread):
    import threading
    return threading.Thread.start(thread)


def test_verify_says_what_differs_reading_large_arrays_a_block_at_a_time(tmp_path, model_file, monkeypatch):
    """When the files differ, verify says how from the models built as apply builds them, not loaded
    whole: a variable over LARGE_ARRAY (1 KiB here) is compared where it is, a block of rows at a time,
    and the message is the one a whole-array comparison gives."""
    from modelxform.keras_io import files, variables
    original, out = _tampered(tmp_path, model_file)
    whole = run_cli("verify", out, "--input", original)
    assert whole.status == 1 and "dense_2: kernel differs (max abs difference 0.001)" in whole.out
    monkeypatch.setattr(variables, "LARGE_ARRAY", 1 << 10)
    monkeypatch.setattr(variables, "BLOCK_BYTES", 16 << 10)
    blocks, real_rows = [], variables.read_variable_rows
    monkeypatch.setattr(variables, "read_variable_rows",
                        lambda var, start, stop: blocks.append((var.path, stop - start)) or real_rows(var, start, stop))
    monkeypatch.setattr(files, "load_model", lambda *a, **k: pytest.fail("verify loaded a model whole"))
    streamed = run_cli("verify", out, "--input", original)
    assert streamed.status == 1 and streamed.out == whole.out
    # dense_1's (1936, 32) kernel in blocks of 128 rows (16 KiB), the changed (32, 10) dense_2 kernel in one
    assert {("dense_1/kernel", 128), ("dense_2/kernel", 32)} <= set(blocks)


def test_library_versions_are_read_once_and_handed_out_as_copies():
    """The versions a record names are read from the installed metadata once per process (25-35 ms),
    and every caller gets its own copy: changing one changes no later record."""
    from importlib import metadata

    from modelxform.keras_io import backend
    first = backend.library_versions()
    assert first["keras"] == metadata.version("keras")
    first["keras"] = "changed"
    hits = backend._library_versions.cache_info().hits
    again = backend.library_versions()
    assert again["keras"] == metadata.version("keras")
    assert backend._library_versions.cache_info().hits == hits + 1
