"""The local executor: a pool of long-lived worker processes on this machine.

Where the jobs need Keras on TensorFlow, the workers are forked from a server process that imported
TensorFlow and Keras once (and started nothing of TensorFlow's runtime, which is not fork-safe; see
_context); otherwise each is a fresh interpreter ('spawn'). The main process never imports TensorFlow.
Each worker takes job after job over its own pipe. The pool knows which job each worker holds, so when a worker dies — a crash in native code, the
kernel's OOM killer, a kill -9 — exactly that job is reported failed (with the worker's exit signal
and its last output), a fresh worker takes its place, and the other jobs carry on. Nothing partial is
left behind: outputs are written to a temporary file and renamed (keras_io.files.save_model), and the
temporary file of a worker that died while saving (which it could not remove itself) is removed by the
pool, recognised by its name (keras_io.files.stale_temp_files). SIGTERM reaches a worker as Ctrl-C does.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from multiprocessing.connection import wait

from .job import worker_main

INTERRUPT_GRACE = 15.0  # seconds the running jobs get to stop cleanly after Ctrl-C


class _Worker:
    def __init__(self, ctx, log_dir: str, number: int, threads: int):
        self.log_path = os.path.join(log_dir, f"worker-{number}.log")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child, self.log_path, threads), daemon=True,
                                   name=f"modelxform-batch-{number}")
        self.process.start()
        child.close()
        self.job: dict | None = None
        self.last_job: dict | None = None

    def last_words(self, limit: int = 12) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                lines = [line.rstrip() for line in fh.read().splitlines() if line.strip()]
        except OSError:
            return ""
        return "\n".join(lines[-limit:])

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker process running this job stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"the worker process running this job was killed by {name}{why}"
    return f"the worker process running this job exited with status {code} before finishing it"


class WorkerStarts:
    """How the pool's workers start (see _context), begun as early as the caller can.

    The fork server's import of TensorFlow is the part of a run no number of workers shortens, so it
    should overlap everything the main process does before the first job: reading ZOO.yaml and the
    recipes, hashing the inputs, reading the existing outputs' records. The command line begins it
    before it reads the zoo, when whether a job needs Keras is not known yet (``begin``: the server is
    started wherever workers could be forked from one); ``settle`` then says whether one does, and a
    server no job needs (a weight-only zoo, whose workers are fresh interpreters) is killed in the
    middle of its import, having used a core the main process was not using. The server is stopped
    at ``end`` (and when the ``with`` block ends: a bad ZOO.yaml, Ctrl-C)."""

    def __init__(self) -> None:
        self._server = contextlib.ExitStack()
        self.ctx = multiprocessing.get_context("spawn")

    def begin(self) -> "WorkerStarts":
        """Start the fork server now (returns at once; the server imports on its own), where workers can
        be forked from one (Keras on TensorFlow, a system with fork)."""
        if self.ctx.get_start_method() != "forkserver":
            ctx, server = _context(True)
            if ctx.get_start_method() == "forkserver":
                import multiprocessing.forkserver
                self._server.enter_context(server)
                self.ctx = ctx
                multiprocessing.forkserver.ensure_running()
        return self

    def settle(self, preload: bool):
        """The context run_local starts the workers with, now that it is known whether a job needs Keras
        (``preload``): the server begun (if it was not), or stopped (if it was)."""
        if preload:
            return self.begin().ctx
        self.end()
        return self.ctx

    def end(self) -> None:
        self._server.close()
        self.ctx = multiprocessing.get_context("spawn")

    def __enter__(self) -> "WorkerStarts":
        return self

    def __exit__(self, *exc) -> None:
        self.end()


class _Preparer(threading.Thread):
    """The first jobs' models opened while the workers' TensorFlow imports, on the core that waits.

    With N >= 2 workers on as many cores, the fork server's import (3-4 s, before any job can start)
    keeps one core busy and leaves the others idle. This thread uses that time for the part of each job
    that needs no TensorFlow and that the worker would do first: opening the model's .keras archive
    (batch._archive_for; reading config.json and the layout of model.weights.h5, about a sixth of a
    structural job). It goes through the queue in the order the jobs will be handed out and puts each
    opened archive in its job's payload ("opened"), which carries it to the worker (Archive.__getstate__:
    what was read travels; the worker opens the file again and checks that it is unchanged, else it reads
    it itself). ``stop`` ends it when the workers are started: from then on no payload is changed, and the
    cores are the workers'. At -j 1 it does not run: the one core that run asks for is the import's."""

    def __init__(self, queue, prepare):
        super().__init__(name="modelxform-prepare", daemon=True)
        self._payloads = list(queue)
        self._prepare = prepare
        self._lock = threading.Lock()
        self._stopped = False

    def run(self) -> None:
        for payload in self._payloads:
            if self._stopped:
                return
            try:
                opened = self._prepare(payload)
            except Exception:  # noqa: BLE001 - the worker opens it itself
                opened = None
            if opened is None:
                continue
            with self._lock:
                if not self._stopped:
                    payload["opened"] = opened
                    continue
            opened.close()  # (too late: the job may be on its way)
            return

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def _release(payload: dict) -> None:
    """Close the main process's file of an archive opened for ``payload`` (sent, or never to be)."""
    opened = payload.pop("opened", None)
    if opened is not None:
        opened.close()


