"""The command line: exit codes, messages, what is written and what is not.

Most tests run the CLI in-process through conftest.run_cli; subprocesses are used only where a fresh
interpreter is the point (custom layers registered by --import, "check/fmt/--help never import
TensorFlow", `python -m modelxform --help`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import assert_bit_identical, custom_layer_module, make_cnn, make_nested, run_cli, weights_by_path

EXAMPLE = ("select random where type=Dense; scale weights 0.8; "
           "replace MaxPooling2D with AveragePooling2D; tap conv2d_1\n")
HEADER = 'recipe "cli-test" version "1.0.0"\n'
SUBPROCESS_TIMEOUT = 120


# -- helpers ------------------------------------------------------------------------------------------

def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def listing(folder) -> set[str]:
    """Every file and folder under ``folder``, relative, hidden ones included."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def hidden(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


def write(path, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def keras():
    from modelxform.keras_io.files import import_keras
    return import_keras()


def load(path):
    return keras().models.load_model(path, compile=False)


def only_error_line(err: str, *needles: str) -> None:
    """One clear message: a single line starting with `error:`, naming what it should, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert "Traceback" not in err


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cnn_bytes(tmp_path_factory) -> bytes:
    """The sample CNN saved once per module (building and saving it is the slow part)."""
    from modelxform.keras_io.files import save_model
    path = tmp_path_factory.mktemp("cnn") / "cnn.keras"
    save_model(make_cnn(), path)
    return path.read_bytes()


@pytest.fixture
def cnn(tmp_path, cnn_bytes) -> pathlib.Path:
    path = tmp_path / "cnn.keras"
    path.write_bytes(cnn_bytes)
    return path


@pytest.fixture
def cnn_weights(cnn_bytes, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "cnn.keras"
    path.write_bytes(cnn_bytes)
    return weights_by_path(load(path))


# -- apply ---------------------------------------------------------------------------------------------

def test_apply_example_recipe(tmp_path, cnn, cnn_weights):
    recipe = write(tmp_path / "example.recipe", EXAMPLE)
    out = tmp_path / "out.keras"
    before = sha256(cnn)
    r = run_cli("apply", recipe, cnn, "-o", out, "--seed", "7")
    assert r.status == 0, r.err
    # every statement is reported at file:line:col
    for col, text in [(1, "select random where type=Dense"), (33, "scale weights 0.8"),
                      (52, "replace MaxPooling2D with AveragePooling2D"), (96, "tap conv2d_1")]:
        assert f"{recipe}:1:{col}  {text}" in r.out, r.out
    assert f"wrote {out}" in r.out
    assert "Traceback" not in r.err
    # the input is untouched, the output exists and loads with the tapped second output
    assert sha256(cnn) == before
    assert out.is_file()
    model = load(out)
    assert len(model.outputs) == 2
    from modelxform.keras_io.layers import walk
    types = {info.path: info.type_name for info in walk(model)}
    assert types["max_pooling2d"] == "AveragePooling2D"
    # the one randomly selected Dense layer (named in the report) is scaled by 0.8, the others are not
    chosen = re.search(r"\(1 layer: (\w+)\)", r.out).group(1)
    assert chosen in ("dense_1", "dense_2", "dense_3")
    after = weights_by_path(model)
    for name in ("dense_1", "dense_2", "dense_3"):
        for w_old, w_new in zip(cnn_weights[name], after[name]):
            expected = w_old * np.float32(0.8) if name == chosen else w_old
            np.testing.assert_allclose(w_new, expected, rtol=1e-6)
    assert hidden(tmp_path) == []


def test_apply_seed_is_deterministic(tmp_path, cnn):
    recipe = write(tmp_path / "r.recipe", "select random 2 where type=Dense; freeze\n")
    outs = [run_cli("plan", recipe, cnn, "--seed", "7") for _ in range(2)]
    assert outs[0].status == outs[1].status == 0
    picked = [re.search(r"\(2 layers: ([\w, ]+)\)", o.out).group(1) for o in outs]
    assert picked[0] == picked[1]


def test_dry_run_writes_nothing(tmp_path, cnn):
    recipe = write(tmp_path / "example.recipe", EXAMPLE)
    out = tmp_path / "out.keras"
    before, files = sha256(cnn), listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", out, "--seed", "7", "--dry-run")
    assert r.status == 0, r.err
    assert "dry run: nothing was written" in r.out
    assert "wrote" not in r.out
    assert not out.exists()
    assert listing(tmp_path) == files
    assert sha256(cnn) == before


def test_plan_prints_matched_layers_and_writes_nothing(tmp_path, cnn):
    recipe = write(tmp_path / "p.recipe", HEADER + "select where type=Dense\nscale kernel 0.5\n")
    before, files = sha256(cnn), listing(tmp_path)
    r = run_cli("plan", recipe, cnn)
    assert r.status == 0, r.err
    assert f"{recipe}:2:1  select where type=Dense" in r.out
    assert "(3 layers: dense_1, dense_2, dense_3)" in r.out
    assert "dense_1: kernel (1936, 32) × 0.5" in r.out
    assert "nothing was written" in r.out
    assert listing(tmp_path) == files
    assert sha256(cnn) == before


PARAM_RECIPE = HEADER + "param f = 0.5\nselect where type=Dense\nscale kernel $f\n"


def test_param_default_and_override(tmp_path, cnn, cnn_weights):
    recipe = write(tmp_path / "p.recipe", PARAM_RECIPE)
    default = run_cli("plan", recipe, cnn)
    assert default.status == 0, default.err
    assert "dense_2: kernel (32, 16) × 0.5" in default.out
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, cnn, "-o", out, "--param", "f=0.25")
    assert r.status == 0, r.err
    assert "dense_2: kernel (32, 16) × 0.25" in r.out
    after = weights_by_path(load(out))
    np.testing.assert_allclose(after["dense_2"][0], cnn_weights["dense_2"][0] * np.float32(0.25), rtol=1e-6)
    np.testing.assert_array_equal(after["dense_2"][1], cnn_weights["dense_2"][1])  # bias untouched


def test_unknown_param_is_a_usage_error(tmp_path, cnn):
    recipe = write(tmp_path / "p.recipe", PARAM_RECIPE)
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, cnn, "-o", out, "--param", "factor=0.25")
    assert r.status == 2
    assert "'factor'" in r.err and "error:" in r.err
    assert "declares: f" in r.err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["f", "=0.5", "f0.5"])
def test_malformed_param_is_a_usage_error(tmp_path, cnn, bad):
    recipe = write(tmp_path / "p.recipe", PARAM_RECIPE)
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, cnn, "-o", out, "--param", bad)
    assert r.status == 2
    assert "NAME=VALUE" in r.err
    assert not out.exists()


def test_param_of_wrong_type_is_a_usage_error(tmp_path, cnn):
    recipe = write(tmp_path / "p.recipe", PARAM_RECIPE)
    r = run_cli("plan", recipe, cnn, "--param", "f=abc")
    assert r.status == 2
    assert "'f'" in r.err and "'abc'" in r.err
    r = run_cli("plan", recipe, cnn, "--param", "f=" + "9" * 5000)  # (was echoed whole)
    assert r.status == 2
    assert r.err.strip().endswith("--param gave '" + "9" * 59 + "… (5,000 characters)")


# -- output path rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_equal_to_input_is_refused(tmp_path, cnn, spelling):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    target = cnn if spelling == "same" else f"{tmp_path}/../{tmp_path.name}/./cnn.keras"
    before, files = sha256(cnn), listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", target)
    assert r.status == 2
    assert "--in-place" in r.err
    assert "is the input model" in r.err
    assert sha256(cnn) == before
    assert listing(tmp_path) == files


def test_apply_without_output_is_a_usage_error(tmp_path, cnn):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn)
    assert r.status == 2
    assert "-o OUT" in r.err and "--in-place" in r.err
    assert listing(tmp_path) == files


@pytest.mark.parametrize("with_o", [False, True])
def test_in_place(tmp_path, cnn, with_o):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    before = sha256(cnn)
    argv = ["apply", recipe, cnn, "--in-place"] + (["-o", cnn] if with_o else [])
    r = run_cli(*argv)
    assert r.status == 0, r.err
    assert f"wrote {cnn}" in r.out
    assert sha256(cnn) != before
    model = load(cnn)
    assert not any(layer.trainable for layer in model.layers if layer.weights)
    assert hidden(tmp_path) == []


def test_unknown_output_extension(tmp_path, cnn):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", tmp_path / "out.txt")
    assert r.status == 2
    assert "out.txt" in r.err and "'.txt'" in r.err and ".keras or .h5" in r.err
    assert listing(tmp_path) == files


def test_output_into_missing_folder(tmp_path, cnn):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    files = listing(tmp_path)
    out = tmp_path / "nowhere" / "out.keras"
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3
    only_error_line(r.err, str(out), "does not exist")
    assert not out.parent.exists()
    assert listing(tmp_path) == files


@pytest.mark.parametrize("under", ["cnn.keras/out.keras", "cnn.keras/sub/out.keras"])
def test_output_under_a_file_says_it_is_not_a_folder(tmp_path, cnn, under):
    """-o m.keras/x.keras, where m.keras is a file, said `folder m.keras does not exist`."""
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    before, files = sha256(cnn), listing(tmp_path)
    out = tmp_path / under
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3, r.err
    assert r.err == f"error: {out}: {cnn} is not a folder\n"
    assert sha256(cnn) == before and listing(tmp_path) == files


def test_output_that_is_the_recipe_is_refused(tmp_path, cnn):
    """A recipe named like a model file (r.keras) was replaced by the output."""
    recipe = write(tmp_path / "r.keras", "select all; freeze\n")
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", recipe)
    assert r.status == 2
    assert r.err == f"error: -o {recipe} is the recipe; refusing to overwrite it\n"
    assert recipe.read_text() == "select all; freeze\n" and listing(tmp_path) == files


def _alias(tmp_path, target, how):
    """``target`` itself, or a symbolic or hard link to it named alias.html."""
    if how == "itself":
        return target
    alias = tmp_path / "alias.html"
    (os.symlink if how == "symlink" else os.link)(target, alias)
    return alias


@pytest.mark.parametrize("command,which,how", [
    ("plan", "model", "itself"), ("plan", "model", "symlink"), ("plan", "recipe", "itself"),
    ("plan", "recipe", "hardlink"), ("diff", "A", "itself"), ("diff", "B", "itself"), ("diff", "B", "symlink"),
    ("diff", "A", "hardlink"),
])
def test_html_report_that_is_an_input_is_refused(tmp_path, cnn, command, which, how):
    """plan --html m.keras replaced the model with the page (exit 0); likewise the recipe and diff's B.
    Refused before any work (no Graphviz needed to say so), the input untouched, nothing left."""
    recipe = write(tmp_path / "r.recipe", "select all; freeze\n")
    other = tmp_path / "other.keras"
    other.write_bytes(cnn.read_bytes())
    target = {"model": cnn, "recipe": recipe, "A": cnn, "B": other}[which]
    report = _alias(tmp_path, target, how)
    before, files = sha256(target), listing(tmp_path)
    argv = ["plan", recipe, cnn] if command == "plan" else ["diff", cnn, other]
    r = run_cli(*argv, "--html", report)
    assert r.status == 2, r.err
    what = {"model": "the input model", "recipe": "the recipe", "A": "model A", "B": "model B"}[which]
    assert r.err == f"error: --html {report} is {what}; refusing to overwrite it\n"
    assert r.out == ""
    assert sha256(target) == before and listing(tmp_path) == files


@pytest.mark.parametrize("command", ["plan", "diff"])
def test_html_report_folder_is_checked_before_any_work(tmp_path, cnn, monkeypatch, command):
    """A folder the page cannot be written in was found only once the plan (or diff) was made and laid
    out; now at once, exit 3, one line. As root chmod cannot say no: os.access is told to (as a folder
    marked immutable, or on a read-only mount, makes it say)."""
    from modelxform import session
    recipe = write(tmp_path / "r.recipe", "select all; freeze\n")
    folder = tmp_path / "reports"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if pathlib.Path(p) == folder
                        else real_access(p, mode, *a, **k))
    work = []
    monkeypatch.setattr(session, "plan_file", lambda *a, **k: work.append("plan") or 1 / 0)
    monkeypatch.setattr(session, "model_to_look_at", lambda *a, **k: work.append("load") or 1 / 0)
    files = listing(tmp_path)
    argv = ["plan", recipe, cnn] if command == "plan" else ["diff", cnn, cnn]
    r = run_cli(*argv, "--html", folder / "report.html")
    assert r.status == 3, r.err
    assert r.err == f"error: {folder / 'report.html'}: cannot write in {folder}: Permission denied\n"
    assert work == [] and listing(tmp_path) == files


def test_diff_checks_both_files_before_loading_either(tmp_path, cnn):
    """`diff A B` with B missing loaded A first (TensorFlow's import, seconds) and only then said so."""
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, "diff", cnn.name, "missing.keras"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert "STATUS 3" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr == "error: missing.keras: no such file\n"
    assert "LOADED False False" in proc.stdout


@pytest.fixture
def small_batch(tmp_path, cnn):
    """z/Z.yaml: one model, one recipe, outputs in z/out (made, so that an output's name is a path)."""
    zoo = tmp_path / "z"
    zoo.mkdir()
    model = zoo / "a.keras"
    cnn.rename(model)
    write(zoo / "w.recipe", "select where type=Dense\nscale kernel 0.5\n")
    write(zoo / "Z.yaml", 'models: [a.keras]\nrecipes: [w.recipe]\noutput: "out/{model}.keras"\n')
    (zoo / "out").mkdir()
    (zoo / "out" / "a.keras").write_bytes(b"an earlier output")
    return zoo


@pytest.mark.parametrize("which,what", [
    ("a.keras", "a model of the batch"), ("w.recipe", "a recipe of the batch"), ("Z.yaml", "the batch file"),
    ("out/a.keras", "an output of the batch"), ("link", "a model of the batch"),
])
def test_batch_report_that_is_a_file_of_the_batch_is_refused(small_batch, which, what):
    """batch Z.yaml --report a.keras replaced the model (or the recipe, or the zoo file) with JSON."""
    report = small_batch / which
    if which == "link":
        report.symlink_to(small_batch / "a.keras")
    files = listing(small_batch)
    digests = {name: sha256(small_batch / name) for name in ("a.keras", "w.recipe", "Z.yaml", "out/a.keras")}
    r = run_cli("batch", small_batch / "Z.yaml", "-j", 1, "--report", report)
    assert r.status == 2, r.out + r.err
    assert r.err == f"error: --report {report} is {what}; refusing to overwrite it\n"
    assert listing(small_batch) == files
    assert {name: sha256(small_batch / name) for name in digests} == digests


# -- recipe errors -------------------------------------------------------------------------------------

BAD_SYNTAX = "select all\nfreeze unfreeze\n"  # error at line 2, column 8 (`unfreeze`)


def test_syntax_error_position_excerpt_and_caret(tmp_path, cnn):
    recipe = write(tmp_path / "bad.recipe", BAD_SYNTAX)
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 2
    assert f"{recipe}:2:8: error:" in r.err
    lines = r.err.splitlines()
    i = next(n for n, line in enumerate(lines) if f"{recipe}:2:8: error:" in line)
    assert lines[i + 1].strip() == "freeze unfreeze"
    caret = lines[i + 2]
    assert set(caret.strip()) == {"^"}
    # the caret sits under `unfreeze`
    assert caret.index("^") == lines[i + 1].index("unfreeze")
    assert len(caret.strip()) == len("unfreeze")
    assert "Traceback" not in r.err
    assert r.out == ""
    assert not out.exists()


def test_traceback_flag_shows_traceback(tmp_path, cnn):
    recipe = write(tmp_path / "bad.recipe", BAD_SYNTAX)
    r = run_cli("--traceback", "apply", recipe, cnn, "-o", tmp_path / "out.keras")
    assert r.status == 2
    assert "Traceback (most recent call last)" in r.err
    assert "RecipeError" in r.err
    assert f"{recipe}:2:8: error:" in r.err


@pytest.mark.parametrize("command", ["apply", "plan", "check"])
def test_missing_recipe_file(tmp_path, cnn, command):
    missing = tmp_path / "nope.recipe"
    argv = [command, missing] + ([] if command == "check" else [cnn]) + (["-o", tmp_path / "o.keras"]
                                                                          if command == "apply" else [])
    r = run_cli(*argv)
    assert r.status == 2
    assert f"{missing}: no such recipe file" in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "o.keras").exists()


def test_labelled_syntax_message_after_first_statement(tmp_path):
    """The labelled messages of parser.SYNTAX_EXAMPLES apply below line 1 too (a regression: lark's
    match_examples compares whole parser stacks, so they used to be found only in the first statement)."""
    first = write(tmp_path / "first.recipe", "scale weights\n")
    r1 = run_cli("check", first)
    assert "`scale` needs a target and a factor" in r1.err  # holds on line 1
    later = write(tmp_path / "later.recipe", "select all\nscale weights\n")
    r2 = run_cli("check", later)
    assert r2.status == 2
    assert f"{later}:2:" in r2.err
    assert "`scale` needs a target and a factor" in r2.err


# -- model file errors ---------------------------------------------------------------------------------

def _make_bad_model(kind: str, tmp_path: pathlib.Path, cnn_bytes: bytes) -> pathlib.Path:
    if kind == "missing":
        return tmp_path / "missing.keras"
    if kind == "directory":
        path = tmp_path / "folder.keras"
        path.mkdir()
        return path
    if kind == "empty":
        path = tmp_path / "empty.keras"
        path.write_bytes(b"")
        return path
    if kind == "random":
        path = tmp_path / "random.keras"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path
    if kind == "zip-without-config":
        path = tmp_path / "noconfig.keras"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("metadata.json", "{}")
            zf.writestr("model.weights.h5", b"not really")
        return path
    if kind == "zip-with-bad-config":
        path = tmp_path / "badconfig.keras"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("config.json", "{not json")
        return path
    if kind == "truncated":
        path = tmp_path / "truncated.keras"
        path.write_bytes(cnn_bytes[: len(cnn_bytes) // 2])
        return path
    if kind == "h5-not-a-model":
        import h5py
        path = tmp_path / "data.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.arange(10))
        return path
    if kind == "h5-random":
        path = tmp_path / "random.h5"
        path.write_bytes(np.random.default_rng(1).bytes(4096))
        return path
    raise AssertionError(kind)


MODEL_ERRORS = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "file is empty",
    "random": "not a .keras archive",
    "zip-without-config": "no config.json",
    "zip-with-bad-config": "config.json is not valid JSON",
    "truncated": "not a .keras archive",
    "h5-not-a-model": "holds no Keras model",
    "h5-random": "not a readable HDF5 file",
}


@pytest.mark.parametrize("kind", list(MODEL_ERRORS))
@pytest.mark.parametrize("command", ["apply", "inspect"])
def test_unreadable_model_file(tmp_path, cnn_bytes, kind, command):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    model = _make_bad_model(kind, tmp_path, cnn_bytes)
    out = tmp_path / "out.keras"
    files = listing(tmp_path)
    if command == "apply":
        r = run_cli("apply", recipe, model, "-o", out)
    else:
        r = run_cli("inspect", model)
    assert r.status == 3, r.err
    only_error_line(r.err, str(model), MODEL_ERRORS[kind])
    assert r.out == ""
    assert listing(tmp_path) == files


def _lambda_model(path: pathlib.Path) -> pathlib.Path:
    k = keras()
    inp = k.Input((4,), name="x")
    hidden_ = k.layers.Dense(3, name="dense")(inp)
    out = k.layers.Lambda(lambda x: x * 2, name="double")(hidden_)
    k.Model(inp, out, name="with_lambda").save(path)
    return path


def test_lambda_layer_needs_unsafe(tmp_path):
    model = _lambda_model(tmp_path / "lam.keras")
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, model, "-o", out)
    assert r.status == 3
    only_error_line(r.err, str(model), "Lambda", "--unsafe")
    assert not out.exists()

    r = run_cli("apply", recipe, model, "-o", out, "--unsafe")
    assert r.status == 0, r.err
    assert "(2 layers: dense, double)" in r.out
    assert out.is_file()


@pytest.fixture(scope="module")
def custom_layer_runs(tmp_path_factory):
    """Apply a recipe to a model with a custom layer in two fresh interpreters, without and with
    --import (started together: each pays the TensorFlow import)."""
    folder = tmp_path_factory.mktemp("custom")
    # build the model here: the registration in this process does not reach the subprocesses
    module = custom_layer_module(folder, "mxtest_layers", "mxtest", "Doubler", 2.0)
    k = keras()
    inp = k.Input((4,), name="x")
    out = module.Doubler(name="dbl")(k.layers.Dense(3, name="dense")(inp))
    k.Model(inp, out, name="custom").save(folder / "custom.keras")
    recipe = write(folder / "ok.recipe", "select all; freeze\n")
    # the module is importable in both runs; only --import is missing in the first
    env = subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    runs = {}
    for name, extra in [("plain", []), ("import", ["--import", "mxtest_layers"])]:
        argv = [sys.executable, "-m", "modelxform", "apply", recipe.name, "custom.keras",
                "-o", f"out_{name}.keras", *extra]
        runs[name] = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        results[name] = (proc.returncode, out, err)
    return folder, results


def test_custom_layer_without_import_fails(custom_layer_runs):
    folder, results = custom_layer_runs
    status, out, err = results["plain"]
    assert status == 3, err
    assert "error: custom.keras:" in err
    assert "--import" in err and "custom layer" in err
    assert "Traceback" not in err
    assert out == ""
    assert not (folder / "out_plain.keras").exists()


def test_custom_layer_with_import_loads(custom_layer_runs):
    folder, results = custom_layer_runs
    status, out, err = results["import"]
    assert status == 0, err
    assert "(2 layers: dense, dbl)" in out
    assert "wrote out_import.keras" in out
    assert (folder / "out_import.keras").is_file()
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def custom_layer_commands(custom_layer_runs):
    """plan, inspect, diff, verify and export of the custom-layer model and apply's output, with
    --import, each in a fresh interpreter (started together)."""
    folder, _ = custom_layer_runs
    env = subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    commands = {"plan": ["plan", "ok.recipe", "custom.keras"], "inspect": ["inspect", "custom.keras"],
                "diff": ["diff", "custom.keras", "out_import.keras"],
                "verify": ["verify", "out_import.keras", "--input", "custom.keras"],
                "export": ["export", "out_import.keras", "served"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "modelxform", *argv, "--import", "mxtest_layers"],
                                    cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        results[name] = (proc.returncode, out, err)
    return folder, results


@pytest.mark.parametrize("command, status, shown", [
    ("plan", 0, ["    (2 layers: dense, dbl)", "dry run: nothing was written"]),
    ("inspect", 0, ["custom.keras: 2 layer(s)", " dbl     Doubler   (None, 3)           0   yes"]),
    ("diff", 1, ["changed   dbl (Doubler)", "differ: 2 trainable changed"]),  # (1: the models differ, as diff(1))
    ("verify", 0, ["re-made out_import.keras from custom.keras in 1 step(s): identical",
                   "out_import.keras: verified"]),
    ("export", 0, ["wrote served (TensorFlow SavedModel; endpoint `serve`, signature `serving_default`)"]),
])
def test_every_command_that_loads_a_model_takes_import(custom_layer_commands, command, status, shown):
    folder, results = custom_layer_commands
    got, out, err = results[command]
    assert got == status and "Traceback" not in err, err
    lines = [line.rstrip() for line in out.splitlines()]  # (a table's rows are padded to its width)
    assert all(line in lines for line in shown), out
    if command == "export":  # the SavedModel computes what the model does, the custom layer included
        import tensorflow as tf
        model = keras().saving.load_model(folder / "out_import.keras")  # (Doubler: registered by the fixture)
        x = np.random.default_rng(5).normal(size=(2, 4)).astype("float32")
        served = tf.saved_model.load(str(folder / "served"))
        np.testing.assert_allclose(served.serve(x).numpy(), np.asarray(model(x)), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(model(x)), 2 * np.asarray(model.get_layer("dense")(x)), rtol=1e-6)


def test_custom_layer_with_import_keeps_stderr_clean(custom_layer_runs):
    _, results = custom_layer_runs
    status, _, err = results["import"]
    assert status == 0
    assert err.strip() == ""


# -- apply failures and atomicity ------------------------------------------------------------------

def test_failed_assert_exits_1_and_writes_nothing(tmp_path, cnn):
    recipe = write(tmp_path / "a.recipe", "select all; assert count == 99\n")
    out = tmp_path / "out.keras"
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 1
    assert f"{recipe}:1:13: error: assert failed" in r.err
    assert "8 layers" in r.err and "99" in r.err
    assert not out.exists()
    assert listing(tmp_path) == files


def test_empty_selection_exits_4(tmp_path, cnn):
    recipe = write(tmp_path / "n.recipe", "select where type=Conv3D\nfreeze\n")
    out = tmp_path / "out.keras"
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 4
    assert f"{recipe}:1:1: error:" in r.err
    assert "matches no layer" in r.err
    assert "Traceback" not in r.err
    assert not out.exists()
    assert listing(tmp_path) == files


@pytest.mark.parametrize("text,status", [("select where type=Conv3D\nfreeze\n", 4),
                                         ("select all; assert count == 99\n", 1)])
def test_failed_apply_keeps_previous_output(tmp_path, cnn, text, status):
    recipe = write(tmp_path / "r.recipe", text)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / "out.keras"
    out.write_bytes(b"previous output")
    before = sha256(out)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == status
    assert sha256(out) == before
    assert sorted(p.name for p in outdir.iterdir()) == ["out.keras"]


@functools.lru_cache(maxsize=None)
def _flaky_dense():
    """A Dense layer whose saving can be made to fail, registered in this process only, so the CLI run
    in-process can load it and then fail while saving. FAIL is an exception class (or None) and FAIL_AT
    says where: "config" (before anything is written) or "weights" (in the middle of writing a .keras)."""
    k = keras()

    @k.saving.register_keras_serializable(package="mxtest_cli")
    class FlakyDense(k.layers.Dense):
        FAIL = None
        FAIL_AT = "weights"

        def _maybe_fail(self, where):
            if type(self).FAIL is not None and type(self).FAIL_AT == where:
                raise type(self).FAIL(f"simulated failure while writing the {where}")

        def get_config(self):
            self._maybe_fail("config")
            return super().get_config()

        def save_own_variables(self, store):
            super().save_own_variables(store)
            self._maybe_fail("weights")

    return FlakyDense


def _flaky_model_file(path):
    from modelxform.keras_io.files import save_model
    k = keras()
    flaky = _flaky_dense()
    inp = k.Input((4,), name="x")
    out = flaky(2, name="flaky")(k.layers.Dense(3, name="dense")(inp))
    save_model(k.Model(inp, out, name="flaky_model"), path)
    return path


@pytest.mark.parametrize("suffix,where", [(".keras", "weights"), (".keras", "config"), (".h5", "config")])
def test_save_failure_leaves_previous_output_and_no_temporary(tmp_path, suffix, where):
    model = _flaky_model_file(tmp_path / "flaky.keras")
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / f"out{suffix}"
    out.write_bytes(b"previous output")
    flaky = _flaky_dense()
    flaky.FAIL, flaky.FAIL_AT = RuntimeError, where
    try:
        r = run_cli("apply", recipe, model, "-o", out)
    finally:
        flaky.FAIL = None
    assert r.status == 3, r.err
    only_error_line(r.err, str(out), "cannot save the model", f"simulated failure while writing the {where}")
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in outdir.iterdir()) == [out.name]


def test_interrupted_save_leaves_no_temporary(tmp_path):
    model = _flaky_model_file(tmp_path / "flaky.keras")
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    flaky = _flaky_dense()
    flaky.FAIL, flaky.FAIL_AT = KeyboardInterrupt, "weights"
    try:
        r = run_cli("apply", recipe, model, "-o", outdir / "out.keras")
    finally:
        flaky.FAIL = None
    assert r.status == 130
    assert "nothing was written" in r.err
    assert list(outdir.iterdir()) == []


def test_successful_apply_replaces_previous_output(tmp_path, cnn):
    recipe = write(tmp_path / "ok.recipe", "select all; freeze\n")
    out = tmp_path / "out.keras"
    out.write_bytes(b"previous output")
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 0, r.err
    assert zipfile.is_zipfile(out)
    assert len(load(out).layers) > 1
    assert hidden(tmp_path) == []


# -- h5 ------------------------------------------------------------------------------------------------

def test_h5_in_and_out(tmp_path, cnn, cnn_weights):
    scale = write(tmp_path / "scale.recipe", "select where type=Dense\nscale kernel 0.5\n")
    freeze = write(tmp_path / "freeze.recipe", "select all; freeze\n")
    mid = tmp_path / "mid.h5"
    back = tmp_path / "back.keras"
    r1 = run_cli("apply", scale, cnn, "-o", mid)
    assert r1.status == 0, r1.err
    import h5py
    with h5py.File(mid, "r") as f:
        assert "model_config" in f.attrs
    r2 = run_cli("apply", freeze, mid, "-o", back)
    assert r2.status == 0, r2.err
    assert zipfile.is_zipfile(back)
    w_mid = weights_by_path(load(mid))
    back_model = load(back)
    w_back = weights_by_path(back_model)
    assert w_mid.keys() == w_back.keys() == cnn_weights.keys()
    for path in w_mid:
        assert_bit_identical(w_mid[path], w_back[path])
    np.testing.assert_allclose(w_back["dense_1"][0], cnn_weights["dense_1"][0] * np.float32(0.5), rtol=1e-6)
    assert_bit_identical(w_back["conv2d_1"], cnn_weights["conv2d_1"])
    assert not any(layer.trainable for layer in back_model.layers if layer.weights)
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("fmt, name, ok", [("h5", "out.h5", True), ("keras", "out.keras", True),
                                           ("h5", "out.keras", False), ("keras", "out.h5", False),
                                           ("h5", None, False)])
def test_format_confirms_the_output_name(tmp_path, cnn, fmt, name, ok):
    """--format keras|h5 says which file the output is; a name of the other kind is refused before any work
    (with --in-place, the input's name is the output's)."""
    recipe = write(tmp_path / "r.recipe", "select all; freeze\n")
    model = tmp_path / "in.keras"
    model.write_bytes(cnn.read_bytes())
    out = tmp_path / name if name else model
    where = ["-o", out] if name else ["--in-place"]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("apply", recipe, model, *where, "--format", fmt)
    if ok:
        assert r.status == 0, r.err
        assert zipfile.is_zipfile(out) == (fmt == "keras") and hidden(tmp_path) == []
        if fmt == "h5":
            assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
        return
    given = f"-o {out}" if name else f"--in-place on {model}"
    kind = "keras" if (name or "in.keras").endswith(".keras") else "h5"
    assert (r.status, r.err) == (2, f"error: --format {fmt} does not match {given} (a .{kind} file name)\n")
    assert model.read_bytes() == cnn.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_version_is_the_package_version():
    from modelxform.version import __version__
    r = subprocess.run([sys.executable, "-m", "modelxform", "--version"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"modelxform {__version__}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


@pytest.mark.parametrize("first", ["tap", "insert"])
def test_insert_after_a_tapped_layer_moves_the_tap_and_says_so(tmp_path, cnn, first):
    """A model output reads the layer like any consumer: `insert … after` moves a tap made before it (the
    plan notes it); a tap made after the insert reads the layer itself."""
    lines = {"tap": "tap conv2d_1\n", "insert": "insert Dropout(rate=0.5) after conv2d_1\n"}
    recipe = write(tmp_path / "r.recipe", lines[first] + lines["insert" if first == "tap" else "tap"])
    r = run_cli("apply", recipe, cnn, "-o", tmp_path / "out.keras")
    assert r.status == 0, r.err
    moved = "    (the model's output 1, which read conv2d_1, now reads dropout_1)"
    assert (moved in r.out.splitlines()) == (first == "tap"), r.out
    with zipfile.ZipFile(tmp_path / "out.keras") as z:
        outputs = json.loads(z.read("config.json"))["config"]["output_layers"]
    assert [ref[0] for ref in outputs] == ["dense_3", "dropout_1" if first == "tap" else "conv2d_1"]
    # and the record holds the changes only, as before this note
    record = json.loads(zipfile.ZipFile(tmp_path / "out.keras").read("modelxform.json"))
    assert not any("now reads" in line for line in record["chain"][-1]["statements"])


# -- check ---------------------------------------------------------------------------------------------

def test_check_good_and_bad_files(tmp_path):
    good = write(tmp_path / "good.recipe", HEADER + "select where type=Dense\nscale kernel 0.5\n")
    bad = write(tmp_path / "bad.recipe", HEADER + BAD_SYNTAX)
    r = run_cli("check", good, bad)
    assert r.status == 2
    assert f"{good}: ok (3 statements)" in r.out
    assert f"{bad}: ok" not in r.out
    assert f"{bad}:3:8: error:" in r.err
    assert "freeze unfreeze" in r.err
    assert "Traceback" not in r.err


def test_check_good_file_only(tmp_path):
    good = write(tmp_path / "good.recipe", HEADER + "select all\nfreeze\n")
    r = run_cli("check", good)
    assert r.status == 0
    assert r.out == f"{good}: ok (3 statements)\n"
    assert r.err == ""


def test_check_static_error_has_position(tmp_path):
    recipe = write(tmp_path / "typo.recipe", HEADER + "select where type=Dens\nfreeze\n")
    r = run_cli("check", recipe)
    assert r.status == 2
    assert f"{recipe}:2:19: error: unknown layer type 'Dens' (did you mean 'Dense'?)" in r.err


def test_check_warns_without_header_and_strict_fails(tmp_path):
    recipe = write(tmp_path / "nohead.recipe", "select all\nfreeze\n")
    r = run_cli("check", recipe)
    assert r.status == 0
    assert f"{recipe}: ok (2 statements)" in r.out
    assert f"{recipe}:1:1: warning:" in r.err
    assert "version header" in r.err

    strict = run_cli("check", "--strict", recipe)
    assert strict.status == 2
    assert f"{recipe}:1:1: warning:" in strict.err
    assert "--strict" in strict.err
    assert "ok" not in strict.out

    headed = write(tmp_path / "head.recipe", HEADER + "select all\nfreeze\n")
    ok = run_cli("check", "--strict", headed)
    assert ok.status == 0
    assert ok.err == ""


# -- fmt -----------------------------------------------------------------------------------------------

UNFORMATTED = """\
# header comment
recipe   "demo"   version "1.0.0"
select   where type = Dense ; scale kernel 0.50   # halve

# structure
replace MaxPool2D with AveragePooling2D
tap conv2d_1,conv2d_2 only   # two taps
# the end
"""

FORMATTED = """\
# header comment
recipe "demo" version "1.0.0"
select where type=Dense
scale kernel 0.5  # halve

# structure
replace MaxPooling2D with AveragePooling2D
tap conv2d_1, conv2d_2 only  # two taps
# the end
"""


def test_fmt_rewrites_to_canonical_form(tmp_path):
    recipe = write(tmp_path / "f.recipe", UNFORMATTED)
    r = run_cli("fmt", recipe)
    assert r.status == 0, r.err
    assert f"{recipe}: formatted" in r.out
    text = recipe.read_text(encoding="utf-8")
    assert text == FORMATTED
    for comment in ("# header comment", "# halve", "# structure", "# two taps", "# the end"):
        assert comment in text
    assert hidden(tmp_path) == []


def test_fmt_is_idempotent(tmp_path):
    once = write(tmp_path / "once.recipe", UNFORMATTED)
    assert run_cli("fmt", once).status == 0
    first = once.read_bytes()
    r = run_cli("fmt", once)
    assert r.status == 0
    assert once.read_bytes() == first
    assert "formatted" not in r.out  # nothing to do the second time


def test_fmt_check(tmp_path):
    messy = write(tmp_path / "messy.recipe", UNFORMATTED)
    tidy = write(tmp_path / "tidy.recipe", FORMATTED)
    messy_before, tidy_before = messy.read_bytes(), tidy.read_bytes()
    r = run_cli("fmt", "--check", messy)
    assert r.status == 1
    assert f"{messy}: not formatted" in r.out
    assert messy.read_bytes() == messy_before
    r = run_cli("fmt", "--check", tidy)
    assert r.status == 0
    assert r.out == "" and r.err == ""
    assert tidy.read_bytes() == tidy_before
    both = run_cli("fmt", "--check", tidy, messy)
    assert both.status == 1
    assert f"{tidy}: not formatted" not in both.out
    assert hidden(tmp_path) == []


def test_fmt_stdout_prints_and_changes_nothing(tmp_path):
    recipe = write(tmp_path / "f.recipe", UNFORMATTED)
    r = run_cli("fmt", "--stdout", recipe)
    assert r.status == 0
    assert r.out == FORMATTED
    assert recipe.read_text(encoding="utf-8") == UNFORMATTED


def test_fmt_syntax_error_leaves_file_alone(tmp_path):
    recipe = write(tmp_path / "bad.recipe", BAD_SYNTAX)
    r = run_cli("fmt", recipe)
    assert r.status == 2
    assert f"{recipe}:2:8: error:" in r.err
    assert recipe.read_text(encoding="utf-8") == BAD_SYNTAX


UNFORMATTED_YAML = """\
# header comment
- recipe: {name: demo, version: 1.0.0}
- select:   {where: "type=Dense"}   # the dense ones

# noise
- add_noise:
    target: bias   # only the bias
    # a normal one
    normal: {stddev: 0.01}
- replace: {source: MaxPool2D, with: "AveragePooling2D"}  # "#" in a string: {glob: "a#b"}
# the end
"""

FORMATTED_YAML = """\
# header comment
- recipe: {name: demo, version: 1.0.0}
- select: {where: type=Dense}  # the dense ones

# noise
# a normal one
- add_noise:
    target: bias
    normal: {stddev: 0.01}  # only the bias
- replace: {source: MaxPooling2D, with: AveragePooling2D}  # "#" in a string: {glob: "a#b"}
# the end
"""


def test_fmt_keeps_the_comments_of_a_yaml_recipe(tmp_path):
    recipe = write(tmp_path / "f.yaml", UNFORMATTED_YAML)
    r = run_cli("fmt", recipe)
    assert (r.status, r.out) == (0, f"{recipe}: formatted\n"), r.err
    assert recipe.read_text(encoding="utf-8") == FORMATTED_YAML  # (every comment dropped before)
    assert run_cli("fmt", "--check", recipe).status == 0  # idempotent
    assert hidden(tmp_path) == []


def test_fmt_keeps_a_comment_on_a_yaml_document_marker():
    from modelxform.lang.fmt import format_text
    assert format_text("--- # doc comment\n- select: all\n- freeze\n", "r.yaml") == \
        "# doc comment\n- {select: all}\n- freeze\n"  # (it was lost: no line before it to join)
    assert format_text("%YAML 1.1 # directive\n---\n- select: all\n", "r.yaml") == "# directive\n- {select: all}\n"


def test_fmt_to_keeps_comments_both_ways(tmp_path):
    text = write(tmp_path / "f.recipe", UNFORMATTED)
    r = run_cli("fmt", "--to", "yaml", text)
    assert r.status == 0, r.err
    for comment in ("# header comment", "# halve", "# structure", "# two taps", "# the end"):
        assert comment in r.out
    assert r.out.splitlines()[3] == "- scale: {target: kernel, factor: 0.5}  # halve"
    back = run_cli("fmt", "--to", "recipe", write(tmp_path / "f.yaml", r.out))
    assert (back.status, back.out) == (0, FORMATTED)


@pytest.mark.parametrize("argv,message", [
    (["--stdout", "--check"], "--check changes and prints nothing; it cannot go with --stdout"),
    (["--to", "yaml", "--check"], "--check changes and prints nothing; it cannot go with --to"),
    (["--to", "yaml", "f.recipe"], "--to converts one recipe at a time"),
])
def test_fmt_options_that_cannot_go_together(tmp_path, argv, message):
    recipe = write(tmp_path / "f.recipe", UNFORMATTED)
    r = run_cli("fmt", *argv, recipe)  # (--check with --stdout printed the text and passed)
    assert (r.status, r.out) == (2, "")
    only_error_line(r.err, f"error: {message}")
    assert recipe.read_text(encoding="utf-8") == UNFORMATTED


def test_a_yaml_recipe_read_as_text_says_how_to_name_it():
    r = run_cli("check", "-", stdin=b"# c\n- select: all\n- freeze\n")
    assert r.status == 2
    assert r.err.splitlines()[0].startswith("<stdin>:2:1: error: unexpected character '-'")
    assert r.err.splitlines()[-1] == ("    hint: this looks like a YAML recipe, which is read as YAML when its name "
                                      "ends in .yaml or .yml (standard input: --stdin-filename NAME.yaml)")


# -- `-`: a recipe on standard input, as black and ruff read one ------------------------------------------

def test_check_reads_a_recipe_from_stdin():
    r = run_cli("check", "-", stdin=(HEADER + "select all; freeze\n").encode())
    assert (r.status, r.out, r.err) == (0, "<stdin>: ok (3 statements)\n", "")
    r = run_cli("check", "-", stdin=(HEADER + "freeze all\n").encode())
    assert r.status == 2 and r.out == ""
    assert r.err.splitlines()[0] == ("<stdin>:2:8: error: `freeze` acts on the selected layers and takes no "
                                     "argument: write `select all; freeze`")
    r = run_cli("check", "-", stdin=b"select all\n\xff\n")
    assert r.status == 2
    assert r.err.splitlines()[0] == "<stdin>:2:1: error: recipe is not valid UTF-8 (byte 0xff)"


def test_check_stdin_filename_names_it_chooses_its_form_and_resolves_includes(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "common.recipe", "select where type=Dense\n")
    r = run_cli("check", "-", "--stdin-filename", tmp_path / "sub" / "main.recipe",
                stdin=(HEADER + 'include "common.recipe"\nscale kernel 90%\n').encode())
    assert (r.status, r.out) == (0, f"{tmp_path / 'sub' / 'main.recipe'}: ok (3 statements)\n"), r.err
    yaml_text = "- recipe: {name: y, version: 1.0.0}\n- select: {where: \"type=Dense\"}\n- freeze\n"
    r = run_cli("check", "-", "--stdin-filename", "r.yaml", stdin=yaml_text.encode())
    assert (r.status, r.out, r.err) == (0, "r.yaml: ok (3 statements)\n", "")
    r = run_cli("check", "-", "--stdin-filename", "r.yaml", stdin=b"- frezee\n")
    assert r.status == 2 and r.err.startswith("r.yaml:1:3: error:")


def test_check_files_and_stdin_together(tmp_path):
    good = write(tmp_path / "good.recipe", HEADER + "select all\nfreeze\n")
    r = run_cli("check", good, "-", stdin=b"select type=Dense\n")
    assert r.status == 2
    assert r.out == f"{good}: ok (3 statements)\n"
    assert "<stdin>:1:8: error: a predicate follows `where`: write `select where type=Dense`" in r.err


@pytest.mark.parametrize("argv,message", [
    (["check", "-", "-"], "error: `-` (standard input) can be given only once"),
    (["fmt", "x.recipe", "--stdin-filename", "y.recipe"],
     "error: --stdin-filename names standard input's recipe: give `-` among the recipes"),
])
def test_stdin_usage_errors(argv, message):
    r = run_cli(*argv, stdin=b"")
    assert r.status == 2
    only_error_line(r.err, message)


def test_fmt_dash_writes_the_formatted_recipe_to_stdout():
    r = run_cli("fmt", "-", stdin=UNFORMATTED.encode())
    assert (r.status, r.out, r.err) == (0, FORMATTED, "")
    r = run_cli("fmt", "-", stdin=b"select  where type=Dense ; scale kernel by 90%\n")
    assert (r.status, r.out) == (0, "select where type=Dense\nscale kernel 0.9\n")
    r = run_cli("fmt", "--to", "yaml", "-", stdin=b"select all; freeze\n")
    assert (r.status, r.out) == (0, "- {select: all}\n- freeze\n")


def test_fmt_check_dash_changes_nothing_and_says_whether_it_is_formatted():
    r = run_cli("fmt", "--check", "-", stdin=UNFORMATTED.encode())
    assert (r.status, r.out) == (1, "<stdin>: not formatted\n")
    r = run_cli("fmt", "--check", "-", stdin=FORMATTED.encode())
    assert (r.status, r.out, r.err) == (0, "", "")


def test_fmt_dash_with_an_error_writes_nothing_to_stdout():
    r = run_cli("fmt", "-", stdin=b"select all\nreplace dense_3 with keras.layers.Dense(units=10)\n")
    assert r.status == 2 and r.out == ""
    assert r.err.splitlines()[0] == ("<stdin>:2:22: error: write the class name without its module: `Dense`, "
                                     "not `keras.layers.Dense`")


def test_stdin_through_a_real_pipe_without_tensorflow(tmp_path):
    for argv, text, status, out in [
            (["check", "-"], HEADER + "select all; freeze\n", 0, "<stdin>: ok (3 statements)"),
            (["fmt", "-"], "select  all ; scale kernel 90%\n", 0, "select all\nscale kernel 0.9"),
            (["fmt", "--check", "-"], "select  all\n", 1, "<stdin>: not formatted")]:
        proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, *argv], cwd=tmp_path, env=subprocess_env(),
                              input=text, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert f"STATUS {status}" in proc.stdout, proc.stdout + proc.stderr
        assert proc.stdout.startswith(out + "\n"), proc.stdout
        assert "LOADED False False" in proc.stdout


# -- inspect -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nested_file(tmp_path_factory):
    from modelxform.keras_io.files import save_model
    path = tmp_path_factory.mktemp("nested") / "nested.keras"
    save_model(make_nested(), path)
    return path


def _row(out: str, path: str) -> str:
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] == path]
    assert len(rows) == 1, (path, out)
    return rows[0]


