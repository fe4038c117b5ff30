"""Hostile input, round 2 (issue 16): a recipe, a model file and a provenance record may each come from
someone else. Safe mode on every path, no disclosure through `include` or `verify`, bounded reads,
validated provenance, honest checks, atomic .h5 outputs, batch leftovers, and the smaller holes.

Each section names the point of the issue it covers; docs/robustness.md lists the classes of attack
tried here and what the user sees.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from conftest import ROOT, make_sequential, run_cli

SUBPROCESS_TIMEOUT = 120
WEIGHT_ONLY = "select where type=Dense\nscale kernel 0.5\n"  # the archive (TensorFlow-free) path
STRUCTURAL = "replace Dropout with GaussianDropout(rate=0.1)\n"  # a rebuild


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def listing(folder) -> set[str]:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def only_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def env(**extra) -> dict:
    out = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out.update(extra)
    return out


NO_TF_PROBE = """\
import sys
from modelxform.cli import main
status = main(sys.argv[1:])
print("STATUS", status)
print("LOADED", "tensorflow" in sys.modules, "keras" in sys.modules)
"""


def no_tf_run(cwd, *argv):
    return subprocess.run([sys.executable, "-c", NO_TF_PROBE, *map(str, argv)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def seq_bytes(tmp_path_factory) -> bytes:
    """The small Sequential model (features -> fc1 Dense(relu) -> dropout_1 -> fc2), saved once."""
    from modelxform.keras_io.files import save_model
    path = tmp_path_factory.mktemp("seq") / "seq.keras"
    save_model(make_sequential(), path)
    return path.read_bytes()


@pytest.fixture
def seq(tmp_path, seq_bytes) -> pathlib.Path:
    path = tmp_path / "seq.keras"
    path.write_bytes(seq_bytes)
    return path


def rewrite_member(src: pathlib.Path, dst: pathlib.Path, member: str, change) -> pathlib.Path:
    """Copy a .keras zip with one member's bytes passed through change(bytes) -> bytes."""
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in members:
            if info.filename == member:
                data = change(data)
            zout.writestr(info, data)
    return dst


def edit_config(src, dst, edit) -> pathlib.Path:
    def change(data):
        config = json.loads(data)
        edit(config)
        return json.dumps(config).encode()
    return rewrite_member(src, dst, "config.json", change)


def layer(config: dict, name: str) -> dict:
    return next(e for e in config["config"]["layers"] if e["config"]["name"] == name)


# A Python lambda as Keras serializes one (keras.saving.serialize_keras_object(lambda x: x * 2)): its
# marshalled code. Loading it with safe mode off would run it.
LAMBDA = {"class_name": "__lambda__", "config": {"value": [
    "4wEAAAAAAAAAAAAAAAIAAAADAAAA8wwAAACXAHwAZAF6BQAAUwApAk7pAgAAAKkAKQHaAXhzAQAA\nACD6Di90bXAvdzE2L21rLnB5"
    "+gg8bGFtYmRhPnIGAAAABwAAAHMKAAAAgACwQbgBsUWAAPMAAAAA\n", None, None]}}


def _lambda_activation(config):
    layer(config, "fc1")["config"]["activation"] = LAMBDA


def _lambda_in_initializer(config):
    layer(config, "fc2")["config"]["kernel_initializer"]["config"]["seed"] = LAMBDA


def _os_function(config):
    layer(config, "fc1")["config"]["activation"] = {"module": "os", "class_name": "function",
                                                   "config": "system", "registered_name": "system"}


def _vocabulary_file(config):
    layer(config, "fc1")["config"]["extra"] = {"module": "keras.layers", "class_name": "StringLookup",
                                              "config": {"name": "words", "vocabulary": "/etc/passwd"},
                                              "registered_name": None}


# ---- 1. safe mode on every path ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit,fragment", [
    (_lambda_activation, "a serialized Python lambda (layer 'fc1', activation)"),
    (_lambda_in_initializer, "a serialized Python lambda (layer 'fc2', seed)"),
    (_vocabulary_file, "a StringLookup ('words') that reads its vocabulary from a file outside the archive"),
], ids=["lambda-activation", "lambda-anywhere", "vocabulary-file"])
def test_every_path_refuses_what_safe_mode_refuses_with_one_message(tmp_path, seq, monkeypatch, edit, fragment):
    model = edit_config(seq, tmp_path / "hostile.keras", edit)
    weight_only = write(tmp_path / "w.recipe", WEIGHT_ONLY)
    structural = write(tmp_path / "s.recipe", STRUCTURAL)
    out = tmp_path / "out.keras"
    before = listing(tmp_path)
    seen = set()
    runs = [("apply", weight_only, model, "-o", out), ("apply", structural, model, "-o", out),
            ("plan", weight_only, model), ("inspect", model), ("diff", seq, model)]
    for argv in runs:
        r = run_cli(*argv)
        assert r.status == 3, (argv, r.status, r.err, r.out)
        seen.add(only_error_line(r.err, str(model), fragment, "safe mode", "--unsafe"))
    monkeypatch.setenv("MODELXFORM_FASTPATH", "0")  # the Keras path: the same message
    r = run_cli("apply", weight_only, model, "-o", out)
    assert r.status == 3
    seen.add(only_error_line(r.err))
    assert len(seen) == 1, seen
    assert listing(tmp_path) == before  # nothing written


def test_the_archive_path_refuses_before_importing_tensorflow(tmp_path, seq):
    edit_config(seq, tmp_path / "hostile.keras", _lambda_activation)
    write(tmp_path / "w.recipe", WEIGHT_ONLY)
    proc = no_tf_run(tmp_path, "apply", "w.recipe", "hostile.keras", "-o", "out.keras")
    assert "STATUS 3" in proc.stdout, proc.stdout + proc.stderr
    assert "a serialized Python lambda" in proc.stderr and "Traceback" not in proc.stderr
    assert "LOADED False False" in proc.stdout
    assert not (tmp_path / "out.keras").exists()


def test_a_function_from_another_module_is_left_to_keras_which_refuses_it(tmp_path, seq):
    model = edit_config(seq, tmp_path / "hostile.keras", _os_function)
    recipe = write(tmp_path / "w.recipe", WEIGHT_ONLY)
    r = run_cli("apply", recipe, model, "-o", tmp_path / "out.keras")
    assert r.status == 3, r.out + r.err
    only_error_line(r.err, str(model), "'system'")
    assert not (tmp_path / "out.keras").exists()


def test_unsafe_lets_the_archive_path_leave_a_lambda_to_keras(tmp_path, seq):
    """With --unsafe, Keras loads the lambda (the user trusts the file); the archive never copies a
    config it cannot vouch for."""
    from modelxform import session
    from modelxform.keras_io.archive import Archive
    model = edit_config(seq, tmp_path / "hostile.keras", _lambda_activation)
    source = session.open_model(model, unsafe=True)
    assert not isinstance(source, Archive)


def test_the_activation_snapshot_is_the_installed_keras_one():
    """archive.KERAS_ACTIVATIONS: the names keras.activations.get resolves (Keras internals, read here so
    that a Keras release that adds or drops one fails loudly)."""
    from keras.src.activations import ALL_OBJECTS_DICT
    from modelxform.keras_io.archive import KERAS_ACTIVATIONS
    assert KERAS_ACTIVATIONS == set(ALL_OBJECTS_DICT)


