"""modelxform inspect MODEL [--where PRED] — a table of the model's layers."""
from __future__ import annotations

import json

from . import add_model_options
from ..errors import ExitCode, RecipeError, UsageError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "inspect", help="list a model's layers (path, type, output shape, params, trainable)",
        description="List MODEL's layers, nested models expanded, optionally filtered with a predicate of "
                    "the recipe language, e.g. --where 'type=Conv2D and params > 1K'.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--where", metavar="PRED", help="only layers matching this predicate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(p)
    return p


def compile_predicate(text: str):
    """A predicate from the command line, with errors pointing into the option's text."""
    from ..compiler import compile_recipe
    from ..errors import Diagnostic
    from ..source import Source, Span
    prefix = "select where "
    try:
        program = compile_recipe(prefix + text, "--where").program
    except RecipeError as exc:
        diagnostics = []
        for d in exc.diagnostics:
            span = d.span
            if span is not None:
                span = Span(span.line, max(1, span.column - len(prefix)), span.end_line,
                            max(1, span.end_column - len(prefix)), "--where")
            diagnostics.append(Diagnostic(d.message, span, Source(text, "--where"), d.hint))
        raise UsageError(diagnostics[0].message, diagnostics=diagnostics) from None
    return program.statements[0].selector.pred


def run(args, console) -> int:
    pred = compile_predicate(args.where) if args.where else None
    from ..model_io import load_model
    from ..runner import Params, _shape_text
    from ..selectors import matches, walk
    model = load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    rows = []
    for info in walk(model):
        if pred is not None and not matches(pred, info, Params({})):
            continue
        try:
            shape = _shape_text(tuple(info.layer.output.shape))
        except Exception:  # shared layers have several outputs
            shape = "(shared)"
        rows.append({"path": info.path, "type": info.type_name, "output_shape": shape,
                     "params": info.params(), "trainable": bool(info.layer.trainable)})
    if args.json:
        console.print(json.dumps({"model": args.model, "layers": rows}, indent=2))
        return ExitCode.OK
    console.table(["path", "type", "output shape", "params", "trainable"],
                  [[r["path"], r["type"], r["output_shape"], f"{r['params']:,}", "yes" if r["trainable"] else "no"]
                   for r in rows], title=f"{args.model}: {len(rows)} layer(s)", right=("params",))
    total = sum(r["params"] for r in rows)
    console.print(f"{len(rows)} layer(s), {total:,} params")
    return ExitCode.OK