def test_inspect_lists_every_layer(nested_file):
    from modelxform.keras_io.shapes import shape_text as _shape_text
    from modelxform.keras_io.layers import walk
    r = run_cli("inspect", nested_file)
    assert r.status == 0, r.err
    infos = walk(load(nested_file))
    assert any("/" in info.path for info in infos)  # nested paths are expanded
    for info in infos:
        row = _row(r.out, info.path)
        assert info.type_name in row.split()
        assert _shape_text(tuple(info.layer.output.shape)) in row
        assert f" {info.params():,} " in f" {row} "
    assert f"{len(infos)} layer(s), {sum(i.params() for i in infos):,} params" in r.out


def test_inspect_where_filters(cnn):
    r = run_cli("inspect", cnn, "--where", "type=Dense")
    assert r.status == 0, r.err
    for name in ("dense_1", "dense_2", "dense_3"):
        assert "Dense" in _row(r.out, name)
    for name in ("conv2d_1", "conv2d_2", "flatten", "dropout", "max_pooling2d"):
        assert name not in r.out
    assert "3 layer(s), 62,682 params" in r.out


def test_inspect_where_typo(cnn):
    r = run_cli("inspect", cnn, "--where", "type=Dens")
    assert r.status == 2
    assert "--where:1:6: error:" in r.err
    assert "did you mean 'Dense'" in r.err
    assert "type=Dens" in r.err
    assert "Traceback" not in r.err
    assert r.out == ""


