"""Run a compiled recipe on a working copy of a model.

Statements are bound to the model one after the other, because a selection made after a structural
edit must see the edited model. Weight statements change the working copy in place; structural
statements queue edits that are rebuilt in one go before the next statement that needs the model
(graph.py). With ``dry_run`` (``plan``), the arrays are left alone but every selection, structural edit
and check is still resolved, so the report is exactly what ``apply`` would do. The input model is
never modified.
"""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass, field

from . import ir
from . import statements as st
from .lang.compiler import parse_value
from .errors import ApplyError, ModelxformError, UsageError
from .keras_io.graph import GraphEditor, transfer_weights
from .keras_io.layers import model_kind, refuse_subclassed
from .passes import PASSES, StatementReport, load_all
from .rng import generator
from .keras_io.layers import walk
from .selectors import resolve_selector


class Params:
    """Parameter values for one run: the recipe's defaults with command-line overrides."""

    def __init__(self, values: dict):
        self.values = values

    def value(self, v):
        if isinstance(v, ir.ParamRef):
            if v.name not in self.values:
                raise ApplyError(f"unknown parameter ${v.name}", span=v.span)
            return self.values[v.name]
        if isinstance(v, ir.Percent):
            return ir.Percent(self.value(v.value))
        if isinstance(v, tuple):
            return tuple(self.value(x) for x in v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        return v


def resolve_params(recipe, overrides: dict | None) -> dict:
    declared = recipe.params
    values = dict(declared)
    used = _used_params(recipe.program)
    for name, raw in (overrides or {}).items():
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise UsageError(f"unknown parameter {name!r} (--param {name}=…); the recipe declares: {known}")
        if name not in used:
            raise UsageError(f"parameter {name!r} (--param {name}=…) is declared but never used by the recipe")
        value = parse_value(raw) if isinstance(raw, str) else raw
        default = declared[name]
        if isinstance(default, bool) != isinstance(value, bool) or \
                (isinstance(default, (int, float)) and not isinstance(value, (int, float))) or \
                (isinstance(default, str) and not isinstance(value, str)):
            raise UsageError(f"parameter {name!r} is {type(default).__name__} in the recipe "
                             f"({ir.format_value(default)}), but --param gave {raw!r}")
        values[name] = value
    return values


def _used_params(program: ir.Program) -> set[str]:
    used: set[str] = set()

    def visit(obj):
        if isinstance(obj, ir.ParamRef):
            used.add(obj.name)
        elif isinstance(obj, (tuple, list)):
            for x in obj:
                visit(x)
        elif isinstance(obj, ir.Program):
            return
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                if name != "span":
                    visit(getattr(obj, name))
    for stmt in program.flat():
        if not isinstance(stmt, st.Param):
            visit(stmt)
    return used


@dataclass
class Report:
    statements: list = field(default_factory=list)
    seed: int = 0
    params: dict = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"seed": self.seed, "params": self.params, "dry_run": self.dry_run,
                "statements": [s.to_dict() for s in self.statements]}

    def lines(self) -> list[str]:
        out = []
        for s in self.statements:
            out.append(f"{s.location}  {s.statement}")
            for line in s.changes:
                out.append(f"    {line}")
            for line in s.notes:
                out.append(f"    ({line})")
        return out


