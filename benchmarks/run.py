"""Whole-process benchmarks: modelxform against the Keras script a user would otherwise write (issue 7).

    .venv/bin/python benchmarks/run.py                 # set up (once), then 5 runs of each side per case
    .venv/bin/python benchmarks/run.py --runs 3 --only vgg16-scale-dense,check-500
    .venv/bin/python benchmarks/run.py --setup-only
    .venv/bin/python benchmarks/run.py --backend jax --only resnet50-replace-pooling
    .venv/bin/python benchmarks/run.py --backend torch --python .venv-torch/bin/python --only …
    .venv/bin/python benchmarks/run.py --also jax --also torch=.venv-torch/bin/python --no-keras-path \
        --only resnet50-replace-pooling       # every backend in the same run, alternating

With --backend, modelxform runs with KERAS_BACKEND set to it (and the --python interpreter, for a
virtual environment that has that backend), against the same hand-written scripts on TensorFlow: the
comparison a JAX or PyTorch user makes with the script they would otherwise run. The input models
are the same files (built once, under TensorFlow).

Every run is a fresh process (what a user or a CI job pays: interpreter, imports, load, edit, save). The
two sides alternate run by run, so that a slow spell of the machine hits both. Reported per case: the
median wall time of each side, the ratio modelxform/script, and the peak resident memory of each side
(from /usr/bin/time -v when present, else from getrusage in a small wrapper process) against the bytes of
the model's weights. Weight-only cases are also run with the fast path switched off
(MODELXFORM_FASTPATH=0), to show what it saves.

Models are built here (keras.applications with weights=None; nothing is downloaded) into
benchmarks/.work/, which is never committed. Results go to benchmarks/.work/results.json and are printed as
a Markdown table; benchmarks/README.md quotes them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
RECIPES = HERE / "recipes"
SCRIPTS = HERE / "scripts"
PY = sys.executable
MXPY = PY  # the interpreter modelxform runs with (--python)
BACKEND = "tensorflow"  # the Keras backend modelxform runs on (--backend); the scripts run on TensorFlow
ALSO: list = []  # (backend, python): modelxform on these backends too, in the same run (--also)
KERAS_PATH = True  # also run modelxform with the fast path off (--no-keras-path: skip)
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

TEN = ["conv2_block1_1_relu", "conv2_block1_2_relu", "conv2_block1_out", "conv2_block2_1_relu",
       "conv2_block2_2_relu", "conv2_block2_out", "conv2_block3_1_relu", "conv2_block3_2_relu",
       "conv2_block3_out", "conv3_block1_1_relu"]


GITIGNORE = "# models, outputs and results made by benchmarks/run.py: never committed\n*\n!.gitignore\n"


# ---- setup ------------------------------------------------------------------------------------------

BUILD = """\
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras
name, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
model = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50}[name](weights=None)
built = time.perf_counter()
model.save(path)
print(f"{name}: built in {built - start:.1f} s, saved in {time.perf_counter() - built:.1f} s")
"""


# A BERT-base-sized encoder built from Keras layers (issue 14): a token Embedding, then 12 blocks of
# MultiHeadAttention (its query, key, value and output projections are EinsumDense sublayers), Add,
# LayerNormalization and two Dense layers; 108.5M parameters, random weights.
TRANSFORMER = """\
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras
path = sys.argv[1]
start = time.perf_counter()
keras.utils.set_random_seed(0)
vocab, hidden, blocks, heads, ffn, length = 30522, 768, 12, 12, 3072, 128
ids = keras.Input((length,), dtype="int32", name="token_ids")
x = keras.layers.Embedding(vocab, hidden, name="token_embedding")(ids)
for n in range(blocks):
    a = keras.layers.MultiHeadAttention(heads, hidden // heads, name=f"attention_{n}")(x, x)
    x = keras.layers.LayerNormalization(name=f"attention_norm_{n}")(keras.layers.Add(name=f"attention_add_{n}")([x, a]))
    f = keras.layers.Dense(ffn, activation="gelu", name=f"ffn_in_{n}")(x)
    f = keras.layers.Dense(hidden, name=f"ffn_out_{n}")(f)
    x = keras.layers.LayerNormalization(name=f"ffn_norm_{n}")(keras.layers.Add(name=f"ffn_add_{n}")([x, f]))
model = keras.Model(ids, x, name="transformer")
built = time.perf_counter()
model.save(path)
print(f"transformer: {model.count_params():,} parameters, built in {built - start:.1f} s, "
      f"saved in {time.perf_counter() - built:.1f} s")
"""


def setup(log=print) -> dict:
    """Build the models and the generated recipe into .work/ (skipping what exists); their timings."""
    WORK.mkdir(exist_ok=True)
    (WORK / ".gitignore").write_text(GITIGNORE)
    # modelxform's modules compiled to bytecode, as installing the wheel does (an editable install under
    # PYTHONDONTWRITEBYTECODE=1 would compile them from source in every process, about 0.1 s)
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "modelxform")], check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    timings = {}
    cnn = WORK / "cnn.keras"
    if not cnn.exists():
        start = time.perf_counter()
        subprocess.run([PY, "-m", "modelxform.samples", "cnn", str(cnn)], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        timings["cnn"] = time.perf_counter() - start
    for name in ("vgg16", "resnet50"):
        path = WORK / f"{name}.keras"
        if not path.exists():
            start = time.perf_counter()
            out = subprocess.run([PY, "-c", BUILD, name, str(path)], check=True, env=env, cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
            timings[name] = time.perf_counter() - start
            log(f"setup: {out} ({timings[name]:.1f} s as a whole process, {path.stat().st_size / 1e6:.0f} MB)")
    path = WORK / "transformer.keras"
    if not path.exists():
        start = time.perf_counter()
        out = subprocess.run([PY, "-c", TRANSFORMER, str(path)], check=True, env=env, cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        timings["transformer"] = time.perf_counter() - start
        log(f"setup: {out} ({timings['transformer']:.1f} s as a whole process, {path.stat().st_size / 1e6:.0f} MB)")
    big = WORK / "check-500.recipe"
    if not big.exists():
        big.write_text(generated_recipe(500))
    return timings


def generated_recipe(n: int) -> str:
    """A long recipe that exercises the whole front end (every statement family), ``n`` statements."""
    templates = [
        "select where type=Dense and params > {k}K or name ~ \"dense_{k}\"",
        "scale kernel 0.9",
        "add noise normal(stddev=0.01) to bias",
        "select first {j} where type in (Conv2D, DepthwiseConv2D) and trainable",
        "clip weights -1 1",
        "prune kernel {k}%",
        "set bias to constant(0.1)",
        "freeze",
        "select \"conv{k}_*\", dense_{k}",
        "unfreeze",
        "replace dense_{k} with Dense(units={k}, activation=\"relu\", use_bias=False)",
        "assert count >= 1",
    ]
    lines = [f'recipe "generated-{n}" version "1.0.0"']
    i = 0
    while len(lines) < n:
        lines.append(templates[i % len(templates)].format(k=i % 97 + 1, j=i % 5 + 1))
        i += 1
    return "\n".join(lines) + "\n"


# ---- cases -------------------------------------------------------------------------------------------

def cases() -> list[dict]:
    mx = [MXPY, "-m", "modelxform"]
    w = WORK

    def apply(recipe, model, *extra):
        return mx + ["apply", str(recipe), str(w / model), "-o", str(w / "out-mx.keras"), *extra]

    def script(name, model, *extra):
        return [PY, str(SCRIPTS / name), str(w / model), str(w / "out-script.keras"), *extra]

    return [
        dict(name="cnn-design-card", model="cnn.keras", kind="structural",
             what="recipes/example.recipe (random Dense × 0.8, MaxPool→AvgPool, tap conv2d_1)",
             mx=apply(ROOT / "recipes" / "example.recipe", "cnn.keras", "--seed", "7"),
             script=script("design_card_example.py", "cnn.keras")),
        dict(name="vgg16-replace-pooling", model="vgg16.keras", kind="structural",
             what="replace MaxPooling2D with AveragePooling2D",
             mx=apply(RECIPES / "replace-pooling.recipe", "vgg16.keras"),
             script=script("replace_pooling.py", "vgg16.keras")),
        dict(name="resnet50-replace-pooling", model="resnet50.keras", kind="structural",
             what="replace MaxPooling2D with AveragePooling2D",
             mx=apply(RECIPES / "replace-pooling.recipe", "resnet50.keras"),
             script=script("replace_pooling.py", "resnet50.keras")),
        dict(name="vgg16-scale-dense", model="vgg16.keras", kind="weight-only",
             what="select where type=Dense; scale kernel 0.8",
             mx=apply(RECIPES / "scale-dense.recipe", "vgg16.keras"),
             script=script("scale_dense.py", "vgg16.keras")),
        dict(name="resnet50-freeze-but-conv5", model="resnet50.keras", kind="weight-only",
             what="select all; freeze; select \"conv5_*\"; unfreeze; assert count == 32",
             mx=apply(RECIPES / "freeze-but-conv5.recipe", "resnet50.keras"),
             script=script("freeze_but_conv5.py", "resnet50.keras")),
        dict(name="resnet50-replace-one", model="resnet50.keras", kind="structural",
             what="1 × replace <activation> with Activation(activation=\"relu\")",
             mx=apply(RECIPES / "replace-one.recipe", "resnet50.keras"),
             script=script("replace_activations.py", "resnet50.keras", TEN[0])),
        dict(name="resnet50-replace-ten", model="resnet50.keras", kind="structural",
             what="10 × replace <activation> with Activation(activation=\"relu\")",
             mx=apply(RECIPES / "replace-ten.recipe", "resnet50.keras"),
             script=script("replace_activations.py", "resnet50.keras", *TEN)),
        dict(name="resnet50-fold-batchnorm", model="resnet50.keras", kind="structural",
             what="fold batchnorm (53 BatchNormalization layers into their convolutions)",
             mx=apply(RECIPES / "fold-batchnorm.recipe", "resnet50.keras"),
             script=script("fold_batchnorm.py", "resnet50.keras")),
        dict(name="transformer-quantize-int8", model="transformer.keras", kind="finetune",
             what="select where type in (Dense, EinsumDense); quantize int8 (108.5M-parameter encoder of Keras layers)",
             mx=apply(RECIPES / "quantize-int8.recipe", "transformer.keras"),
             script=script("quantize_int8.py", "transformer.keras"), memory_target=True),
        dict(name="transformer-lora-attention", model="transformer.keras", kind="finetune",
             what='select "*/query", "*/value"; lora rank 8 (the same encoder)',
             mx=apply(RECIPES / "lora-attention.recipe", "transformer.keras"),
             script=script("lora_attention.py", "transformer.keras")),
        dict(name="check-500", model=None, kind="front-end", what="modelxform check on a 500-statement recipe",
             mx=mx + ["check", str(w / "check-500.recipe")], script=None),
        dict(name="fmt-500", model=None, kind="front-end", what="modelxform fmt --check on the same recipe",
             mx=mx + ["fmt", "--check", str(w / "check-500.recipe")], script=None, ok=(0, 1)),
    ]


# ---- measuring -----------------------------------------------------------------------------------------

RUSAGE_WRAPPER = """\
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""


def measure(argv, env, ok=(0,), cwd=ROOT) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one whole process, run in ``cwd`` (``python -m`` imports from
    there before PYTHONPATH)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        if TIME:
            wrapped = [TIME, "-v", "-o", report.name, *argv]
        else:
            wrapped = [PY, "-c", RUSAGE_WRAPPER, *argv]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        wall = time.perf_counter() - start
        if proc.returncode not in ok:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
        if TIME:
            text = pathlib.Path(report.name).read_text()
            kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
        else:
            kb = int(proc.stderr.strip().splitlines()[-1])
    return wall, kb * 1024


def weight_bytes(model: str | None) -> int | None:
    if model is None:
        return None
    with zipfile.ZipFile(WORK / model) as zf:
        return zf.getinfo("model.weights.h5").file_size


PROBE = """\
import sys
from modelxform.cli import main
status = main(sys.argv[1:])
sys.stderr.write(f"FASTPATH {'keras' not in sys.modules}\\n")
sys.exit(status)
"""


def took_fast_path(argv, env) -> bool:
    proc = subprocess.run([MXPY, "-c", PROBE, *argv[3:]], env=env, cwd=ROOT, capture_output=True, text=True)
    return "FASTPATH True" in proc.stderr


def sha(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_model(a, b) -> bool:
    """The same config.json and the same arrays (bit for bit) in two .keras files."""
    import io

    import h5py
    import numpy as np

    def arrays(path):
        with zipfile.ZipFile(path) as zf:
            config, data = zf.read("config.json"), zf.read("model.weights.h5")
        out = {}
        with h5py.File(io.BytesIO(data), "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
        return config, out

    (config_a, a_arrays), (config_b, b_arrays) = arrays(a), arrays(b)
    return config_a == config_b and a_arrays.keys() == b_arrays.keys() and all(
        a_arrays[k].dtype == b_arrays[k].dtype and np.array_equal(a_arrays[k], b_arrays[k]) for k in a_arrays)


def run_case(case, runs, log, baseline: str | None = None) -> dict:
    script_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow")
    env = dict(script_env, KERAS_BACKEND=BACKEND)
    variants = {"modelxform": (case["mx"], env)}
    if baseline:
        # the same command from another checkout (e.g. before a refactoring), in the same run; run from
        # that checkout, since `python -m modelxform` imports the package of its working folder first
        variants["modelxform, baseline"] = (case["mx"], dict(env, PYTHONPATH=baseline), baseline)
    if case["script"]:
        variants["script"] = (case["script"], script_env)
    for backend, python in ALSO:
        # the same command on another backend (and interpreter), alternating with the others
        variants[f"modelxform on {backend}"] = ([python, *case["mx"][1:]], dict(script_env, KERAS_BACKEND=backend))
    if case["kind"] in ("weight-only", "structural") and KERAS_PATH:
        # with the fast path and the archive run off: the input model is loaded, as before both existed
        variants["modelxform, Keras path"] = (case["mx"], dict(env, MODELXFORM_FASTPATH="0"))
    ok = case.get("ok", (0,))
    result = {k: v for k, v in case.items() if k not in ("mx", "script")}  # (memory_target kept)
    result["load_average_before"] = os.getloadavg()[0]  # other work on the machine skews the figures
    result["weight_bytes"] = weight_bytes(case["model"])
    if case["kind"] == "weight-only":
        result["fast_path_taken"] = took_fast_path(case["mx"], env)
    samples = {name: [] for name in variants}
    for n in range(runs):
        for name, (argv, variant_env, *cwd) in variants.items():
            wall, rss = measure(argv, variant_env, ok, *cwd)
            samples[name].append((wall, rss))
            log(f"  {case['name']} run {n + 1}/{runs} {name}: {wall:.2f} s, {rss / 2**20:.0f} MiB")
        if "modelxform, Keras path" in variants and n == 0:
            # the quick way's model must be the Keras path's: the same config and arrays, and normally
            # the same bytes (not when the input's weights file was laid out by Keras's other writer, as
            # model.save does for a model above about 512 MB without psutil: the fast path keeps the
            # input's layout; see model_io._write_keras_archive)
            quick = WORK / "out-quick.keras"
            subprocess.run(variants["modelxform"][0], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            os.replace(WORK / "out-mx.keras", quick)
            subprocess.run(variants["modelxform"][0], env=variants["modelxform, Keras path"][1], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            result["identical_to_keras_path"] = sha(quick) == sha(WORK / "out-mx.keras")
            result["same_model_as_keras_path"] = same_model(quick, WORK / "out-mx.keras")
            quick.unlink()
    result["runs"] = runs
    result["load_average_after"] = os.getloadavg()[0]
    result["median_s"] = {name: statistics.median(w for w, _ in s) for name, s in samples.items()}
    result["peak_rss_bytes"] = {name: max(r for _, r in s) for name, s in samples.items()}
    result["samples"] = samples
    if "script" in result["median_s"]:
        result["ratio"] = result["median_s"]["modelxform"] / result["median_s"]["script"]
    for out in ("out-mx.keras", "out-script.keras"):
        (WORK / out).unlink(missing_ok=True)
    return result


# ---- reporting -----------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = re.search(r"MemTotal:\s+(\d+) kB", pathlib.Path("/proc/meminfo").read_text()).group(1)
        mem = int(kb) * 1024
    except (OSError, AttributeError):
        pass
    return {"nproc": os.cpu_count(), "memory_bytes": mem, "cpu": cpu, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
            "rss_from": "/usr/bin/time -v" if TIME else "getrusage(RUSAGE_CHILDREN) in a wrapper process"}


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, figures, met) per issue-7 target."""
    by = {r["name"]: r for r in results["cases"]}
    out = []
    for r in results["cases"]:
        if r["kind"] == "structural" and "ratio" in r:
            out.append((f"structural ≤ 1.0× script: {r['name']}", f"{r['ratio']:.2f}×", r["ratio"] <= 1.0))
            jax = r["median_s"]["modelxform"] if results.get("backend") == "jax" else \
                r["median_s"].get("modelxform on jax")
            if jax is not None and r["name"].startswith("resnet50"):
                ratio = jax / r["median_s"]["script"]
                out.append((f"structural ResNet50 on JAX ≤ 0.6× the TensorFlow script (issue 18): {r['name']}",
                            f"{ratio:.2f}×", ratio <= 0.6))
        if r["kind"] == "weight-only" and "ratio" in r:
            out.append((f"weight-only ≤ 0.3× script: {r['name']}", f"{r['ratio']:.2f}×", r["ratio"] <= 0.3))
        if r["kind"] == "finetune" and "ratio" in r:
            out.append((f"fine-tuning prep ≤ 1.0× script: {r['name']}", f"{r['ratio']:.2f}×", r["ratio"] <= 1.0))
            if r.get("memory_target"):
                mine, theirs = r["peak_rss_bytes"]["modelxform"], r["peak_rss_bytes"]["script"]
                out.append((f"peak memory ≤ the script's: {r['name']}",
                            f"{mine / 2**20:.0f} MiB vs {theirs / 2**20:.0f} MiB", mine <= theirs))
        if r["kind"] == "front-end":
            t = r["median_s"]["modelxform"]
            out.append((f"check/fmt ≤ 0.3 s whole process: {r['name']}", f"{t:.2f} s", t <= 0.3))
    if "resnet50-replace-ten" in by and "resnet50-replace-one" in by:
        ten = by["resnet50-replace-ten"]["median_s"]["modelxform"]
        one = by["resnet50-replace-one"]["median_s"]["modelxform"]
        out.append(("ten structural ≤ 1.3× one (ResNet50)", f"{ten:.2f} s / {one:.2f} s = {ten / one:.2f}×",
                    ten / one <= 1.3))
    for r in results["cases"]:
        if r.get("weight_bytes") and r["kind"] in ("structural", "weight-only") and r["weight_bytes"] > 50e6:
            limit = 2.5 if r["kind"] == "structural" else 1.5
            x = r["peak_rss_bytes"]["modelxform"] / r["weight_bytes"]
            runtime = results.get("runtime_rss_bytes")
            beyond = "" if not runtime or r["kind"] != "structural" else (
                f"; beyond the {runtime / 2**20:.0f} MiB of Python, Keras and its backend imported: "
                f"{(r['peak_rss_bytes']['modelxform'] - runtime) / r['weight_bytes']:.2f}×")
            out.append((f"peak memory ≤ {limit}× weight bytes: {r['name']}",
                        f"{r['peak_rss_bytes']['modelxform'] / 2**20:.0f} MiB = {x:.2f}× "
                        f"{r['weight_bytes'] / 2**20:.0f} MiB{beyond}", x <= limit))
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    loads = ", ".join(f"{r['name']} {r.get('load_average_before', float('nan')):.1f}/"
                      f"{r.get('load_average_after', float('nan')):.1f}" for r in results["cases"])
    backend = results.get("backend", "tensorflow")
    lines = [f"modelxform on the {backend} backend; the scripts on tensorflow. "
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB memory, "
             f"Python {m['python']}; {m['date']}; {results['runs']} runs per side; peak RSS from {m['rss_from']}; "
             f"1-minute load average before/after each case: {loads}.",
             "",
             "| case | weights | modelxform | script | ratio | Keras path (fast path off) "
             "| peak RSS modelxform | peak RSS script |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["cases"]:
        med, rss, wb = r["median_s"], r["peak_rss_bytes"], r.get("weight_bytes")

        def mem(name):
            if name not in rss:
                return "–"
            text = f"{rss[name] / 2**20:.0f} MiB"
            # against the weights only where they, not the interpreter and its libraries, could dominate
            return text + (f" ({rss[name] / wb:.2f}×)" if wb and wb > 50e6 else "")

        def size(n):
            return "–" if n is None else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
        keras_path = med.get("modelxform, Keras path")
        lines.append("| {} | {} | {:.2f} s | {} | {} | {} | {} | {} |".format(
            r["name"], size(wb), med["modelxform"],
            f"{med['script']:.2f} s" if "script" in med else "–",
            f"{r['ratio']:.2f}×" if "ratio" in r else "–",
            f"{keras_path:.2f} s ({keras_path / med['script']:.2f}×)" if keras_path else "–",
            mem("modelxform"), mem("script")))
    lines += ["", "| issue-7 target | figure | met |", "|---|---|---|"]
    for target, figure, met in targets(results):
        lines.append(f"| {target} | {figure} | {'yes' if met else 'no'} |")
    also = sorted({k for r in results["cases"] for k in r["median_s"] if k.startswith("modelxform on ")})
    if also:
        backend = results.get("backend", "tensorflow")
        head = f"| case | script (tensorflow) | modelxform on {backend} | ratio | " + " | ".join(
            f"{k} | ratio | peak RSS" for k in also) + " |"
        lines += ["", head, "|---|" + "---:|" * (3 + 3 * len(also))]
        for r in results["cases"]:
            med, rss = r["median_s"], r["peak_rss_bytes"]
            if "script" not in med:
                continue
            cells = [r["name"], f"{med['script']:.2f} s", f"{med['modelxform']:.2f} s",
                     f"{med['modelxform'] / med['script']:.2f}×"]
            for k in also:
                cells += ([f"{med[k]:.2f} s", f"{med[k] / med['script']:.2f}×", f"{rss[k] / 2**20:.0f} MiB"]
                          if k in med else ["–", "–", "–"])
            lines.append("| " + " | ".join(cells) + " |")
        runtimes = results.get("runtimes") or {}
        lines += ["", "`python -c 'import keras, BACKEND'` alone: " + ", ".join(
            f"{b} {t:.2f} s / {m / 2**20:.0f} MiB" for b, (t, m) in runtimes.items())]
    based = [r for r in results["cases"] if "modelxform, baseline" in r["median_s"]]
    if based:
        lines += ["", "| case | modelxform | baseline checkout | ratio | peak RSS | baseline peak RSS |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in based:
            med, rss = r["median_s"], r["peak_rss_bytes"]
            lines.append(f"| {r['name']} | {med['modelxform']:.2f} s | {med['modelxform, baseline']:.2f} s | "
                         f"{med['modelxform'] / med['modelxform, baseline']:.2f}× | "
                         f"{rss['modelxform'] / 2**20:.0f} MiB | {rss['modelxform, baseline'] / 2**20:.0f} MiB |")
    extra = [r for r in results["cases"] if "same_model_as_keras_path" in r]
    if extra:
        lines.append("")
        for r in extra:
            taken = f"fast path taken: {r['fast_path_taken']}; " if "fast_path_taken" in r else ""
            lines.append(f"- {r['name']}: {taken}same config and arrays as the Keras path's output: "
                         f"{r['same_model_as_keras_path']}; byte-identical: {r['identical_to_keras_path']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each side per case (default 5)")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--backend", default="tensorflow", choices=("tensorflow", "jax", "torch"),
                        help="the Keras backend modelxform runs on (the scripts run on TensorFlow)")
    parser.add_argument("--python", metavar="PYTHON",
                        help="the interpreter modelxform runs with (a virtual environment with that backend)")
    parser.add_argument("--also", action="append", default=[], metavar="BACKEND[=PYTHON]",
                        help="also run modelxform on this backend (with this interpreter), in the same run")
    parser.add_argument("--no-keras-path", action="store_true",
                        help="skip the runs with the fast path off (MODELXFORM_FASTPATH=0)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run modelxform from the checkout DIR (e.g. `git worktree add DIR REV`), "
                             "alternating with this one: its figures appear as 'modelxform, baseline'")
    args = parser.parse_args(argv)
    global MXPY, BACKEND, ALSO, KERAS_PATH
    MXPY, BACKEND = args.python or PY, args.backend
    ALSO = [(a.split("=", 1)[0], a.split("=", 1)[1] if "=" in a else PY) for a in args.also]
    KERAS_PATH = not args.no_keras_path
    log = lambda text: print(text, flush=True)  # noqa: E731
    build_times = setup(log)
    if args.setup_only:
        return 0
    chosen = [c for c in cases() if not args.only or c["name"] in args.only.split(",")]
    results = {"machine": machine(), "runs": args.runs, "setup_seconds": build_times, "cases": [],
               "backend": BACKEND}
    # what any Keras process holds before it reads a model: the floor under every structural figure
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=BACKEND)
    floor = [MXPY, "-c", f"import keras, {BACKEND}"]
    samples = [measure(floor, env) for _ in range(3)]
    results["runtime_rss_bytes"] = max(rss for _, rss in samples)
    results["runtime_s"] = statistics.median(wall for wall, _ in samples)
    log(f"runtime: python -c 'import keras, {BACKEND}' takes {results['runtime_s']:.2f} s and peaks at "
        f"{results['runtime_rss_bytes'] / 2**20:.0f} MiB")
    results["runtimes"] = {BACKEND: (results["runtime_s"], results["runtime_rss_bytes"])}
    for backend, python in ALSO:
        samples = [measure([python, "-c", f"import keras, {backend}"], dict(env, KERAS_BACKEND=backend))
                   for _ in range(3)]
        results["runtimes"][backend] = (statistics.median(w for w, _ in samples), max(r for _, r in samples))
        log(f"runtime: python -c 'import keras, {backend}' takes {results['runtimes'][backend][0]:.2f} s and "
            f"peaks at {results['runtimes'][backend][1] / 2**20:.0f} MiB")
    for case in chosen:
        log(f"{case['name']}: {case['what']}")
        results["cases"].append(run_case(case, args.runs, log, args.baseline))
    out = WORK / ("results.json" if BACKEND == "tensorflow" and not ALSO else
                  f"results-{'-'.join([BACKEND] + [b for b, _ in ALSO])}.json")
    previous = json.loads(out.read_text()) if out.exists() and args.only else None
    if previous:  # --only: keep the other cases' last results
        names = {c["name"] for c in results["cases"]}
        results["cases"] = [c for c in previous["cases"] if c["name"] not in names] + results["cases"]
        order = [c["name"] for c in cases()]
        results["cases"].sort(key=lambda c: order.index(c["name"]) if c["name"] in order else len(order))
        results["runtime_rss_bytes"] = results["runtime_rss_bytes"] or previous.get("runtime_rss_bytes")
    out.write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