def test_inspect_where_is_one_predicate(cnn):
    for given, error in [("type=Dense; freeze", "--where:1:13: error: --where takes one predicate; `freeze` after "
                                                "it is a statement"),
                         ("type=Dense\nselect all", "--where:2:1: error: --where takes one predicate; `select all` "
                                                    "after it is a statement"),
                         ("type=Dense # and name=dense_1", "--where:1:12: error: `#` starts a comment here, and the "
                                                           "rest would be dropped; a predicate has no comments")]:
        r = run_cli("inspect", cnn, "--where", given)  # (what followed `;` was dropped: all Dense layers listed)
        assert (r.status, r.out) == (2, "")
        assert r.err.splitlines()[0] == error
        statement = error.split("`")[1]
        assert r.err.splitlines()[2].strip() == "^" * len(statement)  # (under the statement, or the `#`)


def test_inspect_json(nested_file):
    from modelxform.keras_io.layers import walk
    r = run_cli("inspect", nested_file, "--json")
    assert r.status == 0, r.err
    data = json.loads(r.out)
    assert data["model"] == str(nested_file)
    paths = [row["path"] for row in data["layers"]]
    assert paths == [info.path for info in walk(load(nested_file))]
    for row in data["layers"]:
        assert set(row) == {"path", "type", "output_shape", "params", "trainable"}
        assert isinstance(row["params"], int) and isinstance(row["trainable"], bool)
    filtered = json.loads(run_cli("inspect", nested_file, "--json", "--where", "has weights").out)
    assert {row["type"] for row in filtered["layers"]} == {"Conv2D", "BatchNormalization", "Dense"}


