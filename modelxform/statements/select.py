"""``select``: which layers the statements after it act on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..ir import SPAN, ParamRef, Percent, Pred, Ref, Statement, format_value
from ..source import Span


@dataclass(frozen=True)
class SelAll:
    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class SelRefs:
    refs: tuple[Ref, ...]

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self.refs)


@dataclass(frozen=True)
class SelWhere:
    pred: Pred

    def __str__(self) -> str:
        return f"where {self.pred}"


@dataclass(frozen=True)
class SelSample:
    """``random``/``first``/``last`` [count] [where pred]; count None means one layer."""

    mode: str
    count: Union[int, Percent, ParamRef, None] = None
    pred: Pred | None = None

    def __str__(self) -> str:
        text = self.mode
        if self.count is not None:
            text += f" {format_value(self.count)}"
        if self.pred is not None:
            text += f" where {self.pred}"
        return text


Selector = Union[SelAll, SelRefs, SelWhere, SelSample]


@dataclass(frozen=True)
class Select(Statement):
    """``select all`` / ``select conv1, "block*"`` / ``select where type=Dense`` /
    ``select random 2 where has weights``: the selection that the statements after it act on."""

    selector: Selector
    span: Span | None = field(**SPAN)
    keyword = "select"
    rules = ("select_stmt",)
    yaml_key = "select"
    role = "select"
    needs = "archive"

    def __str__(self) -> str:
        return f"select {self.selector}"

    @classmethod
    def compile(cls, c, node, span):
        sel = node.children[0]
        kind = sel.data
        if kind == "sel_all":
            selector = SelAll()
        elif kind == "sel_refs":
            selector = SelRefs(tuple(c.ref(r) for r in sel.children))
        elif kind == "sel_where":
            selector = SelWhere(c.pred(sel.children[0]))
        else:
            mode = sel.children[0].data
            count = pred = None
            for child in sel.children[1:]:
                if child.data in ("count", "param_percent"):
                    count = c.count(child)
                else:
                    pred = c.pred(child)
            selector = SelSample(mode, count, pred)
        return cls(selector, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        if r.is_word(body, "all"):
            return cls(SelAll(), span=span)
        f = r.mapping(body, "select", {"all": False, "layers": False, "where": False, "random": False,
                                       "first": False, "last": False})
        if f is None:
            return None
        modes = [m for m in ("random", "first", "last") if m in f]
        if "layers" in f:
            if set(f) != {"layers"}:
                r.error(body, "select: `layers` does not combine with other keys")
            return cls(SelRefs(r.refs(f["layers"])), span=span)
        if len(modes) > 1:
            r.error(body, "select takes one of random, first, last")
            return None
        pred = r.pred(f["where"]) if "where" in f else None
        if not modes:
            if pred is None:
                if "where" not in f:
                    r.error(body, "select needs `all`, `layers`, `where`, or `random`/`first`/`last`")
                return None
            return cls(SelWhere(pred), span=span)
        mode = modes[0]
        count_node = f[mode]
        count = None
        if not r.is_null(count_node):
            stmt = r.text_piece(count_node, f"select {mode} ", f"select {mode}")
            count = stmt.selector.count if stmt is not None else None
        return cls(SelSample(mode, count, pred), span=span)

    def yaml(self, w):
        sel = self.selector
        if isinstance(sel, SelAll):
            return {"select": "all"}
        if isinstance(sel, SelRefs):
            return {"select": {"layers": [w.ref(r) for r in sel.refs]}}
        if isinstance(sel, SelWhere):
            return {"select": {"where": str(sel.pred)}}
        body = {sel.mode: w.count(sel.count)}
        if sel.pred is not None:
            body["where"] = str(sel.pred)
        return {"select": body}

    def run(self, ctx):
        infos = ctx.select(self)
        ctx.selection = [i.path for i in infos]
        return ctx.report(self, layers=list(ctx.selection),
                          notes=[f"{len(infos)} layer{'s' if len(infos) != 1 else ''}: "
                                 + abbreviate([i.path for i in infos])])


def abbreviate(paths: list[str], limit: int = 8) -> str:
    if len(paths) <= limit:
        return ", ".join(paths)
    return ", ".join(paths[:limit]) + f", … ({len(paths) - limit} more)"
