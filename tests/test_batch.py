"""modelxform batch: a zoo built here (several architectures and sizes, one corrupt file, one model a
recipe cannot apply to) run with two local workers and on a local Ray.

Batch runs start worker processes that import TensorFlow, so the expensive runs happen once per module
(fixtures) and the tests read their reports and files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from conftest import ROOT, make_nested, make_sequential, run_cli, weights_by_path
from modelxform.keras_io.files import load_model, read_provenance, save_model, sha256_file

pytestmark = pytest.mark.slow

SCALE = """\
recipe "scale-dense" version "1.0.0"
param factor = 0.8
select where type=Dense
scale weights $factor
"""
# structural (TensorFlow path) and seeded; the Sequential model has no Conv2D: it cannot apply there
CONV = """\
recipe "conv-noise-head" version "1.0.0"
select where type=Conv2D
add noise normal(stddev=0.01) to kernel
append Dense(units=3, activation="softmax", name="new_head")
assert output shape == (None, 3)
"""
ZOO = """\
# every model of the zoo; seq.keras gets its own factor
models:
  - "zoo/**/*.keras"
  - {path: zoo/seq.keras, params: {factor: 0.25}}
recipes: [recipes/scale.recipe, recipes/conv.recipe]
output: "OUT/{model}/{recipe}-{params}.keras"
seed: 3
params:
  factor: [0.5, 0.8]
"""
GOOD = """\
models: [zoo/cnn.keras, zoo/mobilenet.keras, zoo/sub/nested.keras]
recipes: [recipes/scale.recipe, recipes/conv.recipe]
output: "out/{model}/{recipe}-{params}.keras"
seed: 3
params:
  factor: [0.5, 0.8]
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def zoo_file(root, name, out="out", text=ZOO):
    return write(root / name, text.replace("OUT/", f"{out}/"))


