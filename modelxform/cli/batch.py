"""modelxform batch ZOO.yaml — apply recipes to every model of a zoo, on all cores or on a Ray cluster."""
from __future__ import annotations

import collections
import json
import os
import time

from . import add_include_option, add_model_options, include_root
from ..errors import ExitCode, UsageError

STATUS_ORDER = ("done", "skipped", "failed", "interrupted", "not run")
STDOUT = "-"
MAX_FAILED_ROWS = 50


def add_parser(subparsers):
    p = subparsers.add_parser(
        "batch", help="apply recipes to a whole zoo of models, as described by a ZOO.yaml",
        description="Run every model × recipe × params job of ZOO.yaml on a pool of worker processes (or on "
                    "Ray). Jobs whose output is already up to date are skipped; a job that fails is reported "
                    "and the others carry on. Exit status: 0 all succeeded, 1 some failed, 2 bad ZOO.yaml, "
                    "130 interrupted (run again to finish what is left).")
    p.add_argument("zoo", metavar="ZOO.yaml", help="the batch file: models, recipes, output, seed, params")
    p.add_argument("-j", "--jobs", dest="workers", type=int, default=None, metavar="N",
                   help="worker processes (default: the number of cores); with --executor ray and no "
                        "--ray-address, the CPUs of the local Ray")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes (default) or Ray tasks (pip install 'modelxform[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (auto, HOST:6379 or ray://HOST:10001) instead of starting one")
    p.add_argument("--dry-run", action="store_true",
                   help="print which recipes resolve on which models (the applicability matrix); write nothing")
    p.add_argument("--force", action="store_true", help="redo jobs whose output is already up to date")
    p.add_argument("--report", metavar="REPORT.json",
                   help="write a JSON report: per job status, duration, output, sha256 and error (each output "
                        "is read once more for its sha256 only when a report is written); `-`: to standard "
                        "output, the progress and tables then going to standard error (for jq)")
    add_include_option(p, "confine the zoo's recipes (and what they include and load weights from), models "
                          "and outputs to DIR (symbolic links resolved), and refuse the zoo's imports: and "
                          "unsafe: true unless --import/--unsafe give them; default: $MODELXFORM_INCLUDE_ROOT, "
                          "else anywhere. For zoos you did not write, e.g. in CI")
    add_model_options(p)  # (--unsafe, --import MODULE: for every job, as apply's)
    return p


def run(args, console) -> int:
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"-j {args.workers}: the number of workers must be at least 1")
    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray-address goes with --executor ray")
    report_to = None  # (the console the report is written to, for `--report -`)
    if args.report == STDOUT:  # (the JSON alone on standard output; what batch says goes to standard error)
        from ..console import Console
        report_to, console = console, Console(console.err, console.err, console.inp)
    elif args.report:
        folder = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(folder):
            raise UsageError(f"--report {args.report}: folder {folder} does not exist")
        from ..keras_io.outputs import check_output_folder, refuse_overwriting_inputs
        refuse_overwriting_inputs("--report", args.report, [(args.zoo, "the batch file")])
        check_output_folder(args.report)
    if args.executor == "ray":
        from ..batch.ray_executor import import_ray
        import_ray()  # fail now, with the install hint, not after reading the zoo
    from ..batch.local import WorkerStarts
    with WorkerStarts() as early:
        if args.executor == "local":
            early.begin()  # (the workers' TensorFlow import, under way while the zoo is read; see WorkerStarts)
        return _run(args, console, early, report_to)


