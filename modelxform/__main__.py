"""``python -m modelxform`` and the ``modelxform`` command (pyproject.toml's entry point is :func:`run`).

Importing this module and the package costs next to nothing (modelxform/__init__.py imports lazily), so
Ctrl-C at any moment after the interpreter has started is handled here or by cli.main: a message and
exit status 130, never a traceback.
"""
import sys


def run() -> int:
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
