"""``python -m modelxform`` and the ``modelxform`` command (pyproject.toml's entry point is :func:`run`).

Importing this module and the package costs next to nothing (modelxform/__init__.py imports lazily), so
Ctrl-C at any moment after the interpreter has started is handled here or by cli.main: a message and
exit status 130, never a traceback.
"""
import os
import sys

# numpy's OpenBLAS starts a thread per core when it is loaded, and each spins for about 0.1 s of CPU
# (2**28 cycles) waiting for work that, in most commands, never comes: 0.13 s of a second core in every
# process that imports numpy on the benchmark machine, while a first run's input digest needs that core,
# and proportionally more on a machine with more cores (per batch worker too: the setting is inherited).
# With 2**4 cycles the threads go to sleep at once and wake when BLAS has work (a first run on 2 GiB:
# 1.78 -> 1.72-1.74 s, benchmarks/README.md). A value the user set is kept.
BLAS_SPIN = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def run() -> int:
    for name, value in BLAS_SPIN.items():
        os.environ.setdefault(name, value)
    # Ctrl-C while the command line is being imported is an interruption like any other
    try:
        from .cli import main
    except BaseException as exc:  # (Python wraps some interrupted import steps in a RuntimeError)
        cause = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        sys.stderr.write("interrupted; nothing was written\n")
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
