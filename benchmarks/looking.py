"""Looking at large models: inspect, diff, plan --html, verify and export at 2 GiB (and other sizes), against the
Keras code a user would write by hand, as whole processes (issue 19).

    .venv/bin/python benchmarks/looking.py                  # 2 GiB, 3 runs per side
    .venv/bin/python benchmarks/looking.py --sizes 0.5,2 --runs 2

The fixtures are large.py's functional MLPs (built once, without holding their weights in memory). For
each size, an edited copy is made first (``modelxform apply recipes/scale-dense.recipe``), then these are
timed, alternating run by run, with the peak resident memory of each process tree (large.measure):

- inspect: ``modelxform inspect MODEL`` against scripts/inspect_model.py (load, ``model.summary()``);
- diff: ``modelxform diff MODEL EDITED`` against scripts/diff_models.py (load both, compare every
  variable: largest absolute difference and relative L2 change, what ``diff`` reports per weight);
- plan --html: ``modelxform plan recipes/insert-dropout.recipe MODEL --html …`` (no script: a user does
  not write a graph drawing by hand);
- verify: ``modelxform verify EDITED --input MODEL`` (no script: re-making the file is the script of
  large.py, timed there);
- export: ``modelxform export MODEL DIR`` against scripts/export_model.py (load, ``model.export`` as a
  TensorFlow SavedModel); the folder is removed after each run.

Results: benchmarks/looking-results.json and a Markdown table on stdout (benchmarks/README.md quotes it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import large  # noqa: E402 - the fixtures and the measurement of large.py

RESULTS = HERE / "looking-results.json"
PY = sys.executable


def commands(model: pathlib.Path, edited: pathlib.Path) -> dict:
    """case -> side -> argv."""
    mx = [PY, "-m", "modelxform"]
    scripts = HERE / "scripts"
    return {
        "inspect": {"modelxform": mx + ["inspect", str(model)],
                    "script": [PY, str(scripts / "inspect_model.py"), str(model)]},
        "diff": {"modelxform": mx + ["diff", str(model), str(edited)],
                 "script": [PY, str(scripts / "diff_models.py"), str(model), str(edited)]},
        "plan --html": {"modelxform": mx + ["plan", str(HERE / "recipes" / "insert-dropout.recipe"), str(model),
                                            "--html", str(large.WORK / "plan.html")]},
        "verify": {"modelxform": mx + ["verify", str(edited), "--input", str(model)]},
        "export": {"modelxform": mx + ["export", str(model), str(large.EXPORTED)],
                   "script": [PY, str(scripts / "export_model.py"), str(model), str(large.EXPORTED)]},
    }


def run(sizes, runs: int, limit: int, log) -> dict:
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
               "nproc": os.cpu_count(), "memory_limit_bytes": limit, "runs": runs, "sizes": []}
    for gib in sizes:
        model = large.fixture(gib)
        edited = large.WORK / "edited.keras"
        subprocess.run([PY, "-m", "modelxform", "apply", str(HERE / "recipes" / "scale-dense.recipe"), str(model),
                        "-o", str(edited)], check=True, cwd=large.ROOT, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        entry = {"gib": gib, "file_bytes": model.stat().st_size, "load_average_before": os.getloadavg()[0],
                 "cases": {}}
        cases = {case: {side: (argv, {}) for side, argv in sides.items()}
                 for case, sides in commands(model, edited).items()}
        try:  # (diff and verify exit 1 when the files differ, which they do: that is no failure)
            entry["cases"] = large.timed(cases, runs, limit, lambda m: log(f"{gib:g} GiB {m}"), ok_codes=(0, 1))
        finally:
            edited.unlink(missing_ok=True)
            (large.WORK / "plan.html").unlink(missing_ok=True)
        entry["load_average_after"] = os.getloadavg()[0]
        results["sizes"].append(entry)
    return results


def markdown(results: dict) -> str:
    lines = ["| model | command | modelxform | peak RSS | script | peak RSS | ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for entry in results["sizes"]:
        for case, sides in entry["cases"].items():
            mx, script = sides["modelxform"], sides.get("script")
            if script is None:
                s = peak = ratio = "–"
            elif script["killed"]:
                s, peak, ratio = f"killed at {script['peak_rss_bytes'] / 2**30:.1f} GiB", "–", "–"
            else:
                s, peak = f"{script['median_s']:.2f} s", f"{script['peak_rss_bytes'] / 2**20:.0f} MiB"
                ratio = f"{mx['median_s'] / script['median_s']:.2f}×"
            lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | {case} | {mx['median_s']:.2f} s | "
                         f"{mx['peak_rss_bytes'] / 2**20:.0f} MiB | {s} | {peak} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2", help="GiB, comma-separated (default: 2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-limit", type=float, default=20.0, help="GiB a process tree may reach")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    results = run(sizes, args.runs, int(args.memory_limit * 2**30), lambda m: print(m, file=sys.stderr, flush=True))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
