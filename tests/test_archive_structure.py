"""Structural recipes run from the archive, without building the input model (engine/context.py).

The structural statements edit the archive's config and the first rebuild builds the edited model once,
filled from the archive. The engine on a loaded model is the reference: the same recipes run both ways
on the sample models and on keras.applications architectures, and must agree on the report (its shape
and parameter lines included), the model summary, and the bytes of the written file.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import run_cli
from modelxform import apply_file, compile_recipe, session
from modelxform.engine.runner import run
from modelxform.errors import ExitCode
from modelxform.keras_io import files as model_io
from modelxform.keras_io.files import read_provenance, save_model, sha256_file
from modelxform.keras_io.layers import walk
from modelxform.provenance import entry, extend
from test_archive_weights import _declines, member, subjects  # noqa: F401  (subjects is a fixture)

keras = pytest.importorskip("keras")

SEED = 5


def structural_recipe(subject) -> str:
    """Weight statements on the archive, then every structural statement that edits the config alone,
    then statements on the rebuilt model; layer names taken from the model."""
    layers = subject.layers
    types = collections.Counter(i.type_name for i in layers)
    top = [layer for layer in subject.model.layers if type(layer).__name__ != "InputLayer"]
    outputs = {t._keras_history[0].name for t in subject.model.outputs}
    weighted = [i for i in layers if i.layer.weights]
    lines = ["seed 3",
             f"select random {min(2, len(weighted))} where has weights", "scale weights 0.5",
             "select all", "freeze", "select last 1 where has weights", "unfreeze"]
    if types["MaxPooling2D"]:
        lines.append("replace MaxPooling2D with AveragePooling2D")
    elif types["ReLU"]:
        relu = next(i.path for i in layers if i.type_name == "ReLU")
        lines.append(f"replace {relu} with ReLU(max_value=4.0)")
    elif types["Dropout"]:
        lines.append("replace Dropout with Dropout(rate=0.125)")
    tap = next((layer.name for layer in top if layer.name not in outputs and not hasattr(layer, "layers")), None)
    if tap is not None:
        lines.append(f"tap {tap}")
    anchor = next(layer.name for layer in top if not hasattr(layer, "layers"))
    lines.append(f"insert Dropout(rate=0.25) after {anchor}")
    if types["Dense"]:
        lines += ["select where type=Dense", 'set activation = "relu6"']
    lines += [f"select {weighted[0].path}", 'rename to "renamed_first"']
    lines += ["select where has weights", "scale weights 1.5", "assert params > 0"]
    return "\n".join(lines) + "\n"


def both_ways(subject, text, tmp_path, dry_run=False):
    """(the run on the archive, the engine's run on the loaded model), each as (report dict, summary,
    written file or None)."""
    recipe = compile_recipe(text, "structural.recipe")
    out = tmp_path / "archive.keras"
    with _declines() as reasons:
        result = apply_file(recipe, subject.path, out, dry_run=dry_run)
    assert result.source == "archive", f"the archive could not stand in for the file: {reasons}"
    engine_summary = (len(subject.layers), int(subject.model.count_params()))
    if dry_run:
        return (result.plan.to_dict(), result.plan.before, None), \
            (recipe.plan(subject.model).to_dict(), engine_summary, None)
    engine_model, engine_report = recipe.apply(subject.model)
    engine_out = tmp_path / "engine.keras"
    save_model(engine_model, engine_out, provenance=extend(read_provenance(subject.path),
                                                           entry(recipe, engine_report, sha256_file(subject.path))))
    return (result.plan.to_dict(), result.plan.before, out), (engine_report.to_dict(), engine_summary, engine_out)


def archive_model(recipe, path):
    """The model a recipe makes when run on the archive of ``path``."""
    source = session.open_model(path)
    with source:
        ctx, _ = run(recipe, source)
        return ctx.current_model()


@pytest.mark.parametrize("name", ["cnn", "nested", "sequential", "zoo"])
def test_small_models_agree_with_the_engine(subjects, name, tmp_path):  # noqa: F811
    subject = subjects(name)
    (report, summary, out), (engine_report, engine_summary, engine_out) = both_ways(
        subject, structural_recipe(subject), tmp_path)
    assert report == engine_report
    assert "?" not in str(report["statements"]), "every shape in the report is known"
    assert summary == engine_summary
    assert member(out, "config.json") == member(engine_out, "config.json")
    assert out.read_bytes() == engine_out.read_bytes()
    # the recipe changed the model, so that agreeing means something
    assert member(out, "config.json") != member(subject.path, "config.json")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "densenet121"])
def test_applications_agree_with_the_engine(subjects, name, tmp_path):  # noqa: F811
    subject = subjects(name)
    (report, summary, out), (engine_report, engine_summary, engine_out) = both_ways(
        subject, structural_recipe(subject), tmp_path)
    assert report == engine_report
    assert summary == engine_summary
    assert out.read_bytes() == engine_out.read_bytes()


def test_the_untouched_layers_keep_their_arrays(subjects, tmp_path):  # noqa: F811
    subject = subjects("cnn")
    recipe = compile_recipe("replace MaxPooling2D with AveragePooling2D\ntap conv2d_1\n")
    model = archive_model(recipe, subject.path)
    before = {i.path: i.layer.get_weights() for i in subject.layers}
    after = {i.path: i.layer.get_weights() for i in walk(model)}
    assert before.keys() == after.keys()
    for path in before:
        assert [a.tobytes() for a in before[path]] == [a.tobytes() for a in after[path]], path
    probe = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype("float32")
    tapped = model([probe])
    assert len(tapped) == 2
    # MaxPooling2D -> AveragePooling2D changes the logits; the tapped conv2d_1 output is the input model's
    conv = keras.Model(subject.model.inputs, subject.model.get_layer("conv2d_1").output)
    np.testing.assert_array_equal(np.asarray(tapped[1]), np.asarray(conv([probe])))


def test_plan_agrees_and_reads_no_digest(subjects, tmp_path):  # noqa: F811
    subject = subjects("nested")
    (report, summary, _), (engine_report, engine_summary, _) = both_ways(
        subject, "replace MaxPooling2D with AveragePooling2D\ntap gap\n", tmp_path, dry_run=True)
    assert report == engine_report and report["dry_run"] is True
    assert summary == engine_summary


@pytest.mark.parametrize("text", [
    "remove dropout",
    "select all\nscale weights 0.5\nreplace Dropout with Dropout(rate=0.1)\nremove dropout\n",
    "select all\nreinit weights\nreplace Dropout with Dropout(rate=0.1)",
    "assert params > 1\nreplace Dropout with Dropout(rate=0.1)",
    "replace Dropout with Dropout(rate=0.1)\nassert equivalent",
    "select where type=Dense\nscale kernel 0.5\nassert equivalent tolerance 10",
])
def test_what_needs_the_built_model_builds_the_archive_and_agrees(subjects, tmp_path, text):  # noqa: F811
    """remove checks shapes on the built model, reinit and the asserts need it: the archive (with
    the arrays changed so far) is built once, and the result is the loaded engine's."""
    subject = subjects("cnn")
    (report, summary, out), (engine_report, engine_summary, engine_out) = both_ways(subject, text + "\n", tmp_path)
    assert report == engine_report and summary == engine_summary
    assert out.read_bytes() == engine_out.read_bytes()