def test_what_safe_mode_refuses_is_found_anywhere_in_any_json():
    from modelxform.keras_io.safety import unsafe_content
    assert unsafe_content({"a": [1, "x", None, {"b": {"c": LAMBDA}}]}) == "a serialized Python lambda"
    assert unsafe_content([[[{"class_name": "TFSMLayer", "config": {"name": "sm"}}]]]) == \
        "a TFSMLayer ('sm'), which loads an external SavedModel"
    assert unsafe_content({"class_name": "TorchModuleWrapper", "config": {"name": "t", "module": "gASV"}}) == \
        "a TorchModuleWrapper ('t') holding a pickled torch module"
    lam = {"class_name": "Lambda", "module": "keras.layers", "config": {"name": "double", "function": LAMBDA}}
    assert unsafe_content({"config": {"layers": [lam]}}) == "a Lambda layer ('double') whose function is Python code"
    for harmless in (None, 3, "__lambda__", {"class_name": "Dense", "config": {"name": "d", "activation": "relu"}},
                     {"class_name": "StringLookup", "config": {"name": "s", "vocabulary": ["a", "b"]}}):
        assert unsafe_content(harmless) is None
    deep = current = {}
    for _ in range(100_000):  # no recursion: a hostile config cannot exhaust the stack
        current["x"] = current = {}
    assert unsafe_content(deep) is None


def _lambda_model(path: pathlib.Path, name: str = "double") -> pathlib.Path:
    import keras
    inp = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, name="dense")(inp)
    out = keras.layers.Lambda(lambda x: x * 2, name=name)(hidden)
    keras.Model(inp, out, name="with_lambda").save(path)
    return path


def test_unsafe_lets_structural_statements_rebuild_a_lambda_model(tmp_path):
    model = _lambda_model(tmp_path / "lam.keras")
    recipe = write(tmp_path / "r.recipe", 'append Dense(units=2, name="head")\ntap dense\n')
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, model, "-o", out)
    assert r.status == 3
    only_error_line(r.err, "a Lambda layer ('double') whose function is Python code", "--unsafe")
    r = run_cli("apply", recipe, model, "-o", out, "--unsafe")
    assert r.status == 0, r.err
    import keras
    rebuilt = keras.saving.load_model(out, safe_mode=False)
    assert [layer.name for layer in rebuilt.layers] == ["x", "dense", "double", "head"]
    x = np.ones((1, 4), "float32")
    dense = rebuilt.get_layer("dense")
    np.testing.assert_allclose(rebuilt(x)[1], dense(x))  # the tap
    np.testing.assert_allclose(rebuilt.get_layer("double")(dense(x)), 2 * dense(x))  # the lambda's code


def test_a_load_error_naming_a_layer_lambda_is_not_called_a_lambda_layer(tmp_path, seq):
    def rename_and_damage(config):
        entry = layer(config, "fc2")
        entry["config"]["name"] = "Lambda_head"
        entry["config"]["units"] = 5  # the weights no longer fit
    model = edit_config(seq, tmp_path / "damaged.keras", rename_and_damage)
    recipe = write(tmp_path / "s.recipe", STRUCTURAL)
    r = run_cli("apply", recipe, model, "-o", tmp_path / "out.keras")
    assert r.status == 3
    line = only_error_line(r.err, str(model))
    assert "safe mode" not in line and "--unsafe" not in line and "Lambda layer" not in line, line


# ---- 2. no disclosure through `include` ---------------------------------------------------------------

def check(*argv):
    start = time.perf_counter()
    r = run_cli("check", *argv)
    r.seconds = time.perf_counter() - start
    return r


def test_include_of_the_process_environment_prints_none_of_it(tmp_path, monkeypatch):
    main = write(tmp_path / "main.recipe", 'select all\ninclude "/proc/self/environ"\nfreeze\n')
    r = check(main)
    assert r.status == 2
    assert r.err.splitlines()[0] == (f"{main}:2:1: error: cannot include '/proc/self/environ': it is not a recipe "
                                     "(a syntax error at line 1, column 1)"), r.err
    for name in ("PATH", "HOME"):
        if os.environ.get(name):
            assert os.environ[name] not in r.err
    assert "=" not in r.err.replace('"', "")  # no NAME=value of the environment


def test_include_of_a_system_file_quotes_none_of_it(tmp_path):
    secret = write(tmp_path / "secrets.txt", "root:x:0:0:root:/root:/bin/bash\napi_key = hunter2\n")
    for target in (str(secret), "/etc/passwd"):
        if not os.path.isfile(target):
            continue
        main = write(tmp_path / "main.recipe", f'select all\ninclude "{target}"\n')
        r = check(main)
        assert r.status == 2
        assert f"cannot include '{target}': it is not a recipe (a syntax error at line 1, column " in r.err
        assert "root:" not in r.err and "hunter2" not in r.err and "root" not in r.err.split(target)[-1]


def test_an_included_yaml_file_that_is_not_a_recipe_is_not_quoted(tmp_path):
    write(tmp_path / "config.yaml", "database:\n  password: hunter2\n")
    write(tmp_path / "list.yaml", "- select: all\n- password: hunter2\n")
    write(tmp_path / "broken.yaml", "- select: all\n- {password: hunter2\n")
    for name, reason in [("config.yaml", "a YAML document that is not a list of statements at line 1, column 1"),
                         ("list.yaml", "a key that is not a statement at line 2, column 3"),
                         ("broken.yaml", "not a YAML document a recipe can be at line 3, column 1")]:
        main = write(tmp_path / "main.recipe", f'include "{name}"\n')
        r = check(main)
        assert r.status == 2
        assert f"cannot include '{name}': it is not a recipe ({reason})" in r.err, r.err
        assert "hunter2" not in r.err and "password" not in r.err


def test_errors_in_an_included_recipe_are_still_shown_with_their_line(tmp_path):
    write(tmp_path / "part.recipe", "select all\nscale kernel $missing\n")
    main = write(tmp_path / "main.recipe", 'include "part.recipe"\n')
    r = check(main)
    assert r.status == 2
    assert "part.recipe:2:14: error: unknown parameter $missing" in r.err
    assert "scale kernel $missing" in r.err  # recipe text: quoted with its caret


@pytest.mark.parametrize("kind,message", [
    ("fifo", "cannot include 'inc.recipe': it is a FIFO (named pipe), not a recipe file"),
    ("device", "cannot include '/dev/zero': it is a character device, not a recipe file"),
    ("directory", "cannot include 'inc.recipe': it is a directory, not a recipe file"),
    ("huge", "cannot include 'inc.recipe': it is larger than 1000000 bytes"),
    ("binary", "cannot include 'inc.recipe': recipe is not valid UTF-8 text"),
])
def test_an_included_file_is_checked_before_it_is_read(tmp_path, kind, message):
    inc = tmp_path / "inc.recipe"
    target = "inc.recipe"
    if kind == "fifo":
        os.mkfifo(inc)
    elif kind == "device":
        target = "/dev/zero"
    elif kind == "directory":
        inc.mkdir()
    elif kind == "huge":
        with open(inc, "wb") as fh:  # sparse: 4 GB that reading would take seconds and gigabytes
            fh.truncate(4 << 30)
    else:
        inc.write_bytes(b"select all\n\xff\xfe secret \x00")
    main = write(tmp_path / "main.recipe", f'select all\ninclude "{target}"\n')
    r = check(main)
    assert r.status == 2
    assert r.err.splitlines()[0] == f"{main}:2:1: error: {message}", r.err
    assert "secret" not in r.err and "0xff" not in r.err
    assert r.seconds < 1.0


def test_include_root_confines_includes(tmp_path, monkeypatch):
    root = tmp_path / "ci"
    (root / "parts").mkdir(parents=True)
    write(root / "parts" / "common.recipe", "select all\n")
    outside = write(tmp_path / "outside.recipe", "freeze\n")
    (root / "parts" / "link.recipe").symlink_to(outside)
    good = write(root / "good.recipe", 'include "parts/common.recipe"\nfreeze\n')
    assert check(good, "--include-root", root).status == 0
    for target in ("../outside.recipe", str(outside), "parts/link.recipe"):
        bad = write(root / "bad.recipe", f'include "{target}"\nfreeze\n')
        r = check(bad, "--include-root", root)
        assert r.status == 2
        assert r.err.splitlines()[0] == (f"{bad}:1:1: error: cannot include {target!r}: it is outside the include "
                                         f"root {root.resolve()}"), r.err
    # the environment variable does the same for every command, batch workers included
    monkeypatch.setenv("MODELXFORM_INCLUDE_ROOT", str(root))
    assert check(bad).status == 2
    assert check(good).status == 0
    assert run_cli("fmt", "--check", bad).status == 2
    r = run_cli("apply", bad, tmp_path / "no-model.keras", "-o", tmp_path / "out.keras")
    assert r.status == 2 and "outside the include root" in r.err
    monkeypatch.delenv("MODELXFORM_INCLUDE_ROOT")
    r = run_cli("plan", bad, tmp_path / "no-model.keras", "--include-root", root)
    assert r.status == 2 and "outside the include root" in r.err
    assert run_cli("check", good, "--include-root", tmp_path / "nowhere").status == 2


