"""One batch job, as a worker runs it: exactly what ``modelxform apply`` does, through the same code.

:func:`run_job` is called in the local pool's worker processes and as a Ray task alike. It takes the
plain-data payload of :meth:`Job.payload` and never raises: every failure comes back as a result with
its cause, so one bad model never stops the others. The work itself is ``session.apply_file`` (or
``plan_file`` for a dry run) — what ``modelxform apply`` calls — so a batch output is byte for byte the
file ``apply`` writes for the same recipe, seed and params.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time

# Test-only hook: a job whose model file has this stem kills its own worker process with os._exit,
# as a segfault or the kernel's OOM killer would. The test suite uses it to check that such a crash is
# reported for that job and that the others still run. "STEM:saving" does so once the output's
# temporary file is written, before it is renamed (as a kill while saving would); "STEM:slow-save"
# waits there for a minute instead (for a signal to arrive while saving). Nothing else reads it; never
# set it otherwise.
CRASH_ENV = "MODELXFORM_TEST_CRASH_ON"

_recipes: dict = {}  # a worker compiles each recipe once: (path, mtime, size) -> Recipe
_in_job = False
_interrupted = False
_terminated = False  # SIGTERM came: finish (or stop) the job at hand, send its result, and end


def _recipe(path: str, include_root: str | None = None):
    from ..session import load_recipe
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, include_root)
    if key not in _recipes:
        _recipes[key] = load_recipe(path, include_root=include_root)
    return _recipes[key]


def run_job(payload: dict) -> dict:
    """Run one job; returns {"index", "status", "duration", "sha256", "error", "exit_code", ...}.

    status is "done" (written), "ok" (a dry run whose plan resolves), "failed" or "interrupted".
    """
    global _in_job, _interrupted
    from ..errors import ModelxformError
    start = time.perf_counter()
    result = {"index": payload["index"], "status": "failed", "sha256": None, "error": None, "exit_code": None,
              "statements": None, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.update(payload.get("env") or {})
    from ..keras_io.backend import own_process
    own_process()
    crash = os.environ.get(CRASH_ENV)
    stem = os.path.splitext(os.path.basename(payload["model"]))[0]
    if crash == stem:
        os._exit(70)
    if crash in (f"{stem}:saving", f"{stem}:slow-save"):
        _stop_while_saving(crash.endswith(":saving"))
    if _interrupted:  # Ctrl-C came while this worker was between jobs: do not start another
        _interrupted = False
        result.update(status="interrupted", error="interrupted before it started", duration=0.0)
        return result
    _in_job = True
    try:
        from ..session import apply_file, plan_file
        recipe = _recipe(payload["recipe"], payload.get("include_root"))
        imports = list(payload.get("imports") or [])
        root = payload.get("import_root")
        if imports and root and root not in sys.path:  # ZOO.yaml's folder first (docs/batch.md)
            sys.path.insert(0, root)
        options = dict(seed=payload["seed"], params=payload["params"], unsafe=bool(payload.get("unsafe")),
                       imports=imports)
        if payload["kind"] == "plan":
            plan = plan_file(recipe, payload["model"], **options)
            result["statements"] = [{"statement": s["statement"], "line": s["line"], "layers": len(s["layers"])}
                                    for s in plan.to_dict()["statements"]]
            result["status"] = "ok"
        else:
            os.makedirs(os.path.dirname(payload["output"]), exist_ok=True)
            done = apply_file(recipe, payload["model"], payload["output"], input_digest=payload.get("input_digest"),
                              opened=payload.get("opened"), **options)
            if payload.get("digest_output", True):  # (read once more: only where it is asked for)
                result["sha256"] = done.sha256
            result["status"] = "done"
    except ModelxformError as exc:
        result["error"] = exc.render()
        result["exit_code"] = int(exc.exit_code)
    except KeyboardInterrupt as exc:
        from ..errors import Terminated
        result["status"] = "interrupted"
        result["error"] = ("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted") + \
            "; nothing was written for this job"
    except MemoryError:
        result["error"] = "out of memory while running this job; nothing was written"
    except Exception as exc:  # a bug or an unexpected Keras failure: report it with the job, go on
        first = (str(exc).strip().splitlines() or [""])[0]
        result["error"] = f"internal error: {type(exc).__name__}: {first}"
    finally:
        _in_job = _interrupted = False
        opened = payload.get("opened")  # (the archive the main process opened for it, if the run never used it)
        if opened is not None and opened.reopened:
            opened.close()
    result["duration"] = time.perf_counter() - start
    return result


def _stop_while_saving(crash: bool) -> None:
    """The test hook of CRASH_ENV: die (or wait) once the output's temporary file is written."""
    from ..keras_io import files
    original = files.write_atomically

    def write_atomically(dest, write, failure=None):
        def then_stop(tmp):
            write(tmp)
            if crash:
                os._exit(70)
            time.sleep(60)
        return original(dest, then_stop, failure)
    files.write_atomically = write_atomically


def _on_sigint(signum, frame):
    """Ctrl-C reaches the workers too (same process group), and the main process may send it again:
    interrupt the running job once (its temporary file is removed on the way out); between jobs,
    remember it so that a job handed over at that moment does not start."""
    global _interrupted
    already, _interrupted = _interrupted, True
    if _in_job and not already:
        raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    """SIGTERM (the pool stopping a worker, a cluster or container shutting down) is handled like
    Ctrl-C: the running job stops and removes its temporary file; between jobs the worker just ends."""
    global _interrupted, _terminated
    from ..errors import Terminated
    _interrupted = _terminated = True
    if _in_job:
        raise Terminated
    _exit_now()


def worker_main(conn, log_path: str | None, threads: int | None = None) -> None:
    """The loop of a local worker process: take a job, run it, send the result, until told to stop.
    TensorFlow was imported before the worker was forked (batch/local.py), or is imported by the first
    job that needs it, and stays imported for the next ones."""
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if threads:
        # N workers on N cores: each TensorFlow sizing its thread pools for the whole machine makes them
        # fight over the cores (Eigen's threads spin while they wait). Read by TensorFlow when its
        # runtime starts (the first op), also in a worker forked after TensorFlow was imported.
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))
    if log_path:
        # Keras and TensorFlow write to the terminal; keep it in a file the main process shows only if
        # this worker dies (the last words of a crash).
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    while True:
        try:
            payload = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            payload = None  # the main process is gone
        if payload is None:
            # Every result is sent and every output renamed into place: skip the interpreter's teardown,
            # which with TensorFlow and a model loaded takes about a second the whole batch would wait for.
            _exit_now()
        if log_path:
            os.ftruncate(2, 0)
            os.lseek(2, 0, os.SEEK_SET)
        result = run_job(payload)
        try:
            conn.send(result)
        except (OSError, ValueError):
            _exit_now()
        if _terminated:
            _exit_now()


def _exit_now() -> None:
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
