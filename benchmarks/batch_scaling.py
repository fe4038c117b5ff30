"""How `modelxform batch` scales with workers: whole-process timings of a 12-model zoo, -j 1 against -j 2.

    .venv/bin/python benchmarks/batch_scaling.py              # build the zoo (once), 3 runs of each
    .venv/bin/python benchmarks/batch_scaling.py --runs 5 --workers 1 2
    .venv/bin/python benchmarks/batch_scaling.py --zoo classic   # the larger zoo

Every run is a fresh `python -m modelxform batch ZOO.yaml -j N --force` process: interpreter start, the
main process's checks, the workers' TensorFlow import, 12 jobs, the summary. The -j settings alternate
run by run, so a slow spell of the machine hits all of them. Reported: median wall time per setting,
throughput (jobs per minute), the throughput ratio against -j 1 (issue 5's target on a 2-core
machine: at least 1.7x with 2 workers), the CPU seconds of the whole process tree, and when the first
job started, counted from the process's start (what every job waits for: the one TensorFlow import,
which more workers do not shorten).
Two more ratios say where the throughput ratio is bounded: the ceiling (Amdahl's law on the -j 1 runs:
the ratio if each of N workers ran its jobs as fast as the lone worker, with the rest of the run — start,
import, end — unchanged; with two workers or more the main process opens the first jobs' archives during
the import, job work a -j 1 run does in its jobs, so -j 2 can pass this ceiling) and the ratio from the
first job's start on (how the workers themselves scale).
The machine's load average is recorded before each run: other work on the machine takes cores from
the workers, and the ratio means little when it is high.

The zoos (benchmarks/.work/, never committed) are built here, nothing is downloaded; every model has
weights=None and 10 classes:
- ``mobilenet`` (the default; benchmarks/.work/batch-scaling/): twelve MobileNetV2, alpha 0.35, 0.5,
  0.75 and 1.0 at 32, 64 and 96 pixels: 0.4M to 2.3M parameters, 2 to 9 MB each, about 150 layers.
  Jobs of 0.6-1 s, so the import before the first job is a fifth of a -j 1 run.
- ``classic`` (benchmarks/.work/batch-scaling-classic/): twelve keras.applications architectures of
  the kind a model zoo holds, at 64 to 128 pixels: ResNet50, DenseNet121, EfficientNetB0, Xception,
  InceptionV3 and MobileNetV2: 3.5M to 23.6M parameters, 14 to 95 MB, 150 to 430 layers.
The recipe is structural (it appends a layer), so every job takes the TensorFlow path: load, seeded
noise on every Conv2D kernel, rebuild, validate, save with provenance.
Results: benchmarks/batch-scaling-<zoo>.json and a Markdown table on stdout (docs/batch.md quotes
it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

RECIPE = """\
recipe "bench-conv-head" version "1.0.0"
select where type=Conv2D
add noise normal(stddev=0.01) to kernel
append Dense(units=3, activation="softmax", name="bench_head")
"""
ZOO = """\
models: ["zoo/*.keras"]
recipes: [bench.recipe]
output: "out/{model}.keras"
seed: 0
"""
# name: (folder, description, the models: file stem -> (keras.applications function, its arguments))
def _app(name: str, size: int, **kwargs) -> tuple:
    return name, {"input_shape": (size, size, 3), "weights": None, "classes": 10, **kwargs}


ZOOS = {
    "mobilenet": ("batch-scaling", "12 MobileNetV2 (alpha 0.35-1.0, 32-96 px), structural recipe",
                  {f"mobilenet-{a}-{s}": _app("MobileNetV2", s, alpha=a)
                   for a in (0.35, 0.5, 0.75, 1.0) for s in (32, 64, 96)}),
    "classic": ("batch-scaling-classic",
                "12 keras.applications models (ResNet50, DenseNet121, EfficientNetB0, Xception, InceptionV3, "
                "MobileNetV2; 64-160 px), structural recipe",
                {f"{name.lower()}-{s}": _app(name, s)
                 for name, sizes in (("ResNet50", (64, 96)), ("DenseNet121", (64, 96, 128)),
                                     ("EfficientNetB0", (64, 96)), ("Xception", (96, 128)),
                                     ("InceptionV3", (96,)), ("MobileNetV2", (128, 160)))
                 for s in sizes}),
}
WORK = HERE / ".work" / ZOOS["mobilenet"][0]  # (set by main from --zoo)


def build(models: dict) -> None:
    zoo = WORK / "zoo"
    if zoo.is_dir() and sorted(p.stem for p in zoo.glob("*.keras")) == sorted(models):
        return
    zoo.mkdir(parents=True, exist_ok=True)
    code = f"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from modelxform.keras_io.files import import_keras, save_model
keras = import_keras()
zoo = {str(zoo)!r}
for i, (stem, (name, kwargs)) in enumerate({sorted(models.items())!r}):
    path = os.path.join(zoo, stem + ".keras")
    if os.path.exists(path):
        continue
    keras.utils.set_random_seed(i)
    model = getattr(keras.applications, name)(**kwargs)
    save_model(model, path)
"""
    subprocess.run([PY, "-c", code], check=True, cwd=ROOT)
    (WORK / "bench.recipe").write_text(RECIPE)
    (WORK / "zoo.yaml").write_text(ZOO)