def test_batch_takes_the_include_root_too(tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    write(tmp_path / "outside.recipe", "freeze\n")
    write(root / "r.recipe", 'include "../outside.recipe"\nselect all\n')
    (root / "m.keras").write_bytes(b"never read")
    zoo = write(root / "zoo.yaml", 'models: [m.keras]\nrecipes: [r.recipe]\noutput: "out/{model}.keras"\n')
    r = run_cli("batch", zoo, "--include-root", root)
    assert r.status == 2 and "outside the include root" in r.err
    assert not (root / "out").exists()


# ---- 2b. a batch file is someone else's too: its recipes, models, outputs, imports and params -----------

ZOO_HEAD = 'models: [m.keras]\noutput: "out/{model}.keras"\n'


def zoo_with(folder: pathlib.Path, tail: str, name: str = "zoo.yaml") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "m.keras").exists():
        (folder / "m.keras").write_bytes(b"never read: the batch file is refused first")
    return write(folder / name, ZOO_HEAD + tail)


def test_a_zoo_recipe_that_is_the_process_environment_prints_none_of_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MX_TEST_SECRET", "ghp_example_secret")
    zoo = zoo_with(tmp_path / "z", "recipes: [/proc/self/environ]\n")
    r = run_cli("batch", zoo)  # no include root: the file is read, and not quoted
    assert r.status == 2
    assert r.err.splitlines()[0] == (f"{zoo}:3:11: error: recipe '/proc/self/environ' is not a recipe "
                                     "(a syntax error at line 1, column 1)"), r.err
    assert "ghp_example_secret" not in r.err + r.out and "MX_TEST_SECRET" not in r.err + r.out
    # under the include root it is not even read
    for argv, extra in [(["--include-root", tmp_path / "z"], {}), ([], {"MODELXFORM_INCLUDE_ROOT": str(tmp_path / "z")})]:
        for name, value in extra.items():
            monkeypatch.setenv(name, value)
        r = run_cli("batch", zoo, *argv)
        assert r.status == 2
        assert r.err.splitlines()[0] == (f"{zoo}:3:11: error: recipe '/proc/self/environ' is outside the include "
                                         f"root {(tmp_path / 'z').resolve()}"), r.err
        assert "ghp_example_secret" not in r.err + r.out
    assert not (tmp_path / "z" / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,message", [
    ("secrets", "recipe 'secrets.txt' is not a recipe (a syntax error at line 1, column 1)"),
    ("yaml-mapping", "recipe 'config.yaml' is not a recipe (a YAML document that is not a list of statements at "
                     "line 1, column 1)"),
    ("yaml-list", "recipe 'list.yaml' is not a recipe (a key that is not a statement at line 2, column 3)"),
    ("binary", "recipe 'bin.recipe' is not valid UTF-8 text"),
    ("fifo", "recipe 'fifo.recipe' is a FIFO (named pipe), not a recipe file"),
    ("device", "recipe '/dev/zero' is a character device, not a recipe file"),
    ("directory", "recipe 'dir.recipe' is a directory, not a recipe file"),
    ("huge", "recipe 'huge.recipe' is larger than 1000000 bytes"),
])
def test_a_zoo_recipe_that_is_not_recipe_text_is_refused_at_its_entry_unquoted(tmp_path, kind, message):
    folder = tmp_path / "z"
    folder.mkdir()
    name = {"secrets": "secrets.txt", "yaml-mapping": "config.yaml", "yaml-list": "list.yaml", "binary": "bin.recipe",
            "fifo": "fifo.recipe", "device": "/dev/zero", "directory": "dir.recipe", "huge": "huge.recipe"}[kind]
    if kind == "secrets":
        write(folder / name, "root:x:0:0:root:/root:/bin/bash\napi_key = hunter2\n")
    elif kind == "yaml-mapping":
        write(folder / name, "database:\n  password: hunter2\n")
    elif kind == "yaml-list":
        write(folder / name, "- select: all\n- password: hunter2\n")
    elif kind == "binary":
        (folder / name).write_bytes(b"select all\n\xff\xfe hunter2 \x00")
    elif kind == "fifo":
        os.mkfifo(folder / name)  # opening it would block
    elif kind == "directory":
        (folder / name).mkdir()
    elif kind == "huge":
        with open(folder / name, "wb") as fh:  # sparse: 4 GB
            fh.truncate(4 << 30)
    zoo = zoo_with(folder, f"recipes: [{name}]\n")
    start = time.perf_counter()
    r = run_cli("batch", zoo, "--dry-run")
    assert time.perf_counter() - start < 5.0
    assert r.status == 2
    assert r.err.splitlines()[0] == f"{zoo}:3:11: error: {message}", r.err
    assert "hunter2" not in r.err and "root:" not in r.err and "password" not in r.err and "0xff" not in r.err
    assert "Traceback" not in r.err


def test_a_zoo_recipe_with_errors_is_still_shown_with_its_lines(tmp_path):
    folder = tmp_path / "z"
    folder.mkdir()
    write(folder / "typo.recipe", "select all\nscale kernel $missing\n")
    write(folder / "typo.yaml", "- select: all\n- scale: {target: kernel, factor: $missing}\n")
    for name, where in [("typo.recipe", "typo.recipe:2:14"), ("typo.yaml", "typo.yaml:2")]:
        r = run_cli("batch", zoo_with(folder, f"recipes: [{name}]\n"), "--include-root", folder)
        assert r.status == 2
        assert f"{where}" in r.err and "unknown parameter $missing" in r.err, r.err
        assert "$missing" in r.err.splitlines()[1]  # recipe text: quoted with its caret


def test_include_root_confines_a_zoos_recipes_models_and_outputs(tmp_path, monkeypatch):
    root = tmp_path / "ci"
    folder = root / "z"
    folder.mkdir(parents=True)
    write(folder / "ok.recipe", WEIGHT_ONLY)
    (folder / "m.keras").write_bytes(b"never read")
    outside_recipe = write(tmp_path / "private.recipe", WEIGHT_ONLY)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "private.keras").write_bytes(b"never read")
    (folder / "link.recipe").symlink_to(outside_recipe)
    (folder / "link.keras").symlink_to(tmp_path / "private" / "private.keras")
    (folder / "linked").symlink_to(tmp_path / "private")  # a folder that leads outside
    resolved = root.resolve()
    out = 'output: "out/{model}.keras"\n'
    cases = [  # (batch file, line, column, message)
        (f"models: [m.keras]\nrecipes: [{outside_recipe}]\n{out}", 2, 11,
         f"recipe '{outside_recipe}' is outside the include root {resolved}"),
        (f"models: [m.keras]\nrecipes: [../../private.recipe]\n{out}", 2, 11,
         f"recipe '../../private.recipe' is outside the include root {resolved}"),
        (f"models: [m.keras]\nrecipes: [link.recipe]\n{out}", 2, 11,
         f"recipe 'link.recipe' is outside the include root {resolved}"),
        (f"models: [../../private/private.keras]\nrecipes: [ok.recipe]\n{out}", 1, 10,
         f"model '../../private/private.keras' is outside the include root {resolved}"),
        (f"models: [link.keras]\nrecipes: [ok.recipe]\n{out}", 1, 10,
         f"model 'link.keras' is outside the include root {resolved}"),
        (f"models: ['**/*.keras']\nrecipes: [ok.recipe]\n{out}", 1, 10,  # link.keras and linked/private.keras
         f"'**/*.keras' matches 2 files outside the include root {resolved}"),
        ("models: [m.keras]\nrecipes: [ok.recipe]\noutput: 'linked/{model}.keras'\n", 3, 9,
         f"output 'linked/m.keras' for m.keras × ok.recipe is outside the include root {resolved}"),
    ]
    for text, line, column, message in cases:
        zoo = write(folder / "zoo.yaml", text)
        r = run_cli("batch", zoo, "--include-root", root)
        assert r.status == 2, (text, r.err)
        first = r.err.splitlines()[0]
        assert first == f"{zoo}:{line}:{column}: error: {message}", (text, r.err)
        assert "hint: with --include-root (or $MODELXFORM_INCLUDE_ROOT) the recipes and models" in r.err
        monkeypatch.setenv("MODELXFORM_INCLUDE_ROOT", str(root))
        r = run_cli("batch", zoo)
        monkeypatch.delenv("MODELXFORM_INCLUDE_ROOT")
        assert r.status == 2 and r.err.splitlines()[0] == first
        assert listing(tmp_path / "private") == {"private.keras"} and not (folder / "out").exists()
    # everything inside the root passes these checks; without a root, nothing is confined
    from modelxform.batch import load_zoo
    zoo = load_zoo(write(folder / "zoo.yaml", f"models: [m.keras]\nrecipes: [ok.recipe]\n{out}"), include_root=root)
    assert [job.output_name for job in zoo.jobs] == ["out/m.keras"]
    zoo = load_zoo(write(folder / "zoo.yaml", f"models: [link.keras]\nrecipes: [link.recipe]\n{out}"))
    assert [job.output_name for job in zoo.jobs] == ["out/link.keras"]


