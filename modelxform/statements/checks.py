"""Checks: assert equivalent, assert count, assert params, assert output shape. A failed assert stops
the run and nothing is written."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import ApplyError, AssertionFailed
from ..ir import SPAN, ParamRef, Statement, compare, format_size, format_value
from ..source import Span


class Check(Statement):
    role = "check"
    keyword = "assert"
    yaml_key = "assert"

    @classmethod
    def read_yaml(cls, r, body, span):
        """The YAML ``assert:`` mapping holds one of count, params, output_shape, equivalent."""
        f = r.mapping(body, "assert", {"count": False, "params": False, "output_shape": False,
                                       "op": False, "index": False, "equivalent": False, "tolerance": False})
        if f is None:
            return None
        kinds = [k for k in ("count", "params", "output_shape", "equivalent") if k in f]
        if len(kinds) != 1:
            r.error(body, "assert takes exactly one of: count, params, output_shape, equivalent")
            return None
        kind = kinds[0]
        if kind == "equivalent":
            if r.value(f["equivalent"]) is not True:
                r.error(f["equivalent"], "write `equivalent: true`")
            tolerance = r.number(f["tolerance"], "tolerance") if "tolerance" in f else None
            return AssertEquivalent(tolerance, span=span)
        if kind in ("count", "params"):
            stmt = r.text_piece(f[kind], f"assert {kind} ", f"assert {kind}")
            if stmt is not None:
                stmt = type(stmt)(stmt.op, stmt.value, span=span)
            return stmt
        shape_node = f["output_shape"]
        if not r.is_sequence(shape_node):
            r.error(shape_node, "output_shape is a list such as [null, 10]")
            return None
        dims = []
        for item in r.items(shape_node):
            value = r.value(item)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                r.error(item, "a dimension is a whole number or null")
            dims.append(value)
        op = r.string(f["op"], "op") if "op" in f else "=="
        if op not in ("==", "!="):
            r.error(f["op"], "op is == or !=")
        index = r.value(f["index"]) if "index" in f else None
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            r.error(f["index"], "index is a whole number ≥ 0")
            index = None
        return AssertShape(op, tuple(dims), index, span=span)


@dataclass(frozen=True)
class AssertEquivalent(Check):
    """``remove where type=Dropout; assert equivalent`` — same outputs as the input model on seeded
    random probe inputs, in inference mode (maximum absolute difference ≤ tolerance; by default 1e-5 on
    a CPU, whatever the backend, and more on a GPU or TPU: keras_io.backend.default_tolerance)."""

    tolerance: Union[int, float, ParamRef, None] = None
    span: Span | None = field(**SPAN)
    rules = ("assert_equivalent",)
    wants_reference = True

    def __str__(self) -> str:
        return "assert equivalent" + (f" tolerance {format_value(self.tolerance)}" if self.tolerance is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        tolerance = c.number(node.children[0]) if node.children else None
        if isinstance(tolerance, (int, float)) and tolerance < 0:
            c.error("a tolerance is a number ≥ 0", node.children[0])
        return cls(tolerance, span=span)

    def yaml(self, w):
        body = {"equivalent": True}
        if self.tolerance is not None:
            body["tolerance"] = w.value(self.tolerance)
        return {"assert": body}

    def run(self, ctx):
        import numpy as np
        if self.tolerance is None:
            tolerance, which = ctx.default_tolerance()  # (1e-5 on a CPU; larger on an accelerator)
        else:
            tolerance = ctx.number(self.tolerance, self)
            which = "the recipe's"
        _, expected = ctx.reference
        _, outputs = ctx.probe_outputs(self)
        if outputs is None:
            raise AssertionFailed("assert equivalent failed: the model's inputs changed", span=self.span)
        if len(outputs) < len(expected):
            raise AssertionFailed(f"assert equivalent failed: the model has {len(outputs)} outputs, the input model "
                                  f"had {len(expected)}", span=self.span)
        worst = 0.0
        for k, (got, want) in enumerate(zip(outputs, expected)):
            if got.shape != want.shape:
                raise AssertionFailed(f"assert equivalent failed: output {k} has shape {got.shape}, was "
                                      f"{want.shape}", span=self.span)
            got, want = got.astype("float64"), want.astype("float64")
            # NaN and infinities are no numbers to subtract (NaN - x is NaN, which max() and `>` ignore):
            # a value is the same only where both are NaN or both the same infinity
            finite_got, finite_want = np.isfinite(got), np.isfinite(want)
            same = (finite_got & finite_want) | (np.isnan(got) & np.isnan(want)) | \
                (np.isinf(got) & np.isinf(want) & (got == want))
            if not same.all():
                n = int((~same).sum())
                became = ~same & ~finite_got & finite_want
                what = (f"{n} NaN or infinite value{'s' if n != 1 else ''} where the input model's output is finite"
                        if became.sum() == n else
                        f"{n} value{'s' if n != 1 else ''} that are NaN or infinite in one model and not the same "
                        "in the other")
                raise AssertionFailed(f"assert equivalent failed: output {k} has {what}", span=self.span)
            both = finite_got & finite_want
            worst = max(worst, float(np.max(np.abs(got[both] - want[both]))) if both.any() else 0.0)
        if worst > tolerance:
            raise AssertionFailed(f"assert equivalent failed: outputs differ by up to {worst:.3g} "
                                  f"(tolerance {tolerance:g}, {which})", span=self.span)
        # the largest difference depends on the backend and the device, so provenance keeps only the verdict
        recorded = "holds (the default tolerance)" if self.tolerance is None else f"holds (tolerance {tolerance:g})"
        return ctx.report(self, notes=[f"holds: largest difference {worst:.3g} (tolerance {tolerance:g}, {which})"],
                          record=[recorded])


@dataclass(frozen=True)
class AssertCount(Check):
    """``select where type=Dense; assert count == 3``."""

    op: str
    value: Union[int, ParamRef]
    span: Span | None = field(**SPAN)
    rules = ("assert_count",)
    needs_selection = True
    needs = "archive"

    def __str__(self) -> str:
        return f"assert count {self.op} {format_value(self.value)}"

    @classmethod
    def compile(cls, c, node, span):
        value = c.number(node.children[1])
        if isinstance(value, float):
            c.error("assert count compares with a whole number", node.children[1])
        return cls(c.cmp(node.children[0]), value, span=span)

    def yaml(self, w):
        return {"assert": {"count": f"{self.op} {format_value(self.value)}"}}

    def run(self, ctx):
        n = len(ctx.selected(self))
        want = ctx.number(self.value, self)
        if not compare(self.op, n, want):
            raise AssertionFailed(f"assert failed: the selection has {n} layer{'s' if n != 1 else ''}, "
                                  f"expected count {self.op} {want}", span=self.span)
        return ctx.report(self, notes=[f"holds: count is {n}"])


@dataclass(frozen=True)
class AssertParams(Check):
    """``assert params < 30M`` — all parameters of the model, trainable or not."""

    op: str
    value: Union[int, float, ParamRef]
    span: Span | None = field(**SPAN)
    rules = ("assert_params",)

    def __str__(self) -> str:
        return f"assert params {self.op} {format_size(self.value)}"

    @classmethod
    def compile(cls, c, node, span):
        return cls(c.cmp(node.children[0]), c.quantity(node.children[1]), span=span)

    def yaml(self, w):
        return {"assert": {"params": f"{self.op} {format_size(self.value)}"}}

    def run(self, ctx):
        n = ctx.param_count()
        want = ctx.number(self.value, self)
        if not compare(self.op, n, want):
            raise AssertionFailed(f"assert failed: the model has {n:,} parameters, expected params {self.op} "
                                  f"{format_size(want)}", span=self.span)
        return ctx.report(self, notes=[f"holds: {n:,} parameters"])


@dataclass(frozen=True)
class AssertShape(Check):
    """``assert output shape == (None, 10)``; ``assert output 1 shape == (None, 26, 26, 8)``."""

    op: str
    shape: tuple
    index: int | None = None
    span: Span | None = field(**SPAN)
    rules = ("assert_shape",)

    def __str__(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        if len(self.shape) == 1:
            dims += ","
        where = "output" if self.index is None else f"output {self.index}"
        return f"assert {where} shape {self.op} ({dims})"

    @classmethod
    def compile(cls, c, node, span):
        kids = list(node.children)
        index = c.leading_index(kids, node, "an output index")
        op = c.cmp(kids[0])
        if op not in ("==", "!="):
            c.error("shapes compare with == or !=", kids[0])
        dims = c.dims(kids[1], 0, "a dimension is a whole number or None")
        return cls(op, tuple(dims), index, span=span)

    def yaml(self, w):
        body = {"output_shape": list(self.shape)}
        if self.op != "==":
            body["op"] = self.op
        if self.index is not None:
            body["index"] = self.index
        return {"assert": body}

    def run(self, ctx):
        outputs = ctx.output_shapes()
        index = self.index or 0
        if index >= len(outputs):
            raise ApplyError(f"the model has {len(outputs)} output{'s' if len(outputs) != 1 else ''}; "
                             f"there is no output {index}", span=self.span)
        shape = outputs[index]
        equal = shape == tuple(self.shape)
        if equal != (self.op == "=="):
            raise AssertionFailed(f"assert failed: output {index} has shape {_fmt_shape(shape)}, expected "
                                  f"shape {self.op} {_fmt_shape(self.shape)}", span=self.span)
        return ctx.report(self, notes=[f"holds: output {index} has shape {_fmt_shape(shape)}"])


def _fmt_shape(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"
