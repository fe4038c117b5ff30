"""Run a compiled recipe: bind its statements to the model one after the other and make the Plan.

Statements are bound one after the other, because a selection made after a structural edit must see the
edited model. Each statement's pass (``stmt.run(ctx)``) resolves what it acts on and reports what it
changes; its array work runs only when the recipe is applied, so ``plan`` and ``apply`` run the very
same passes and a plan changes no arrays. Structural statements queue edits that are rebuilt in one go
before the next statement that needs the model (keras_io.graph). The input model is never modified.
"""
from __future__ import annotations

from ..errors import ApplyError, ModelxformError
from .context import Context
from .plan import Params, Plan, effective_seed, resolve_params


def run(recipe, source, *, seed: int | None = None, params: dict | None = None,
        apply: bool = True, unsafe: bool = False, imports=(), weights_file=None) -> tuple[Context, Plan]:
    """Run ``recipe`` on ``source`` (a keras_io.archive.Archive, or a Keras model that becomes the
    working copy); returns the context (whose model is the result) and the Plan. ``unsafe`` and
    ``imports`` are --unsafe and --import (for rebuilds and `load weights from`); ``weights_file``
    chooses the file a `load weights from` reads (Context.load_layers)."""
    values = Params(resolve_params(recipe, params))
    seed_value = effective_seed(recipe, seed, values)
    ctx = Context(source, seed_value, values, unsafe=unsafe, imports=imports, weights_file=weights_file)
    plan = Plan(seed=seed_value, params=dict(values.values), dry_run=not apply)
    try:
        plan.before = ctx.summary()
        _run_statements(recipe, ctx, plan, apply)
        plan.after = ctx.summary()
        plan.weights_files = dict(ctx.weights_sha256)
    except ModelxformError as exc:
        attach_sources(exc, recipe)
        raise
    return ctx, plan


def _run_statements(recipe, ctx: Context, plan: Plan, apply: bool) -> None:
    statements = [s for s in recipe.program.flat() if s.role != "header"]
    wanting = [s for s in statements if s.wants_reference]
    if wanting:
        ctx.take_reference(wanting[0])
    for stmt in statements:
        ctx.begin(stmt)
        ctx.prepare(stmt)  # (may rebuild the edits of statements before it: their errors are theirs)
        try:
            report = stmt.run(ctx)
            if apply:
                for work in report.work:
                    work()
        except ApplyError as exc:  # (deep in keras_io, an error does not know the statement it is in)
            exc.place_at(stmt.span)
            raise
        report.work = []
        _attach(report.warnings, recipe)
        plan.statements.append(report)
        if stmt.structural:
            ctx.hold(report)
    ctx.flush()
    if ctx.obligations:
        paths = sorted(ctx.obligations)
        stmt = ctx.obligations[paths[0]]
        raise ApplyError(f"`{stmt}` changes the weight shapes of {', '.join(paths)}, so their weights cannot be "
                         "kept", span=stmt.span,
                         hint="reinitialise them in the same recipe, e.g. `select …; reinit weights`")


def attach_sources(exc: ModelxformError, recipe) -> None:
    """Errors raised while running carry a span; give them the text too, for the caret excerpt."""
    _attach(exc.diagnostics, recipe)
    exc.source = exc.diagnostics[0].source


def _attach(diagnostics, recipe) -> None:
    sources = getattr(recipe, "sources", {}) or {}
    for diagnostic in diagnostics:
        if diagnostic.source is None and diagnostic.span is not None:
            diagnostic.source = sources.get(diagnostic.span.filename or recipe.source.name, recipe.source)
