"""Checks: assert count, assert params, assert output shape. A failed assert stops the run."""
from __future__ import annotations

from .. import ir
from .. import statements as st
from ..errors import ApplyError, AssertionFailed
from ..selectors import compare
from . import StatementReport, register


def _fmt_shape(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


@register(st.AssertCount)
def assert_count(ctx, stmt: st.AssertCount):
    """``select where type=Dense; assert count == 3``."""
    n = len(ctx.selected(stmt))
    want = ctx.number(stmt.value, stmt)
    if not compare(stmt.op, n, want):
        raise AssertionFailed(f"assert failed: the selection has {n} layer{'s' if n != 1 else ''}, "
                              f"expected count {stmt.op} {want}", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: count is {n}"])


@register(st.AssertParams)
def assert_params(ctx, stmt: st.AssertParams):
    """``assert params < 30M`` — all parameters of the model, trainable or not."""
    model = ctx.current_model()
    n = int(model.count_params())
    want = ctx.number(stmt.value, stmt)
    if not compare(stmt.op, n, want):
        raise AssertionFailed(f"assert failed: the model has {n:,} parameters, expected params {stmt.op} "
                              f"{ir.format_size(want)}", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: {n:,} parameters"])


@register(st.AssertShape)
def assert_shape(ctx, stmt: st.AssertShape):
    """``assert output shape == (None, 10)``; ``assert output 1 shape == (None, 26, 26, 8)``."""
    model = ctx.current_model()
    outputs = list(model.outputs or [])
    index = stmt.index or 0
    if index >= len(outputs):
        raise ApplyError(f"the model has {len(outputs)} output{'s' if len(outputs) != 1 else ''}; "
                         f"there is no output {index}", span=stmt.span)
    shape = tuple(None if d is None else int(d) for d in outputs[index].shape)
    equal = shape == tuple(stmt.shape)
    if equal != (stmt.op == "=="):
        raise AssertionFailed(f"assert failed: output {index} has shape {_fmt_shape(shape)}, expected "
                              f"shape {stmt.op} {_fmt_shape(stmt.shape)}", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: output {index} has shape {_fmt_shape(shape)}"])


@register(st.AssertEquivalent)
def assert_equivalent(ctx, stmt: st.AssertEquivalent):
    """``remove where type=Dropout; assert equivalent`` — same outputs as the input model on seeded
    random probe inputs, in inference mode (maximum absolute difference ≤ tolerance, default 1e-5)."""
    import numpy as np
    tolerance = 1e-5 if stmt.tolerance is None else ctx.number(stmt.tolerance, stmt)
    model = ctx.current_model()
    inputs, expected = ctx.reference
    if len(model.inputs) != len(inputs) or any(tuple(a.shape)[1:] != tuple(np.shape(b))[1:]
                                               for a, b in zip(model.inputs, inputs)):
        raise AssertionFailed("assert equivalent failed: the model's inputs changed", span=stmt.span)
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    if len(outputs) < len(expected):
        raise AssertionFailed(f"assert equivalent failed: the model has {len(outputs)} outputs, the input model "
                              f"had {len(expected)}", span=stmt.span)
    worst = 0.0
    for k, (got, want) in enumerate(zip(outputs, expected)):
        if got.shape != want.shape:
            raise AssertionFailed(f"assert equivalent failed: output {k} has shape {got.shape}, was {want.shape}",
                                  span=stmt.span)
        worst = max(worst, float(np.max(np.abs(got.astype("float64") - want.astype("float64")))) if got.size else 0.0)
    if worst > tolerance:
        raise AssertionFailed(f"assert equivalent failed: outputs differ by up to {worst:.3g} "
                              f"(tolerance {tolerance:g})", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: largest difference {worst:.3g} (tolerance {tolerance:g})"])
