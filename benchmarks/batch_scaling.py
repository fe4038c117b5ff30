"""How `modelxform batch` scales with workers: whole-process timings of a 12-model zoo, -j 1 against -j 2.

    .venv/bin/python benchmarks/batch_scaling.py              # build the zoo (once), 3 runs of each
    .venv/bin/python benchmarks/batch_scaling.py --runs 5 --workers 1 2

Every run is a fresh `python -m modelxform batch ZOO.yaml -j N --force` process: interpreter start, the
main process's checks, the workers' TensorFlow import, 12 jobs, the summary. The -j settings alternate
run by run, so a slow spell of the machine hits all of them. Reported: median wall time per setting,
throughput (jobs per minute), the throughput ratio against -j 1 (issue 5's target on a 2-core
machine: at least 1.7x with 2 workers) and the CPU seconds of the whole process tree. The machine's load
average is recorded before each run: other work on the machine takes cores from the workers, and the
ratio means little when it is high.

The zoo (benchmarks/.work/batch-scaling/, never committed) is built here, nothing is downloaded: twelve
MobileNetV2 (weights=None, 10 classes), alpha 0.35, 0.5, 0.75 and 1.0 at 32, 64 and 96 pixels: 0.4M to
2.3M parameters, 2 to 9 MB each, about 150 layers. The recipe is structural (it appends a layer), so
every job takes the TensorFlow path: load, seeded noise on every Conv2D kernel, rebuild, validate, save
with provenance.
Results: benchmarks/.work/batch-scaling/results.json and a Markdown table on stdout (docs/batch.md
quotes it).
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
WORK = HERE / ".work" / "batch-scaling"
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


def build() -> None:
    zoo = WORK / "zoo"
    if zoo.is_dir() and len(list(zoo.glob("*.keras"))) == 12:
        return
    zoo.mkdir(parents=True, exist_ok=True)
    code = f"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from modelxform.keras_io.files import import_keras, save_model
keras = import_keras()
zoo = {str(zoo)!r}
for i, (alpha, size) in enumerate((a, s) for a in (0.35, 0.5, 0.75, 1.0) for s in (32, 64, 96)):
    keras.utils.set_random_seed(i)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, weights=None, classes=10)
    save_model(model, os.path.join(zoo, f"mobilenet-{{alpha}}-{{size}}.keras"))
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
    return {"workers": workers, "wall": wall, "cpu": cpu, "load_before": load,
            "job_seconds": sum(j["duration"] for j in jobs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    build()
    runs = []
    for n in range(args.runs):
        for workers in args.workers:
            run = one_run(workers)
            runs.append(run)
            print(f"run {n + 1}: -j {workers}: {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU "
                  f"(load average before: {run['load_before']:.2f})", file=sys.stderr)
    base = statistics.median(r["wall"] for r in runs if r["workers"] == args.workers[0])
    rows = []
    for workers in args.workers:
        walls = [r["wall"] for r in runs if r["workers"] == workers]
        median = statistics.median(walls)
        rows.append({"workers": workers, "median_wall": median, "walls": walls,
                     "jobs_per_minute": 12 * 60 / median, "throughput_ratio": base / median,
                     "cpu_seconds": statistics.median(r["cpu"] for r in runs if r["workers"] == workers),
                     "job_seconds": statistics.median(r["job_seconds"] for r in runs if r["workers"] == workers),
                     "load_before": [r["load_before"] for r in runs if r["workers"] == workers]})
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "zoo": "12 MobileNetV2 (alpha 0.35-1.0, 32-96 px), structural recipe",
               "runs": args.runs, "results": rows}
    (WORK / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| workers | median wall (s) | runs (s) | jobs/min | throughput vs -j 1 | CPU (s, median) "
          "| load avg before runs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| -j {r['workers']} | {r['median_wall']:.1f} | {', '.join(f'{w:.1f}' for w in r['walls'])} | "
              f"{r['jobs_per_minute']:.1f} | {r['throughput_ratio']:.2f}x | {r['cpu_seconds']:.1f} | "
              f"{', '.join(f'{x:.1f}' for x in r['load_before'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