def test_inspect_weights_lists_each_layers_variables(nested_file):
    from modelxform.keras_io.layers import walk
    r = run_cli("inspect", nested_file, "--weights")
    assert r.status == 0, r.err
    model = load(nested_file)
    variables = [(info.path, v) for info in walk(model) for v in info.layer.weights]
    assert len(variables) == 10
    assert "variables: 10 (a recipe targets them by name, e.g. `scale kernel 0.9`)" in r.out
    lines = r.out.splitlines()
    for path, v in variables:
        shape = "(" + ", ".join(str(d) for d in v.shape) + ("," if len(v.shape) == 1 else "") + ")"
        expected = [path, v.name, v.path, *shape.split(), "float32", "yes" if v.trainable else "no"]
        assert sum(1 for line in lines if line.split() == expected) == 1, (expected, r.out)
    # the rest of inspect's output is there too
    assert "6 layer(s), 291 params" in r.out and "nested models:" in r.out
    assert "variables:" not in run_cli("inspect", nested_file).out

    data = json.loads(run_cli("inspect", nested_file, "--weights", "--json", "--where", "type=BatchNormalization").out)
    (row,) = data["layers"]
    assert row["variables"] == [
        {"name": name, "path": path, "shape": "(4,)", "dtype": "float32", "trainable": trainable}
        for name, path, trainable in [(v.name, v.path, v.trainable)
                                      for v in model.get_layer("backbone").get_layer("block").get_layer("bn_a").weights]]
    assert [v["name"] for v in row["variables"]] == ["gamma", "beta", "moving_mean", "moving_variance"]


