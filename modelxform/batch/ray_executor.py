"""The Ray executor: the same job function as Ray tasks, on a local Ray or an existing cluster.

Ray is an optional extra (``pip install 'modelxform[ray]'``) and is imported only here, only when
``--executor ray`` is asked for. Without ``--ray-address`` a local Ray is started with ``-j`` CPUs and
shut down afterwards; with one, the batch joins that cluster (``auto``, ``HOST:6379`` or
``ray://HOST:10001``). Every node must have modelxform installed with the same pinned versions, and
see the models, recipes and outputs at the same paths (see README, "Batch runs").

A task runs :func:`modelxform.batch.job.run_job`, which never raises; a task that Ray itself reports
failed (its worker crashed or was killed for memory) is reported for that job, with Ray's reason, and
not retried: the same job would most likely crash again.
"""
from __future__ import annotations

import collections
import os

from ..errors import UsageError

INSTALL_HINT = "pip install 'modelxform[ray]'"


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f"--executor ray needs Ray, which is not installed ({exc}); install it with "
                         f"{INSTALL_HINT}") from None
    return ray


def run_ray(payloads: list[dict], workers: int, address: str | None, on_start, on_result) -> None:
    """Run the payloads as Ray tasks; same callbacks as local.run_local."""
    queue = collections.deque(payloads)
    if not queue:
        return
    ray = import_ray()
    import logging

    from .job import run_job

    started_here = False
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                       configure_logging=True)
        try:
            if address:
                ray.init(address=address, **options)
            else:  # "local": a new Ray of our own, even when RAY_ADDRESS is set or a cluster runs here
                ray.init(address="local", num_cpus=workers, **options)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ... here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            hint = None
            if address and not os.environ.get("RAY_AUTH_MODE"):
                hint = ("if the cluster uses token authentication (Ray's default for clusters started by "
                        "ray.init since 2.59), set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN")
            raise UsageError(f"cannot {where}: {first}", hint=hint) from None
        started_here = True
    task = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(run_job)
    try:
        # Keep about as many tasks in flight as the cluster has CPUs, so that "started" means running
        # and a Ctrl-C leaves the rest unsubmitted.
        slots = max(1, int(ray.cluster_resources().get("CPU", workers)))
        pending: dict = {}
        try:
            while queue or pending:
                while queue and len(pending) < slots:
                    payload = queue.popleft()
                    pending[task.remote(payload)] = payload
                    on_start(payload)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    payload = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        result = {"index": payload["index"], "status": "failed", "sha256": None,
                                  "exit_code": None, "statements": None, "duration": None, "worker": None,
                                  "error": f"the Ray task running this job failed ({type(exc).__name__}): {first}"}
                    on_result(result)
        except KeyboardInterrupt:
            for ref, payload in pending.items():
                ray.cancel(ref, force=False)
            for ref, payload in pending.items():
                on_result({"index": payload["index"], "status": "interrupted", "error": "interrupted",
                           "sha256": None, "exit_code": None, "statements": None, "duration": None,
                           "worker": None})
            raise
    finally:
        if started_here:
            ray.shutdown()