def one_run(workers: int) -> dict:
    load = os.getloadavg()[0]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    report = WORK / f"report-j{workers}.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([PY, "-m", "modelxform", "batch", str(WORK / "zoo.yaml"), "-j", str(workers), "--force",
                           "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the batch process and its workers (it reaps them)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"batch -j {workers} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(report.read_text())
    jobs = [j for j in data["jobs"] if j["status"] == "done"]
    if len(jobs) != 12:
        sys.exit(f"batch -j {workers}: expected 12 jobs done, got {len(jobs)}")
    # (a job's "started" counts from when the zoo had been read, as the report's "duration" does; the time
    # before that — interpreter start, reading the zoo, while the workers' server already imports — is
    # the wall time less that duration, give or take the few milliseconds after it: the summary, the exit)
    before_run = wall - data["duration"]
    return {"workers": workers, "wall": wall, "cpu": cpu, "load_before": load,
            "job_seconds": sum(j["duration"] for j in jobs),
            "first_job": before_run + min(j["started"] for j in jobs)}


# The machine's own scaling, as a yardstick: a pure-Python loop (no memory traffic, no I/O) timed alone
# and as two processes at once. Where two processes each run slower than one alone (shared caches, or
# vCPUs that are threads of one host core), no program gets twice the throughput from two workers.
LOOP = "x = 0\nfor i in range(20_000_000):\n    x += i * i\n"


def cpu_pair_ratio() -> float:
    """Two processes' throughput against one's, on a pure-Python loop (one timing of each)."""
    def timed(count: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen([PY, "-c", LOOP]) for _ in range(count)]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - start
    return 2 * timed(1) / timed(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="mobilenet")
    args = parser.parse_args(argv)
    global WORK
    folder, description, models = ZOOS[args.zoo]
    WORK = HERE / ".work" / folder
    build(models)
    runs, pairs = [], []
    for n in range(args.runs):
        for workers in args.workers:
            run = one_run(workers)
            runs.append(run)
            print(f"run {n + 1}: -j {workers}: {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU "
                  f"(load average before: {run['load_before']:.2f})", file=sys.stderr)
        pairs.append(cpu_pair_ratio())  # (in every round: the machine's speed drifts)
        print(f"run {n + 1}: two pure-Python processes against one: {pairs[-1]:.2f}x", file=sys.stderr)
    base = statistics.median(r["wall"] for r in runs if r["workers"] == args.workers[0])
    rows = []
    for workers in args.workers:
        walls = [r["wall"] for r in runs if r["workers"] == workers]
        median = statistics.median(walls)
        rows.append({"workers": workers, "median_wall": median, "walls": walls,
                     "jobs_per_minute": 12 * 60 / median, "throughput_ratio": base / median,
                     "cpu_seconds": statistics.median(r["cpu"] for r in runs if r["workers"] == workers),
                     "job_seconds": statistics.median(r["job_seconds"] for r in runs if r["workers"] == workers),
                     "first_job": statistics.median(r["first_job"] for r in runs if r["workers"] == workers),
                     "load_before": [r["load_before"] for r in runs if r["workers"] == workers]})
    # Where the ratio is bounded, from the -j 1 runs themselves: what is not job time there (interpreter
    # start, the one TensorFlow import, the end) runs once whatever the number of workers. The ceiling is
    # the ratio N workers would reach if each ran its jobs as fast as the lone worker does (Amdahl's law);
    # "after the first job" compares the runs from the first job's start on, where the workers scale.
    ones = [r for r in runs if r["workers"] == args.workers[0]]
    for row in rows:
        n = row["workers"] / args.workers[0]
        row["ceiling"] = statistics.median(r["wall"] / (r["wall"] - r["job_seconds"] + r["job_seconds"] / n)
                                           for r in ones)
        row["ratio_after_first_job"] = (statistics.median(r["wall"] - r["first_job"] for r in ones)
                                        / statistics.median(r["wall"] - r["first_job"] for r in runs
                                                            if r["workers"] == row["workers"]))
    pair = statistics.median(pairs)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "pure_python_two_process_ratio": pair,
                           "pure_python_two_process_ratios": pairs},
               "zoo": description,
               "runs": args.runs, "results": rows}
    (HERE / f"batch-scaling-{args.zoo}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| workers | median wall (s) | runs (s) | jobs/min | throughput vs -j 1 | ceiling | after the first job "
          "| CPU (s, median) | first job started (s, median) | job time, summed (s, median) | load avg before runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| -j {r['workers']} | {r['median_wall']:.1f} | {', '.join(f'{w:.1f}' for w in r['walls'])} | "
              f"{r['jobs_per_minute']:.1f} | {r['throughput_ratio']:.2f}x | {r['ceiling']:.2f}x | "
              f"{r['ratio_after_first_job']:.2f}x | {r['cpu_seconds']:.1f} | "
              f"{r['first_job']:.1f} | {r['job_seconds']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in r['load_before'])} |")
    print(f"\nTwo processes of a pure-Python loop against one, on this machine: {pair:.2f}x the throughput "
          f"(median; rounds: {', '.join(f'{x:.2f}' for x in pairs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