class Context:
    """What the passes see: the working model, the current selection, seed, params and report."""

    def __init__(self, model, seed: int, params: Params, dry_run: bool):
        self.model = model
        self.seed = seed
        self.params = params
        self.dry_run = dry_run
        self.selection: list[str] | None = None
        self._editor: GraphEditor | None = None
        self._pending: list[StatementReport] = []
        self._occurrences: collections.Counter = collections.Counter()
        self._parts: dict[int, tuple] = {}
        # layers whose weight shapes a `set` changed: the recipe must reinitialise them (path -> statement)
        self.obligations: dict[str, object] = {}
        self.reference = None  # (probe inputs, outputs) of the input model, for `assert equivalent`
        self.loaded: dict[str, object] = {}  # models read by `load weights from`

    # -- randomness ------------------------------------------------------------------------------
    def begin(self, stmt) -> None:
        text = str(stmt)
        self._parts[id(stmt)] = (text, self._occurrences[text])
        self._occurrences[text] += 1

    def rng_parts(self, stmt) -> tuple:
        return self._parts[id(stmt)]

    def rng(self, stmt, *extra):
        return generator(self.seed, *self.rng_parts(stmt), *extra)

    # -- values ----------------------------------------------------------------------------------
    def value(self, v, stmt):
        return self.params.value(v)

    def number(self, v, stmt):
        value = self.params.value(v)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApplyError(f"`{stmt}`: expected a number, got {ir.format_value(value)}", span=stmt.span)
        return value

    # -- the model -------------------------------------------------------------------------------
    def editor(self, stmt) -> GraphEditor:
        if self._editor is None:
            refuse_subclassed(self.model, f"`{stmt}`", stmt.span)
            self._editor = GraphEditor(self.model, self.seed)
        return self._editor

    def pass_for(self, stmt):
        """The pass that runs ``stmt`` here (archive_run.ArchiveContext runs some differently)."""
        return PASSES[type(stmt)]

    def before_rebuild(self):
        """What a rebuild needs of the model before it: (layer facts by path, output shapes, the
        LayerInfos holding the weights to carry across)."""
        return _layer_facts(self.model), _output_shapes(self.model), walk(self.model)

    def flush(self) -> None:
        """Rebuild the model from the queued structural edits, if any. A pass must not hold on to an
        editor across a call that flushes (selected(), layers(), current_model())."""
        if self._editor is None:
            return
        editor, pending = self._editor, self._pending
        self._editor, self._pending = None, []
        editor.closed = True
        before, outputs_before, old_layers = self.before_rebuild()
        new_model = editor.build(old_layers)
        self.obligations.update(editor.reshaped)
        after = _layer_facts(new_model)
        outputs_after = _output_shapes(new_model)
        # Consecutive structural statements are rebuilt together, so "after" is the state after all of
        # them; say so rather than attribute a later statement's effect to an earlier one.
        together = f" (after rebuilding {len(pending)} structural statements together)" if len(pending) > 1 else ""
        for report in pending:
            for path in getattr(report, "rebuilt", []):
                old_path = report.layers[report.rebuilt.index(path)] if path not in before else path
                if old_path in before and path in after:
                    report.changes.append(f"{path}: output {before[old_path][0]} -> {after[path][0]}, "
                                          f"params {before[old_path][1]:,} -> {after[path][1]:,}{together}")
                elif path in after:
                    report.changes.append(f"{path} (new): output {after[path][0]}, params {after[path][1]:,}"
                                          f"{together}")
            if isinstance(report.statement, st.Tap):
                report.changes.append(f"model outputs: {', '.join(outputs_before)} -> "
                                      f"{', '.join(outputs_after)}{together}")
        self.model = new_model

    def forget(self, paths) -> None:
        """Layers a statement removed: out of the selection, and no longer owed a reinitialisation."""
        gone = set(paths)
        if self.selection is not None:
            self.selection = [p for p in self.selection if p not in gone]
        for path in gone:
            self.obligations.pop(path, None)

    def current_model(self):
        self.flush()
        return self.model

    def layers(self):
        return walk(self.current_model())

    def selected(self, stmt):
        if self.selection is None:
            raise ApplyError(f"`{stmt}` acts on the selected layers, but nothing is selected",
                             span=stmt.span, hint="add `select …` before it")
        by_path = {info.path: info for info in self.layers()}
        found = [by_path[p] for p in self.selection if p in by_path]
        if not found:
            raise ApplyError(f"`{stmt}`: none of the selected layers is left in the model", span=stmt.span)
        return found