EVIL = 'import pathlib\npathlib.Path({marker!r}).write_text("ran")\n'


def test_a_zoos_imports_and_unsafe_are_refused_under_the_include_root(tmp_path, monkeypatch):
    folder = tmp_path / "z"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    write(folder / "evil.py", EVIL.format(marker=str(marker)))
    write(folder / "ok.recipe", WEIGHT_ONLY)
    zoo = zoo_with(folder, "recipes: [ok.recipe]\nimports: [evil]\nunsafe: true\n")
    imports = (f"{zoo}:4:11: error: imports: 'evil' would run Python code, which a batch file may not ask for under "
               "--include-root (or $MODELXFORM_INCLUDE_ROOT); if you trust that module, pass --import evil")
    unsafe = (f"{zoo}:5:9: error: unsafe: true would turn Keras safe mode off, which a batch file may not ask for "
              "under --include-root (or $MODELXFORM_INCLUDE_ROOT); if you trust these models, pass --unsafe")
    for argv, environment in [(["--include-root", folder], None), ([], str(folder))]:
        if environment:
            monkeypatch.setenv("MODELXFORM_INCLUDE_ROOT", environment)
        for extra in ([], ["--force"]):
            r = run_cli("batch", zoo, "--dry-run", *argv, *extra)
            assert r.status == 2
            lines = [line for line in r.err.splitlines() if ": error: " in line]
            assert sorted(lines) == sorted([imports, unsafe]), r.err
        r = run_cli("batch", zoo, "--dry-run", "--unsafe", *argv)  # one of the two given
        assert r.status == 2 and [line for line in r.err.splitlines() if ": error: " in line] == [imports]
        r = run_cli("batch", zoo, "--dry-run", "--import", "evil", *argv)
        assert r.status == 2 and [line for line in r.err.splitlines() if ": error: " in line] == [unsafe]
        assert not marker.exists() and not (folder / "out").exists()
    monkeypatch.delenv("MODELXFORM_INCLUDE_ROOT")
    from modelxform.batch import load_zoo
    # given on the command line too: the jobs import it from where --import finds modules, not from the
    # batch file's folder first (which a pull request may fill)
    job = load_zoo(zoo, include_root=folder, imports=["evil"], unsafe=True).jobs[0]
    assert (job.imports, job.unsafe, job.import_root) == (("evil",), True, "")
    # without an include root, the batch file's imports and unsafe work as they always did
    job = load_zoo(zoo).jobs[0]
    assert (job.imports, job.unsafe, job.import_root) == (("evil",), True, str(folder))
    # and the command line's add to them, for every job
    plain = zoo_with(folder, "recipes: [ok.recipe]\n", name="plain.yaml")
    job = load_zoo(plain, imports=["mylayers"], unsafe=True).jobs[0]
    assert (job.imports, job.unsafe) == (("mylayers",), True)
    assert not marker.exists()


@pytest.mark.parametrize("params,line,column,text", [
    ("params: {f: [0.5, .nan]}\n", 4, 19, ".nan"),
    ("params: {f: [.inf]}\n", 4, 14, ".inf"),
    ("params: {f: [-.Inf]}\n", 4, 14, "-.Inf"),
    ("params: {f: [1.0e+400]}\n", 4, 14, "1.0e+400"),
])
def test_a_zoo_refuses_nan_and_infinite_params_as_apply_does(tmp_path, seq, params, line, column, text):
    folder = tmp_path / "z"
    folder.mkdir()
    (folder / "m.keras").write_bytes(seq.read_bytes())
    write(folder / "p.recipe", "param f = 0.5\nselect where type=Dense\nscale kernel $f\n")
    zoo = write(folder / "zoo.yaml", 'models: [m.keras]\nrecipes: [p.recipe]\noutput: "out/{model}-{params}.keras"\n'
                + params)
    r = run_cli("batch", zoo, "-j", 1)
    assert r.status == 2
    assert r.err.splitlines()[0] == f"{zoo}:{line}:{column}: error: a value of f must be a finite number, not {text}"
    assert not (folder / "out").exists()
    # a model's own params too
    zoo = write(folder / "zoo.yaml", "models: [{path: m.keras, params: {f: .nan}}]\nrecipes: [p.recipe]\n"
                                     'output: "out/{model}.keras"\n')
    r = run_cli("batch", zoo, "-j", 1)
    assert r.status == 2
    assert r.err.splitlines()[0] == f"{zoo}:1:38: error: the value of f must be a finite number, not .nan"
    # the rule apply's --param follows, and a value given in Python
    assert run_cli("apply", folder / "p.recipe", seq, "-o", tmp_path / "o.keras", "--param", "f=nan").status == 2
    from modelxform import UsageError, apply_file, load_recipe
    with pytest.raises(UsageError, match="parameter 'f' must be a finite number"):
        apply_file(load_recipe(folder / "p.recipe"), seq, tmp_path / "o.keras", params={"f": float("nan")})
    assert not (tmp_path / "o.keras").exists()


# ---- 2c. `load weights from` is confined as `include` is ---------------------------------------------------

