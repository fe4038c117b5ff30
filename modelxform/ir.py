"""The compiled form of a recipe: one frozen dataclass per statement kind.

``str(node)`` is the node's canonical recipe text (what ``fmt`` prints), and compiling that text gives an
equal node: spans are excluded from equality, so positions never make two programs differ.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Union

from .source import Span

_SPAN = dict(default=None, compare=False, repr=False, kw_only=True)
_KEYWORDS = {
    "recipe", "version", "requires", "modelxform", "seed", "param", "include", "select", "all",
    "where", "random", "first", "last", "layer", "type", "in", "name", "trainable", "params", "has",
    "weights", "and", "or", "not", "scale", "add", "noise", "to", "reinit", "with", "set", "clip",
    "prune", "freeze", "unfreeze", "replace", "selected", "tap", "only", "assert", "count", "output",
    "shape", "True", "true", "False", "false", "None", "none", "insert", "after", "before", "remove",
    "swap", "shuffle", "cut", "append", "rename", "prefix", "load", "from", "strict", "equivalent",
    "tolerance",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ---- values ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamRef:
    """``$name``: replaced by the parameter's value when the recipe is bound to a model."""

    name: str
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"${self.name}"


@dataclass(frozen=True)
class Percent:
    """``25%``; ``value`` is the number before the sign (or a ParamRef holding it)."""

    value: Union[float, int, ParamRef]

    def __str__(self) -> str:
        return f"{format_value(self.value)}%"


Value = Union[int, float, str, bool, None, tuple, list, ParamRef, Percent]