def test_cli_structural_apply_does_not_load_the_input(subjects, tmp_path, monkeypatch):  # noqa: F811
    subject = subjects("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select random where type=Dense\nscale weights 0.8\n"
                      "replace MaxPooling2D with AveragePooling2D\ntap conv2d_1\n")
    keras_way = tmp_path / "keras.keras"
    monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    assert run_cli("apply", recipe, subject.path, "-o", keras_way, "--seed", 7).status == 0
    monkeypatch.delenv("MODELXFORM_FASTPATH")

    def refuse(*args, **kwargs):
        raise AssertionError("the input model was loaded")
    monkeypatch.setattr(model_io, "load_model", refuse)
    from modelxform.keras_io.graph import GraphEditor
    builds, real_build = [], GraphEditor._build
    monkeypatch.setattr(GraphEditor, "_build", lambda self, *a: builds.append(1) or real_build(self, *a))
    out = tmp_path / "out.keras"
    result = run_cli("apply", recipe, subject.path, "-o", out, "--seed", 7)
    assert result.status == 0, result.err
    assert len(builds) == 1  # the edited model, once: the input model is never built
    assert "max_pooling2d: output (None, 13, 13, 8) -> (None, 13, 13, 8)" in result.out
    assert out.read_bytes() == keras_way.read_bytes()
    assert read_provenance(out)["chain"][-1]["input_sha256"] == sha256_file(subject.path)


def assert_apply_fails(subject, tmp_path, text: str, message: str) -> None:
    """``apply`` of ``text`` exits APPLY with ``bad.recipe:message`` and writes nothing."""
    recipe = tmp_path / "bad.recipe"
    recipe.write_text(text)
    result = run_cli("apply", recipe, subject.path, "-o", tmp_path / "out.keras")
    assert result.status == ExitCode.APPLY
    assert f"{recipe}:{message}" in result.err
    assert not (tmp_path / "out.keras").exists()


def test_cli_errors_are_the_engines(subjects, tmp_path):  # noqa: F811
    assert_apply_fails(subjects("cnn"), tmp_path,
                       "replace MaxPooling2D with AveragePooling2D\ninsert Dropout(rate=0.5) after nosuch\n",
                       "2:32: error: insert … after: no layer named 'nosuch'")