def test_a_missing_variable_points_to_inspect_weights(tmp_path, cnn):
    recipe = write(tmp_path / "dw.recipe", HEADER + "select where type=Conv2D\nscale depthwise_kernel 0.5\n")
    r = run_cli("apply", recipe, cnn, "-o", tmp_path / "out.keras")
    assert r.status == 4
    lines = r.err.splitlines()
    assert lines[0] == f"{recipe}:3:1: error: the selected layers have no variable 'depthwise_kernel'"
    assert lines[-1] == ("    hint: they have: bias, kernel; `modelxform inspect MODEL --weights` lists every "
                         "layer's variables")
    assert not (tmp_path / "out.keras").exists()


# -- what a recipe did not do as meant ------------------------------------------------------------------

SHUFFLE_TWO = (HEADER + 'insert Dropout(rate=0.1, name="drop_a") after dense_1\n'
               'insert GaussianDropout(rate=0.1, name="drop_b") after dense_2\nselect drop_a, drop_b\nshuffle\n')


def test_a_shuffle_that_leaves_every_layer_in_place_warns_and_writes(tmp_path, cnn):
    recipe = write(tmp_path / "shuffle.recipe", SHUFFLE_TWO)
    # seed 0 draws the order the two layers have, seed 1 the other one
    same = run_cli("apply", recipe, cnn, "-o", tmp_path / "same.keras", "--seed", "0")
    assert same.status == 0, same.err
    assert same.err.splitlines() == [
        f"{recipe}:5:1: warning: shuffle left all 2 selected layers in place: seed 0 drew the order they already "
        "have, so the shuffle changed nothing",
        "    shuffle",
        "    ^^^^^^^",
        "    hint: another --seed draws another order (with 2 layers, 1 seed in 2 draws it)",
    ]
    assert "    (the permutation left every layer in place)" in same.out.splitlines()
    assert (tmp_path / "same.keras").is_file()
    moved = run_cli("apply", recipe, cnn, "-o", tmp_path / "moved.keras", "--seed", "1")
    assert moved.status == 0 and moved.err == ""
    assert "the place of drop_a now holds drop_b" in moved.out
    plan = run_cli("plan", recipe, cnn, "--seed", "0", "--json")
    assert plan.status == 0
    reports = json.loads(plan.out)["statements"]
    assert reports[-1]["warnings"] == [
        "shuffle left all 2 selected layers in place: seed 0 drew the order they already have, so the shuffle "
        "changed nothing"]
    assert all(report["warnings"] == [] for report in reports[:-1])
    assert "warning: shuffle left all 2 selected layers in place" in plan.err