def quote(text: str) -> str:
    """Double-quote ``text`` so that the recipe lexer reads back exactly ``text``."""
    out = []
    for i, ch in enumerate(text):
        if ch == '"':
            out.append('\\"')
        elif ch == "\\" and (i + 1 == len(text) or text[i + 1] in '"\\'):
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def unquote(token: str) -> str:
    """Inverse of :func:`quote`: ``\\"`` and ``\\\\`` are escapes, ``\\n`` a newline, any other
    backslash is literal (so regexes such as ``"conv\\d+"`` need no doubling)."""
    body = token[1:-1]
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in '"\\n':
            nxt = body[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def format_number(value: int | float) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 1e16:
        return f"{int(value)}.0"
    return repr(value)


def format_size(value: int | float) -> str:
    """Whole numbers of thousands or millions print with a K/M/G suffix (``30M``)."""
    if isinstance(value, int) and value != 0:
        for suffix, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
            if value % scale == 0:
                return f"{value // scale}{suffix}"
    return format_value(value)


def format_value(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)  # ParamRef, Percent


def format_word(word: str) -> str:
    """A name as a bare word when it lexes as one, else quoted (only where the grammar takes both)."""
    return word if _WORD.match(word) else quote(word)


@dataclass(frozen=True)
class Call:
    """``Name(arg, key=value, …)`` — a layer constructor, initializer or noise distribution.

    ``bare`` is a name written without parentheses (``with AveragePooling2D``, ``with he_normal``).
    """

    name: str
    args: tuple = ()  # positional values
    kwargs: tuple = ()  # (key, value) pairs in written order
    bare: bool = False
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        if self.bare:
            return self.name
        parts = [format_value(v) for v in self.args] + [f"{k}={format_value(v)}" for k, v in self.kwargs]
        return f"{self.name}({', '.join(parts)})"


# ---- layer references ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A layer reference. ``kind`` is ``name`` (a path such as ``backbone/conv1``), ``glob``
    (a quoted pattern, which may also be an exact name) or ``type`` (every layer of a class)."""

    kind: str
    text: str
    explicit: bool = False  # written as `layer X` / `type X`
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        if self.kind == "glob":
            return quote(self.text)
        if self.kind == "type":
            return f"type {self.text}" if self.explicit else self.text
        if self.explicit or any(part in _KEYWORDS for part in self.text.split("/")):
            return f"layer {self.text}"
        return self.text


# ---- predicates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PType:
    names: tuple[str, ...]
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        if len(self.names) == 1:
            return f"type={self.names[0]}"
        return f"type in ({', '.join(self.names)})"


@dataclass(frozen=True)
class PName:
    name: str
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"name={format_word(self.name)}"


@dataclass(frozen=True)
class PRegex:
    pattern: str
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"name ~ {quote(self.pattern)}"


@dataclass(frozen=True)
class PTrainable:
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return "trainable"


@dataclass(frozen=True)
class PHasWeights:
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return "has weights"


@dataclass(frozen=True)
class PParams:
    op: str
    value: Union[int, float, ParamRef]
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"params {self.op} {format_size(self.value)}"


@dataclass(frozen=True)
class PNot:
    operand: "Pred"
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"not ({inner})" if isinstance(self.operand, (PAnd, POr)) else f"not {inner}"


@dataclass(frozen=True)
class PAnd:
    left: "Pred"
    right: "Pred"
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        def side(p, right):
            text = str(p)
            return f"({text})" if isinstance(p, POr) or (right and isinstance(p, PAnd)) else text
        return f"{side(self.left, False)} and {side(self.right, True)}"


@dataclass(frozen=True)
class POr:
    left: "Pred"
    right: "Pred"
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        right = f"({self.right})" if isinstance(self.right, POr) else str(self.right)
        return f"{self.left} or {right}"


Pred = Union[PType, PName, PRegex, PTrainable, PHasWeights, PParams, PNot, PAnd, POr]


# ---- statements ------------------------------------------------------------------------------

class Statement:
    """Marker base class; every statement has a ``span`` and a canonical ``__str__``."""

    structural = False  # changes the graph (queued and rebuilt in one go)
    needs_selection = False


@dataclass(frozen=True)
class RecipeHeader(Statement):
    name: str
    version: str | None = None
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        text = f"recipe {quote(self.name)}"
        return text + (f" version {quote(self.version)}" if self.version is not None else "")


@dataclass(frozen=True)
class Requires(Statement):
    spec: str
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"requires modelxform {quote(self.spec)}"


@dataclass(frozen=True)
class Seed(Statement):
    value: Union[int, ParamRef]
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"seed {format_value(self.value)}"


@dataclass(frozen=True)
class Param(Statement):
    name: str
    value: Value
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"param {self.name} = {format_value(self.value)}"


@dataclass(frozen=True)
class Include(Statement):
    path: str
    program: "Program"
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"include {quote(self.path)}"


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
    selector: Selector
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"select {self.selector}"


@dataclass(frozen=True)
class Scale(Statement):
    target: str
    factor: Union[int, float, ParamRef]
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"scale {self.target} {format_value(self.factor)}"


@dataclass(frozen=True)
class AddNoise(Statement):
    distribution: Call
    target: str
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"add noise {self.distribution} to {self.target}"


@dataclass(frozen=True)
class Reinit(Statement):
    target: str
    initializer: Call | None = None
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        text = f"reinit {self.target}"
        return text + (f" with {self.initializer}" if self.initializer is not None else "")


@dataclass(frozen=True)
class Fill(Statement):
    target: str
    initializer: Call
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"set {self.target} to {self.initializer}"


@dataclass(frozen=True)
class Clip(Statement):
    target: str
    low: Union[int, float, ParamRef]
    high: Union[int, float, ParamRef]
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"clip {self.target} {format_value(self.low)} {format_value(self.high)}"


@dataclass(frozen=True)
class Prune(Statement):
    target: str
    amount: Percent
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"prune {self.target} {self.amount}"


@dataclass(frozen=True)
class Freeze(Statement):
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return "freeze"


@dataclass(frozen=True)
class Unfreeze(Statement):
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return "unfreeze"


@dataclass(frozen=True)
class Replace(Statement):
    """``source`` is a Ref (a layer, or every layer of a type) or None for ``selected``."""

    source: Ref | None
    replacement: Call
    span: Span | None = field(**_SPAN)
    structural = True

    @property
    def needs_selection(self) -> bool:  # type: ignore[override]
        return self.source is None

    def __str__(self) -> str:
        source = "selected" if self.source is None else str(self.source)
        repl = str(self.replacement)
        if self.replacement.bare and self.replacement.name in _KEYWORDS:
            repl = f"type {repl}"
        return f"replace {source} with {repl}"


@dataclass(frozen=True)
class Tap(Statement):
    refs: tuple[Ref, ...]
    only: bool = False
    span: Span | None = field(**_SPAN)
    structural = True

    def __str__(self) -> str:
        return "tap " + ", ".join(str(r) for r in self.refs) + (" only" if self.only else "")


@dataclass(frozen=True)
class Insert(Statement):
    """``insert Dropout(rate=0.5) after fc1`` / ``insert BatchNormalization() before conv2d_2``."""

    layer: Call
    where: str  # "after" or "before"
    anchor: Ref
    span: Span | None = field(**_SPAN)
    structural = True

    def __str__(self) -> str:
        return f"insert {self.layer} {self.where} {self.anchor}"


@dataclass(frozen=True)
class Remove(Statement):
    """``remove dropout_1`` / ``remove selected`` / ``remove where type=Dropout``."""

    refs: tuple = ()
    pred: Pred | None = None
    selected: bool = False
    span: Span | None = field(**_SPAN)
    structural = True

    @property
    def needs_selection(self) -> bool:  # type: ignore[override]
        return self.selected

    def __str__(self) -> str:
        if self.selected:
            return "remove selected"
        if self.pred is not None:
            return f"remove where {self.pred}"
        return "remove " + ", ".join(str(r) for r in self.refs)


@dataclass(frozen=True)
class Swap(Statement):
    first: Ref
    second: Ref
    span: Span | None = field(**_SPAN)
    structural = True

    def __str__(self) -> str:
        return f"swap {self.first} {self.second}"


@dataclass(frozen=True)
class Shuffle(Statement):
    """A seeded permutation of the positions of the selected layers."""

    span: Span | None = field(**_SPAN)
    structural = True
    needs_selection = True

    def __str__(self) -> str:
        return "shuffle"


@dataclass(frozen=True)
class Cut(Statement):
    anchor: Ref
    span: Span | None = field(**_SPAN)
    structural = True

    def __str__(self) -> str:
        return f"cut after {self.anchor}"


@dataclass(frozen=True)
class Append(Statement):
    layer: Call
    anchor: Ref | None = None
    span: Span | None = field(**_SPAN)
    structural = True

    def __str__(self) -> str:
        return f"append {self.layer}" + (f" after {self.anchor}" if self.anchor is not None else "")


@dataclass(frozen=True)
class SetConfig(Statement):
    """``set activation = "relu6"`` — a config field of every selected layer."""

    key: str
    value: Value
    span: Span | None = field(**_SPAN)
    structural = True
    needs_selection = True

    def __str__(self) -> str:
        return f"set {self.key} = {format_value(self.value)}"


@dataclass(frozen=True)
class Rename(Statement):
    """``rename to "stem_conv"`` (one selected layer) or ``rename prefix "ft_"``."""

    mode: str  # "to" or "prefix"
    text: str
    span: Span | None = field(**_SPAN)
    structural = True
    needs_selection = True

    def __str__(self) -> str:
        return f"rename {self.mode} {quote(self.text)}"


@dataclass(frozen=True)
class LoadWeights(Statement):
    path: str
    strict: bool = False
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"load weights from {quote(self.path)}" + (" strict" if self.strict else "")


@dataclass(frozen=True)
class AssertEquivalent(Statement):
    tolerance: Union[int, float, ParamRef, None] = None
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return "assert equivalent" + (f" tolerance {format_value(self.tolerance)}" if self.tolerance is not None else "")


@dataclass(frozen=True)
class AssertCount(Statement):
    op: str
    value: Union[int, ParamRef]
    span: Span | None = field(**_SPAN)
    needs_selection = True

    def __str__(self) -> str:
        return f"assert count {self.op} {format_value(self.value)}"


@dataclass(frozen=True)
class AssertParams(Statement):
    op: str
    value: Union[int, float, ParamRef]
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        return f"assert params {self.op} {format_size(self.value)}"


@dataclass(frozen=True)
class AssertShape(Statement):
    op: str
    shape: tuple
    index: int | None = None
    span: Span | None = field(**_SPAN)

    def __str__(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        if len(self.shape) == 1:
            dims += ","
        where = "output" if self.index is None else f"output {self.index}"
        return f"assert {where} shape {self.op} ({dims})"


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]
    filename: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return "".join(f"{s}\n" for s in self.statements)

    def flat(self):
        """Statements with includes expanded in place (what actually runs)."""
        for stmt in self.statements:
            if isinstance(stmt, Include):
                yield from stmt.program.flat()
            else:
                yield stmt

    def header(self) -> RecipeHeader | None:
        for stmt in self.statements:
            if isinstance(stmt, RecipeHeader):
                return stmt
        return None

    def inlined_text(self) -> str:
        """Canonical text with every include replaced by the statements it brings in."""
        return "".join(f"{s}\n" for s in self.flat())


STATEMENT_TYPES = (RecipeHeader, Requires, Seed, Param, Include, Select, Scale, AddNoise, Reinit, Fill,
                   Clip, Prune, Freeze, Unfreeze, Replace, Tap, Insert, Remove, Swap, Shuffle, Cut, Append,
                   SetConfig, Rename, LoadWeights, AssertEquivalent, AssertCount, AssertParams, AssertShape)
# Statements that change nothing in the model: the runner handles them itself.
HEADER_TYPES = (RecipeHeader, Requires, Seed, Param, Include)