def _run(args, console, early, report_to) -> int:
    from ..batch import load_zoo, run_batch

    zoo = load_zoo(args.zoo, include_root=include_root(args), imports=args.imports, unsafe=args.unsafe)
    if args.report and report_to is None:  # before any job runs: the report replaces no file the batch reads or writes
        from ..keras_io.outputs import refuse_overwriting_inputs
        refuse_overwriting_inputs("--report", args.report, [(path, "a model of the batch") for path in zoo.models]
                                  + [(path, "a recipe of the batch") for path in zoo.recipes]
                                  + [(job.output, "an output of the batch") for job in zoo.jobs])
    workers = args.workers or os.cpu_count() or 1
    models = len(dict.fromkeys(job.model for job in zoo.jobs))
    recipes = len(dict.fromkeys(job.recipe for job in zoo.jobs))
    settings = len(zoo.jobs) // max(models * recipes, 1)  # (params combinations, where each pair has as many)
    shown = f"{models} model{'s' if models != 1 else ''} × {recipes} recipe{'s' if recipes != 1 else ''}"
    if settings > 1 and settings * models * recipes == len(zoo.jobs):
        shown += f" × {settings} params"
    elif len(zoo.jobs) != models * recipes:
        shown += " with their params"
    console.print(f"{len(zoo.jobs)} job{'s' if len(zoo.jobs) != 1 else ''}: {shown}"
                  + (" (dry run: nothing is written)" if args.dry_run else f" -> {_rel(zoo, zoo.output_folder)}/"))
    progress = _Progress(console, zoo, len(zoo.jobs))
    start = time.perf_counter()
    interrupted = False
    try:
        outcomes = run_batch(zoo, workers=workers, executor=args.executor, ray_address=args.ray_address,
                             force=args.force, dry_run=args.dry_run, on_event=progress.event, early=early,
                             digests=bool(args.report))  # (the outputs' sha256 is for the report only)
    except KeyboardInterrupt as exc:
        from ..errors import Terminated
        outcomes = getattr(exc, "outcomes", None)
        interrupted = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        if outcomes is None:
            raise
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    if args.dry_run:
        status = _print_matrix(console, zoo, outcomes)
    else:
        status = _print_summary(console, zoo, outcomes, elapsed)
    if args.report:
        _write_report(args, zoo, outcomes, workers, elapsed, report_to)
    if args.report and report_to is None:
        console.print(f"report: {args.report}")
    if interrupted:
        left = sum(o.status in ("interrupted", "not run") for o in outcomes)
        console.error(f"{'terminated' if interrupted == 'SIGTERM' else 'interrupted'}: {left} "
                      f"job{'s' if left != 1 else ''} left; run the same command again to "
                      "finish them (finished jobs are skipped)")
        return 143 if interrupted == "SIGTERM" else 130
    return status


def _rel(zoo, path: str) -> str:
    rel = os.path.relpath(path, zoo.root)
    return path if rel.startswith("..") else rel


def _short(zoo, error: str | None) -> str:
    """The first line of an error, with the zoo folder taken off its paths."""
    first = (error or "").strip().splitlines()[0] if (error or "").strip() else ""
    first = first.replace(zoo.root + os.sep, "")
    return first[len("error: "):] if first.startswith("error: ") else first


def _what(outcome) -> str:
    job = outcome.job
    return f"{job.model_name} × {job.recipe_name}" + (f" ({job.params_text})" if job.params_text else "")