def test_swap_into_a_place_of_another_rank_says_so_without_numpy(tmp_path, cnn):
    recipe = write(tmp_path / "swap.recipe", HEADER + "swap max_pooling2d dropout\n")
    r = run_cli("apply", recipe, cnn, "-o", tmp_path / "out.keras")
    assert r.status == 4
    assert r.err.splitlines()[0] == (
        f"{recipe}:2:1: error: max_pooling2d (MaxPooling2D) takes 4-dimensional input, like the (None, 26, 26, 8) "
        "it was built for, but in dropout's place it would receive (None, 32)")
    assert "broadcast" not in r.err and "Traceback" not in r.err
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("command", ["apply", "plan"])
def test_json_report_keeps_the_params_apart_from_the_counts(tmp_path, cnn, command):
    recipe = write(tmp_path / "ok.recipe", "param factor = 0.5\nselect where type=Dense; freeze\n"
                                           "append Dense(units=2, name=\"extra\")\nselect all; scale weights $factor\n")
    out = tmp_path / "out.keras"
    argv = ["-o", out] if command == "apply" else []
    r = run_cli(command, recipe, cnn, *argv, "--json", "--seed", "3", "--param", "factor=0.25")
    assert r.status == 0, r.err
    data = json.loads(r.out)
    assert data["seed"] == 3 and data["params"] == {"factor": 0.25}  # the recipe's parameters
    assert data["layer_count"] == [8, 9]
    assert data["param_count"] == [63930, 63930 + 10 * 2 + 2]  # the model's, before and after
    assert data["output"] == (str(out) if command == "apply" else None)
    assert out.is_file() == (command == "apply")