def test_load_weights_from_is_confined_by_the_include_root(tmp_path, seq, donor_bytes, monkeypatch):
    root = tmp_path / "ci"
    (root / "parts").mkdir(parents=True)
    (root / "m.keras").write_bytes(seq.read_bytes())
    (root / "donor.keras").write_bytes(donor_bytes)
    private = tmp_path / "private.keras"
    private.write_bytes(donor_bytes)
    (root / "parts" / "link.keras").symlink_to(private)
    resolved = root.resolve()
    hint = "hint: with --include-root (or $MODELXFORM_INCLUDE_ROOT) the files a recipe loads weights from"
    out = root / "out.keras"
    for target in ("../private.keras", str(private), "parts/link.keras"):
        recipe = write(root / "r.recipe", f'select fc2\nload weights from "{target}"\n')
        message = (f"{recipe}:2:1: error: cannot load weights from {target!r}: it is outside the include root "
                   f"{resolved}")
        for command in (["check", recipe], ["fmt", "--check", recipe], ["plan", recipe, root / "m.keras"],
                        ["apply", recipe, root / "m.keras", "-o", out]):
            r = run_cli(*command, "--include-root", root)
            assert r.status == 2, (command, r.err)
            assert r.err.splitlines()[0] == message, r.err
            assert hint in r.err and not out.exists()
        monkeypatch.setenv("MODELXFORM_INCLUDE_ROOT", str(root))
        r = run_cli("apply", recipe, root / "m.keras", "-o", out)
        monkeypatch.delenv("MODELXFORM_INCLUDE_ROOT")
        assert r.status == 2 and r.err.splitlines()[0] == message and not out.exists()
    # the YAML form, and a statement in an included file (at its own line)
    yaml_recipe = write(root / "r.yaml", "- select: {layers: [fc2]}\n- load_weights: {from: ../private.keras}\n")
    r = run_cli("check", yaml_recipe, "--include-root", root)
    assert r.status == 2 and r.err.splitlines()[0] == (
        f"{yaml_recipe}:2:3: error: cannot load weights from '../private.keras': it is outside the include root "
        f"{resolved}")
    write(root / "parts" / "part.recipe", 'select fc2\nload weights from "../../private.keras"\n')
    main = write(root / "main.recipe", 'include "parts/part.recipe"\n')
    monkeypatch.chdir(root)
    r = run_cli("check", main, "--include-root", root)
    assert r.status == 2 and "parts/part.recipe:2:1: error: cannot load weights from '../../private.keras'" in r.err
    # in batch: a ZOO.yaml error before any job runs
    zoo = write(root / "zoo.yaml", 'models: [m.keras]\nrecipes: [r.recipe]\noutput: "batch/{model}.keras"\n')
    r = run_cli("batch", zoo, "--include-root", root, "-j", 1)
    assert r.status == 2 and f"{root / 'r.recipe'}:2:1: error: cannot load weights from 'parts/link.keras'" in r.err
    assert not (root / "batch").exists()
    # a file inside the root loads; without a root, any file does (recipes you wrote)
    inside = write(root / "in.recipe", 'select fc2\nload weights from "donor.keras"\n')
    assert run_cli("apply", inside, root / "m.keras", "-o", out, "--include-root", root).status == 0
    assert run_cli("apply", recipe, root / "m.keras", "-o", tmp_path / "out2.keras").status == 0


@pytest.mark.timeout(180)
def test_verify_confines_a_recorded_load_weights_path_unless_it_is_named(tmp_path, seq, donor_bytes, monkeypatch):
    root = tmp_path / "ci"
    root.mkdir()
    private = tmp_path / "private.keras"
    private.write_bytes(donor_bytes)
    monkeypatch.chdir(root)  # a recorded path is taken from the working folder
    recipe = write(root / "load.recipe", 'select fc2\nload weights from "../private.keras"\n')
    made = root / "made.keras"
    assert run_cli("apply", recipe, seq, "-o", made).status == 0  # (made by someone without a root)
    assert run_cli("verify", made, "--input", seq).status == 0  # the recorded sha256 matches: read
    message = (f"error: {made}: step 1 loads weights from '../private.keras', which is outside the include root "
               f"{root.resolve()}, so verify does not read it; if you trust it, pass "
               "--load-weights ../private.keras=FILE")
    r = run_cli("verify", made, "--input", seq, "--include-root", root)
    assert r.status == 2 and r.err.strip() == message, r.err
    monkeypatch.setenv("MODELXFORM_INCLUDE_ROOT", str(root))
    r = run_cli("verify", made, "--input", seq)
    assert r.status == 2 and r.err.strip() == message, r.err
    # a file the user names is read, root or not
    r = run_cli("verify", made, "--input", seq, "--load-weights", f"../private.keras={private}")
    assert r.status == 0, r.out + r.err


# ---- 4. bounded reads: the recipe ------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["check", "fmt", "apply"])
def test_a_fifo_or_device_as_the_recipe_is_refused_without_reading(tmp_path, command):
    fifo = tmp_path / "r.recipe"
    os.mkfifo(fifo)  # opening it would block until someone writes
    for path, what in [(fifo, "is a FIFO (named pipe)"), ("/dev/zero", "is a character device")]:
        argv = [command, path] + (["model.keras", "-o", tmp_path / "out.keras"] if command == "apply" else [])
        start = time.perf_counter()
        r = run_cli(*argv)
        assert time.perf_counter() - start < 1.0
        assert r.status == 2
        only_error_line(r.err, f"{path}: {what}, not a recipe file")


def test_a_huge_recipe_is_refused_before_it_is_read_and_never_echoed(tmp_path):
    huge = tmp_path / "huge.recipe"
    with open(huge, "wb") as fh:
        fh.write(b"select " + b"x" * 1000)
        fh.truncate(100 << 20)
    start = time.perf_counter()
    r = run_cli("check", huge)
    assert time.perf_counter() - start < 1.0
    assert r.status == 2
    assert r.err.strip() == f"{huge}:1:1: error: recipe is larger than 1000000 bytes"


def test_a_long_line_is_shown_around_the_error_only(tmp_path):
    text = "select " + "a, " * 20_000 + "bad!\n"
    long = write(tmp_path / "long.recipe", text)
    r = check(long)
    assert r.status == 2
    first, excerpt, caret = r.err.splitlines()[:3]
    assert first.startswith(f"{long}:1:{text.index('!') + 1}: error: unexpected character '!'"), first
    assert len(excerpt) < 200 and excerpt.strip().startswith("…") and excerpt.rstrip().endswith("bad!")
    assert caret.index("^") == excerpt.index("!")


# ---- 4. bounded reads: the model file -------------------------------------------------------------------

def _pad_member(member: str, padding: int):
    """change() that pads a JSON member with whitespace (valid JSON, deflated ~1000:1)."""
    def change(data):
        return data + b" " * padding
    return change


def _deflate_all(src, dst, change_member=None, change=None):
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in members:
            if info.filename == change_member:
                data = change(data)
            info.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else info.compress_type
            zout.writestr(info, data)
    return dst


def _declare(dst: pathlib.Path, member: str, size: int) -> None:
    """Make the zip's headers declare ``size`` bytes for ``member`` (a lying header)."""
    import struct
    data = bytearray(dst.read_bytes())
    name = member.encode()
    for signature, size_at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:start + name_at + len(name)] == name:
                struct.pack_into("<I", data, start + size_at, size)
            start += 4
    dst.write_bytes(bytes(data))


@pytest.fixture
def applied(tmp_path, seq):
    """seq.keras with a provenance record (a weight-only recipe applied)."""
    out = tmp_path / "applied.keras"
    assert run_cli("apply", write(tmp_path / "w.recipe", WEIGHT_ONLY), seq, "-o", out).status == 0
    return out


@pytest.mark.parametrize("member,how,fragment", [
    ("config.json", "padded", "config.json declares 40,00"),
    ("modelxform.json", "padded", "modelxform.json declares 40,00"),
    ("metadata.json", "padded", "metadata.json declares 40,00"),
    ("config.json", "declared", "config.json declares 2,147,483,648 bytes"),
    ("modelxform.json", "ratio", "modelxform.json declares 5,000,000 bytes compressed into"),
])
def test_archive_members_are_capped_before_they_are_read(tmp_path, applied, member, how, fragment):
    model = tmp_path / "big.keras"
    if how == "padded":  # an honest member: 40 MB of JSON whitespace, deflated to 40 KB
        _deflate_all(applied, model, member, _pad_member(member, 40_000_000))
    else:
        _deflate_all(applied, model)
        _declare(model, member, 2 << 30 if how == "declared" else 5_000_000)
    recipe = write(tmp_path / "s.recipe", STRUCTURAL)
    weight_only = tmp_path / "w.recipe"
    out = tmp_path / "out.keras"
    before = listing(tmp_path)
    commands = [("apply", weight_only, model, "-o", out), ("apply", recipe, model, "-o", out), ("inspect", model),
                ("plan", weight_only, model)]
    if member == "modelxform.json":
        commands.append(("provenance", model))
    for argv in commands:
        start = time.thread_time()
        r = run_cli(*argv)
        assert time.thread_time() - start < 0.5, argv
        assert r.status == 3, (argv, r.status, r.err)
        only_error_line(r.err, str(model), fragment)
    assert listing(tmp_path) == before


