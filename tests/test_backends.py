"""modelxform on another Keras backend, without TensorFlow (issue 18).

The suite runs under TensorFlow; these tests run modelxform a second time under JAX (the dev extra
installs the CPU jax wheel) in processes where `import tensorflow` fails as if it were not installed
(tests/no_tensorflow/sitecustomize.py):

- the core cases of the pinned output bytes (every CNN recipe and benchmark case, and two ResNet50
  ones, on the archive and with the input model loaded) give the very files TensorFlow gives, the
  provenance's record of the backend aside;
- every command but export works; export says in one line that it needs TensorFlow (exit 2); verify
  re-makes a file made under TensorFlow;
- the tests of the Keras internals keras_io uses (variable filling, rows in blocks), of the archive
  engine against the Keras engine on the CNN, and of assert equivalent run again under JAX.

MODELXFORM_BACKEND_CASES=all runs every pinned case under JAX (VGG16 included; a few minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli
from modelxform.keras_io.backend import library_versions
from modelxform.keras_io.files import _normalise_keras_archive, read_provenance, sha256_file
from test_output_bytes import CASES, PINS

pytest.importorskip("jax")
pytestmark = pytest.mark.slow

NO_TF = ROOT / "tests" / "no_tensorflow"
CORE = {"cnn"} if os.environ.get("MODELXFORM_BACKEND_CASES") != "all" else {"cnn", "resnet50", "vgg16"}
CORE_RESNET = {"recipe-resnet50-finetune", "bench-resnet50-replace-pooling"}

DRIVER = r"""
import io, json, os, sys
from modelxform.cli import main
from modelxform.console import Console
results = []
for job in json.loads(sys.argv[1]):
    saved = {k: os.environ.get(k) for k in job["env"]}
    os.environ.update(job["env"])
    out, err = io.StringIO(), io.StringIO()
    try:
        status = main(job["argv"], Console(out, err))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    results.append({"status": int(status), "out": out.getvalue(), "err": err.getvalue()})
import keras
print("RESULTS " + json.dumps({"results": results, "backend": keras.backend.backend(),
                               "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")}))