# -- fresh interpreters --------------------------------------------------------------------------------

NO_TF_PROBE = """\
import sys
from modelxform.cli import main
status = main(sys.argv[1:])
print("STATUS", status)
print("LOADED", "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("command", ["check", "fmt --check", "--help"])
def test_fast_commands_do_not_import_tensorflow(tmp_path, command):
    recipe = write(tmp_path / "ok.recipe", HEADER + "select all\nfreeze\n")
    argv = command.split() + ([] if command == "--help" else [recipe.name])
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, *argv], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "STATUS 0" in proc.stdout, proc.stdout + proc.stderr
    if command == "check":
        assert "ok.recipe: ok (3 statements)" in proc.stdout
    if command == "--help":
        assert "usage: modelxform" in proc.stdout
    assert "LOADED False False" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name,content,message", [
    ("notzip.keras", b"not a zip at all", "notzip.keras: not a .keras archive (a .keras file is a zip)"),
    ("notmodel.h5", b"\x89HDF\r\n\x1a\n but not really", "notmodel.h5: not a readable HDF5 file"),
])
def test_a_file_that_is_no_model_is_refused_without_tensorflow(tmp_path, name, content, message):
    recipe = write(tmp_path / "r.recipe", "replace MaxPooling2D with AveragePooling2D\n")
    (tmp_path / name).write_bytes(content)
    proc = subprocess.run([sys.executable, "-c", NO_TF_PROBE, "apply", recipe.name, name, "-o", "out.keras"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert "STATUS 3" in proc.stdout, proc.stdout + proc.stderr
    assert f"error: {message}" in proc.stderr
    assert "LOADED False False" in proc.stdout  # the refusal did not wait for TensorFlow's import
    assert not (tmp_path / "out.keras").exists()


BLAS_SPIN_PROBE = """\
import os, sys, time
import modelxform.cli
assert "numpy" not in sys.modules