def test_an_h5_config_attribute_is_capped(tmp_path):
    import h5py
    path = tmp_path / "big.h5"
    with h5py.File(path, "w", libver="latest") as f:  # (dense attribute storage: no 64 KB limit)
        f.attrs["model_config"] = np.bytes_(b" " * (40 << 20) + b"{}")
    start = time.thread_time()
    r = run_cli("inspect", path)
    assert time.thread_time() - start < 0.5
    assert r.status == 3
    only_error_line(r.err, str(path), "the model config is 41,943,042 bytes; modelxform reads at most")


def test_deeply_nested_config_json_is_one_line(tmp_path, seq):
    model = rewrite_member(seq, tmp_path / "deep.keras", "config.json", lambda data: b"[" * 100_000 + b"]" * 100_000)
    r = run_cli("inspect", model)
    assert r.status == 3
    only_error_line(r.err, str(model), "config.json is nested too deeply to be read")


# ---- 3. verify re-runs only what it may ---------------------------------------------------------------

def _record(path) -> dict:
    from modelxform.keras_io.files import read_provenance
    return read_provenance(path)


def _set_record(src: pathlib.Path, dst: pathlib.Path, record) -> pathlib.Path:
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    return rewrite_member(src, dst, "modelxform.json", lambda _: data)


