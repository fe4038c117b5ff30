"""modelxform inspect MODEL [--where PRED] [--json] — the model's layers, inputs, outputs, nesting and
parameter totals by layer type."""
from __future__ import annotations

import json

from . import add_model_options
from ..errors import ExitCode, RecipeError, UsageError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "inspect", help="list a model's layers, inputs and outputs, nested models and params by layer type",
        description="List MODEL's layers (path, type, output shape, params, trainable; nested models expanded "
                    "and shared layers marked with the number of times they are called), then the model's "
                    "inputs and outputs, how its sub-models nest, and parameter totals by layer type. "
                    "--where filters the layers with a predicate of the recipe language, e.g. "
                    "--where 'type=Conv2D and params > 1K' (the totals then count the listed layers only).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--where", metavar="PRED", help="only layers matching this predicate")
    p.add_argument("--depth", type=int, metavar="N",
                   help="show the layers N levels deep, each nested model or composite layer below that as one "
                        "row (e.g. --depth 1: the model's own layers, a keras_hub transformer block as one row)")
    p.add_argument("--weights", action="store_true",
                   help="also list each layer's variables (name, Keras path, shape, dtype, trainable): the "
                        "names the weight statements target, as in `scale kernel 0.9`")
    p.add_argument("--json", action="store_true",
                   help="print JSON: layers, inputs, outputs, submodels, shared and by_type (with --weights, "
                        "each layer's variables)")
    add_model_options(p)
    return p


def compile_predicate(text: str):
    """A predicate from the command line, with errors pointing into the option's text."""
    from ..lang.compiler import COMMENT_IN_PIECE, beyond_one_statement, compile_recipe
    from ..errors import Diagnostic
    from ..source import Source, Span
    prefix = "select where "

    def shifted(span):  # (the prefix is on the first line only)
        if span is None:
            return None
        return Span(span.line, max(1, span.column - len(prefix) * (span.line == 1)), span.end_line,
                    max(1, span.end_column - len(prefix) * (span.end_line == 1)), "--where")
    try:
        program = compile_recipe(prefix + text, "--where").program
    except RecipeError as exc:
        diagnostics = [Diagnostic(d.message, shifted(d.span), Source(text, "--where"), d.hint)
                       for d in exc.diagnostics]
        raise UsageError(diagnostics[0].message, diagnostics=diagnostics) from None
    beyond = beyond_one_statement(prefix + text, program)
    if beyond is not None:  # (`type=Dense; freeze`, `type=Dense # …`: what followed was dropped without a word)
        kind, span, what = beyond
        message = COMMENT_IN_PIECE if kind == "comment" else \
            f"--where takes one predicate; `{what}` after it is a statement"
        raise UsageError(message, diagnostics=[Diagnostic(message, shifted(span), Source(text, "--where"))])
    return program.statements[0].selector.pred


def run(args, console) -> int:
    pred = compile_predicate(args.where) if args.where else None
    from ..session import model_to_look_at
    with model_to_look_at(args.model, unsafe=args.unsafe, imports=args.imports) as model:
        return _show(args, console, pred, model)


