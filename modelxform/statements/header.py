"""Header statements: recipe, requires, seed, param, include. They change nothing in the model: the
compiler checks them and the run reads the seed and the parameters."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from ..ir import SPAN, ParamRef, Program, Statement, Value, format_value, quote, unquote
from ..source import Span


class Header(Statement):
    role = "header"
    needs = "nothing"


@dataclass(frozen=True)
class RecipeHeader(Header):
    """``recipe "prep" version "1.0.0"``: the recipe's name and version (recorded in provenance)."""

    name: str
    version: str | None = None
    span: Span | None = field(**SPAN)
    keyword = "recipe"
    rules = ("recipe_stmt",)
    yaml_key = "recipe"

    def __str__(self) -> str:
        text = f"recipe {quote(self.name)}"
        return text + (f" version {quote(self.version)}" if self.version is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        toks = node.children
        name = unquote(toks[0].value)
        version = unquote(toks[1].value) if len(toks) > 1 else None
        if version is not None and not re.fullmatch(r"\d+(\.\d+)*([.-]?[A-Za-z0-9]+)*", version):
            c.error(f"recipe version {version!r} is not a version number such as \"1.2.0\"", toks[1])
        return cls(name, version, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "recipe", {"name": True, "version": False})
        if f is None or "name" not in f:
            return None
        version = r.string(f["version"], "version") if "version" in f else None
        return cls(r.string(f["name"], "name") or "", version, span=span)

    def yaml(self, w):
        return {"recipe": {"name": self.name, **({"version": self.version} if self.version is not None else {})}}


@dataclass(frozen=True)
class Requires(Header):
    """``requires modelxform ">=0.2"``: refuse to run on a modelxform that does not satisfy it."""

    spec: str
    span: Span | None = field(**SPAN)
    keyword = "requires"
    rules = ("requires_stmt",)
    yaml_key = "requires"

    def __str__(self) -> str:
        return f"requires modelxform {quote(self.spec)}"

    @classmethod
    def compile(cls, c, node, span):
        spec = unquote(node.children[0].value)
        problem = requires_problem(spec)
        if problem:
            c.error(problem[0], node.children[0], hint=problem[1])
        return cls(spec, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        spec = r.string(body, "requires") or ""
        problem = requires_problem(spec)
        if problem:
            r.error(body, problem[0], hint=problem[1])
        return cls(spec, span=span)

    def yaml(self, w):
        return {"requires": self.spec}


def requires_problem(spec: str) -> tuple[str, str | None] | None:
    """(message, hint) when the running modelxform does not satisfy ``requires modelxform SPEC``."""
    from ..version import VersionSpecError, __version__, satisfies
    try:
        if satisfies(__version__, spec):
            return None
    except VersionSpecError as exc:
        return str(exc), None
    return (f"this recipe requires modelxform {spec}, but this is modelxform {__version__}",
            "upgrade modelxform, or relax the `requires` line")


@dataclass(frozen=True)
class Seed(Header):
    """``seed 42``: the default seed (``--seed`` overrides it)."""

    value: Union[int, ParamRef]
    span: Span | None = field(**SPAN)
    keyword = "seed"
    rules = ("seed_stmt",)
    yaml_key = "seed"

    def __str__(self) -> str:
        return f"seed {format_value(self.value)}"

    @classmethod
    def compile(cls, c, node, span):
        value = c.number(node.children[0])
        if not isinstance(value, ParamRef) and (not isinstance(value, int) or value < 0):
            c.error(f"seed must be a whole number ≥ 0, not {node.children[0].value}", node.children[0])
        return cls(value, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        return cls(r.number(body, "seed"), span=span)

    def yaml(self, w):
        return {"seed": w.value(self.value)}


@dataclass(frozen=True)
class Param(Header):
    """``param factor = 0.8``: a value the recipe uses as ``$factor`` (``--param factor=0.5`` overrides)."""

    name: str
    value: Value
    span: Span | None = field(**SPAN)
    keyword = "param"
    rules = ("param_stmt",)
    yaml_key = "param"

    def __str__(self) -> str:
        return f"param {self.name} = {format_value(self.value)}"

    @classmethod
    def compile(cls, c, node, span):
        value = c.value(node.children[1])
        if isinstance(value, ParamRef):
            c.error("a parameter's default must be a literal value, not another parameter", node.children[1])
        return cls(node.children[0].value, value, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "param", {"name": True, "value": True})
        if not f or len(f) < 2:
            return None
        return cls(r.string(f["name"], "name") or "", r.value(f["value"]), span=span)

    def yaml(self, w):
        return {"param": {"name": self.name, "value": w.value(self.value)}}


@dataclass(frozen=True)
class Include(Header):
    """``include "common.recipe"``: the statements of another recipe file, in place (inlined in the
    recorded provenance)."""

    path: str
    program: Program
    span: Span | None = field(**SPAN)
    keyword = "include"
    rules = ("include_stmt",)
    yaml_key = "include"

    def __str__(self) -> str:
        return f"include {quote(self.path)}"

    @classmethod
    def compile(cls, c, node, span):
        path = unquote(node.children[0].value)
        sub = c.loader(path, span, c)
        return cls(path, sub, span=span) if sub is not None else None

    @classmethod
    def read_yaml(cls, r, body, span):
        path = r.string(body, "include")
        if path is None:
            return None
        return r.include(path, span, body)

    def yaml(self, w):
        return {"include": self.path}