def _with_recipe_text(record: dict, text: str, step: int = 0) -> dict:
    record = json.loads(json.dumps(record))
    record["chain"][step]["recipe"]["text"] = text
    record["chain"][step]["recipe"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()  # a careful forger
    return record


@pytest.mark.timeout(120)
def test_verify_refuses_a_recorded_include_without_reading_it(tmp_path, seq, applied):
    fifo = tmp_path / "secret.recipe"
    os.mkfifo(fifo)  # reading it would block: the test would time out
    for target in (str(fifo), "/etc/passwd"):
        hostile = _set_record(applied, tmp_path / "hostile.keras",
                              _with_recipe_text(_record(applied), f'include "{target}"\nselect all\n'))
        r = run_cli("verify", hostile, "--input", seq)
        assert r.status == 3, r.out + r.err
        only_error_line(r.err, str(hostile), f"step 1's recorded recipe holds `include \"{target}\"`",
                        "the record was altered")
        assert "root:" not in r.err and r.out == ""


@pytest.fixture(scope="module")
def donor_bytes(tmp_path_factory) -> bytes:
    """The Sequential model with other weights: a file to `load weights from`."""
    from modelxform.keras_io.files import save_model
    path = tmp_path_factory.mktemp("donor") / "donor.keras"
    model = make_sequential()
    for variable in model.weights:
        variable.assign(np.full(variable.shape, 0.25, variable.dtype))
    save_model(model, path)
    return path.read_bytes()


def test_load_weights_files_are_recorded_and_read_again_only_when_they_match(tmp_path, seq, donor_bytes,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    donor = tmp_path / "donor.keras"
    donor.write_bytes(donor_bytes)
    recipe = write(tmp_path / "load.recipe", 'select fc2\nload weights from "donor.keras"\n')
    out = tmp_path / "out.keras"
    assert run_cli("apply", recipe, seq, "-o", out).status == 0
    step = _record(out)["chain"][0]
    assert step["load_weights"] == {"donor.keras": sha256(donor)}
    assert run_cli("verify", out, "--input", seq).status == 0
    # the file at that path is another one now: not read, unless the user says so
    other = tmp_path / "other.keras"
    other.write_bytes(seq.read_bytes())
    donor.write_bytes(seq.read_bytes())
    r = run_cli("verify", out, "--input", seq)
    assert r.status == 3
    assert r.err.startswith("<step 1>:2:1: error: load weights from 'donor.keras': ") and "Traceback" not in r.err
    assert "is not the file step 1 read (its sha256 is not the recorded one)" in r.err
    assert "--load-weights donor.keras=" in r.err
    donor.write_bytes(donor_bytes)
    r = run_cli("verify", out, "--input", seq, "--load-weights", f"donor.keras={other}")
    assert r.status == 1  # read, as asked: and the result differs
    assert "fc2: kernel differs" in r.out and "load_weights" in r.out
    moved = tmp_path / "moved.keras"
    donor.rename(moved)
    assert run_cli("verify", out, "--input", seq, "--load-weights", f"donor.keras={moved}").status == 0


@pytest.mark.timeout(120)
def test_a_recorded_load_weights_path_without_a_digest_is_not_read(tmp_path, seq, applied):
    fifo = tmp_path / "secret.keras"
    os.mkfifo(fifo)  # reading or hashing it would block
    hostile = _set_record(applied, tmp_path / "hostile.keras",
                          _with_recipe_text(_record(applied), f'select all\nload weights from "{fifo}"\n'))
    r = run_cli("verify", hostile, "--input", seq)
    assert r.status == 2
    only_error_line(r.err, f"step 1 loads weights from '{fifo}', and the record holds no sha256 of that file",
                    f"--load-weights {fifo}=FILE")
    forged = _record(hostile)
    forged["chain"][0]["load_weights"] = {str(fifo): "0" * 64}
    hostile = _set_record(applied, tmp_path / "hostile2.keras", forged)
    r = run_cli("verify", hostile, "--input", seq)
    assert r.status == 3
    assert f"{fifo}: is a FIFO (named pipe), not a model file" in r.err.splitlines()[0]


# ---- 5. malformed provenance ----------------------------------------------------------------------------

MALFORMED = {
    "number": (b"42", "malformed provenance record: the record is a number, not an object"),
    "string": (b'"modelxform"', "malformed provenance record: the record is a string, not an object"),
    "chain-string": ({"format": "modelxform-provenance/1", "chain": "abc"},
                     "malformed provenance record: chain is a string, not a list of steps"),
    "chain-numbers": ({"format": "modelxform-provenance/1", "chain": [1, 2]},
                      "malformed provenance record: chain[0] is a number, not an object (one step)"),
    "seed-text": (lambda r: r["chain"][0].update(seed="7"),
                  "malformed provenance record: chain[0].seed is a string, not a whole number"),
    "no-statements": (lambda r: r["chain"][0].pop("statements"),
                      "malformed provenance record: chain[0].statements is null, not a list of strings"),
    "bad-digest": (lambda r: r["chain"][0].update(input_sha256="../../etc"),
                   "malformed provenance record: chain[0].input_sha256 is not a sha256"),
    "other-format": (lambda r: r.update(format="something/9"),
                     "malformed provenance record: format is 'something/9'"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "its provenance record (modelxform.json) is nested too deeply"),
    "not-json": (b"{'chain': }", "its provenance record (modelxform.json) is not valid JSON"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_record_is_one_line_everywhere(tmp_path, seq, applied, kind):
    import shutil
    content, fragment = MALFORMED[kind]
    if callable(content):
        record = _record(applied)
        content(record)
        content = record
    model = _set_record(applied, tmp_path / "malformed.keras", content)
    out = tmp_path / "out.keras"
    runs = [("provenance", model), ("provenance", model, "--json"),
            ("apply", tmp_path / "w.recipe", model, "-o", out), ("verify", model, "--input", seq)]
    if shutil.which("dot"):
        runs.append(("diff", seq, model, "--html", tmp_path / "d.html"))
    for argv in runs:
        r = run_cli(*argv)
        assert r.status == 3, (argv, r.status, r.out, r.err)
        only_error_line(r.err, str(model), fragment)
    assert not out.exists() and not (tmp_path / "d.html").exists()


# ---- 7. .h5 outputs: model and record together, every field verified -------------------------------------

def test_an_h5_output_and_its_record_are_replaced_together(tmp_path, seq, monkeypatch):
    from modelxform.keras_io import files
    out = tmp_path / "out.h5"
    first = write(tmp_path / "first.recipe", 'recipe "first" version "1"\nselect all\nfreeze\n')
    second = write(tmp_path / "second.recipe", 'recipe "second" version "1"\nselect all\nscale kernel 2\n')
    assert run_cli("apply", first, seq, "-o", out).status == 0
    before, files_before = sha256(out), listing(tmp_path)

    def killed(path, record):  # the process dies after the model is written, before the record is
        raise KeyboardInterrupt
    monkeypatch.setattr(files, "_write_h5_record", killed)
    r = run_cli("apply", second, seq, "-o", out)
    assert r.status == 130 and "nothing was written" in r.err
    assert sha256(out) == before and listing(tmp_path) == files_before  # no new record beside the old model
    assert _record(out)["chain"][0]["recipe"]["name"] == "first"


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_verify_checks_every_field_of_the_record(tmp_path, seq, suffix):
    import h5py
    from modelxform.keras_io.files import H5_PROVENANCE_ATTRIBUTE
    recipe = write(tmp_path / "r.recipe", 'recipe "scaler" version "1.0"\nselect all\nscale kernel 2\n')
    out = tmp_path / f"out{suffix}"
    assert run_cli("apply", recipe, seq, "-o", out, "--seed", 3).status == 0
    assert run_cli("verify", out, "--input", seq).status == 0
    record = _record(out)
    record["chain"][0]["seed"] = 4  # nothing random: the same weights, another claim
    record["chain"][0]["recipe"]["name"] = "trusted-scaler"
    record["chain"][0]["recipe"]["version"] = "2.0"
    record["chain"][0]["reviewed_by"] = "someone"
    if suffix == ".h5":
        with h5py.File(out, "r+") as f:
            f.attrs[H5_PROVENANCE_ATTRIBUTE] = json.dumps(record)
    else:
        out = _set_record(out, tmp_path / "tampered.keras", record)
    r = run_cli("verify", out, "--input", seq)
    assert r.status == 1, r.out + r.err
    assert 'step 1: the record says recipe name "trusted-scaler", re-making it gives "scaler"' in r.out
    assert 'step 1: the record says recipe version "2.0", re-making it gives "1.0"' in r.out
    assert "step 1: the record holds fields modelxform does not write: reviewed_by" in r.out
    # the seed: re-made with the recorded seed (4), which the recipe does not use: a consistent claim
    assert "seed" not in r.out


# ---- 6. assert equivalent: NaN and Inf are differences -------------------------------------------------

def test_assert_equivalent_counts_nan_and_inf_as_differences(tmp_path, seq):
    path = write(tmp_path / "r.recipe", "select all\nscale kernel 1e38\nscale kernel 1e38\nassert equivalent\n")
    r = run_cli("apply", path, seq, "-o", tmp_path / "out.keras")
    assert r.status == 1, r.out + r.err
    assert r.err.startswith(f"{path}:4:1: error: assert equivalent failed: output 0 has 16 NaN or infinite values "
                            "where the input model's output is finite"), r.err
    assert "largest difference" not in r.out + r.err
    assert not (tmp_path / "out.keras").exists()


def test_assert_equivalent_holds_within_its_tolerance_and_fails_beyond_it(tmp_path, seq):
    """Finite outputs: the same largest difference is within a tolerance of 1000 (the run goes on and
    the report says it) and beyond one of 1e-9 (the run stops, saying it)."""
    import re
    lenient = write(tmp_path / "lenient.recipe", "select all\nscale weights 0\nassert equivalent tolerance 1000\n")
    r = run_cli("apply", lenient, seq, "-o", tmp_path / "out.keras")
    assert r.status == 0, r.err
    held = re.search(r"holds: largest difference (\S+) \(tolerance 1000, ", r.out)
    assert held, r.out
    strict = write(tmp_path / "strict.recipe", "select all\nscale weights 0\nassert equivalent tolerance 1e-9\n")
    r = run_cli("apply", strict, seq, "-o", tmp_path / "strict.keras")
    assert r.status == 1, r.out + r.err
    assert r.err.startswith(f"{strict}:3:1: error: assert equivalent failed: outputs differ by up to {held[1]} "
                            "(tolerance 1e-09, "), r.err
    assert 0 < float(held[1]) <= 1000 and not (tmp_path / "strict.keras").exists()


def test_assert_equivalent_unit():
    """NaN where NaN was and the same infinity where it was are no difference; anything else is."""
    from modelxform.errors import AssertionFailed
    from modelxform.statements.checks import AssertEquivalent

    class Ctx:
        def __init__(self, got, want):
            self.reference = (None, [np.array(want, "float32")])
            self._got = [np.array(got, "float32")]

        def probe_outputs(self, stmt=None):
            return None, self._got

        def number(self, value, stmt):
            return value

        def report(self, stmt, **fields):
            return fields

        @staticmethod
        def default_tolerance():
            return 1e-5, "a CPU's"

    stmt = AssertEquivalent()
    nan, inf = float("nan"), float("inf")
    assert stmt.run(Ctx([1.0, nan, inf, -inf], [1.0, nan, inf, -inf]))["notes"] == [
        "holds: largest difference 0 (tolerance 1e-05, a CPU's)"]
    for got, want in ([nan, 1.0], [1.0, nan], [inf, 1.0], [inf, -inf], [nan, inf]):
        with pytest.raises(AssertionFailed, match="NaN or infinite"):
            stmt.run(Ctx([0.0, got], [0.0, want]))


# ---- 8. batch: no partial output, ever ------------------------------------------------------------------

def hidden_files(folder) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith("."))


@pytest.fixture
def small_zoo(tmp_path, seq_bytes):
    """zoo/a.keras, zoo/victim.keras (the Sequential model) and a weight-only recipe: the jobs run on the
    archive, so the workers never import TensorFlow."""
    (tmp_path / "zoo").mkdir()
    for name in ("a", "victim"):
        (tmp_path / "zoo" / f"{name}.keras").write_bytes(seq_bytes)
    write(tmp_path / "scale.recipe", WEIGHT_ONLY)
    return write(tmp_path / "zoo.yaml", 'models: ["zoo/*.keras"]\nrecipes: [scale.recipe]\noutput: "out/{model}.keras"\n')


def test_a_worker_killed_while_saving_leaves_no_temporary_file(tmp_path, small_zoo, monkeypatch):
    monkeypatch.setenv("MODELXFORM_TEST_CRASH_ON", "victim:saving")  # os._exit once its temporary file is written
    r = run_cli("batch", small_zoo, "-j", 2, "--report", tmp_path / "report.json")
    assert r.status == 1, r.out + r.err
    jobs = {j["model"]: j for j in json.loads((tmp_path / "report.json").read_text())["jobs"]}
    assert jobs["zoo/victim.keras"]["status"] == "failed"
    assert "exited with status 70" in jobs["zoo/victim.keras"]["error"]
    assert jobs["zoo/a.keras"]["status"] == "done"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.keras"]  # no partial output, no temporary file


def test_temporary_files_of_an_earlier_killed_run_are_removed(tmp_path, small_zoo):
    import socket
    from modelxform.keras_io.files import temp_prefix
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [out / (temp_prefix(out / "a.keras", dead_pid) + "k2j4h5l6.keras"),
                 out / (temp_prefix(out / "victim.keras", dead_pid) + "abcdefgh.keras.norm")]
        kept = [out / (temp_prefix(out / "a.keras", sleeper.pid) + "q1w2e3r4.keras"),  # still running
                out / f".a.keras.modelxform-tmp-{socket.gethostname()}x-{dead_pid}-zzzzzzzz.keras",  # another host
                out / ".a.keras.k2j4h5l6.keras",  # not ours: no tag
                out / "notes.txt"]
        for path in stale + kept:
            path.write_bytes(b"partial")
        r = run_cli("batch", small_zoo, "-j", 1)
        assert r.status == 0, r.out + r.err
        assert "removed 1 temporary file that a killed earlier run left beside out/a.keras" in r.err
        assert "removed 1 temporary file that a killed earlier run left beside out/victim.keras" in r.err
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_sigterm_stops_a_batch_like_ctrl_c(tmp_path, small_zoo):
    proc = subprocess.Popen([sys.executable, "-m", "modelxform", "batch", str(small_zoo), "-j", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=env(MODELXFORM_TEST_CRASH_ON="a:slow-save"))  # it waits while saving a.keras
    try:
        assert _wait_for(lambda: hidden_files(tmp_path / "out")), "no temporary file appeared"
        proc.send_signal(signal.SIGTERM)  # to the batch process only, as `kill PID` or a service manager would
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out + err
    assert "terminated: 2 jobs left; run the same command again" in err, err
    assert "Traceback" not in err
    assert hidden_files(tmp_path / "out") == [] and not (tmp_path / "out" / "a.keras").exists(), out + err


SLOW_SAVE = """\
import sys, time
from modelxform.keras_io import files
original = files.write_atomically
def slow(dest, write, failure=None):
    def then_wait(tmp):
        write(tmp)
        time.sleep(60)
    return original(dest, then_wait, failure)
files.write_atomically = slow
from modelxform.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_apply_removes_the_temporary_file(tmp_path, seq):
    recipe = write(tmp_path / "w.recipe", WEIGHT_ONLY)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "apply", str(recipe), str(seq), "-o", "out.keras"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env())
    try:
        assert _wait_for(lambda: hidden_files(tmp_path)), "no temporary file appeared"
        (name,) = [os.path.basename(p) for p in hidden_files(tmp_path)]
        assert name.startswith(".out.keras.modelxform-tmp-") and name.endswith(".keras")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out + err
    assert err.strip() == "terminated; nothing was written"
    assert hidden_files(tmp_path) == [] and not (tmp_path / "out.keras").exists()


# ---- 9. the smaller ones --------------------------------------------------------------------------------

CTRL_C_ENTRY = "import sys; from modelxform.__main__ import run; sys.exit(run())"  # as the `modelxform` script


def _reading_stdin(pid: int) -> bool:
    """Whether process ``pid`` (whose stdin is a pipe) waits to read it (Linux: /proc/PID/syscall, read
    being syscall 0 on x86-64 and 63 on arm64, or the pipe read its wchan names)."""
    import platform
    read = {"x86_64": 0, "aarch64": 63}.get(platform.machine())
    try:
        with open(f"/proc/{pid}/syscall") as fh:
            if read is not None and fh.read().startswith(f"{read} 0x0 "):
                return True
        with open(f"/proc/{pid}/wchan") as fh:
            return "pipe" in fh.read()
    except OSError:
        return False


@pytest.mark.parametrize("how", ["module", "script"])
def test_ctrl_c_in_the_first_moments_prints_no_traceback(tmp_path, how):
    recipe = write(tmp_path / "r.recipe", "select all\nfreeze\n")
    argv = [sys.executable, "-m", "modelxform"] if how == "module" else [sys.executable, "-c", CTRL_C_ENTRY]

    def start(*args):
        return subprocess.Popen(argv + ["check", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # The delays are spread over a whole check's time as it is on this machine now (slower under load)
    began = time.perf_counter()
    start(str(recipe)).communicate(timeout=60)
    whole = time.perf_counter() - began
    for share in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        proc = start(str(recipe))
        time.sleep(share * whole)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        # Once any code of modelxform runs, Ctrl-C is caught: a traceback can only come from the
        # interpreter's own start-up (site, runpy), before the first line of modelxform (~20 ms idle)
        assert "modelxform" not in err.partition("Traceback")[2], (share, err)
        if "Traceback" not in err:
            assert proc.returncode in (0, 130, -signal.SIGINT), (share, proc.returncode, err)
        if proc.returncode == 130:
            assert err.strip() == "interrupted; nothing was written", err
    # And once modelxform is at work (here: waiting for its recipe on standard input), it is caught
    proc = start("-")
    deadline = time.monotonic() + 60
    while not _reading_stdin(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (130, "interrupted; nothing was written")


def test_a_layer_too_large_for_memory_is_refused_before_it_is_made(tmp_path, seq):
    recipe = write(tmp_path / "r.recipe", "append Dense(units=100000000000)\n")
    start = time.perf_counter()
    r = run_cli("apply", recipe, seq, "-o", tmp_path / "out.keras")
    assert time.perf_counter() - start < 10
    assert r.status == 4, r.err
    assert r.err.startswith(f"{recipe}:1:1: error: `append Dense(units=100000000000)`: the edited model would hold "
                            "500,000,000,212 parameters (2.0 TB), more than this machine's memory")
    assert "Traceback" not in r.err and not (tmp_path / "out.keras").exists()


def test_overflow_is_said_in_the_report_not_printed_by_numpy(tmp_path, seq):
    import warnings
    recipe = write(tmp_path / "r.recipe", "select where type=Dense\nscale kernel 1e38\nscale kernel 1e38\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the run
        r = run_cli("apply", recipe, seq, "-o", tmp_path / "out.keras")
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    third = lines.index(next(line for line in lines if line.endswith("r.recipe:3:1  scale kernel 1e+38")))
    assert "    (fc1: kernel: overflow in the arithmetic; 128 of 128 values are now infinite or NaN)" in lines[third:]
    assert "    (fc2: kernel: overflow in the arithmetic; 64 of 64 values are now infinite or NaN)" in lines[third:]
    assert not any("fc1: kernel: overflow" in line for line in lines[:third])  # 1e38 alone is finite


@pytest.mark.parametrize("name", ["out.H5", "out.HDF5", "out.Keras"])
def test_an_upper_case_suffix_is_a_format_like_any_other(tmp_path, seq, name):
    recipe = write(tmp_path / "r.recipe", STRUCTURAL)
    out = tmp_path / name
    r = run_cli("apply", recipe, seq, "-o", out)
    assert r.status == 0, r.err
    assert out.is_file() and hidden_files(tmp_path) == []
    assert run_cli("verify", out, "--input", seq).status == 0


def test_any_save_removes_what_killed_saves_of_that_output_left(tmp_path, seq):
    from modelxform.keras_io.files import temp_prefix
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / (temp_prefix(tmp_path / "out.keras", int(dead.stdout)) + "k2j4h5l6.keras")
    other = tmp_path / (temp_prefix(tmp_path / "other.keras", int(dead.stdout)) + "k2j4h5l6.keras")
    stale.write_bytes(b"partial")
    other.write_bytes(b"partial")
    assert run_cli("apply", write(tmp_path / "w.recipe", WEIGHT_ONLY), seq, "-o", tmp_path / "out.keras").status == 0
    assert not stale.exists() and other.exists()  # only the output being written is tidied


def test_the_typed_reader_and_the_json_schema_agree(tmp_path, applied, donor_bytes, seq, monkeypatch):
    """docs/provenance.schema.json documents the record; provenance.validate (no jsonschema at run time)
    must accept and refuse the same records."""
    import jsonschema
    from modelxform.errors import ModelFileError
    from modelxform.provenance import validate
    schema = json.loads((ROOT / "docs" / "provenance.schema.json").read_text())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "donor.keras").write_bytes(donor_bytes)
    loaded = tmp_path / "loaded.keras"
    assert run_cli("apply", write(tmp_path / "l.recipe", 'select fc2\nload weights from "donor.keras"\n'), applied,
                   "-o", loaded).status == 0
    good = [_record(applied), _record(loaded), {"format": "modelxform-provenance/1", "chain": []}]
    assert len(good[1]["chain"]) == 2 and "load_weights" in good[1]["chain"][1]
    for record in good:
        jsonschema.validate(record, schema)
        assert validate(record, "m") is record
    bad = []
    for kind, (content, _) in MALFORMED.items():
        if kind in ("deep", "not-json"):
            continue
        if callable(content):
            record = _record(applied)
            content(record)
            content = record
        bad.append(json.loads(content) if isinstance(content, bytes) else content)
    more = _record(loaded)
    more["chain"][1]["load_weights"] = {"donor.keras": "nope"}
    bad.append(more)
    for record in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(record, schema)
        with pytest.raises(ModelFileError, match="malformed provenance record"):
            validate(record, "m")