def _shape_text(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _layer_facts(model) -> dict:
    facts = {}
    for info in walk(model):
        try:
            shape = _shape_text(tuple(info.layer.output.shape))
        except Exception:  # a shared layer has several outputs; an unbuilt one has none
            shape = "?"
        facts[info.path] = (shape, info.params())
    return facts


def _output_shapes(model) -> list[str]:
    try:
        return [_shape_text(tuple(t.shape)) for t in model.outputs]
    except Exception:
        return ["?"]


def working_copy(model):
    """A copy of ``model`` that passes may change freely (the caller's model is never touched)."""
    import keras
    kind = model_kind(model)
    if kind != "subclassed":
        config = keras.saving.serialize_keras_object(model)
        clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
        transfer_weights(walk(model), clone, {}, 0)
        return clone
    from .keras_io.files import load_model, save_model
    with tempfile.TemporaryDirectory(prefix="modelxform-") as tmp:
        path = os.path.join(tmp, "copy.keras")
        save_model(model, path)
        return load_model(path)


def effective_seed(recipe, seed: int | None, params: Params) -> int:
    if seed is not None:
        return int(seed)
    declared = recipe.seed
    if declared is None:
        return 0
    value = params.value(declared)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"seed must be a whole number ≥ 0, not {ir.format_value(value)}")
    return value


def run(recipe, model, *, seed: int | None = None, params: dict | None = None, dry_run: bool = False,
        copy: bool = True):
    """Run ``recipe`` on ``model``; returns ``(new_model, Report)``. With ``copy=False`` the given model
    is the working copy (the CLI passes a model it has just loaded)."""
    load_all()
    values = Params(resolve_params(recipe, params))
    seed_value = effective_seed(recipe, seed, values)
    working = working_copy(model) if copy else model
    ctx = Context(working, seed_value, values, dry_run)
    report = Report(seed=seed_value, params=dict(values.values), dry_run=dry_run)
    try:
        _run_statements(recipe, ctx, report, values)
    except ModelxformError as exc:
        _attach_sources(exc, recipe)
        raise
    return ctx.model, report


def _attach_sources(exc: ModelxformError, recipe) -> None:
    """Errors raised while running carry a span; give them the text too, for the caret excerpt."""
    sources = getattr(recipe, "sources", {}) or {}
    for diagnostic in exc.diagnostics:
        if diagnostic.source is None and diagnostic.span is not None:
            diagnostic.source = sources.get(diagnostic.span.filename or recipe.source.name, recipe.source)
    exc.source = exc.diagnostics[0].source


def select(ctx, stmt: st.Select) -> StatementReport:
    """``select …``: resolve the selector against the current layers and make it the selection."""
    infos = resolve_selector(stmt.selector, ctx.current_model(), ctx.layers(), ctx.params,
                             lambda: ctx.rng(stmt), stmt.span)
    ctx.selection = [i.path for i in infos]
    return StatementReport(stmt, layers=list(ctx.selection),
                           notes=[f"{len(infos)} layer{'s' if len(infos) != 1 else ''}: "
                                  + _abbrev([i.path for i in infos])])


def _run_statements(recipe, ctx: Context, report: Report, values: Params) -> None:
    if any(isinstance(s, st.AssertEquivalent) for s in recipe.program.flat()):
        ctx.reference = reference_outputs(ctx.model, ctx.seed)
    for stmt in recipe.program.flat():
        if isinstance(stmt, st.HEADER_TYPES):
            continue
        ctx.begin(stmt)
        if isinstance(stmt, st.Select):
            report.statements.append(select(ctx, stmt))
            continue
        if not stmt.structural:
            ctx.flush()
        result = ctx.pass_for(stmt)(ctx, stmt)
        report.statements.append(result)
        if stmt.structural:
            ctx._pending.append(result)
    ctx.flush()
    if ctx.obligations:
        paths = sorted(ctx.obligations)
        stmt = ctx.obligations[paths[0]]
        raise ApplyError(f"`{stmt}` changes the weight shapes of {', '.join(paths)}, so their weights cannot be "
                         "kept", span=stmt.span,
                         hint="reinitialise them in the same recipe, e.g. `select …; reinit weights`")


def reference_outputs(model, seed: int):
    """Seeded random probe inputs and the model's outputs on them, in inference mode."""
    from .keras_io.graph import probe_inputs
    rng = generator(seed, "assert equivalent probe")
    inputs = probe_inputs(model, rng, batch=4)
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    import numpy as np
    return inputs, [np.asarray(o) for o in outputs]


def _abbrev(paths: list[str], limit: int = 8) -> str:
    if len(paths) <= limit:
        return ", ".join(paths)
    return ", ".join(paths[:limit]) + f", … ({len(paths) - limit} more)"
