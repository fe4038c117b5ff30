"""Models of 0.5, 2 and 6 GiB: modelxform against the Keras script and a `cp` of the file (issue 19).

    .venv/bin/python benchmarks/large.py                        # fixtures once, then 3 runs per side
    .venv/bin/python benchmarks/large.py --sizes 0.5,2 --runs 2   # (6 GiB keeps its earlier figures)
    .venv/bin/python benchmarks/large.py --plot-only            # the table and plot from large-results.json
    .venv/bin/python benchmarks/large.py --sizes 12 --runs 1    # a model whose copy does not fit in the page
                                                                # cache beside it (24 GiB of disk)

The fixtures are functional MLPs written by benchmarks/large_fixture.py without holding their weights in
memory. Per size, three commands are timed as whole processes, alternating run by run:

- weight-only: ``modelxform apply recipes/scale-dense.recipe`` against scripts/scale_dense.py, modelxform
  once as on a file it reads for the first time (it hashes the input for the record) and once with the
  input's digest kept from the run before (keras_io/digests.py);
- structural: ``modelxform apply recipes/insert-dropout.recipe`` against scripts/insert_dropout.py;
- ``cp`` of the file, the floor of any command that writes a copy of it, and ``cp`` followed by a
  ``sync`` of the copy: modelxform syncs its output before it renames it into place (an output is
  written atomically, and a crash does not leave a truncated one), which neither ``cp`` nor the
  scripts do; and the file's sha256 taken by a Python process (hashlib, as modelxform takes it for
  the record): the floor of a first run on a file, however well the edit overlaps the hashing.

Dirty pages are written back (``sync``) before every run and every output is removed after it, so no
run pays for the writeback of another's output. Peak memory is the process's own peak resident set
(the kernel's high-water mark, read every 20 ms), or its tree's, sampled every 0.1 s, where that is
larger; a process whose tree grows past ``--memory-limit`` (default 20 GiB of this machine's 23.5) is
killed and reported so, rather than taking the machine down. Results go to benchmarks/large-results.json;
the table is printed, and the plot is written to benchmarks/large.png (matplotlib).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work" / "large"
EXPORTED = WORK / "exported"  # a SavedModel folder (looking.py's export case), removed after each run
RESULTS = HERE / "large-results.json"
PLOT = HERE / "large.png"
PY = sys.executable
SIZES = (0.5, 2.0, 6.0)


def fixture(gib: float) -> pathlib.Path:
    path = WORK / f"mlp-{gib:g}g.keras"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        if not (WORK.parent / ".gitignore").exists():  # benchmarks/.work is never committed
            (WORK.parent / ".gitignore").write_text("*\n")
        subprocess.run([PY, str(HERE / "large_fixture.py"), str(path), "--gib", str(gib)], check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stdout=subprocess.DEVNULL)
    return path


def commands(model: pathlib.Path) -> dict:
    """case -> side -> (argv, environment added). modelxform's sides run with the digest cache off
    (MODELXFORM_DIGEST_CACHE=0: every run hashes its input, as the first run on a file does), but for
    "hashed before": the same weight-only command with a cache (of its own, in WORK) that holds the
    input's digest from the run before, as when a model is edited again."""
    out = WORK / "out.keras"
    mx = [PY, "-m", "modelxform", "apply"]
    first = {"MODELXFORM_DIGEST_CACHE": "0"}
    again = {"MODELXFORM_CACHE_DIR": str(WORK / "digest-cache")}
    scale = mx + [str(HERE / "recipes" / "scale-dense.recipe"), str(model), "-o", str(out)]
    return {
        "weight-only": {
            "modelxform": (scale, first),
            "modelxform, hashed before": (scale, again),
            "script": ([PY, str(HERE / "scripts" / "scale_dense.py"), str(model), str(out)], {})},
        "structural": {
            "modelxform": (mx + [str(HERE / "recipes" / "insert-dropout.recipe"), str(model), "-o", str(out)], first),
            "script": ([PY, str(HERE / "scripts" / "insert_dropout.py"), str(model), str(out)], {})},
        "copy": {"cp": (["cp", str(model), str(out)], {}),
                 # a durable copy, as modelxform writes its output: synced to the disk before it counts
                 "cp + sync": (["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(model), str(out)], {}),
                 # the input's sha256 alone, as modelxform takes it for the record (hashlib, one thread):
                 # the floor of a first run on a file, which no overlap with the edit can go under
                 "sha256": ([PY, "-c", SHA256, str(model)], {})},
    }


# The input's sha256 as modelxform's digest takes it (keras_io/digests.py): hashlib over maps of the
# file, 16 MiB at a time, nothing copied (until 29 Nov, 17:55 UTC, hashlib.file_digest, which reads the
# file into a buffer: 0.1-0.15 s slower at 2 GiB, a floor below which modelxform's first run had gone).
SHA256 = """\
import hashlib, mmap, os, sys
fd, digest, at = os.open(sys.argv[1], os.O_RDONLY), hashlib.sha256(), 0
size = os.fstat(fd).st_size
while at < size:
    window = mmap.mmap(fd, min(16 << 20, size - at), prot=mmap.PROT_READ, offset=at)
    digest.update(window)
    at += len(window)
    window.close()
"""


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total


# How the memory is watched. The process's own peak (VmHWM, the kernel's high-water mark of its resident
# set, exact up to the moment it is read) is read every 20 ms: one small file, 0.03 ms. The whole tree
# (for the limit, and for commands of more than one process) every 0.1 s: that reads /proc/*/stat, about
# 1 ms of CPU here, which every 20 ms (until 29 Nov) was 5 % of a core taken from the process measured,
# and on two cores counts against a command that keeps both busy (modelxform's first run) more than
# against `cp`.
WATCH_S, TREE_EVERY = 0.02, 5


def _high_water(pid: int) -> int:
    """The peak resident bytes of process ``pid`` so far (VmHWM), or 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measure(argv, limit: int, extra_env: dict | None = None, ok_codes=(0,)) -> dict:
    """One whole process: wall seconds, peak resident bytes (the process's own high-water mark, or its
    tree's as sampled where that is larger), and whether it was killed (an exit status outside
    ``ok_codes`` stops the benchmark)."""
    os.sync()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), **(extra_env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    peak, killed = 0, False
    stop = threading.Event()

    def watch():
        nonlocal peak, killed
        looks = 0
        while not stop.wait(WATCH_S):
            peak = max(peak, _high_water(proc.pid))
            looks += 1
            if looks % TREE_EVERY:
                continue
            rss = _tree_rss(proc.pid)
            peak = max(peak, rss)
            if rss > limit and not killed:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    (WORK / "out.keras").unlink(missing_ok=True)
    shutil.rmtree(EXPORTED, ignore_errors=True)
    if proc.returncode not in ok_codes and not killed:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{err.decode()[-2000:]}")
    return {"seconds": wall, "peak_rss_bytes": peak, "killed": killed}


# The runtime's own memory: TensorFlow and Keras imported and a model built, the floor under any
# structural command (the memory goal counts what a command holds beyond it).
# The runtime as modelxform's own processes import it (without what keras_io.backend.UNUSED_EXTRAS leaves out)
RUNTIME = [PY, "-c", "from modelxform.keras_io import backend, files; backend.own_process(); keras = files.import_keras(); "
           "import modelxform.session; keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])"]


def timed(cases: dict, runs: int, limit: int, log, ok_codes=(0,)) -> dict:
    """Every side of every case (case -> side -> (argv, environment added)) timed ``runs`` times,
    alternating run by run: case -> side -> median seconds, peak memory, whether it was killed, samples.
    A side killed once for its memory is not run again (it would be again)."""
    samples = {(case, side): [] for case, sides in cases.items() for side in sides}
    for n in range(runs):
        for case, sides in cases.items():
            for side, (argv, extra_env) in sides.items():
                if any(s["killed"] for s in samples[(case, side)]):
                    continue
                sample = measure(argv, limit, extra_env, ok_codes)
                samples[(case, side)].append(sample)
                log(f"{case} {side} run {n + 1}/{runs}: {sample['seconds']:.2f} s, "
                    f"{sample['peak_rss_bytes'] / 2**20:.0f} MiB" + (" (killed)" if sample["killed"] else ""))
    out: dict = {}
    for (case, side), got in samples.items():
        done = [s for s in got if not s["killed"]]
        out.setdefault(case, {})[side] = {
            "median_s": statistics.median(s["seconds"] for s in done) if done else None,
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in got),
            "killed": any(s["killed"] for s in got), "samples": got}
    return out


def run(sizes, runs: int, limit: int, log) -> dict:
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
               "nproc": os.cpu_count(), "memory_limit_bytes": limit, "runs": runs, "sizes": []}
    results["runtime_peak_rss_bytes"] = max(measure(RUNTIME, limit)["peak_rss_bytes"] for _ in range(runs))
    log(f"runtime alone: {results['runtime_peak_rss_bytes'] / 2**20:.0f} MiB")
    for gib in sizes:
        model = fixture(gib)
        entry = {"gib": gib, "file_bytes": model.stat().st_size, "load_average_before": os.getloadavg()[0],
                 "date": results["date"], "cases": {}}
        cases = commands(model)
        for sides in cases.values():  # a run before, not counted, leaves the input's digest in the cache
            for side, (argv, extra_env) in sides.items():
                if side.endswith("hashed before"):
                    measure(argv, limit, extra_env)
        entry["cases"] = timed(cases, runs, limit, lambda m: log(f"{gib:g} GiB {m}"))
        entry["load_average_after"] = os.getloadavg()[0]
        results["sizes"].append(entry)
    return results


def markdown(results: dict) -> str:
    runtime = results.get("runtime_peak_rss_bytes")
    lines = ["| model | case | modelxform | script | ratio | vs `cp` | vs `cp` + sync | peak RSS modelxform "
             "| peak RSS script | modelxform beyond the runtime / weights |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in results["sizes"]:
        when = entry.get("date", results["date"])
        if when != results["date"]:  # a size kept from an earlier run (main)
            lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | *measured {when}* | | | | | | | | |")
        copies = entry["cases"]["copy"]
        cp = copies["cp"]["median_s"]
        durable = copies.get("cp + sync", {}).get("median_s")
        rows = [("weight-only", "modelxform", "weight-only"), ("weight-only", "modelxform, hashed before",
                                                             "weight-only, input hashed before"),
                ("structural", "modelxform", "structural")]
        for case, side, label in rows:
            if side not in entry["cases"][case]:
                continue
            mx, script = entry["cases"][case][side], entry["cases"][case]["script"]
            s = "killed at {:.1f} GiB".format(script["peak_rss_bytes"] / 2**30) if script["killed"] else \
                f"{script['median_s']:.2f} s"
            ratio = f"{mx['median_s'] / script['median_s']:.2f}×" if not script["killed"] else "–"
            lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | {label} | {mx['median_s']:.2f} s | {s} | "
                         f"{ratio} | {mx['median_s'] / cp:.1f}× | " +
                         (f"{mx['median_s'] / durable:.1f}× | " if durable else "| ") +
                         f"{mx['peak_rss_bytes'] / 2**20:.0f} MiB | {script['peak_rss_bytes'] / 2**20:.0f} MiB | " +
                         (f"{(mx['peak_rss_bytes'] - runtime) / entry['file_bytes']:.2f}× |"
                          if runtime and case == "structural" else "|"))
        lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | `cp` | {cp:.2f} s | | | | | | | |")
        if durable:
            lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | `cp` + `sync` of the copy | {durable:.2f} s "
                         "| | | | | | | |")
        sha = copies.get("sha256", {}).get("median_s")
        if sha:
            lines.append(f"| {entry['file_bytes'] / 2**30:.2f} GiB | sha256 of the file (a Python process) | "
                         f"{sha:.2f} s | | | {sha / cp:.1f}× | | | | |")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [e["file_bytes"] / 2**30 for e in results["sizes"]]
    lines = [("weight-only", "modelxform", "modelxform, weight-only", "tab:blue", "-"),
             ("weight-only", "script", "script, weight-only", "tab:blue", "--"),
             ("structural", "modelxform", "modelxform, structural", "tab:orange", "-"),
             ("structural", "script", "script, structural", "tab:orange", "--"),
             ("weight-only", "modelxform, hashed before", "modelxform, weight-only, input hashed before",
              "tab:green", "-"),
             ("copy", "cp", "cp", "tab:gray", ":"),
             ("copy", "cp + sync", "cp + sync", "black", ":"),
             ("copy", "sha256", "sha256 of the file", "tab:red", ":")]
    for case, side, label, color, style in lines:
        measured = [(x, e["cases"][case][side]) for x, e in zip(sizes, results["sizes"]) if side in e["cases"][case]]
        if not measured:  # (a side added since the sizes kept from earlier runs were measured: their points only)
            continue
        at, got = zip(*measured)
        xs = [x for x, g in measured if not g["killed"]]
        left.plot(xs, [g["median_s"] for g in got if not g["killed"]], style, color=color, marker="o", label=label)
        right.plot(at, [g["peak_rss_bytes"] / 2**30 for g in got], style, color=color, marker="o", label=label)
        for x, g in measured:
            if g["killed"]:
                right.annotate("killed", (x, g["peak_rss_bytes"] / 2**30), textcoords="offset points",
                               xytext=(4, 4), fontsize=8, color=color)
    left.set(xlabel="model file (GiB)", ylabel="wall time (s)", title="time")
    right.set(xlabel="model file (GiB)", ylabel="peak resident memory (GiB)", title="memory")
    right.plot(sizes, sizes, color="black", linewidth=0.6, label="the weights")
    if results.get("runtime_peak_rss_bytes"):
        right.axhline(results["runtime_peak_rss_bytes"] / 2**30, color="black", linewidth=0.6, linestyle=":",
                      label="TensorFlow and Keras alone")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    earlier = [f"{e['gib']:g} GiB: {e['date']}" for e in results["sizes"] if e.get("date", results["date"]) != results["date"]]
    fig.suptitle(f"modelxform on large models ({results['nproc']} CPUs; {results['date']})"
                 + (f"\nsizes measured earlier: {', '.join(earlier)}" if earlier else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{s:g}" for s in SIZES), help="GiB of weights, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-limit", type=float, default=20.0, help="GiB; a process past it is killed")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(RESULTS.read_text())
    else:
        subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "modelxform")], check=True, stdout=subprocess.DEVNULL)
        sizes = [float(s) for s in args.sizes.split(",")]
        results = run(sizes, args.runs, int(args.memory_limit * 2**30), lambda t: print(t, flush=True))
        if RESULTS.exists():  # sizes not run this time keep their earlier figures, with their date
            earlier = json.loads(RESULTS.read_text())
            kept = [dict(e, date=e.get("date", earlier["date"])) for e in earlier["sizes"] if e["gib"] not in sizes]
            results["sizes"] = sorted(results["sizes"] + kept, key=lambda e: e["gib"])
        RESULTS.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    plot(results, PLOT)
    print(f"plot: {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
