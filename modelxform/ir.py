"""The compiled form of a recipe: values, layer references, predicates, and the Program.

The statement kinds themselves are frozen dataclasses declared in modelxform/statements/ (each with
its syntax, YAML form and pass); this module holds what they are made of and their common base.
``str(node)`` is a node's canonical recipe text (what ``fmt`` prints), and compiling that text gives an
equal node: spans are excluded from equality, so positions never make two programs differ.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Union

from .source import Span

SPAN = dict(default=None, compare=False, repr=False, kw_only=True)  # a statement's ``span`` field
_SPAN = SPAN
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def keywords() -> frozenset:
    """The grammar's keywords (every quoted word in grammar/recipe.lark): a layer named like one is
    written ``layer NAME`` in canonical text."""
    return _keywords()


@functools.lru_cache(maxsize=1)
def _keywords() -> frozenset:
    from .grammar_file import grammar_text
    text = re.sub(r"//[^\n]*", "", grammar_text())
    return frozenset(re.findall(r'"([A-Za-z_]+)"', text))


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
        if self.explicit or any(part in keywords() for part in self.text.split("/")):
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
    """The base of every statement kind. A kind is declared once, in a module of
    modelxform/statements/, as a frozen dataclass (with a ``span`` field and a canonical ``__str__``)
    that also says:

    - ``keyword``: how a user starts it (``"add noise"``); ``rules``: the grammar rules it compiles,
      with the classmethod ``compile(c, node, span)`` (``c``: the compiler, whose helpers read values,
      references and predicates);
    - ``yaml_key`` (and ``yaml_bare`` for a bare word such as ``freeze``), with the classmethod
      ``read_yaml(r, body, span)`` and the method ``yaml(w)`` for the YAML form (a statement with no
      arguments takes all of these and its text from :class:`Bare`);
    - ``run(ctx)``: its pass, which resolves it against the model through the run context and returns a
      StatementReport (with any array work deferred, so that a plan runs the same pass);
    - ``needs``: what the pass needs of the model: ``"archive"`` (the arrays and config of a .keras
      archive will do: no TensorFlow), ``"config"`` (a structural edit of the config), ``"model"`` (a
      built Keras model);
    - ``role`` (header, select, weights, structure, check) and ``plan_tag`` (how the HTML report marks
      the layers it names).
    """

    keyword = ""
    rules: tuple = ()
    yaml_key: str | None = None
    yaml_bare = False
    role = "edit"
    structural = False  # changes the graph (queued and rebuilt in one go)
    needs_selection = False
    needs = "model"
    wants_reference = False  # needs the input model's outputs before anything runs (assert equivalent)
    plan_tag: str | None = None

    @classmethod
    def compile(cls, c, node, span):
        raise NotImplementedError(cls.__name__)

    @classmethod
    def read_yaml(cls, r, body, span):
        raise NotImplementedError(cls.__name__)

    def yaml(self, w):
        raise NotImplementedError(type(self).__name__)

    def run(self, ctx):
        raise NotImplementedError(type(self).__name__)


class Bare:
    """A statement that is its words alone, with no arguments (``freeze``, ``fold batchnorm``): put before
    its statement kind's other bases. ``words``: its canonical text. In YAML it is the bare key
    (``- freeze``) or the key with nothing after it (``- freeze:``); anything given after the key is an
    error, where it would otherwise be dropped without a word (``- freeze: [dense_1]`` freezing the
    selection, not dense_1)."""

    words = ""
    yaml_bare = True

    def __str__(self) -> str:
        return self.words

    @classmethod
    def compile(cls, c, node, span):
        return cls(span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        if not r.is_null(body) and not r.is_word(body, cls.yaml_key):
            r.error(body, f"{cls.yaml_key} takes no arguments: write `- {cls.yaml_key}`",
                    hint="to choose the layers it acts on, put a `select` before it")
        return cls(span=span)

    def yaml(self, w):
        return self.yaml_key


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]
    filename: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return "".join(f"{s}\n" for s in self.statements)

    def flat(self):
        """Statements with includes expanded in place (what actually runs)."""
        for stmt in self.statements:
            inner = getattr(stmt, "program", None)
            if isinstance(inner, Program):
                yield from inner.flat()
            else:
                yield stmt

    @property
    def needs_keras(self) -> bool:
        """Whether running it builds a Keras model (a structural edit, a statement whose pass needs the
        built model, a comparison of outputs), where a .keras archive's own would otherwise do."""
        return any(s.needs != "archive" and s.needs != "nothing" or s.structural or s.wants_reference
                   for s in self.flat())

    def header(self):
        """The ``recipe "name" version "…"`` statement, if any."""
        for stmt in self.statements:
            if stmt.keyword == "recipe":
                return stmt
        return None

    def inlined_text(self) -> str:
        """Canonical text with every include replaced by the statements it brings in."""
        return "".join(f"{s}\n" for s in self.flat())


_CMP = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
}


def compare(op: str, left, right) -> bool:
    """``left OP right`` for a comparison operator of the language."""
    return _CMP[op](left, right)