def test_a_whole_process_prints_the_report_and_nothing_else(subjects, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    from conftest import ROOT
    subject = subjects("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text("replace MaxPooling2D with AveragePooling2D\ntap conv2d_1\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # TensorFlow's chatter on
    proc = subprocess.run([sys.executable, "-m", "modelxform", "apply", str(recipe), str(subject.path),
                           "-o", str(tmp_path / "out.keras")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no TensorFlow start-up messages, no warnings
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path / 'out.keras'}"


# ---- the rebuild's variables: created without initial values, then filled (graph.LazyVariables) ---------

LAZY_RECIPE = """\
seed 9
insert Dropout(rate=0.3, name="extra_drop") after dense_1
append Dense(units=4, name="extra")
select dense_2
set units = 12
reinit weights
select dense_3
reinit weights
replace MaxPooling2D with AveragePooling2D
"""


def test_lazily_built_variables_get_the_values_an_ordinary_build_gives(subjects, tmp_path, monkeypatch):  # noqa: F811
    from keras.src.backend.common import global_state

    from modelxform.keras_io import variables as graph
    subject = subjects("cnn")
    recipe = compile_recipe(LAZY_RECIPE)
    before = list(global_state.get_global_attribute("uninitialized_variables") or [])
    deferred = []
    real_exit = graph.LazyVariables.__exit__

    def exit_and_count(self, *exc):
        result = real_exit(self, *exc)
        deferred.append(len(self.created))
        return result
    monkeypatch.setattr(graph.LazyVariables, "__exit__", exit_and_count)
    lazy_model, lazy_report = recipe.apply(subject.model)
    assert deferred and deferred[-1] >= len(lazy_model.weights) > 0  # the build did defer the values
    assert (global_state.get_global_attribute("uninitialized_variables") or []) == before  # left as found
    assert all(v._value is not None for v in lazy_model.variables)  # every variable holds a value

    def unavailable(self):
        raise ImportError("as if Keras had no stateless scope")
    monkeypatch.setattr(graph.LazyVariables, "__enter__", unavailable)
    eager_model, eager_report = recipe.apply(subject.model)
    assert lazy_report.to_dict() == eager_report.to_dict()
    save_model(lazy_model, tmp_path / "lazy.keras")
    save_model(eager_model, tmp_path / "eager.keras")
    assert (tmp_path / "lazy.keras").read_bytes() == (tmp_path / "eager.keras").read_bytes()
    # and the model runs, the Dropout's seed state included
    probe = np.random.default_rng(1).standard_normal((2, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(lazy_model([probe], training=False)),
                                  keras.ops.convert_to_numpy(eager_model([probe], training=False)))
    assert tuple(lazy_model([probe], training=True).shape) == (2, 4)


def test_a_build_that_fails_lazily_is_reported_as_keras_reports_it(subjects, tmp_path):  # noqa: F811
    assert_apply_fails(subjects("cnn"), tmp_path, "select conv2d_2\nset kernel_size = [30, 30]\nreinit weights\n",
                       "2:1: error: `set kernel_size = [30, 30]`: the edited model does not build")


@pytest.mark.parametrize("way", ["archive", "keras"])
def test_large_arrays_moved_in_blocks_give_the_same_file(subjects, tmp_path, monkeypatch, way):  # noqa: F811
    """Arrays above graph.LARGE_ARRAY are moved a block of rows at a time: on the Keras path into the
    rebuilt model's variables, then from them into the file; from the archive straight into the file,
    the rebuilt model's variables never holding them (variables.FromSource). With the thresholds
    lowered so that every array of the CNN is large and moved in blocks of a few rows, the file is the
    one whole arrays give."""
    from modelxform.keras_io import variables as graph
    subject = subjects("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select random where type=Dense\nscale weights 0.8\n"
                      "replace MaxPooling2D with AveragePooling2D\ntap conv2d_1\n")
    if way == "keras":
        monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    assert run_cli("apply", recipe, subject.path, "-o", tmp_path / "whole.keras", "--seed", 3).status == 0
    calls = []
    real = graph.row_blocks
    monkeypatch.setattr(graph, "LARGE_ARRAY", 64)
    monkeypatch.setattr(graph, "BLOCK_BYTES", 100)
    monkeypatch.setattr(graph, "row_blocks", lambda *a: calls.append(a) or real(*a))
    filled = []
    real_materialise = graph.materialise
    monkeypatch.setattr(graph, "materialise", lambda var: filled.append(var) or real_materialise(var))
    result = run_cli("apply", recipe, subject.path, "-o", tmp_path / "blocks.keras", "--seed", 3)
    assert result.status == 0, result.err
    if way == "keras":
        assert len(calls) >= 2 * 6  # every kernel and bias: into the model, then into the file
    else:
        assert len(calls) >= 6 and filled == []  # every kernel and bias, once: into the file
    assert any(len(real(*a)) > 10 for a in calls)  # in many blocks
    assert (tmp_path / "blocks.keras").read_bytes() == (tmp_path / "whole.keras").read_bytes()


def test_deferred_changes_go_into_the_rebuilt_model_a_block_at_a_time(subjects, tmp_path, monkeypatch):  # noqa: F811
    """Elementwise changes deferred on the archive (noise, scale, clip) reach the rebuilt model's variables
    through reads of a few rows at a time, the noise drawn in blocks that line up with nothing: the file
    is the one the Keras path writes with whole arrays."""
    from modelxform.keras_io import archive as archive_module
    from modelxform.keras_io import variables as graph
    from modelxform.statements import weights
    subject = subjects("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select all\nadd noise normal(stddev=0.1) to weights\nscale weights 0.5\n"
                      "clip weights -0.7 0.7\nreplace MaxPooling2D with AveragePooling2D\n")
    monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    assert run_cli("apply", recipe, subject.path, "-o", tmp_path / "keras.keras", "--seed", 3).status == 0
    monkeypatch.delenv("MODELXFORM_FASTPATH")
    reads = []
    real = archive_module.Archive._read_rows_changed
    monkeypatch.setattr(archive_module.Archive, "_read_rows_changed", lambda *a: reads.append(a[-2:]) or real(*a))
    monkeypatch.setattr(graph, "LARGE_ARRAY", 64)
    monkeypatch.setattr(graph, "BLOCK_BYTES", 100)
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 256)
    monkeypatch.setattr(weights, "NOISE_BLOCK", 97)
    result = run_cli("apply", recipe, subject.path, "-o", tmp_path / "archive.keras", "--seed", 3)
    assert result.status == 0, result.err
    assert len(reads) > 100  # the arrays went in by rows, through the deferred passes
    assert (tmp_path / "archive.keras").read_bytes() == (tmp_path / "keras.keras").read_bytes()


def test_variables_that_stay_in_the_file_get_their_values_when_used(subjects, tmp_path, monkeypatch):  # noqa: F811
    """With every array large, a rebuilt model's variables keep taking their values from the archive:
    a forward pass (assert equivalent), a weight statement on the built model, a second rebuild and the
    save each get the right values, and the file is the one the Keras path writes. A plan with no
    forward pass in it fills none."""
    from modelxform.keras_io import variables as graph
    subject = subjects("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text("select random where type=Dense\nadd noise normal(stddev=0.05) to kernel\n"
                      "insert Dropout(rate=0.25) after conv2d_1\nassert equivalent\n"
                      "select where type=Dense\nscale weights 1.5\n"
                      "replace MaxPooling2D with AveragePooling2D\nselect all\nassert params > 0\ntap conv2d_1\n")
    monkeypatch.setenv("MODELXFORM_FASTPATH", "0")
    assert run_cli("apply", recipe, subject.path, "-o", tmp_path / "keras.keras", "--seed", 3).status == 0
    monkeypatch.delenv("MODELXFORM_FASTPATH")
    filled = []
    real_materialise = graph.materialise
    monkeypatch.setattr(graph, "materialise", lambda var: filled.append(var.path) or real_materialise(var))
    monkeypatch.setattr(graph, "LARGE_ARRAY", 64)
    monkeypatch.setattr(graph, "BLOCK_BYTES", 100)
    quiet = tmp_path / "no-forward-pass.recipe"
    quiet.write_text(recipe.read_text().replace("assert equivalent\n", ""))
    result = run_cli("plan", quiet, subject.path, "--seed", 3)
    assert result.status == 0, result.err
    assert filled == []  # without a forward pass, a plan reads no array
    result = run_cli("apply", recipe, subject.path, "-o", tmp_path / "archive.keras", "--seed", 3)
    assert result.status == 0, result.err
    assert filled  # the forward pass and the weight statement needed values
    assert (tmp_path / "archive.keras").read_bytes() == (tmp_path / "keras.keras").read_bytes()


def test_a_model_built_from_the_archive_outlives_it(subjects, tmp_path, monkeypatch):  # noqa: F811
    """Closing the archive gives the variables that still take their values from it those values: the
    model stays usable, and equal to the engine's."""
    from modelxform.keras_io import variables as graph
    monkeypatch.setattr(graph, "LARGE_ARRAY", 64)
    subject = subjects("cnn")
    recipe = compile_recipe("select where type=Dense\nscale weights 0.5\nreplace MaxPooling2D with AveragePooling2D\n")
    model = archive_model(recipe, subject.path)
    engine_model, _ = recipe.apply(subject.model)
    for got, want in zip(walk(model), walk(engine_model)):
        for a, b in zip(got.weights, want.weights):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (got.path, a.name)