def main(argv=None):  # in place of the command line: load numpy as a command would, then look
    import numpy
    time.sleep(0.4)  # (OpenBLAS's threads spin about 0.1 s after it loads, unless told not to)
    me = os.getpid()
    ticks = 0
    for tid in os.listdir(f"/proc/{me}/task"):
        if int(tid) != me:
            fields = open(f"/proc/{me}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    print("OTHER_THREADS_CPU", ticks / os.sysconf("SC_CLK_TCK"))
    return 0


modelxform.cli.main = main
from modelxform.__main__ import run
sys.exit(run())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads' CPU time from /proc")
def test_the_command_line_keeps_numpys_blas_threads_from_spinning(tmp_path):
    """modelxform's entry point tells OpenBLAS's threads to sleep while they have no work (they would
    otherwise spin ~0.1 s of CPU per core when numpy loads, which a first run's digest needs); a value
    the user set is kept: 28 (OpenBLAS's default) shows the spinning this prevents."""
    def other_threads_cpu(**env):
        proc = subprocess.run([sys.executable, "-c", BLAS_SPIN_PROBE], cwd=tmp_path,
                              env={k: v for k, v in subprocess_env(**env).items() if v is not None},
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        return float(re.search(r"OTHER_THREADS_CPU (\S+)", proc.stdout).group(1))
    told = other_threads_cpu(OPENBLAS_THREAD_TIMEOUT="28")
    if told < 0.03:
        pytest.skip(f"numpy's BLAS does not spin here ({told:.2f} s of CPU in other threads)")
    assert other_threads_cpu(OPENBLAS_THREAD_TIMEOUT=None) <= 0.01


def test_module_help_lists_subcommands_and_exit_codes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelxform", "--help"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for command in ("apply", "plan", "check", "fmt", "inspect"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), (command, text)
    for code, meaning in [(0, "ok"), (1, "assert failed"), (2, "usage error"), (3, "model file"),
                          (4, "could not be applied")]:
        assert re.search(rf"^\s+{code}\s+.*{meaning}", text, re.M), (code, text)
    assert "Traceback" not in proc.stderr


def test_no_command_prints_help_and_exits_2():
    r = run_cli()
    assert r.status == 2
    assert "usage: modelxform" in r.out and "exit status:" in r.out



@pytest.mark.parametrize("statement", ["insert Dropout(rate=0.1) before dense_1", "append Dense(units=2)",
                                       "replace MaxPooling2D with AveragePooling2D"])
def test_a_structural_apply_keeps_tensorflows_start_up_messages_off_the_terminal(tmp_path, cnn_bytes, statement):
    """TensorFlow's C++ code writes its start-up messages (absl, oneDNN, CUDA) straight to file
    descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says: Keras is imported quietly (files.import_keras)
    whichever statement needs it first — `insert` and `append` look their layer class up before
    anything else imports Keras."""
    (tmp_path / "cnn.keras").write_bytes(cnn_bytes)
    (tmp_path / "t.recipe").write_text(f'recipe "t" version "1"\n{statement}\n')
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as on a user's terminal
    proc = subprocess.run([sys.executable, "-m", "modelxform", "apply", "t.recipe", "cnn.keras", "-o", "out.keras"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "wrote out.keras" in proc.stdout


def test_export_keeps_tensorflows_start_up_messages_off_the_terminal(tmp_path, cnn_bytes):
    (tmp_path / "cnn.keras").write_bytes(cnn_bytes)
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    proc = subprocess.run([sys.executable, "-m", "modelxform", "export", "cnn.keras", "served"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "served" / "saved_model.pb").is_file()


# -- a reader that goes away (`| head -1`) --------------------------------------------------------------

def _with_stdout_closed_by_its_reader(argv, cwd):
    """Run the command line with its standard output a pipe whose reading end is already closed: every
    write to it fails with EPIPE (the interpreter ignores SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "modelxform", *map(str, argv)], cwd=cwd, env=subprocess_env(),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=SUBPROCESS_TIMEOUT)
    finally:
        os.close(write_end)


def test_output_to_a_closed_pipe_is_discarded_and_the_command_completes(tmp_path, model_file):
    model = model_file("cnn")
    recipe = write(tmp_path / "r.recipe", HEADER + "select where type=Dense; scale kernel 0.5\n")
    for argv in (["check", recipe], ["fmt", "--stdout", recipe], ["inspect", model], ["plan", recipe, model]):
        proc = _with_stdout_closed_by_its_reader(argv, tmp_path)  # (was: a BrokenPipeError traceback, exit 1)
        assert (proc.returncode, proc.stderr) == (0, ""), argv
    proc = _with_stdout_closed_by_its_reader(["apply", recipe, model, "-o", tmp_path / "piped.keras"], tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert run_cli("apply", recipe, model, "-o", tmp_path / "plain.keras").status == 0
    assert (tmp_path / "piped.keras").read_bytes() == (tmp_path / "plain.keras").read_bytes()  # saved whole
    failing = write(tmp_path / "f.recipe", HEADER + "select where type=Dense\nassert count == 7\n")
    proc = _with_stdout_closed_by_its_reader(["apply", failing, model, "-o", tmp_path / "no.keras"], tmp_path)
    assert proc.returncode == 1 and "assert failed" in proc.stderr and "Traceback" not in proc.stderr


# -- a backend Keras does not have ---------------------------------------------------------------------

@pytest.mark.parametrize("chosen,guess", [("nonsense", ""), ("JAX", " (did you mean 'jax'?)")])
def test_a_backend_keras_does_not_have_is_one_line_before_any_work(tmp_path, model_file, chosen, guess):
    model = model_file("cnn")
    weights = write(tmp_path / "w.recipe", HEADER + "select where type=Dense; scale kernel 0.5\n")
    structural = write(tmp_path / "s.recipe", HEADER + "replace MaxPooling2D with AveragePooling2D\n")
    zoo = write(tmp_path / "zoo.yaml", f"models: [{model}]\nrecipes: [{weights}]\noutput: \"out/{{model}}.keras\"\n")
    message = (f"error: Keras's backend is '{chosen}' (from KERAS_BACKEND), which is not one Keras has{guess}; "
               "it has tensorflow, jax, torch, numpy, openvino")
    for argv in (["apply", weights, model, "-o", "w.keras"], ["apply", structural, model, "-o", "s.keras"],
                 ["inspect", model], ["batch", zoo]):
        proc = subprocess.run([sys.executable, "-m", "modelxform", *map(str, argv)], cwd=tmp_path,
                              env=subprocess_env(KERAS_BACKEND=chosen), capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT)  # (was: Keras's ValueError and a traceback; or,
        assert (proc.returncode, proc.stdout) == (2, ""), argv  # weight-only, a record naming the backend)
        only_error_line(proc.stderr, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["w.recipe", "s.recipe", "zoo.yaml", model.name])
    home = tmp_path / "home"
    home.mkdir()
    (home / "keras.json").write_text('{"backend": "tensorflw"}')
    proc = subprocess.run([sys.executable, "-m", "modelxform", "inspect", str(model)], cwd=tmp_path,
                          env={**subprocess_env(KERAS_HOME=str(home)), "KERAS_BACKEND": ""}, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 2
    only_error_line(proc.stderr, f"error: Keras's backend is 'tensorflw' (from {home / 'keras.json'}), which is "
                                 "not one Keras has (did you mean 'tensorflow'?)")


@pytest.mark.parametrize("given", ["-3", "x", "1.5", "9" * 101])
def test_a_seed_argument_that_is_not_a_whole_number_of_at_least_0_is_refused(tmp_path, model_file, given, capsys):
    model = model_file("cnn")
    recipe = write(tmp_path / "r.recipe", HEADER + "select where type=Dense; scale kernel 0.5\n")
    for command in (["apply", recipe, model, "-o", tmp_path / "out.keras"], ["plan", recipe, model]):
        capsys.readouterr()
        r = run_cli(*command, f"--seed={given}")  # (-3 was written into a record `provenance` then refused)
        assert (r.status, r.out) == (2, "")
        shown = repr(given) if len(given) <= 60 else f"{given[:40]!r}… (101 characters)"
        assert capsys.readouterr().err.splitlines()[-1] == f"modelxform {command[0]}: error: argument --seed: a " \
            f"seed is a whole number ≥ 0 of at most 100 digits, not {shown}"
    assert not (tmp_path / "out.keras").exists()


def test_traceback_is_an_option_of_every_command_too(tmp_path):
    for argv in (["--traceback", "provenance", tmp_path / "nope.keras"], ["provenance", tmp_path / "nope.keras",
                                                                          "--traceback"]):
        r = run_cli(*argv)  # (after the command it was "unrecognized arguments")
        assert r.status == 3
        assert r.err.startswith("Traceback (most recent call last):")
        assert r.err.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.keras'}: no such file"
    r = run_cli("provenance", tmp_path / "nope.keras")
    assert (r.status, r.err) == (3, f"error: {tmp_path / 'nope.keras'}: no such file\n")


def test_the_samples_module_has_help_and_one_line_errors(tmp_path, capsys):
    from modelxform.samples import main as samples
    assert samples(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m modelxform.samples {cnn} OUT.keras\n")
    assert samples(["cnn", str(tmp_path / "missing" / "x.keras")]) == 3  # (was a traceback)
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing' / 'x.keras'}: folder {tmp_path / 'missing'} " \
                                      "does not exist\n"
    assert samples(["vgg", "x.keras"]) == 2


def test_no_output_is_a_file_the_recipe_includes_or_loads_weights_from(tmp_path, model_file):
    model = model_file("cnn")
    donor = tmp_path / "donor.keras"
    donor.write_bytes(model.read_bytes())
    write(tmp_path / "part.recipe", "select where type=Dense\n")
    loads = write(tmp_path / "lw.recipe", HEADER + 'select where type=Dense\nload weights from "donor.keras"\n')
    includes = write(tmp_path / "inc.recipe", HEADER + 'include "part.recipe"\nscale kernel 0.5\n')
    (tmp_path / "alias.keras").symlink_to(donor)
    before = {p: p.read_bytes() for p in (donor, tmp_path / "part.recipe")}
    for argv, message in [
            (["apply", loads, model, "-o", donor], f"-o {donor} is a file the recipe loads weights from"),
            (["apply", loads, model, "-o", tmp_path / "alias.keras"],
             f"-o {tmp_path / 'alias.keras'} is a file the recipe loads weights from"),
            (["plan", loads, model, "--html", donor], f"--html {donor} is a file the recipe loads weights from"),
            (["apply", includes, model, "-o", tmp_path / "part.recipe", "--format", "keras"],
             f"-o {tmp_path / 'part.recipe'} is a file the recipe includes"),
    ]:
        r = run_cli(*argv)  # (each replaced the file: exit 0)
        assert (r.status, r.out) == (2, ""), argv
        only_error_line(r.err, f"error: {message}; refusing to overwrite it")
    assert {p: p.read_bytes() for p in before} == before
    zoo = write(tmp_path / "zoo.yaml", f"models: [{model.name}]\nrecipes: [lw.recipe]\noutput: \"donor.keras\"\n")
    r = run_cli("batch", zoo, "--dry-run")
    assert r.status == 2
    assert r.err.splitlines()[0] == (f"{zoo}:3:9: error: output 'donor.keras' for {model.name} × lw.recipe is a "
                                     "file its recipe reads (donor.keras)")
    assert donor.read_bytes() == before[donor]