def hidden_files(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith(".")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """zoo/cnn.keras (the sample CNN), zoo/seq.keras (a small Sequential), zoo/mobilenet.keras
    (MobileNetV2 alpha 0.35 at 32x32, ~150 layers), zoo/sub/nested.keras (nested models), zoo/broken.keras
    (a truncated archive); two recipes; zoo.yaml."""
    from modelxform.keras_io.files import import_keras
    from modelxform.samples import cnn
    keras = import_keras()
    root = tmp_path_factory.mktemp("batch")
    (root / "zoo" / "sub").mkdir(parents=True)
    save_model(cnn(), root / "zoo" / "cnn.keras")
    save_model(make_sequential(), root / "zoo" / "seq.keras")
    keras.utils.set_random_seed(0)
    save_model(keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
               root / "zoo" / "mobilenet.keras")
    save_model(make_nested(), root / "zoo" / "sub" / "nested.keras")
    (root / "zoo" / "broken.keras").write_bytes((root / "zoo" / "cnn.keras").read_bytes()[:2000])
    write(root / "recipes" / "scale.recipe", SCALE)
    write(root / "recipes" / "conv.recipe", CONV)
    zoo_file(root, "zoo.yaml")
    return root


@pytest.fixture(scope="module")
def first_run(zoo):
    result = run_cli("batch", zoo / "zoo.yaml", "-j", 2, "--report", zoo / "report.json")
    report = json.loads((zoo / "report.json").read_text())
    return result, report


def jobs_by_key(report):
    return {(j["model"], j["recipe"], json.dumps(j["params"], sort_keys=True)): j for j in report["jobs"]}


def test_the_zoo_gives_one_job_per_model_recipe_and_params(first_run):
    _, report = first_run
    keys = sorted((j["model"], j["recipe"], j["params"].get("factor")) for j in report["jobs"])
    scale, conv = "recipes/scale.recipe", "recipes/conv.recipe"
    expected = sorted([(f"zoo/{m}.keras", scale, f) for m in ("broken", "cnn", "mobilenet", "sub/nested")
                       for f in (0.5, 0.8)] + [("zoo/seq.keras", scale, 0.25)]
                      + [(f"zoo/{m}.keras", conv, None) for m in ("broken", "cnn", "mobilenet", "seq", "sub/nested")])
    assert keys == expected
    assert report["workers"] == 2 and report["executor"] == "local"
    outputs = [j["output"] for j in report["jobs"]]
    assert "out/cnn/scale-factor=0.5.keras" in outputs and "out/seq/scale-factor=0.25.keras" in outputs
    assert "out/mobilenet/conv-.keras" in outputs


def test_outputs_are_byte_identical_to_single_apply_runs(zoo, first_run, tmp_path):
    _, report = first_run
    done = [j for j in report["jobs"] if j["status"] == "done"]
    assert len(done) == 10
    for job in done:
        output = zoo / job["output"]
        assert sha256_file(output) == job["sha256"]
        params = [a for k, v in job["params"].items() for a in ("--param", f"{k}={v}")]
        single = tmp_path / "single.keras"
        result = run_cli("apply", zoo / job["recipe"], zoo / job["model"], "-o", single, "--seed", 3, *params)
        assert result.status == 0, result.err
        assert sha256_file(single) == job["sha256"], job["output"]


def test_outputs_are_correct(zoo, first_run):
    result, report = first_run
    original = weights_by_path(load_model(zoo / "zoo" / "cnn.keras"))
    scaled = weights_by_path(load_model(zoo / "out" / "cnn" / "scale-factor=0.5.keras"))
    for path in ("dense_1", "dense_2", "dense_3"):
        for before, after in zip(original[path], scaled[path]):
            assert after.tobytes() == (before * np.float32(0.5)).tobytes()
    for path in ("conv2d_1", "conv2d_2"):  # untouched: bit-identical
        for before, after in zip(original[path], scaled[path]):
            assert after.tobytes() == before.tobytes()
    step = read_provenance(zoo / "out" / "seq" / "scale-factor=0.25.keras")["chain"][-1]
    assert step["params"] == {"factor": 0.25} and step["seed"] == 3  # the model's own params
    assert step["input_sha256"] == sha256_file(zoo / "zoo" / "seq.keras")
    head = load_model(zoo / "out" / "mobilenet" / "conv-.keras")
    assert head.layers[-1].name == "new_head" and tuple(head.outputs[0].shape) == (None, 3)
    step = read_provenance(zoo / "out" / "mobilenet" / "conv-.keras")["chain"][-1]
    assert step["recipe"]["name"] == "conv-noise-head" and step["seed"] == 3 and step["params"] == {}


def test_failures_are_reported_with_their_causes_and_the_rest_carries_on(zoo, first_run):
    result, report = first_run
    assert result.status == 1
    failed = {(j["model"], j["recipe"], j["params"].get("factor")): j for j in report["jobs"]
              if j["status"] == "failed"}
    assert sorted(failed, key=str) == sorted([
        ("zoo/broken.keras", "recipes/conv.recipe", None), ("zoo/broken.keras", "recipes/scale.recipe", 0.5),
        ("zoo/broken.keras", "recipes/scale.recipe", 0.8), ("zoo/seq.keras", "recipes/conv.recipe", None)], key=str)
    broken = [j for j in report["jobs"] if j["model"] == "zoo/broken.keras"]
    assert len(broken) == 3 and all(j["status"] == "failed" for j in broken)
    assert all("not a .keras archive" in j["error"] and j["exit_code"] == 3 for j in broken)
    seq_conv = failed[("zoo/seq.keras", "recipes/conv.recipe", None)]
    assert "conv.recipe:2:1: error: where type=Conv2D matches no layer" in seq_conv["error"]
    assert seq_conv["exit_code"] == 4 and seq_conv["sha256"] is None
    assert report["totals"] == {"done": 10, "failed": 4}
    # nothing partial: no output, no temporary file, no empty folder for jobs that failed
    assert not (zoo / "out" / "broken").exists()
    assert not (zoo / "out" / "seq" / "conv-.keras").exists()
    assert hidden_files(zoo / "out") == []
    assert "failed jobs" in result.out and "not a .keras archive" in result.out
    assert "14 jobs: 10 done, 0 skipped, 4 failed" in result.out


def test_a_second_run_skips_what_is_done_and_retries_what_failed(zoo, first_run):
    _, first = first_run
    stamps = {j["output"]: os.stat(zoo / j["output"]).st_mtime_ns for j in first["jobs"] if j["status"] == "done"}
    result = run_cli("batch", zoo / "zoo.yaml", "-j", 2, "--report", zoo / "again.json")
    again = jobs_by_key(json.loads((zoo / "again.json").read_text()))
    assert result.status == 1
    for key, job in jobs_by_key(first).items():
        if job["status"] == "done":
            assert again[key]["status"] == "skipped" and again[key]["sha256"] == job["sha256"]
        else:
            assert again[key]["status"] == "failed" and again[key]["error"] == job["error"]
    assert {o: os.stat(zoo / o).st_mtime_ns for o in stamps} == stamps
    assert "skipped 10 jobs whose output is up to date" in result.err


def test_report_dash_writes_the_json_alone_to_standard_output(zoo, first_run):
    """`--report -` (for jq): the report is standard output, all of it; what batch says goes to standard
    error; and the report is the one a file would hold."""
    _, first = first_run
    result = run_cli("batch", zoo / "zoo.yaml", "-j", 2, "--report", "-")
    assert result.status == 1  # (the first run's failures fail again)
    report = json.loads(result.out)
    assert {key: job["status"] for key, job in jobs_by_key(report).items()} == \
        {key: "skipped" if job["status"] == "done" else "failed" for key, job in jobs_by_key(first).items()}
    assert "14 jobs: 0 done, 10 skipped, 4 failed" in result.err and "failed jobs" in result.err
    assert "report:" not in result.err and not os.path.exists("-")


def test_a_zoo_whose_jobs_are_all_done_skips_everything(zoo, first_run):
    write(zoo / "good.yaml", GOOD)
    result = run_cli("batch", zoo / "good.yaml", "-j", 2, "--report", zoo / "good.json")
    report = json.loads((zoo / "good.json").read_text())
    assert result.status == 0, result.err
    assert len(report["jobs"]) == 9 and {j["status"] for j in report["jobs"]} == {"skipped"}
    assert "9 jobs: 0 done, 9 skipped, 0 failed" in result.out


def test_force_redoes_jobs_with_the_same_bytes(zoo, first_run):
    write(zoo / "one.yaml", GOOD.replace("models: [zoo/cnn.keras, zoo/mobilenet.keras, zoo/sub/nested.keras]",
                                         "models: [zoo/cnn.keras]").replace(", recipes/conv.recipe", ""))
    outputs = [zoo / "out" / "cnn" / f"scale-factor={f}.keras" for f in (0.5, 0.8)]
    before = {p: (os.stat(p).st_ino, sha256_file(p)) for p in outputs}
    result = run_cli("batch", zoo / "one.yaml", "-j", 2, "--force", "--report", zoo / "force.json")
    report = json.loads((zoo / "force.json").read_text())
    assert result.status == 0, result.err
    assert [j["status"] for j in report["jobs"]] == ["done", "done"]
    for p in outputs:  # rewritten (a new file renamed into place), same bytes
        assert os.stat(p).st_ino != before[p][0] and sha256_file(p) == before[p][1]


def test_already_done_compares_input_recipe_seed_and_params(zoo, first_run):
    from modelxform import compile_recipe
    from modelxform.batch import already_done, load_zoo
    batch = load_zoo(zoo / "good.yaml") if (zoo / "good.yaml").exists() else load_zoo(write(zoo / "good.yaml", GOOD))
    job = next(j for j in batch.jobs if j.output_name == "out/cnn/scale-factor=0.5.keras")
    recipe = batch.recipes[job.recipe]
    sha = sha256_file(job.model)
    assert already_done(job, recipe, sha) == sha256_file(job.output)
    assert already_done(job, recipe, "0" * 64) is None  # another input
    assert already_done(dataclasses.replace(job, seed=4), recipe, sha) is None
    assert already_done(dataclasses.replace(job, params={"factor": 0.6}), recipe, sha) is None
    assert already_done(dataclasses.replace(job, params={"factor": 0.8}), recipe, sha) is None
    assert already_done(job, compile_recipe(SCALE + "freeze\n", job.recipe), sha) is None  # another recipe
    assert already_done(dataclasses.replace(job, output=job.output + ".missing.keras"), recipe, sha) is None


def test_outputs_are_hashed_only_when_their_digest_is_asked_for(zoo, first_run, monkeypatch):
    """Without a report nothing reads an output again for its sha256 (on a 2 GiB model that was half of
    a weight-only job): the job's result and a skipped job carry none, the outputs are the same bytes,
    and a later run with --report still knows the skipped outputs' digests."""
    from modelxform.batch import load_zoo, run_batch
    from modelxform.batch.job import run_job
    from modelxform.session import ApplyResult
    write(zoo / "no-digest.yaml", """\
        models: [zoo/cnn.keras, zoo/seq.keras]
        recipes: [recipes/scale.recipe]
        output: "no-digest/{model}-{params}.keras"
        seed: 3
        params: {factor: [0.5]}
        """)
    batch = load_zoo(zoo / "no-digest.yaml")
    first = run_batch(batch, workers=2, digests=False)
    assert [(o.status, o.sha256) for o in first] == [("done", None), ("done", None)]
    outputs = [o.job.output for o in first]
    made_by_the_first_run = [zoo / "out" / "cnn" / "scale-factor=0.5.keras"]  # (the same job, digested)
    assert open(outputs[0], "rb").read() == open(made_by_the_first_run[0], "rb").read()

    again = run_batch(batch, workers=2, digests=False)
    assert [(o.status, o.sha256) for o in again] == [("skipped", None), ("skipped", None)]
    result = run_cli("batch", zoo / "no-digest.yaml", "--report", zoo / "no-digest.json")
    report = json.loads((zoo / "no-digest.json").read_text())
    assert result.status == 0, result.err
    assert [(j["status"], j["sha256"]) for j in report["jobs"]] == [("skipped", sha256_file(o)) for o in outputs]

    def no_reading(self):
        raise AssertionError("the output was read for its sha256")
    monkeypatch.setattr(ApplyResult, "sha256", property(no_reading))
    payload = dict(batch.jobs[1].payload("apply"), digest_output=False)
    os.unlink(payload["output"])
    done = run_job(payload)
    assert (done["status"], done["sha256"], done["error"]) == ("done", None, None)
    assert sha256_file(payload["output"]) == report["jobs"][1]["sha256"]
    checked = run_job(dict(payload, digest_output=True))  # (and the patch is what would tell)
    assert checked["sha256"] is None and "the output was read for its sha256" in checked["error"]


def test_a_crashing_worker_fails_only_its_job(zoo, monkeypatch):
    from modelxform.batch.job import CRASH_ENV
    monkeypatch.setenv(CRASH_ENV, "nested")  # test-only hook: that job calls os._exit in its worker
    write(zoo / "crash.yaml", """\
        models: [zoo/cnn.keras, zoo/sub/nested.keras, zoo/seq.keras]
        recipes: [recipes/scale.recipe]
        output: "crash/{model}.keras"
        """)
    result = run_cli("batch", zoo / "crash.yaml", "-j", 2, "--report", zoo / "crash.json")
    report = json.loads((zoo / "crash.json").read_text())
    assert result.status == 1
    status = {j["model"]: j for j in report["jobs"]}
    assert status["zoo/sub/nested.keras"]["status"] == "failed"
    assert "worker process running this job exited with status 70" in status["zoo/sub/nested.keras"]["error"]
    assert status["zoo/cnn.keras"]["status"] == "done" and status["zoo/seq.keras"]["status"] == "done"
    assert sorted(os.listdir(zoo / "crash")) == ["cnn.keras", "seq.keras"]


def test_structural_jobs_run_in_workers_forked_after_one_import(zoo, monkeypatch, capfd):
    """Jobs that need Keras run in workers forked from a server that imported TensorFlow once: a worker
    that dies fails only its job there too, the rest match `apply`'s bytes, and the server is gone after
    the run (a later run starts its own, with its own environment)."""
    import multiprocessing.forkserver

    from modelxform.batch import local
    from modelxform.batch.job import CRASH_ENV
    contexts = []
    context = local._context
    monkeypatch.setattr(local, "_context", lambda preload: contexts.append(preload) or context(preload))
    monkeypatch.setenv(CRASH_ENV, "nested")
    preload_before = list(multiprocessing.forkserver._forkserver._preload_modules)
    write(zoo / "fork.yaml", """\
        models: [zoo/cnn.keras, zoo/sub/nested.keras, zoo/mobilenet.keras]
        recipes: [recipes/conv.recipe]
        output: "fork/{model}.keras"
        seed: 3
        """)
    result = run_cli("batch", zoo / "fork.yaml", "-j", 2, "--report", zoo / "fork.json")
    assert contexts == [True]
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None
    assert multiprocessing.forkserver._forkserver._preload_modules == preload_before  # the process's own again
    # the server shares the terminal: nothing of TensorFlow's start-up messages reaches it
    terminal = capfd.readouterr().err
    assert "absl" not in terminal and "oneDNN" not in terminal and "Traceback" not in terminal, terminal
    status = {j["model"]: j for j in json.loads((zoo / "fork.json").read_text())["jobs"]}
    assert result.status == 1
    assert "worker process running this job exited with status 70" in status["zoo/sub/nested.keras"]["error"]
    assert status["zoo/cnn.keras"]["status"] == "done" and status["zoo/mobilenet.keras"]["status"] == "done"
    monkeypatch.delenv(CRASH_ENV)
    single = zoo / "fork-single.keras"
    assert run_cli("apply", zoo / "recipes" / "conv.recipe", zoo / "zoo" / "cnn.keras", "-o", single,
                   "--seed", 3).status == 0
    assert sha256_file(zoo / "fork" / "cnn.keras") == sha256_file(single)


def _children_with(pid: int, word: str) -> list[int]:
    """Processes whose parent is ``pid`` and whose command line holds ``word`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            continue
        if ppid == pid and word in cmdline:
            found.append(int(entry))
    return found


def _ignores_sigint(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGINT (the SigIgn mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(line for line in fh if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the fork server through /proc")
def test_ctrl_c_while_the_fork_server_imports_tensorflow_prints_no_traceback(zoo):
    write(zoo / "early.yaml", """\
        models: [zoo/cnn.keras, zoo/mobilenet.keras]
        recipes: [recipes/conv.recipe]
        output: "early/{model}.keras"
        """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "modelxform", "batch", str(zoo / "early.yaml"), "-j", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not _children_with(proc.pid, "forkserver") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    server = _children_with(proc.pid, "forkserver")
    assert server, "no fork server started"
    ignoring = time.monotonic() + 60  # (past the interpreter's start: it ignores Ctrl-C from preload's first line)
    while not _ignores_sigint(server[0]) and time.monotonic() < ignoring and proc.poll() is None:
        time.sleep(0.005)
    assert _ignores_sigint(server[0]), "the fork server never came to ignore Ctrl-C"
    time.sleep(0.2)  # inside its import of TensorFlow (about 3 s)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group, server included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    gone = time.monotonic() + 10
    while os.path.exists(f"/proc/{server[0]}") and time.monotonic() < gone:
        time.sleep(0.05)  # (reaped by the main process, or by init once orphaned)
    assert not os.path.exists(f"/proc/{server[0]}"), "the fork server outlived the batch"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the fork server through /proc")
def test_the_fork_server_imports_while_the_main_process_checks_which_jobs_are_done(zoo):
    """The import every job waits for begins before the main process hashes the inputs and reads the
    existing outputs' records (it used to begin only once those checks were done); the server is
    stopped after the run, also when every job turned out to be done."""
    import multiprocessing.forkserver

    from modelxform.batch import load_zoo, run_batch
    write(zoo / "early-start.yaml", """\
        models: [zoo/cnn.keras, zoo/mobilenet.keras]
        recipes: [recipes/conv.recipe]
        output: "early-start/{model}.keras"
        seed: 3
        """)
    first = run_batch(load_zoo(zoo / "early-start.yaml"), workers=2)
    assert [o.status for o in first] == ["done", "done"]
    (zoo / "early-start" / "mobilenet.keras").unlink()

    servers = []

    def on_event(kind, outcome):
        if kind == "skipped":  # decided once the inputs are hashed and the output's record read
            pid = multiprocessing.forkserver._forkserver._forkserver_pid
            servers.append(pid is not None and os.path.exists(f"/proc/{pid}") and pid)
    again = run_batch(load_zoo(zoo / "early-start.yaml"), workers=2, on_event=on_event)
    assert [o.status for o in again] == ["skipped", "done"]
    assert len(servers) == 1 and servers[0], "no fork server was running while the jobs were checked"
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None
    assert not os.path.exists(f"/proc/{servers[0]}")

    servers.clear()
    done = run_batch(load_zoo(zoo / "early-start.yaml"), workers=2, on_event=on_event)
    assert [o.status for o in done] == ["skipped", "skipped"] and len(servers) == 2 and servers[0]
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None
    assert not os.path.exists(f"/proc/{servers[0]}")
    assert sha256_file(zoo / "early-start" / "cnn.keras") == first[0].sha256


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the fork server through /proc")
def test_the_command_line_begins_the_fork_server_before_it_reads_the_zoo(zoo, monkeypatch):
    """`batch` starts the workers' server before it reads ZOO.yaml and the recipes (whether a job needs
    Keras is not known yet): where one does, that server runs the jobs; where none does, it is killed
    and the workers are fresh interpreters; where ZOO.yaml is bad, it is killed and the error is the
    same. No server is left after any of them."""
    import multiprocessing.forkserver

    import modelxform.batch as batch
    from modelxform.batch import local

    def server() -> int | None:
        pid = multiprocessing.forkserver._forkserver._forkserver_pid
        return pid if pid is not None and os.path.exists(f"/proc/{pid}") else None

    seen = []
    load_zoo, run_local = batch.load_zoo, local.run_local
    monkeypatch.setattr(batch, "load_zoo", lambda *a, **k: seen.append(("read", server())) or load_zoo(*a, **k))
    monkeypatch.setattr(local, "run_local", lambda payloads, workers, on_start, on_result, ctx, **options: (
        seen.append(("run", server(), ctx.get_start_method()))
        or run_local(payloads, workers, on_start, on_result, ctx, **options)))

    def gone(pid):
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        return not os.path.exists(f"/proc/{pid}")

    def one_job(name, recipe):
        (zoo / f"{name}.yaml").write_text(f'models: [zoo/cnn.keras]\nrecipes: [recipes/{recipe}]\n'
                                          f'output: "{name}/{{model}}.keras"\nseed: 3\n')
        return run_cli("batch", zoo / f"{name}.yaml", "-j", 1, "--force")

    assert one_job("begun", "conv.recipe").status == 0
    (_, reading), (_, running, method) = seen
    assert reading and running == reading and method == "forkserver"  # the server begun first ran the job
    assert server() is None and gone(reading)

    seen.clear()
    assert one_job("weight-only", "scale.recipe").status == 0
    (_, reading), (_, running, method) = seen
    assert reading and running is None and method == "spawn"  # begun, then killed: no job needs Keras
    assert gone(reading)
    single = zoo / "weight-only-single.keras"
    assert run_cli("apply", zoo / "recipes" / "scale.recipe", zoo / "zoo" / "cnn.keras", "-o", single,
                   "--seed", 3).status == 0
    assert sha256_file(zoo / "weight-only" / "cnn.keras") == sha256_file(single)

    seen.clear()
    (zoo / "bad-begun.yaml").write_text("models: [zoo/cnn.keras]\nrecipes: [recipes/conv.recipe]\noutput: 3\n")
    result = run_cli("batch", zoo / "bad-begun.yaml", "-j", 2)
    assert result.status == 2 and "bad-begun.yaml:3:9" in result.err and "Traceback" not in result.err, result.err
    ((_, reading),) = seen
    assert reading and server() is None and gone(reading)



def test_only_jobs_that_need_keras_preload_it():
    from modelxform.batch.local import _context
    from modelxform.lang.compiler import compile_recipe
    assert not compile_recipe(SCALE).program.needs_keras
    assert not compile_recipe("select all; freeze; assert count == 3").program.needs_keras
    assert compile_recipe(CONV).program.needs_keras
    assert compile_recipe("select all; assert equivalent").program.needs_keras
    assert compile_recipe("replace MaxPooling2D with AveragePooling2D").program.needs_keras
    assert _context(preload=False)[0].get_start_method() == "spawn"
    assert _context(preload=True)[0].get_start_method() == "forkserver"  # (the suite runs on TensorFlow)


def test_ctrl_c_then_rerun_finishes_only_what_is_left(zoo):
    # three jobs of a second or more each, so that when the first is written the next is still running
    (zoo / "slowzoo").mkdir(exist_ok=True)
    for name in ("m1", "m2", "m3"):
        shutil.copyfile(zoo / "zoo" / "mobilenet.keras", zoo / "slowzoo" / f"{name}.keras")
    write(zoo / "slow.yaml", """\
        models: [slowzoo/m1.keras, slowzoo/m2.keras, slowzoo/m3.keras]
        recipes: [recipes/conv.recipe]
        output: "slow/{model}.keras"
        seed: 1
        """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "modelxform", "batch", str(zoo / "slow.yaml"), "-j", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,
                            # as a terminal's shell would: a test run started in the background (`cmd &`)
                            # ignores SIGINT, and Python would then never raise KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # like a terminal's Ctrl-C: SIGINT to the whole process group
        lines.append(line)
        if " done " in line:  # the first job is written, the next one is running
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + err
    left = re.search(r"interrupted: (\d) jobs? left; run the same command again", err)
    assert left and int(left.group(1)) >= 1, err
    written = sorted(os.listdir(zoo / "slow"))
    assert 1 <= len(written) == 3 - int(left.group(1))  # what was done stays done
    assert hidden_files(zoo / "slow") == []  # the interrupted job left no temporary file
    result = run_cli("batch", zoo / "slow.yaml", "-j", 2, "--report", zoo / "slow.json")
    report = json.loads((zoo / "slow.json").read_text())
    assert result.status == 0, result.err
    status = {os.path.basename(j["output"]): j["status"] for j in report["jobs"]}
    assert status == {name: "skipped" if name in written else "done" for name in status}
    assert sorted(os.listdir(zoo / "slow")) == ["m1.keras", "m2.keras", "m3.keras"]


def test_dry_run_prints_the_applicability_matrix_and_writes_nothing(zoo):
    write(zoo / "dry.yaml", """\
        models: [zoo/cnn.keras, zoo/seq.keras, zoo/broken.keras]
        recipes: [recipes/scale.recipe, recipes/conv.recipe]
        output: "dry/{model}/{recipe}.keras"
        """)
    result = run_cli("batch", zoo / "dry.yaml", "-j", 2, "--dry-run", "--report", zoo / "dry.json")
    report = json.loads((zoo / "dry.json").read_text())
    assert result.status == 1
    assert not (zoo / "dry").exists()
    table = result.out.split("\n\n")[0]  # the table; each failure's full message follows it
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip().startswith("zoo/")}
    assert rows["zoo/cnn.keras"].split()[1:3] == ["ok", "ok"]
    assert rows["zoo/seq.keras"].split()[1] == "ok"
    assert "fails: where type=Conv2D matches no layer" in rows["zoo/seq.keras"]
    assert "fails: zoo/broken.keras: not a .keras archive" in rows["zoo/broken.keras"]
    assert "hint: the model has: Dense ×2, Dropout ×1" in result.out  # the full error follows the table
    assert "3 of 6 jobs would apply; dry run: nothing was written" in result.out
    status = {(j["model"], j["recipe"]): j["status"] for j in report["jobs"]}
    assert status[("zoo/cnn.keras", "recipes/conv.recipe")] == "ok"
    assert status[("zoo/seq.keras", "recipes/conv.recipe")] == "failed"
    select = next(j for j in report["jobs"] if j["model"] == "zoo/cnn.keras" and j["recipe"] == "recipes/conv.recipe")
    assert select["statements"][0] == {"statement": "select where type=Conv2D", "line": 2, "layers": 2}


@pytest.fixture(scope="module")
def ray_run(zoo, first_run):
    """The same zoo on a local Ray with 2 CPUs (started and stopped by the batch)."""
    zoo_file(zoo, "ray.yaml", out="ray-out")
    result = run_cli("batch", zoo / "ray.yaml", "-j", 2, "--executor", "ray", "--report", zoo / "ray.json")
    return result, json.loads((zoo / "ray.json").read_text())


def test_the_ray_executor_gives_the_same_outputs_as_the_local_one(zoo, first_run, ray_run):
    result, ray_report = ray_run
    _, local_report = first_run
    assert result.status == 1, result.err
    assert ray_report["executor"] == "ray"
    local, ray = jobs_by_key(local_report), jobs_by_key(ray_report)
    assert sorted(local) == sorted(ray)
    for key, job in local.items():
        assert ray[key]["status"] == job["status"]
        assert ray[key]["sha256"] == job["sha256"]
        assert ray[key]["output"] == job["output"].replace("out/", "ray-out/", 1)
        assert (ray[key]["error"] or "").splitlines()[:1] == (job["error"] or "").splitlines()[:1]
        if job["status"] == "done":
            assert sha256_file(zoo / ray[key]["output"]) == sha256_file(zoo / job["output"])


RAY_HEAD = """\
import time, ray
context = ray.init(address="local", num_cpus=2, include_dashboard=False)
print(context.address_info["gcs_address"], flush=True)
while True:
    time.sleep(1)
