"""Checks: assert count, assert params, assert output shape. A failed assert stops the run."""
from __future__ import annotations

from .. import ir
from ..errors import ApplyError, AssertionFailed
from ..selectors import compare
from . import StatementReport, register


def _fmt_shape(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


@register(ir.AssertCount)
def assert_count(ctx, stmt: ir.AssertCount):
    """``select where type=Dense; assert count == 3``."""
    n = len(ctx.selected(stmt))
    want = ctx.number(stmt.value, stmt)
    if not compare(stmt.op, n, want):
        raise AssertionFailed(f"assert failed: the selection has {n} layer{'s' if n != 1 else ''}, "
                              f"expected count {stmt.op} {want}", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: count is {n}"])


@register(ir.AssertParams)
def assert_params(ctx, stmt: ir.AssertParams):
    """``assert params < 30M`` — all parameters of the model, trainable or not."""
    model = ctx.current_model()
    n = int(model.count_params())
    want = ctx.number(stmt.value, stmt)
    if not compare(stmt.op, n, want):
        raise AssertionFailed(f"assert failed: the model has {n:,} parameters, expected params {stmt.op} "
                              f"{ir.format_size(want)}", span=stmt.span)
    return StatementReport(stmt, notes=[f"holds: {n:,} parameters"])


@register(ir.AssertShape)
def assert_shape(ctx, stmt: ir.AssertShape):
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