def run_local(payloads: list[dict], workers: int, on_start, on_result, ctx, prepare=None) -> None:
    """Run every payload on ``workers`` processes started by ``ctx`` (WorkerStarts.settle's);
    ``on_start(payload)`` when a job is handed to a worker, ``on_result(result)`` for each finished job
    (in completion order). ``prepare(payload)``: the job's model opened without TensorFlow (or None),
    called for the first jobs while the workers are forked from a server still importing TensorFlow,
    with two workers or more (_Preparer). On Ctrl-C, the running jobs are interrupted and reported, and
    KeyboardInterrupt is raised again."""
    queue = collections.deque(payloads)
    if not queue:
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, min(workers, len(queue))))
    with tempfile.TemporaryDirectory(prefix="modelxform-batch-") as log_dir:
        pool: list[_Worker] = []
        started = 0

        def new_worker() -> _Worker:
            nonlocal started
            started += 1
            return _Worker(ctx, log_dir, started, threads)

        preparer = None
        if prepare is not None and workers >= 2 and len(queue) >= 2 and ctx.get_start_method() == "forkserver":
            preparer = _Preparer(queue, prepare)
            preparer.start()
        try:
            try:
                pool = [new_worker() for _ in range(min(workers, len(queue)))]  # (waits for the server's import)
            finally:
                if preparer is not None:
                    preparer.stop()
            while queue or any(w.job is not None for w in pool):
                for w in pool:
                    if w.job is None and queue and w.process.is_alive():
                        w.job = w.last_job = queue.popleft()
                        try:
                            w.conn.send(w.job)
                        except (OSError, ValueError):
                            pass  # it died; its sentinel says so below
                        except Exception:  # noqa: BLE001 - the opened archive would not travel: the worker opens the file
                            _release(w.job)
                            try:
                                w.conn.send(w.job)
                            except (OSError, ValueError):
                                pass
                        _release(w.job)
                        on_start(w.job)
                busy = [w for w in pool if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in pool])
                survivors = []
                for w in pool:
                    if w.job is not None and (w.conn in ready or w.process.sentinel in ready):
                        result = _receive(w)
                        if result is not None:
                            w.job = None
                            on_result(result)
                            survivors.append(w)
                            continue
                    if w.process.sentinel in ready or not w.process.is_alive():
                        w.process.join()
                        if w.job is not None:
                            job, w.job = w.job, None
                            _remove_leftovers(job, w.process.pid)
                            message = describe_exit(w.process.exitcode)
                            words = w.last_words()
                            if words:
                                message += "; its last output:\n" + words
                            on_result({"index": job["index"], "status": "failed", "error": message,
                                       "exit_code": None, "sha256": None, "statements": None,
                                       "duration": None, "worker": f"pid {w.process.pid}"})
                        w.conn.close()
                        if queue:  # a fresh worker takes the dead one's place
                            survivors.append(new_worker())
                        continue
                    survivors.append(w)
                pool[:] = survivors
        except KeyboardInterrupt:
            _interrupt(pool, on_result)
            _shutdown(pool)
            # Every worker is gone now. One that stopped cleanly removed its temporary file; one that
            # _shutdown had to kill, or that died on the way, could not: remove what is left of theirs.
            for w in pool:
                if w.last_job is not None:
                    _remove_leftovers(w.last_job, w.process.pid)
            pool.clear()
            raise
        finally:
            _shutdown(pool)
            if preparer is not None:
                # (stopped before the first hand-out, but maybe still opening one archive: h5py's C code in
                # a thread while the interpreter shuts down can crash it, so it ends here, after the jobs)
                preparer.join()
            for payload in queue:  # (never handed out: Ctrl-C, or every worker gone)
                _release(payload)