class _Progress:
    """A rich progress bar on a terminal; one line per finished job otherwise (logs, CI, tests)."""

    def __init__(self, console, zoo, total: int):
        from rich.console import Console as RichConsole
        self.console, self.zoo, self.total = console, zoo, total
        self.counts = collections.Counter()
        self.finished = 0
        self.running: dict[int, str] = {}
        self.skipped_reported = False
        self.rich = RichConsole(file=console.err, highlight=False)
        self.bar = None
        if self.rich.is_terminal and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                TextColumn("{task.fields[current]}", style="dim"),
                                console=self.rich, transient=False)
            self.task = self.bar.add_task("batch", total=total, counts="", current="")
            self.bar.start()

    def event(self, kind: str, outcome) -> None:
        if kind == "cleaned":
            n = len(outcome.cleaned)
            self.console.error(f"removed {n} temporary file{'s' if n != 1 else ''} that a killed earlier run left "
                               f"beside {outcome.job.output_name}")
            return
        if kind == "start":
            self.running[outcome.job.index] = outcome.job.model_name
            if self.bar is None and not self.skipped_reported and self.counts["skipped"]:
                self._say_skipped()
        else:
            self.running.pop(outcome.job.index, None)
            self.counts[outcome.status] += 1
            self.finished += 1
            if self.bar is None and kind == "finish":
                self._line(outcome)
        if self.bar is not None:
            counts = " · ".join(f"{self.counts[s]} {s}" for s in ("done", "ok", "failed", "skipped") if self.counts[s])
            current = ", ".join(list(dict.fromkeys(self.running.values()))[:3])
            self.bar.update(self.task, completed=self.finished, counts=counts, current=current)

    def _say_skipped(self) -> None:
        self.skipped_reported = True
        n = self.counts["skipped"]
        self.console.error(f"skipped {n} job{'s' if n != 1 else ''} whose output is up to date (--force redoes them)")

    def _line(self, outcome) -> None:
        width = len(str(self.total))
        head = f"[{self.finished:>{width}}/{self.total}] {outcome.status:<11} {_what(outcome)}"
        took = f" ({outcome.duration:.1f} s)" if outcome.duration is not None else ""
        if outcome.status in ("done", "ok"):
            tail = f" -> {outcome.job.output_name}" if outcome.status == "done" else ""
            self.console.error(head + tail + took)
        else:
            self.console.error(f"{head}{took}: {_short(self.zoo, outcome.error)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, current="")
            self.bar.stop()
        elif self.counts["skipped"] and not self.skipped_reported:
            self._say_skipped()


def _print_summary(console, zoo, outcomes, elapsed: float) -> int:
    by_recipe: dict[str, collections.Counter] = {}
    times: dict[str, float] = collections.defaultdict(float)
    for o in outcomes:
        by_recipe.setdefault(o.job.recipe_name, collections.Counter())[o.status] += 1
        times[o.job.recipe_name] += o.duration or 0.0
    statuses = [s for s in STATUS_ORDER if any(c[s] for c in by_recipe.values())] or ["done"]
    rows = [[name] + [str(c[s]) for s in statuses] + [f"{times[name]:.1f} s"] for name, c in by_recipe.items()]
    console.table(["recipe"] + statuses + ["job time"], rows, title="batch summary",
                  right=tuple(statuses) + ("job time",))
    failed = [o for o in outcomes if o.status in ("failed", "interrupted")]
    if failed:
        console.table(["model", "recipe", "params", "cause"],
                      [[o.job.model_name, o.job.recipe_name, o.job.params_text or "-", _short(zoo, o.error)]
                       for o in failed[:MAX_FAILED_ROWS]], title="failed jobs")
        if len(failed) > MAX_FAILED_ROWS:
            console.print(f"… and {len(failed) - MAX_FAILED_ROWS} more failed jobs (--report has them all)")
    totals = collections.Counter(o.status for o in outcomes)
    shown = [s for s in STATUS_ORDER if totals[s] or s in ("done", "skipped", "failed")]
    console.print(f"{len(outcomes)} job{'s' if len(outcomes) != 1 else ''}: "
                  + ", ".join(f"{totals[s]} {s}" for s in shown) + f" in {elapsed:.1f} s")
    return ExitCode.OK if not failed and not totals["not run"] else ExitCode.ASSERT_FAILED


def _print_matrix(console, zoo, outcomes) -> int:
    """Dry run: for each model (row) and recipe (column), whether the recipe's plan resolves."""
    recipes = list(dict.fromkeys(o.job.recipe_name for o in outcomes))
    cells: dict[tuple[str, str], list] = collections.defaultdict(list)
    for o in outcomes:
        cells[(o.job.model_name, o.job.recipe_name)].append(o)
    rows = []
    for model in dict.fromkeys(o.job.model_name for o in outcomes):
        row = [model]
        for recipe in recipes:
            group = cells.get((model, recipe), [])
            bad = [o for o in group if o.status != "ok"]
            if not group:
                row.append("-")
            elif not bad:
                row.append("ok")
            else:
                message = _short(zoo, bad[0].error)
                message = message.partition(": error: ")[2] or message
                which = "" if len(bad) == len(group) else f" for {', '.join(o.job.params_text for o in bad)}"
                row.append(f"fails{which}: {message}")
        rows.append(row)
    console.table(["model"] + recipes, rows, title="applicability (dry run)")
    bad = [o for o in outcomes if o.status != "ok"]
    for o in bad:
        console.print(f"\n{_what(o)}:")
        console.print((o.error or o.status).replace(zoo.root + os.sep, ""))
    ok = len(outcomes) - len(bad)
    console.print(f"\n{ok} of {len(outcomes)} jobs would apply; dry run: nothing was written")
    return ExitCode.OK if not bad else ExitCode.ASSERT_FAILED


def _write_report(args, zoo, outcomes, workers: int, elapsed: float, report_to=None) -> None:
    """The JSON report, to the file --report names, or to ``report_to`` (the console) for `-`."""
    totals = collections.Counter(o.status for o in outcomes)
    jobs = []
    for o in outcomes:
        item = o.to_dict()
        if args.dry_run:
            item["statements"] = o.statements
        jobs.append(item)
    data = {"zoo": os.path.abspath(zoo.path), "root": zoo.root, "executor": args.executor,
            "workers": workers, "dry_run": bool(args.dry_run), "force": bool(args.force),
            "duration": round(elapsed, 3), "totals": dict(totals), "jobs": jobs}
    if report_to is not None:
        report_to.out.write(json.dumps(data, indent=2) + "\n")
        report_to.out.flush()
        return
    from ..keras_io.outputs import write_text_atomically
    mask = os.umask(0)
    os.umask(mask)
    write_text_atomically(args.report, json.dumps(data, indent=2) + "\n", mode=0o666 & ~mask)
