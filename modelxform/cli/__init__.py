"""Command line: ``modelxform SUBCOMMAND …`` (also ``python -m modelxform``).

Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args, console) -> int``; they are
thin layers over the public API. Errors print one message and exit with a code from ExitCode; a
traceback only with --traceback. check, fmt and --help never import TensorFlow.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from ..console import Console
from ..errors import ExitCode, ModelxformError
from ..version import __version__

SUBCOMMANDS = ("apply", "plan", "check", "fmt", "inspect", "provenance", "verify", "batch", "diff", "export")

EPILOG = """\
exit status:
  0  ok
  1  a recipe assert failed (fmt --check: a file is not formatted; verify: the model differs)
  2  usage error, or a recipe that does not compile
  3  a model file (or its provenance record) could not be read or written
  4  a statement could not be applied to this model
  130, 143  interrupted (Ctrl-C), terminated (SIGTERM); nothing partial is left

example:
  modelxform apply example.recipe cnn.keras -o out.keras --seed 7
"""


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage, which is our USAGE code too; keep its message short."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelxform", description="Apply declarative transformation recipes to Keras models.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"modelxform {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(subparsers)
    for sub in subparsers.choices.values():  # (also after the command: `modelxform apply … --traceback`)
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the Python traceback of an error")
    return parser


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unsafe", action="store_true",
                   help="load models with Keras safe mode off (needed for Lambda layers; trust the file first)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before loading (it registers custom layers); repeatable")


STDIN = "-"


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """RECIPE… where `-` is standard input (as black and ruff read it), with --stdin-filename."""
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files; - reads one from standard input")
    p.add_argument("--stdin-filename", metavar="NAME",
                   help="the name standard input's recipe goes by: in messages, for its form (NAME.yaml is "
                        "read as YAML), and for `include` paths, which resolve next to it (default: <stdin>, "
                        "in the working folder)")


def recipe_inputs(args, console):
    """(name, path or None, text or RecipeError) of every RECIPE argument; `-` is read from stdin once."""
    from ..errors import RecipeError
    from ..lang.compiler import decode_recipe, read_recipe_text
    if args.recipes.count(STDIN) > 1:
        from ..errors import UsageError
        raise UsageError("`-` (standard input) can be given only once")
    if args.stdin_filename is not None and STDIN not in args.recipes:
        from ..errors import UsageError
        raise UsageError("--stdin-filename names standard input's recipe: give `-` among the recipes")
    for item in args.recipes:
        if item == STDIN:
            name = args.stdin_filename or "<stdin>"
            try:
                yield name, None, decode_recipe(console.read_input(), name)
            except RecipeError as exc:
                yield name, None, exc
            continue
        try:
            yield item, item, read_recipe_text(item)
        except RecipeError as exc:
            yield item, item, exc


def add_include_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--include-root", metavar="DIR", default=None,
                   help=help or "only let recipes include (and load weights from) files inside DIR (symbolic "
                                "links resolved); default: $MODELXFORM_INCLUDE_ROOT, else anywhere. For recipes "
                                "you did not write, e.g. in CI")


def include_root(args):
    """--include-root as given (checked to be a folder), or None for $MODELXFORM_INCLUDE_ROOT / anywhere."""
    from ..errors import UsageError
    root = getattr(args, "include_root", None)
    if root is not None and not os.path.isdir(root):
        raise UsageError(f"--include-root {root}: no such folder")
    return root


def seed_argument(text: str) -> int:
    from ..lang.parser import MAX_NUMBER_DIGITS
    try:
        value = int(text) if len(text) <= MAX_NUMBER_DIGITS else -1  # (a recipe's seed has at most as many)
    except ValueError:
        value = -1
    if value < 0:
        shown = repr(text) if len(text) <= 60 else f"{text[:40]!r}… ({len(text):,} characters)"
        raise argparse.ArgumentTypeError(f"a seed is a whole number ≥ 0 of at most {MAX_NUMBER_DIGITS} digits, "
                                         f"not {shown}")
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed_argument, default=None,
                   help="seed for every random choice, a whole number ≥ 0 (overrides the recipe's)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="override a `param` of the recipe; repeatable")


def print_plan(plan, args, console, *, output=None, html=None) -> int:
    """A Plan as text or (--json) as data, as ``apply`` and ``plan`` print it; ``html``: the HTML report
    ``plan --html`` wrote."""
    try:
        return _print_plan(plan, args, console, output, html)
    finally:
        for warning in plan.warnings:  # on stderr, after the plan: what probably did not do what was meant
            console.error(warning.render("warning"))


def _print_plan(plan, args, console, output, html) -> int:
    import json
    (layers_before, params_before), (layers_after, params_after) = plan.before, plan.after
    if getattr(args, "json", False):
        data = plan.to_dict()
        data.update({"model": args.model, "output": None if plan.dry_run else output,
                     "layer_count": [layers_before, layers_after], "param_count": [params_before, params_after]})
        if html is not None:
            data["html"] = html
        console.print(json.dumps(data, indent=2))
        return ExitCode.OK
    for line in plan.lines():
        console.print(line)
    console.print(f"model: {layers_before} layers, {params_before:,} params -> "
                  f"{layers_after} layers, {params_after:,} params")
    if plan.dry_run:
        console.print("dry run: nothing was written")
    else:
        console.print(f"wrote {output}")
    if html is not None:
        console.print(f"wrote the report {html}")
    return ExitCode.OK


def parse_params(items: list[str]) -> dict[str, str]:
    from ..errors import UsageError
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param {item!r}: write NAME=VALUE, e.g. --param factor=0.9")
        if name.strip() in out:
            raise UsageError(f"--param {name.strip()} is given twice")
        out[name.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    try:
        console = console or Console()  # (inside: Ctrl-C can come while it is made)
        # TensorFlow's C++ start-up chatter is not for our users; set before any import of it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from ..keras_io.backend import own_process
        own_process()  # (on JAX or torch, Keras need not import an installed TensorFlow for nothing)
        with _sigterm_as_interrupt():
            status = _main(argv, console)
            console.flush()
            return status
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM) at any moment, imports included
        return _interrupted(exc, console or Console())
    except Exception as exc:
        # Python wraps what interrupts some steps of an import (a dataclass's __set_name__, say) in a
        # RuntimeError: still Ctrl-C
        cause = _interruption_in(exc)
        if cause is None:
            raise
        return _interrupted(cause, console or Console())


def _interrupted(exc: KeyboardInterrupt, console) -> int:
    from ..errors import Terminated
    terminated = isinstance(exc, Terminated)
    console.error(f"{'terminated' if terminated else 'interrupted'}; nothing was written")
    return 143 if terminated else 130


def _interruption_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an exception was raised from (its __cause__ or __context__ chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _main(argv, console) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.command:
        parser.print_help(console.out)
        return ExitCode.USAGE
    module = importlib.import_module(f".{args.command}", __name__)
    try:
        if args.command not in ("check", "fmt", "provenance"):  # (what reads or writes a model: before any
            from ..keras_io.backend import refuse_unknown_backend  # work, where each batch job would fail alike)
            refuse_unknown_backend()
        return int(module.run(args, console))
    except ModelxformError as exc:
        if args.traceback:
            import traceback
            console.error("".join(traceback.format_exception(exc)))
        console.error(exc.render())
        return int(exc.exit_code)


class _sigterm_as_interrupt:
    """While a command runs, SIGTERM raises Terminated (a KeyboardInterrupt) where Ctrl-C would raise
    KeyboardInterrupt, so that the same cleanup runs: temporary files are removed, a batch stops its
    workers. Only in the main thread (signal handlers can be set nowhere else); the previous handler
    is restored afterwards (main() also runs inside other programs and tests)."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                from ..errors import Terminated
                raise Terminated
            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except (ValueError, OSError):
                self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
