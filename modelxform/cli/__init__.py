"""Command line: ``modelxform SUBCOMMAND …`` (also ``python -m modelxform``).

Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args, console) -> int``; they are
thin layers over the public API. Errors print one message and exit with a code from ExitCode; a
traceback only with --traceback. check, fmt and --help never import TensorFlow.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..console import Console
from ..errors import ExitCode, ModelxformError
from ..version import __version__

SUBCOMMANDS = ("apply", "plan", "check", "fmt", "inspect", "provenance", "verify", "batch", "diff", "export")

EPILOG = """\
exit status:
  0  ok
  1  a recipe assert failed (fmt --check: a file is not formatted; verify: the model differs)
  2  usage error, or a recipe that does not compile
  3  a model file could not be read or written
  4  a statement could not be applied to this model

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
    return parser


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unsafe", action="store_true",
                   help="load models with Keras safe mode off (needed for Lambda layers; trust the file first)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before loading (it registers custom layers); repeatable")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="seed for every random choice (overrides the recipe's)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="override a `param` of the recipe; repeatable")


def print_plan(plan, args, console, *, output=None, html=None) -> int:
    """A Plan as text or (--json) as data, as ``apply`` and ``plan`` print it; ``html``: the HTML report
    ``plan --html`` wrote."""
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
    console = console or Console()
    # TensorFlow's C++ start-up chatter is not for our users; set before any import of it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ..keras_io.backend import own_process
    own_process()  # (on JAX or torch, Keras need not import an installed TensorFlow for nothing)
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
        return int(module.run(args, console))
    except ModelxformError as exc:
        if args.traceback:
            import traceback
            console.error("".join(traceback.format_exception(exc)))
        console.error(exc.render())
        return int(exc.exit_code)
    except KeyboardInterrupt:
        console.error("interrupted; nothing was written")
        return 130