def _context(preload: bool):
    """The way workers start, and a context that ends what it needs.

    Jobs that need Keras on TensorFlow: workers are forked from a server that imported TensorFlow and
    Keras once (batch/preload.py), so that N workers pay one import, not N (about 3 s of CPU each: with
    two workers on two cores, the second import was the part of a run that did not shrink). Only the
    import happens before the fork; TensorFlow's runtime starts in each worker. The server is started
    for this run, with this process's environment, and stopped after it (a later run may have another).
    Otherwise (weight-only jobs, which never import TensorFlow; other backends, whose runtimes are not
    fork-safe; systems without fork): each worker is a fresh interpreter ('spawn')."""
    from ..keras_io.backend import keras_backend
    if not (preload and keras_backend() == "tensorflow" and "forkserver" in multiprocessing.get_all_start_methods()):
        return multiprocessing.get_context("spawn"), contextlib.nullcontext()
    import multiprocessing.forkserver as forkserver
    ctx = multiprocessing.get_context("forkserver")

    @contextlib.contextmanager
    def server():
        # (private, multiprocessing.forkserver's one server per process: stopped before, since a server
        # left by an earlier run in this process has that run's environment; killed after, since a
        # process that imported TensorFlow takes about a second to tear the interpreter down, and it
        # holds nothing; the preload list is the process's too, so a program that calls run_batch gets
        # its own back)
        previous = list(getattr(forkserver._forkserver, "_preload_modules", ()))
        forkserver._forkserver._stop()
        ctx.set_forkserver_preload(["modelxform.batch.preload"])
        try:
            yield
        finally:
            ctx.set_forkserver_preload(previous)
            pid = forkserver._forkserver._forkserver_pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            forkserver._forkserver._stop()
    return ctx, server()


def _remove_leftovers(job: dict, pid: int) -> None:
    """A worker that died while saving could not remove its temporary file: remove it now (only that
    worker's, recognised by its name; keras_io.files.stale_temp_files)."""
    from ..keras_io.files import remove_stale_temp_files
    if job.get("output"):
        remove_stale_temp_files(job["output"], pid=pid)


def _receive(w: _Worker) -> dict | None:
    try:
        if w.conn.poll():
            return w.conn.recv()
    except (EOFError, OSError):
        pass
    return None


def _interrupt(pool: list[_Worker], on_result) -> None:
    """Ask the running jobs to stop (they remove their temporary files) and report them."""
    busy = [w for w in pool if w.job is not None]
    for w in busy:
        try:
            os.kill(w.process.pid, signal.SIGINT)
        except OSError:
            pass
    deadline = time.monotonic() + INTERRUPT_GRACE
    try:
        while busy and time.monotonic() < deadline:
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for w in list(busy):
                if w.conn in ready or w.process.sentinel in ready:
                    result = _receive(w)
                    busy.remove(w)
                    job, w.job = w.job, None
                    on_result(result or {"index": job["index"], "status": "interrupted",
                                         "error": "interrupted", "exit_code": None, "sha256": None,
                                         "statements": None, "duration": None, "worker": None})
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    for w in busy:
        job, w.job = w.job, None
        on_result({"index": job["index"], "status": "interrupted", "error": "interrupted",
                   "exit_code": None, "sha256": None, "statements": None, "duration": None, "worker": None})
    return busy


def _shutdown(pool: list[_Worker]) -> None:
    for w in pool:
        w.stop()
    deadline = time.monotonic() + 5.0
    for w in pool:
        w.process.join(timeout=max(0.1, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(timeout=2.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        try:
            w.conn.close()
        except OSError:
            pass