"""


def test_the_ray_executor_joins_a_running_cluster(zoo, first_run, monkeypatch, tmp_path):
    """--ray-address: a Ray started by another process (a one-node cluster), joined, not stopped."""
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        import select
        ready, _, _ = select.select([head.stdout], [], [], 300)  # (a head that never starts fails, not hangs)
        address = head.stdout.readline().strip() if ready else ""
        assert address, "the Ray head did not start"
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the head's token is in Ray's default token file
        write(zoo / "join.yaml", """\
            models: [zoo/cnn.keras, zoo/sub/nested.keras]
            recipes: [recipes/scale.recipe]
            output: "join/{model}-{params}.keras"
            seed: 3
            params: {factor: [0.5]}
            """)
        result = run_cli("batch", zoo / "join.yaml", "--executor", "ray", "--ray-address", address,
                         "--report", tmp_path / "join.json")
        assert result.status == 0, result.err
        report = json.loads((tmp_path / "join.json").read_text())
        assert [j["status"] for j in report["jobs"]] == ["done", "done"]
        for name, model in (("cnn", "cnn"), ("nested", "nested")):
            assert sha256_file(zoo / "join" / f"{name}-factor=0.5.keras") == \
                sha256_file(zoo / "out" / model / "scale-factor=0.5.keras")
        assert head.poll() is None  # the cluster is still up: the batch only disconnected
    finally:
        head.terminate()
        head.wait(timeout=60)


def test_the_ray_executor_without_ray_names_the_extra(zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = run_cli("batch", zoo / "zoo.yaml", "--executor", "ray")
    assert result.status == 2
    assert "--executor ray needs Ray" in result.err and "pip install 'modelxform[ray]'" in result.err


@pytest.mark.parametrize("text, line, col, message", [
    ("modles: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}.keras\n", 1, 1,
     "unknown key 'modles' in the batch file (did you mean 'models'?)"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}.keras\nseed: many\n", 4, 7,
     "seed must be a whole number ≥ 0"),
    ("models: zoo/cnn.keras\nrecipes: [recipes/scale.recipe]\noutput: [o.keras]\n", 3, 9,
     "output must be a non-empty string"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}.keras\nparams: {factor: 0.5}\n",
     4, 18, "params: factor must be a non-empty list of values"),
    ("models: [zoo/cnn.keras, zoo/seq.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{recipe}.keras\n", 3, 9,
     "two jobs would write o/scale.keras: zoo/cnn.keras × recipes/scale.recipe and zoo/seq.keras × "
     "recipes/scale.recipe"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: out/../../x/{model}.keras\n", 3, 9,
     "output must not contain '..'"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: /tmp/{model}.keras\n", 3, 9,
     "output must be a path relative to the batch file's folder"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{name}.keras\n", 3, 9,
     "output: unknown field {name}"),
    ("models: [\"zoo/*.h5\"]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}.keras\n", 1, 10,
     "'zoo/*.h5' matches no .keras or .h5 file"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}-{params}.keras\n"
     "params: {factr: [0.5]}\n", 4, 10,
     "parameter 'factr' is declared by none of the recipes (did you mean 'factor'?)"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}-{params}.keras\n"
     "params: {factor: [big]}\n", 4, 19, "recipes/scale.recipe: parameter 'factor' is float in the recipe"),
    ("models: &m [zoo/cnn.keras]\nrecipes: *m\noutput: o/{model}.keras\n", 1, 9,
     "YAML anchors and aliases are not allowed in batch files"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe, recipes/nope.recipe]\noutput: o/{model}.keras\n",
     2, 33, "recipe 'recipes/nope.recipe' does not exist"),
    ("models: [zoo/cnn.keras]\nrecipes: [recipes/scale.recipe]\noutput: o/{model}-{params}.keras\n"
     "params: {factor: [0.5, .nan]}\n", 4, 24, "a value of factor must be a finite number, not .nan"),
], ids=["unknown-key", "seed-type", "output-type", "params-type", "duplicate-outputs", "dotdot", "absolute",
        "template-field", "glob-matches-nothing", "undeclared-param", "param-type", "alias", "missing-recipe",
        "nan-param"])
def test_a_bad_zoo_file_gives_status_2_with_line_and_column(zoo, text, line, col, message):
    from modelxform.batch import ZooError, load_zoo
    path = write(zoo / "bad.yaml", text)
    result = run_cli("batch", path, "-j", 1)
    assert result.status == 2
    assert f"bad.yaml:{line}:{col}: error: {message}" in result.err, result.err
    with pytest.raises(ZooError) as info:
        load_zoo(path)
    assert (info.value.line, info.value.column) == (line, col)
    assert not (zoo / "o").exists()


def test_a_template_value_cannot_leave_the_output_folder(zoo):
    write(zoo / "recipes" / "tag.recipe", 'param tag = "extra"\ninsert Dropout(rate=0.1, name=$tag) after dense_1\n')
    path = write(zoo / "bad.yaml", 'models: [{path: zoo/cnn.keras, params: {tag: "../../../../etc"}}]\n'
                                   "recipes: [recipes/tag.recipe]\noutput: \"o/{params}/{model}.keras\"\n")
    result = run_cli("batch", path)
    assert result.status == 2
    assert "bad.yaml:3:9: error: output 'o/tag=../../../../etc/cnn.keras'" in result.err
    assert "would leave the output folder o" in result.err


def test_a_recipe_that_does_not_compile_stops_the_batch_before_it_starts(zoo):
    write(zoo / "recipes" / "typo.recipe", "select where type=Dens\n")
    path = write(zoo / "bad.yaml", "models: [zoo/cnn.keras]\nrecipes: [recipes/typo.recipe]\noutput: o/{model}.keras\n")
    result = run_cli("batch", path)
    assert result.status == 2
    assert "typo.recipe:1:19: error: unknown layer type 'Dens' (did you mean 'Dense'?)" in result.err


def test_bad_worker_counts_and_options_are_usage_errors(zoo):
    assert run_cli("batch", zoo / "zoo.yaml", "-j", 0).status == 2
    result = run_cli("batch", zoo / "zoo.yaml", "--ray-address", "auto")
    assert result.status == 2 and "--ray-address goes with --executor ray" in result.err


@pytest.mark.parametrize("doc", ["docs/batch.md", "README.md"])
def test_the_documented_zoo_files_are_valid(tmp_path, doc):
    """The ZOO.yaml examples of the docs, with the files they name (load_zoo reads no model)."""
    from modelxform.batch import load_zoo
    text = (ROOT / doc).read_text()
    example = re.search(r"```yaml\n(models:.*?)```", text, re.S).group(1)
    for name in ("zoo/a.keras", "zoo/big/resnet.keras"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not loaded by load_zoo")
    write(tmp_path / "recipes" / "prep.recipe", SCALE)
    write(tmp_path / "recipes" / "head.recipe", 'append Dense(units=3, name="head")\n')
    zoo = load_zoo(write(tmp_path / "zoo.yaml", example))
    outputs = sorted(job.output_name for job in zoo.jobs)
    if doc == "README.md":
        assert outputs == ["out/a/prep-factor=0.5.keras", "out/a/prep-factor=0.8.keras",
                           "out/resnet/prep-factor=0.5.keras", "out/resnet/prep-factor=0.8.keras"]
    else:
        assert outputs == ["out/a/head-.keras", "out/a/prep-factor=0.5.keras", "out/a/prep-factor=0.8.keras",
                           "out/resnet/head-.keras", "out/resnet/prep-factor=0.3.keras"]


@pytest.fixture(scope="module")
def special_zoo(tmp_path_factory):
    """A zoo whose models need `imports` (a custom layer class from a module beside ZOO.yaml) and
    `unsafe` (a Lambda layer)."""
    from conftest import custom_layer_module
    from modelxform.keras_io.files import import_keras
    keras = import_keras()
    root = tmp_path_factory.mktemp("special")
    module = custom_layer_module(root, "mxzoo_layers", "mxzoo", "Tripler", 3.0)  # the workers must import it
    inp = keras.Input((4,), name="x")
    out = module.Tripler(name="triple")(keras.layers.Dense(3, name="dense")(inp))
    (root / "zoo").mkdir()
    keras.Model(inp, out, name="custom").save(root / "zoo" / "custom.keras")
    inp = keras.Input((4,), name="x")
    out = keras.layers.Lambda(lambda x: x * 2, name="double")(keras.layers.Dense(3, name="dense")(inp))
    keras.Model(inp, out, name="with_lambda").save(root / "zoo" / "lambda.keras")
    write(root / "recipes" / "freeze.recipe", "select all\nfreeze\n")
    return root


def test_imports_and_unsafe_let_a_zoo_load_custom_and_lambda_layers(special_zoo):
    root = special_zoo
    body = "models: [zoo/custom.keras, zoo/lambda.keras]\nrecipes: [recipes/freeze.recipe]\n"
    write(root / "plain.yaml", body + 'output: "plain/{model}.keras"\n')
    result = run_cli("batch", root / "plain.yaml", "-j", 2, "--report", root / "plain.json")
    assert result.status == 1
    jobs = {j["model"]: j for j in json.loads((root / "plain.json").read_text())["jobs"]}
    assert jobs["zoo/custom.keras"]["status"] == "failed" and "--import" in jobs["zoo/custom.keras"]["error"]
    assert jobs["zoo/lambda.keras"]["status"] == "failed" and "Lambda" in jobs["zoo/lambda.keras"]["error"]

    write(root / "special.yaml", body + 'output: "special/{model}.keras"\nimports: [mxzoo_layers]\nunsafe: true\n')
    result = run_cli("batch", root / "special.yaml", "-j", 2, "--report", root / "special.json")
    assert result.status == 0, result.out + result.err
    jobs = {j["model"]: j for j in json.loads((root / "special.json").read_text())["jobs"]}
    assert {m: j["status"] for m, j in jobs.items()} == {"zoo/custom.keras": "done", "zoo/lambda.keras": "done"}
    with zipfile.ZipFile(root / "special" / "custom.keras") as zf:
        layers = json.loads(zf.read("config.json"))["config"]["layers"]
    assert {e["config"]["name"]: e["config"]["trainable"] for e in layers if e["class_name"] != "InputLayer"} \
        == {"dense": False, "triple": False}


def test_the_command_line_gives_imports_and_unsafe_to_every_job(special_zoo, monkeypatch):
    """batch --import / --unsafe, as apply's: what CI gives under --include-root, where a batch file's own
    `imports` and `unsafe: true` are refused (tests/test_hostile_input.py); the module is found on the
    Python path, as apply --import finds it."""
    root = special_zoo
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    write(root / "cli.yaml", "models: [zoo/custom.keras, zoo/lambda.keras]\nrecipes: [recipes/freeze.recipe]\n"
                             'output: "cli/{model}.keras"\nimports: [mxzoo_layers]\n')
    result = run_cli("batch", root / "cli.yaml", "-j", 2, "--include-root", root, "--import", "mxzoo_layers",
                     "--unsafe", "--report", root / "cli.json")
    assert result.status == 0, result.out + result.err
    jobs = {j["model"]: j["status"] for j in json.loads((root / "cli.json").read_text())["jobs"]}
    assert jobs == {"zoo/custom.keras": "done", "zoo/lambda.keras": "done"}


def test_imports_and_unsafe_are_checked_with_their_positions(special_zoo):
    root = special_zoo
    path = write(root / "bad-keys.yaml", """\
        models: [zoo/custom.keras]
        recipes: [recipes/freeze.recipe]
        output: "bad/{model}.keras"
        unsafe: "yes"
        imports: [mxzoo_layers, 3, "not a module"]
        """)
    result = run_cli("batch", path)
    assert result.status == 2
    assert f"{path}:4:9: error: unsafe must be true or false" in result.err
    assert f"{path}:5:25: error: an entry of imports must be a non-empty string" in result.err
    assert f"{path}:5:28: error: imports: 'not a module' is not a module name" in result.err
    assert not (root / "bad").exists()


def test_the_fork_server_imports_once_what_a_job_runs_with_the_collector_frozen():
    """batch/preload.py (the fork server's import): Keras, TensorFlow and modelxform's job modules
    imported once for all workers; no full collection while they import, and TensorFlow's long-lived
    objects frozen out of the collector's walks afterwards (which forked workers inherit: without it
    each full collection in a job walks them again); and nothing of TensorFlow's runtime started."""
    code = textwrap.dedent("""\
        import gc, json, sys
        import modelxform.batch.preload
        from tensorflow.python.eager import context
        print(json.dumps({"modules": [m for m in ("keras", "tensorflow", "modelxform.session",
                                                  "modelxform.batch.job", "modelxform.keras_io.graph",
                                                  "modelxform.keras_io.archive", "modelxform.engine.runner")
                                      if m in sys.modules],
                          "full_collections": gc.get_stats()[2]["collections"], "collector": gc.isenabled(),
                          "frozen": gc.get_freeze_count(),
                          "runtime": context.context_safe() is not None and context.context()._initialized}))
        """)
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    state = json.loads(out)
    assert state["modules"] == ["keras", "tensorflow", "modelxform.session", "modelxform.batch.job",
                                "modelxform.keras_io.graph", "modelxform.keras_io.archive",
                                "modelxform.engine.runner"]
    assert state["full_collections"] == 0 and state["collector"] is True
    assert state["frozen"] > 100_000
    assert state["runtime"] is False