def _show(args, console, pred, model) -> int:
    from ..diff import by_type, snapshot
    from ..engine.plan import Params
    from ..engine.selectors import matches
    from ..keras_io.layers import walk
    from ..keras_io.shapes import shape_text as _shape_text
    snap = snapshot(model, name=str(args.model), weights=False)
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth {args.depth}: the depth is 1 or more")
    rows, listed = [], []
    for info in walk(model):
        if pred is not None and not matches(pred, info, Params({})):
            continue
        try:
            shape = _shape_text(tuple(info.layer.output.shape))
        except Exception:  # several outputs (a shared layer), or none (a composite layer's sublayer)
            shape = f"(in {info.path.rsplit('/', 1)[0]})" if info.is_sublayer else "(shared)"
        rows.append({"path": info.path, "type": info.type_name, "output_shape": shape,
                     "params": info.params(), "trainable": bool(info.layer.trainable), "info": info})
        if args.weights:
            rows[-1]["variables"] = [_variable(v) for v in info.weights]
        listed.append(info.path)
    if args.depth is not None:
        rows = _to_depth(rows, args.depth, _shape_text)
    for row in rows:
        row.pop("info", None)
    shared = [{"path": p, "calls": snap.layers[p].calls} for p in listed if snap.layers[p].shared]
    shared += [{"path": s["path"], "calls": s["calls"]} for s in snap.submodels if s["calls"] > 1]
    subset = snap if pred is None else _restrict(snap, listed)
    types = by_type(subset)
    if args.json:
        console.print(json.dumps({"model": args.model, "layers": rows, "inputs": snap.inputs,
                                  "outputs": snap.outputs, "submodels": snap.submodels, "shared": shared,
                                  "by_type": types, "kind": snap.kind, "total_params": snap.params}, indent=2))
        return ExitCode.OK
    calls = {s["path"]: s["calls"] for s in shared}
    console.table(["path", "type", "output shape", "params", "trainable", "shared"],
                  [[r["path"], r["type"], r["output_shape"], f"{r['params']:,}", "yes" if r["trainable"] else "no",
                    f"×{calls[r['path']]}" if r["path"] in calls else ""]
                   for r in rows], title=f"{args.model}: {len(rows)} layer(s)", right=("params",))
    total = sum(r["params"] for r in rows)
    console.print(f"{len(rows)} layer(s), {total:,} params")
    if args.weights:
        console.print()
        variables = [[r["path"], v["name"], v["path"], v["shape"], v["dtype"], "yes" if v["trainable"] else "no"]
                     for r in rows for v in r["variables"]]
        console.table(["layer", "variable", "path", "shape", "dtype", "trainable"], variables,
                      title=f"variables: {len(variables)} (a recipe targets them by name, e.g. `scale kernel 0.9`)")
    if shared:
        console.print("shared (called more than once): "
                      + ", ".join(f"{s['path']} ×{s['calls']}" for s in shared))
    console.print()
    console.print(f"{snap.kind} model {model.name!r}, {snap.params:,} params")
    for i, inp in enumerate(snap.inputs):
        console.print(f"  input  {i}: {inp['name']} {inp['shape']} {inp['dtype']}")
    for i, out in enumerate(snap.outputs):
        console.print(f"  output {i}: {out['layer'] or '?'} {out['shape']}")
    if not snap.connected:
        console.print("  (a subclassed model: its wiring is Python code, so inputs, outputs and sharing are "
                      "known only as far as Keras tracks them)")
    if snap.submodels:
        console.print()
        console.print("nested models:")
        console.print(f"  {model.name} ({type(model).__name__}), {len(snap.layers)} layers, {snap.params:,} params")
        for line in _tree(snap.submodels):
            console.print("  " + line)
    console.print()
    console.table(["type", "layers", "params", "trainable params"],
                  [[t["type"], str(t["layers"]), f"{t['params']:,}", f"{t['trainable_params']:,}"] for t in types],
                  title="params by layer type" + (" (listed layers)" if pred is not None else ""),
                  right=("layers", "params", "trainable params"))
    return ExitCode.OK


def _to_depth(rows: list[dict], depth: int, shape_text) -> list[dict]:
    """The rows of layers deeper than ``depth`` folded into one row for the nested model or composite
    layer that holds them at that depth (its type, its layers' parameters, its own flag and shape)."""
    out: list[dict] = []
    folded: dict[str, dict] = {}
    for row in rows:
        parts = row["path"].split("/")
        if len(parts) <= depth:
            out.append(row)
            continue
        prefix = "/".join(parts[:depth])
        holder = row["info"].ancestors[depth - 1]
        if prefix not in folded:
            try:
                shape = shape_text(tuple(holder.output.shape))
            except Exception:
                shape = "(shared)" if depth == 1 or not row["info"].is_sublayer else "(in a layer)"
            folded[prefix] = {"path": prefix, "type": type(holder).__name__, "output_shape": shape, "params": 0,
                              "trainable": bool(holder.trainable), "layers": 0}
            out.append(folded[prefix])
        folded[prefix]["params"] += row["params"]
        folded[prefix]["layers"] += 1
    for row in folded.values():
        row["type"] += f" ({row['layers']} layers)"
    return out


def _variable(v) -> dict:
    shape = tuple(int(d) for d in v.shape)
    return {"name": v.name, "path": v.path, "shape": "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
            + ")", "dtype": str(v.dtype), "trainable": bool(v.trainable)}


def _restrict(snap, paths):
    from dataclasses import replace
    keep = set(paths)
    return replace(snap, layers={p: f for p, f in snap.layers.items() if p in keep})


def _tree(submodels) -> list[str]:
    """Nested models as an indented tree (paths are a/b/c, parents listed before children)."""
    lines = []
    paths = [s["path"] for s in submodels]
    for s in submodels:
        depth = s["path"].count("/")
        parent = "/".join(s["path"].split("/")[:-1])
        siblings = [p for p in paths if "/".join(p.split("/")[:-1]) == parent]
        branch = "└─ " if siblings[-1] == s["path"] else "├─ "
        shared = f", called ×{s['calls']}" if s["calls"] > 1 else ""
        lines.append("   " * depth + branch + f"{s['path'].split('/')[-1]} ({s['type']}), {s['layers']} layers, "
                     f"{s['params']:,} params{shared}")
    return lines