"""


def backend_env(tmp_path, backend: str, keras_json: str | None = None) -> dict:
    """The environment of a process on ``backend`` without TensorFlow: chosen by KERAS_BACKEND, or (with
    ``keras_json``) by the keras.json of a fresh KERAS_HOME, as Keras reads it."""
    home = tmp_path / f"keras-home-{backend}"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "MODELXFORM_FASTPATH")}
    env.update(KERAS_HOME=str(home), PYTHONPATH=os.pathsep.join([str(NO_TF), str(ROOT / "tests")]))
    if keras_json is None:
        env["KERAS_BACKEND"] = backend
    else:
        (home / "keras.json").write_text(json.dumps({"backend": keras_json}))
    return env


def run_jobs(jobs, env, cwd) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def as_made_here(path, folder):
    """A copy of the output at ``path`` with its provenance's versions replaced by this process's (the
    TensorFlow backend's), written as modelxform writes every .keras file."""
    copy = folder / ("here-" + path.name)
    shutil.copy(path, copy)
    record = read_provenance(copy)
    for step in record["chain"]:
        step["versions"] = library_versions()
    _normalise_keras_archive(copy, record)
    return copy


@pytest.fixture(scope="module")
def jax_run(pinned_inputs, tmp_path_factory):
    """The pinned cases and every command, run in one process on JAX (chosen in keras.json) without
    TensorFlow; also a file made here, under TensorFlow, for it to verify."""
    tmp = tmp_path_factory.mktemp("jax-run")
    cases = [c for c in CASES if c[1] in CORE or c[0] in CORE_RESNET]
    jobs, outputs = [], {}
    for case, kind, recipe, seed, params in cases:
        for engine in ("archive", "loaded"):
            out = tmp / f"{case}-{engine}.keras"
            argv = ["apply", str(ROOT / recipe), str(pinned_inputs(kind)), "-o", str(out), "--seed", str(seed)]
            for item in params:
                argv += ["--param", item]
            jobs.append({"argv": argv, "env": {"MODELXFORM_FASTPATH": "0" if engine == "loaded" else "1"}})
            outputs[(case, engine)] = out
    cnn = str(pinned_inputs("cnn"))
    made_by_tf = tmp / "new-head-tf.keras"
    assert run_cli("apply", ROOT / "recipes/new-head.recipe", cnn, "-o", made_by_tf, "--seed", 7).status == 0
    zoo = tmp / "zoo.yaml"
    zoo.write_text(f"models: [{json.dumps(cnn)}]\nrecipes: [{json.dumps(str(ROOT / 'recipes/new-head.recipe'))}]\n"
                   f"output: \"batch/{{model}}-{{recipe}}.keras\"\nseed: 7\n")
    example = str(ROOT / "recipes/example.recipe")
    commands = {
        "check": ["check", example],
        "fmt": ["fmt", "--check", str(ROOT / "recipes/new-head.recipe")],
        "plan": ["plan", example, cnn, "--seed", "7"],
        "inspect": ["inspect", cnn],
        "diff": ["diff", cnn, str(outputs[("recipe-example", "archive")])],
        "provenance": ["provenance", str(outputs[("recipe-example", "archive")])],
        "verify": ["verify", str(made_by_tf), "--input", cnn],
        "verify-own": ["verify", str(outputs[("recipe-freeze-features", "loaded")]), "--input", cnn],
        "batch": ["batch", str(zoo), "-j", "1"],
        "export": ["export", cnn, str(tmp / "served")],
        "apply-savedmodel": ["apply", example, cnn, "-o", str(tmp / "served2"), "--format", "savedmodel"],
    }
    for argv in commands.values():
        jobs.append({"argv": argv, "env": {}})
    run = run_jobs(jobs, backend_env(tmp, "jax", keras_json="jax"), tmp)
    results = run["results"]
    run["outputs"] = outputs
    run["applies"] = dict(zip(outputs, results[:len(outputs)]))
    run["commands"] = dict(zip(commands, results[len(outputs):]))
    run["tmp"] = tmp
    run["zoo_output"] = tmp / "batch" / f"{pinned_inputs('cnn').stem}-new-head.keras"
    return run


def test_the_jax_process_ran_on_jax_without_tensorflow(jax_run):
    assert jax_run["backend"] == "jax"
    assert jax_run["tensorflow"] == []


def test_outputs_under_jax_are_the_pinned_bytes(jax_run):
    """Each output made on JAX is, once its provenance says TensorFlow made it, the pinned file."""
    pins = json.loads(PINS.read_text())
    from importlib import metadata
    wrong = []
    for (case, engine), result in jax_run["applies"].items():
        assert result["status"] == 0, f"{case} ({engine}): {result['err']}"
        out = jax_run["outputs"][(case, engine)]
        versions = read_provenance(out)["chain"][-1]["versions"]
        assert versions["backend"] == "jax" and versions["jax"] == metadata.version("jax")
        assert "tensorflow" not in versions
        if sha256_file(as_made_here(out, jax_run["tmp"])) != pins[case]:
            wrong.append(f"{case} ({engine})")
    assert wrong == []
    assert len(jax_run["applies"]) >= 2 * 10


def test_every_command_but_export_works_without_tensorflow(jax_run):
    commands = jax_run["commands"]
    for name in ("check", "fmt", "plan", "inspect", "provenance", "batch"):
        assert commands[name]["status"] == 0, f"{name}: {commands[name]['err']}"
    assert commands["diff"]["status"] == 1 and "max_pooling2d" in commands["diff"]["out"]
    assert "keras 3" in commands["provenance"]["out"] and " on jax " in commands["provenance"]["out"]
    assert jax_run["zoo_output"].is_file()
    assert "AveragePooling2D" in commands["plan"]["out"]


def test_export_without_tensorflow_is_one_line_and_exit_2(jax_run):
    for name in ("export", "apply-savedmodel"):
        result = jax_run["commands"][name]
        assert result["status"] == 2
        assert result["out"] == ""
        assert result["err"].strip().count("\n") == 0
        assert "needs TensorFlow, which is not installed (Keras runs on jax here)" in result["err"]
    assert not (jax_run["tmp"] / "served").exists()


def test_verify_re_makes_a_tensorflow_output_on_jax(jax_run):
    for name in ("verify", "verify-own"):
        result = jax_run["commands"][name]
        assert result["status"] == 0, result["out"] + result["err"]
    out = jax_run["commands"]["verify"]["out"]
    assert "step 1 was made on tensorflow" in out and "re-made on jax" in out
    assert "differs only in the Keras backend its provenance records" in out
    assert "identical" in out


def test_a_missing_backend_is_one_line(tmp_path):
    """keras.json names TensorFlow (what Keras writes there on first use) and TensorFlow is not
    installed: commands that need Keras say so in one line (exit 2); the archive engine needs no Keras."""
    from conftest import make_cnn
    from modelxform.keras_io.files import save_model
    model = tmp_path / "cnn.keras"
    save_model(make_cnn(), model)
    (tmp_path / "w.recipe").write_text("select all\nfreeze\n")
    env = backend_env(tmp_path, "tensorflow", keras_json="tensorflow")

    def mx(*argv):
        return subprocess.run([sys.executable, "-m", "modelxform", *map(str, argv)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    proc = mx("inspect", model)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: Keras's backend is tensorflow (from {tmp_path / 'keras-home-tensorflow' / 'keras.json'}), but "
        "tensorflow is not installed; choose an installed one with KERAS_BACKEND=jax"]
    proc = mx("apply", "w.recipe", model, "-o", "w.keras")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w.keras").is_file()


PROBE_TF = """
import io, json, sys
from modelxform.cli import main
from modelxform.console import Console
seen = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    seen.append([main(argv, Console(out, err)), "tensorflow" in sys.modules, err.getvalue()])
print("SEEN " + json.dumps(seen))
"""


def test_on_jax_an_installed_tensorflow_is_imported_only_when_needed(tmp_path):
    """Keras on JAX imports an installed TensorFlow to serialise a model (2.5 s, 400 MiB); modelxform's
    command line keeps it out until something needs it: a layer that uses TensorFlow on every backend
    (StringLookup) still loads, and export works (through jax2tf)."""
    from conftest import make_cnn
    from modelxform.keras_io.files import import_keras, save_model
    keras = import_keras()
    save_model(make_cnn(), tmp_path / "cnn.keras")
    lookup = keras.layers.StringLookup(name="lookup", vocabulary=["a", "b", "c"])
    words = keras.Input((1,), dtype="string", name="words")
    save_model(keras.Model(words, lookup(words), name="lookup_model"), tmp_path / "lookup.keras")
    env = backend_env(tmp_path, "jax")
    env["PYTHONPATH"] = str(ROOT / "tests")  # TensorFlow importable
    jobs = [["apply", str(ROOT / "recipes/example.recipe"), "cnn.keras", "-o", "out.keras", "--seed", "7"],
            ["inspect", "lookup.keras"], ["export", "out.keras", "served"]]
    proc = subprocess.run([sys.executable, "-c", PROBE_TF, json.dumps(jobs)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("SEEN "))[5:])
    assert [s[:2] for s in seen] == [[0, False], [0, True], [0, True]], seen
    assert (tmp_path / "served" / "saved_model.pb").is_file()


# The tests run a second time under JAX: the Keras internals keras_io uses, the archive engine against
# the Keras engine on the CNN (large arrays in blocks included), new and reinitialised weights, and
# assert equivalent's tolerance.
AGAIN_UNDER_JAX = [
    "tests/test_keras_io.py",
    "tests/test_initializers.py",
    "tests/test_archive_structure.py::test_small_models_agree_with_the_engine",
    "tests/test_archive_structure.py::test_lazily_built_variables_get_the_values_an_ordinary_build_gives",
    "tests/test_archive_structure.py::test_large_arrays_moved_in_blocks_give_the_same_file",
    "tests/test_archive_structure.py::test_deferred_changes_go_into_the_rebuilt_model_a_block_at_a_time",
    "tests/test_archive_structure.py::test_variables_that_stay_in_the_file_get_their_values_when_used",
    "tests/test_archive_structure.py::test_a_model_built_from_the_archive_outlives_it",
    "tests/test_archive_weights.py::test_small_models_agree_with_the_engine",
    "tests/test_archive_weights.py::test_versions_recorded_without_keras_are_keras_own",
    "tests/test_surgery.py::test_assert_equivalent_holds_after_removing_dropout",
    "tests/test_surgery.py::test_assert_equivalent_fails_for_batchnorm_with_default_statistics",
]


def test_core_tests_pass_again_under_jax(tmp_path):
    env = backend_env(tmp_path, "jax")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-x",
                           "-k", "(cnn or not small_models) and not numpy_backend", *AGAIN_UNDER_JAX], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