def test_jobs_are_handed_out_longest_first_by_layers_on_the_keras_path_and_bytes_on_the_weight_only_one(
        tmp_path):
    """A deep model in a small file (60 layers, ~240 kB) against a shallow one in a big file (2 layers,
    ~4 MB): a structural job rebuilds every layer, so the deep model's goes first; a weight-only job
    costs its bytes, so the big file's goes first, and after both structural jobs."""
    from modelxform.batch import Outcome, _to_run, load_zoo
    from modelxform.keras_io.files import import_keras
    keras = import_keras()
    (tmp_path / "zoo").mkdir()
    x = inputs = keras.Input((4,))
    for i in range(60):
        x = keras.layers.Dense(4, name=f"d{i}")(x)
    save_model(keras.Model(inputs, x), tmp_path / "zoo" / "deep.keras")
    save_model(keras.Sequential([keras.Input((500,)), keras.layers.Dense(2000), keras.layers.Dense(2)]),
               tmp_path / "zoo" / "wide.keras")
    write(tmp_path / "structural.recipe", "append Dropout(rate=0.1)\n")
    write(tmp_path / "weights.recipe", "select where type=Dense\nscale kernel 0.5\n")
    zoo = load_zoo(str(write(tmp_path / "zoo.yaml", """\
        models: [zoo/wide.keras, zoo/deep.keras]
        recipes: [weights.recipe, structural.recipe]
        output: "out/{model}-{recipe}.keras"
        """)))
    size = {name: os.path.getsize(tmp_path / "zoo" / f"{name}.keras") for name in ("deep", "wide")}
    assert size["wide"] > 10 * size["deep"]
    payloads = _to_run(zoo, [Outcome(job) for job in zoo.jobs], force=True, dry_run=False,
                       on_event=lambda *a: None)
    order = [(os.path.basename(p["model"]), os.path.basename(p["recipe"]), p["needs_keras"]) for p in payloads]
    assert order == [("deep.keras", "structural.recipe", True), ("wide.keras", "structural.recipe", True),
                     ("wide.keras", "weights.recipe", False), ("deep.keras", "weights.recipe", False)]


