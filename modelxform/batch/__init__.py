"""Batch runs: the recipes of a ZOO.yaml applied to every model of a zoo (``modelxform batch``).

    zoo = load_zoo("zoo.yaml")                       # all checks, no TensorFlow; ZooError if bad
    outcomes = run_batch(zoo, workers=4)             # local worker processes; executor="ray" for Ray
    [o.status for o in outcomes]                     # "done", "skipped", "failed", …

The main process never imports TensorFlow: it reads ZOO.yaml, compiles the recipes, decides which jobs
are already done (their output's provenance names this input, recipe, seed and params) and hands the
rest to an executor. Each job is what ``modelxform apply`` does, through the same function, so its
output is byte-identical to a single ``apply`` run.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .zoo import Job, Zoo, ZooError, load_zoo

__all__ = ["Job", "Zoo", "ZooError", "load_zoo", "Outcome", "run_batch", "already_done", "EXECUTORS"]

EXECUTORS = ("local", "ray")


@dataclass
class Outcome:
    """What became of one job. status: pending, running, done, skipped, failed, interrupted, not run
    (and for a dry run: ok, failed)."""

    job: Job
    status: str = "pending"
    duration: float | None = None
    sha256: str | None = None
    error: str | None = None
    exit_code: int | None = None
    statements: list | None = None
    worker: str | None = None
    started: float | None = field(default=None, repr=False)  # time.perf_counter() when handed to a worker
    offset: float | None = None  # seconds from the start of the batch to the job's start
    cleaned: list = field(default_factory=list, repr=False)  # stale temporary files removed beside its output

    def to_dict(self) -> dict:
        return {"model": self.job.model_name, "recipe": self.job.recipe_name, "params": self.job.params,
                "seed": self.job.seed, "output": self.job.output_name, "status": self.status,
                "started": None if self.offset is None else round(self.offset, 3),
                "duration": None if self.duration is None else round(self.duration, 3),
                "sha256": self.sha256, "error": self.error, "exit_code": self.exit_code,
                "worker": self.worker}


def already_done(job: Job, recipe, input_sha256: str) -> str | None:
    """The output's sha256 when ``job.output`` exists and the last entry of its provenance chain says
    it was made from this input (sha256), this recipe (sha256), this seed and these params; else None."""
    from ..keras_io.files import sha256_remembered
    if not _made_so(job, recipe, input_sha256):
        return None
    try:
        return sha256_remembered(job.output)
    except OSError:
        return None


def _made_so(job: Job, recipe, input_sha256: str) -> bool:
    """Whether ``job.output`` exists and the last entry of its provenance chain says it was made from
    this input (sha256), this recipe (sha256), this seed and these params."""
    from ..errors import ModelxformError
    from ..provenance import _jsonable, read_record, recipe_sha256
    from ..engine.plan import Params, effective_seed, resolve_params
    if not os.path.isfile(job.output):
        return False
    try:
        record = read_record(job.output)
    except ModelxformError:
        return False
    chain = (record or {}).get("chain") or []
    if not chain or not isinstance(chain[-1], dict):
        return False
    last = chain[-1]
    values = resolve_params(recipe, job.params)
    seed = effective_seed(recipe, job.seed, Params(values))
    expected = json.dumps({k: _jsonable(v) for k, v in sorted(values.items())}, sort_keys=True)
    return last.get("input_sha256") == input_sha256 and \
        (last.get("recipe") or {}).get("sha256") == recipe_sha256(recipe) and \
        last.get("seed") == seed and json.dumps(last.get("params"), sort_keys=True) == expected


def _input_hashes(paths: list[str]) -> dict[str, tuple | None]:
    """Each input's (sha256, identity) (keras_io.files.sha256_with_identity): the jobs reuse the digest
    for their provenance record while the file is unchanged, rather than reading it again."""
    from ..keras_io.files import sha256_with_identity

    def one(path):
        try:
            return sha256_with_identity(path)
        except OSError:
            return None  # the job itself will report why the file cannot be read
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(unique)))) as pool:
        return dict(zip(unique, pool.map(one, unique)))


def run_batch(zoo: Zoo, *, workers: int | None = None, executor: str = "local", ray_address: str | None = None,
              force: bool = False, dry_run: bool = False, on_event=None, early=None,
              digests: bool = True) -> list[Outcome]:
    """Run every job of ``zoo``; returns one Outcome per job, in the zoo's order.

    ``on_event(kind, outcome)`` is called with kind "cleaned" (temporary files of an earlier, killed run
    removed beside its output: ``outcome.cleaned``), "skipped" (decided before anything runs), "start"
    and "finish". A dry run loads each model and resolves each recipe's plan, writing nothing. On
    Ctrl-C, KeyboardInterrupt propagates after the running jobs were stopped and recorded; the
    outcomes list (``exc.outcomes``) says what was done. ``early``: a ``local.WorkerStarts`` the caller
    began before it read the zoo (the command line does), so that the workers' TensorFlow import overlaps
    that too; it is settled here for the zoo's jobs and ended with the run. ``digests``: whether each
    output's sha256 is taken (``Outcome.sha256``; else None), which reads every output once more after it
    is written (1.6 s of a 3 s job on a 2 GiB model; the command line asks for it only for --report).
    """
    workers = workers or os.cpu_count() or 1
    on_event = on_event or (lambda kind, outcome: None)
    batch_start = time.perf_counter()
    outcomes = [Outcome(job) for job in zoo.jobs]
    with contextlib.ExitStack() as stack:
        from .local import WorkerStarts
        starts = stack.enter_context(early if early is not None else WorkerStarts())  # (ended with the run)
        if executor == "local":
            # The workers' server (where they need TensorFlow) imports it while this process checks
            # which jobs are done: the import is the part of a run no number of workers shortens.
            processes = starts.settle(any(_needs_keras(zoo, job) for job in zoo.jobs))
        payloads = _to_run(zoo, outcomes, force, dry_run, on_event, digests)

        def on_start(payload):
            outcome = outcomes[payload["index"]]
            outcome.status, outcome.started = "running", time.perf_counter()
            outcome.offset = outcome.started - batch_start
            on_event("start", outcome)

        def on_result(result):
            outcome = outcomes[result["index"]]
            outcome.status = result["status"]
            outcome.duration = result.get("duration")
            if outcome.duration is None and outcome.started is not None:
                outcome.duration = time.perf_counter() - outcome.started
            for key in ("sha256", "error", "exit_code", "statements", "worker"):
                setattr(outcome, key, result.get(key))
            on_event("finish", outcome)

        missing = _missing_folders(o.job.output for o in outcomes if o.status == "pending")
        try:
            if executor == "local":
                from .local import run_local
                run_local(payloads, workers, on_start, on_result, processes, prepare=_archive_for)
            elif executor == "ray":
                from .ray_executor import run_ray
                run_ray(payloads, workers, ray_address, on_start, on_result)
            else:
                from ..errors import UsageError
                raise UsageError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
        except KeyboardInterrupt as exc:
            for outcome in outcomes:
                if outcome.status in ("pending", "running"):
                    outcome.status = "not run" if outcome.status == "pending" else "interrupted"
            exc.outcomes = outcomes
            raise
        finally:
            _remove_empty(missing)
    return outcomes


def _needs_keras(zoo: Zoo, job: Job) -> bool:
    """Whether the job takes the Keras path (its recipe needs it, or its model is not a .keras
    archive), rather than the TensorFlow-free weight-only one."""
    return zoo.recipes[job.recipe].program.needs_keras or not job.model.endswith(".keras")


def _to_run(zoo: Zoo, outcomes: list[Outcome], force: bool, dry_run: bool, on_event,
            digests: bool = True) -> list[dict]:
    """Stale temporary files removed, the jobs already done marked skipped, and the payloads of the
    others, the longest first (_expected_seconds)."""
    if not dry_run:
        _remove_stale_temp_files(outcomes, on_event)
    hashes: dict = {}
    if not dry_run and not force:
        hashes = _input_hashes([job.model for job in zoo.jobs])
        for outcome in outcomes:
            job = outcome.job
            digest = hashes.get(job.model)
            sha = digest[0] if digest else None
            recipe = zoo.recipes[job.recipe]
            if digests:
                done = already_done(job, recipe, sha) if sha else None
            else:
                done = bool(sha) and _made_so(job, recipe, sha)
            if done:
                outcome.status, outcome.duration = "skipped", 0.0
                outcome.sha256 = done if digests else None
                on_event("skipped", outcome)
    todo = [o for o in outcomes if o.status == "pending"]
    # The longest jobs first: they start early, and the last ones to finish are short, so no worker
    # idles long at the end while another finishes a long job.
    config_bytes = functools.cache(_config_bytes)  # (a model's archive read once, whatever its recipes)
    payloads = []
    for outcome in sorted(todo, key=lambda o: _expected_seconds(zoo, o.job, config_bytes), reverse=True):
        payload = outcome.job.payload("plan" if dry_run else "apply")
        payload["needs_keras"] = _needs_keras(zoo, outcome.job)
        payload["digest_output"] = digests
        digest = hashes.get(payload["model"])
        if digest and digest[1] is not None:
            payload["input_digest"] = [digest[0], list(digest[1])]
        payloads.append(payload)
    return payloads


def _archive_for(payload: dict):
    """The job's model opened as an archive for the engine (session.open_archive: TensorFlow-free), to be
    handed to the worker that runs the job (local._Preparer); None where the worker should open it itself:
    a dry run, a weight-only job (its worker does nothing else), imports or environment of its own, a
    file the archive cannot stand in for or that no path may read (the job says why)."""
    if payload.get("kind") != "apply" or not payload.get("needs_keras") or payload.get("imports") \
            or payload.get("env"):
        return None
    from ..session import open_archive
    try:
        return open_archive(payload["model"], unsafe=bool(payload.get("unsafe")))
    except Exception:  # noqa: BLE001 - the worker opens it again and reports what is wrong
        return None


def _remove_stale_temp_files(outcomes: list[Outcome], on_event) -> None:
    """Temporary files beside the outputs that saves killed in an earlier run left (their process is no
    longer running; keras_io.files.stale_temp_files): removed before anything runs, each reported as a
    "cleaned" event."""
    from ..keras_io.files import remove_stale_temp_files
    for outcome in outcomes:
        outcome.cleaned = remove_stale_temp_files(outcome.job.output)
        if outcome.cleaned:
            on_event("cleaned", outcome)


# What a job costs, roughly, to hand out the longest first. On the Keras path a job rebuilds the model
# layer by layer (Keras's from_config), which costs more than its bytes do: with -j 1 on the 12
# keras.applications models of `benchmarks/batch_scaling.py --zoo classic`, DenseNet121 (429 layers, 30
# MB) took 2.4-2.6 s and Xception (134 layers, 84 MB) 1.0-1.1 s; fitted, about 5.5 ms a layer and 3.6 ms
# a MB. A .keras archive's config.json holds about 1 kB per layer, and the zip's directory gives its
# size without reading it. Handed out by file size, that zoo's three DenseNets came after ResNet50,
# InceptionV3 and Xception, and one worker idled 0.5 s at the end of 13 s. The weight-only path (no
# Keras) costs bytes only: about 1.5 s a GB, read, changed, written and hashed.
KERAS_SECONDS_PER_CONFIG_BYTE = 5.5e-6
KERAS_SECONDS_PER_BYTE = 3.6e-9
WEIGHT_ONLY_SECONDS_PER_BYTE = 1.5e-9


def _expected_seconds(zoo: Zoo, job: Job, config_bytes) -> float:
    """A job's expected duration in seconds, from its model file: its size, and on the Keras path the
    size of its archive's config.json (``config_bytes``, _config_bytes or a cache of it)."""
    try:
        size = os.path.getsize(job.model)
    except OSError:
        size = 0
    if not _needs_keras(zoo, job):
        return size * WEIGHT_ONLY_SECONDS_PER_BYTE
    return size * KERAS_SECONDS_PER_BYTE + config_bytes(job.model) * KERAS_SECONDS_PER_CONFIG_BYTE


def _config_bytes(path: str) -> int:
    """The size of a .keras archive's config.json, as the zip's directory says (0 if it has none)."""
    if not path.endswith(".keras"):
        return 0
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.getinfo("config.json").file_size
    except Exception:  # noqa: BLE001 - not an archive this can read: its job says why; here it sorts by size
        return 0


def _missing_folders(outputs) -> list[str]:
    """Output folders that do not exist yet, deepest first: the jobs create them as they write."""
    missing = set()
    for output in outputs:
        folder = os.path.dirname(output)
        while folder and not os.path.isdir(folder) and folder not in missing:
            missing.add(folder)
            folder = os.path.dirname(folder)
    return sorted(missing, key=lambda f: f.count(os.sep), reverse=True)


def _remove_empty(folders: list[str]) -> None:
    """Folders this batch created for jobs that all failed stay behind empty: take them away again
    (only once every job has finished, so no job is about to write into one)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty (or already gone): leave it