def test_an_archive_opened_in_the_main_process_gives_the_worker_the_same_output(zoo, tmp_path):
    """At -j 2 the main process opens the first jobs' archives while the server imports TensorFlow and
    sends them with the jobs (local._Preparer): the output is the one the worker makes opening the file
    itself; a file changed since it was opened is opened again, and its output is the new file's."""
    import pickle

    from modelxform.session import apply_file, load_recipe, open_archive
    recipe = load_recipe(zoo / "recipes" / "conv.recipe")
    model = tmp_path / "model.keras"
    shutil.copyfile(zoo / "zoo" / "mobilenet.keras", model)
    opened = open_archive(model)
    sent = pickle.dumps(opened)  # (what the pipe to the worker does)
    opened.close()
    received = pickle.loads(sent)
    assert received.reopened
    apply_file(recipe, model, tmp_path / "handed.keras", seed=3, opened=received)
    assert not received.reopened  # used and closed by the run
    apply_file(recipe, model, tmp_path / "itself.keras", seed=3)
    assert sha256_file(tmp_path / "handed.keras") == sha256_file(tmp_path / "itself.keras")

    opened = open_archive(model)
    sent = pickle.dumps(opened)
    opened.close()
    shutil.copyfile(zoo / "zoo" / "cnn.keras", tmp_path / "other.keras")
    os.replace(tmp_path / "other.keras", model)  # another model by that name since it was opened
    stale = pickle.loads(sent)
    assert not stale.reopened
    apply_file(recipe, model, tmp_path / "stale.keras", seed=3, opened=stale)
    apply_file(recipe, model, tmp_path / "fresh.keras", seed=3)
    assert sha256_file(tmp_path / "stale.keras") == sha256_file(tmp_path / "fresh.keras")
    assert sha256_file(tmp_path / "stale.keras") != sha256_file(tmp_path / "itself.keras")


def test_the_preparer_changes_no_job_after_it_is_stopped():
    """local._Preparer puts opened archives in the payloads in hand-out order until stopped; one it opens
    after being stopped is closed, not put in a payload that may be on its way to a worker."""
    import threading

    from modelxform.batch.local import _Preparer, _release

    class Opened:
        closed = False

        def close(self):
            self.closed = True

    payloads = [{"index": i} for i in range(4)]
    made, second_begun, go_on = [], threading.Event(), threading.Event()

    def prepare(payload):
        if payload["index"] == 1:
            second_begun.set()
            go_on.wait(10)
        if payload["index"] == 2:
            return None  # (not opened: the worker opens it)
        made.append(Opened())
        return made[-1]

    preparer = _Preparer(payloads, prepare)
    preparer.start()
    assert second_begun.wait(10)
    preparer.stop()
    go_on.set()
    preparer.join(10)
    assert not preparer.is_alive()
    assert payloads[0]["opened"] is made[0] and not made[0].closed
    assert all("opened" not in p for p in payloads[1:])
    assert len(made) == 2 and made[1].closed  # opened while being stopped: closed
    _release(payloads[0])
    assert made[0].closed and "opened" not in payloads[0]


def test_the_first_line_counts_the_params_too(zoo, first_run):
    result, _ = first_run  # (it said "14 jobs: 5 models × 2 recipes": 10)
    assert result.out.splitlines()[0] == "14 jobs: 5 models × 2 recipes with their params -> out/"
    even = zoo_file(zoo, "even.yaml", text="models: [zoo/cnn.keras, zoo/seq.keras]\nrecipes: [recipes/scale.recipe]\n"
                                           "output: \"even/{model}-{params}.keras\"\nparams: {factor: [0.5, 0.8, 0.9]}\n")
    r = run_cli("batch", even, "--dry-run")
    assert r.out.splitlines()[0] == "6 jobs: 2 models × 1 recipe × 3 params (dry run: nothing is written)"
    plain = zoo_file(zoo, "plain.yaml", text="models: [zoo/cnn.keras]\nrecipes: [recipes/conv.recipe]\n"
                                             "output: \"plain/{model}.keras\"\n")
    r = run_cli("batch", plain, "--dry-run")
    assert r.out.splitlines()[0] == "1 job: 1 model × 1 recipe (dry run: nothing is written)"


def test_a_glob_walks_each_folder_once_whatever_its_links(tmp_path, model_file):
    """Two symbolic links back to their own folder made `**` walk without end (glob.glob follows every
    link): 2 GB after ten minutes, with --include-root and --dry-run too."""
    model = model_file("cnn")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.keras").write_bytes(model.read_bytes())
    (tmp_path / "self").symlink_to(".")
    (tmp_path / "sub" / "up").symlink_to("..")
    write(tmp_path / "w.recipe", SCALE)
    zoo = write(tmp_path / "zoo.yaml", 'models: ["**/*.keras"]\nrecipes: [w.recipe]\n'
                                       'output: "out/{model}-{params}.keras"\nparams: {factor: [0.5]}\n')
    proc = subprocess.run([sys.executable, "-m", "modelxform", "batch", str(zoo), "--dry-run", "--include-root",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "2 jobs: 2 models × 1 recipe (dry run: nothing is written)"
    from modelxform.batch.zoo import walk_glob
    assert sorted(walk_glob(str(tmp_path / "**" / "*.keras"))) == [str(tmp_path / "cnn.keras"),
                                                                  str(tmp_path / "sub" / "b.keras")]
