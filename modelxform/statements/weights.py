"""Weight statements: scale, add noise, reinit, set … to, clip, prune, freeze, unfreeze, load weights.

They change variables of the selected layers in place and never rebuild the graph. Layers that no
statement touches keep bit-identical weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..ir import SPAN, Call, ParamRef, Percent, Statement, format_value, quote, unquote
from ..source import Span

NOISE_DISTRIBUTIONS = {"normal": ("mean", "stddev"), "uniform": ("low", "high")}
# `set … to` with these runs on a .keras archive (numpy gives the values keras.initializers would)
CONSTANT_FILLS = {"zeros": "zeros", "Zeros": "zeros", "ones": "ones", "Ones": "ones",
                  "constant": "constant", "Constant": "constant"}


class WeightStatement(Statement):
    role = "weights"
    needs_selection = True
    plan_tag = "weights"


def _target(f, r) -> str:
    return r.string(f["target"], "target") or "weights" if "target" in f else "weights"


@dataclass(frozen=True)
class Scale(WeightStatement):
    """``select where type=Dense; scale kernel 0.8`` — multiply the arrays by a factor."""

    target: str
    factor: Union[int, float, ParamRef]
    span: Span | None = field(**SPAN)
    keyword = "scale"
    rules = ("scale_stmt",)
    yaml_key = "scale"
    needs = "archive"

    def __str__(self) -> str:
        return f"scale {self.target} {format_value(self.factor)}"

    @classmethod
    def compile(cls, c, node, span):
        return cls(c.target(node.children[0]), c.number(node.children[1]), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "scale", {"target": True, "factor": True})
        if not f or "factor" not in f:
            return None
        return cls(_target(f, r), r.number(f["factor"], "factor"), span=span)

    def yaml(self, w):
        return {"scale": {"target": self.target, "factor": w.value(self.factor)}}


@dataclass(frozen=True)
class AddNoise(WeightStatement):
    """``select all; add noise normal(stddev=0.01) to kernel`` — seeded, per layer and variable."""

    distribution: Call
    target: str
    span: Span | None = field(**SPAN)
    keyword = "add noise"
    rules = ("noise_stmt",)
    yaml_key = "add_noise"
    needs = "archive"

    def __str__(self) -> str:
        return f"add noise {self.distribution} to {self.target}"

    @classmethod
    def compile(cls, c, node, span):
        dist = c.call(node.children[0])
        allowed = NOISE_DISTRIBUTIONS.get(dist.name)
        if allowed is None:
            guess = c.suggest(dist.name, NOISE_DISTRIBUTIONS)
            c.error(f"unknown noise distribution {dist.name!r}"
                    + (f" (did you mean {guess!r}?)" if guess else "")
                    + "; use normal(mean=…, stddev=…) or uniform(low=…, high=…)", node.children[0])
        else:
            if dist.args:
                c.error(f"{dist.name}(…) takes keyword arguments: {', '.join(a + '=' for a in allowed)}",
                        node.children[0])
            for key, value in dist.kwargs:
                if key not in allowed:
                    c.error(f"{dist.name}() has no argument {key!r}; it takes {', '.join(allowed)}",
                            node.children[0])
                elif not isinstance(value, (int, float, ParamRef)) or isinstance(value, bool):
                    c.error(f"{dist.name}({key}=…) must be a number", node.children[0])
        return cls(dist, c.target(node.children[1]), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "add_noise", {"target": True, "normal": False, "uniform": False})
        if f is None:
            return None
        dists = [d for d in ("normal", "uniform") if d in f]
        if len(dists) != 1:
            r.error(body, "add_noise takes exactly one of: normal, uniform")
            return None
        name = dists[0]
        args_node = f[name]
        kwargs = []
        if r.is_mapping(args_node):
            args = r.mapping(args_node, name, {k: False for k in NOISE_DISTRIBUTIONS[name]})
            kwargs = [(k, r.number(v, k)) for k, v in (args or {}).items()]
        elif not r.is_null(args_node):
            r.error(args_node, f"{name} takes a mapping of its arguments")
        call = Call(name, (), tuple(kwargs), span=r.span(args_node))
        return cls(call, _target(f, r), span=span)

    def yaml(self, w):
        return {"add_noise": {"target": self.target,
                              self.distribution.name: {k: w.value(v) for k, v in self.distribution.kwargs} or None}}


@dataclass(frozen=True)
class Reinit(WeightStatement):
    """``select last 1 where type=Dense; reinit weights`` — the layer's own initializers, seeded."""

    target: str
    initializer: Call | None = None
    span: Span | None = field(**SPAN)
    keyword = "reinit"
    rules = ("reinit_stmt",)
    yaml_key = "reinit"

    def __str__(self) -> str:
        text = f"reinit {self.target}"
        return text + (f" with {self.initializer}" if self.initializer is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        init = c.initializer(node.children[1]) if len(node.children) > 1 else None
        return cls(c.target(node.children[0]), init, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "reinit", {"target": True, "with": False})
        if f is None:
            return None
        init = r.call(f["with"], "an initializer") if "with" in f else None
        return cls(_target(f, r), init, span=span)

    def yaml(self, w):
        body = {"target": self.target}
        if self.initializer is not None:
            body["with"] = w.call(self.initializer)
        return {"reinit": body}


@dataclass(frozen=True)
class Fill(WeightStatement):
    """``select all; set bias to zeros`` — fill with a constant initializer (or any initializer)."""

    target: str
    initializer: Call
    span: Span | None = field(**SPAN)
    keyword = "set"
    rules = ("fill_stmt",)
    yaml_key = "set"

    @property
    def needs(self) -> str:  # type: ignore[override]
        return "archive" if self.initializer.name in CONSTANT_FILLS else "model"

    def __str__(self) -> str:
        return f"set {self.target} to {self.initializer}"

    @classmethod
    def compile(cls, c, node, span):
        return cls(c.target(node.children[0]), c.initializer(node.children[1]), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "set", {"target": True, "to": True})
        if not f or "to" not in f:
            return None
        init = r.call(f["to"], "an initializer")
        return cls(_target(f, r), init, span=span) if init else None

    def yaml(self, w):
        return {"set": {"target": self.target, "to": w.call(self.initializer)}}


@dataclass(frozen=True)
class Clip(WeightStatement):
    """``select all; clip kernel -1 1``."""

    target: str
    low: Union[int, float, ParamRef]
    high: Union[int, float, ParamRef]
    span: Span | None = field(**SPAN)
    keyword = "clip"
    rules = ("clip_stmt",)
    yaml_key = "clip"
    needs = "archive"

    def __str__(self) -> str:
        return f"clip {self.target} {format_value(self.low)} {format_value(self.high)}"

    @classmethod
    def compile(cls, c, node, span):
        low, high = c.number(node.children[1]), c.number(node.children[2])
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            c.error(f"clip bounds are in the wrong order: {low} > {high}", node)
        return cls(c.target(node.children[0]), low, high, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "clip", {"target": True, "low": True, "high": True})
        if not f or "low" not in f or "high" not in f:
            return None
        return cls(_target(f, r), r.number(f["low"], "low"), r.number(f["high"], "high"), span=span)

    def yaml(self, w):
        return {"clip": {"target": self.target, "low": w.value(self.low), "high": w.value(self.high)}}


@dataclass(frozen=True)
class Prune(WeightStatement):
    """``select where type=Dense; prune kernel 50%`` — magnitude pruning of each array."""

    target: str
    amount: Percent
    span: Span | None = field(**SPAN)
    keyword = "prune"
    rules = ("prune_stmt",)
    yaml_key = "prune"
    needs = "archive"

    def __str__(self) -> str:
        return f"prune {self.target} {self.amount}"

    @classmethod
    def compile(cls, c, node, span):
        tok = node.children[1].children[0]
        if tok.type == "PARAM":
            amount = Percent(ParamRef(tok.value[1:], span=c.span(tok)))
        else:
            value = c.number_text(tok.value[:-1], tok)
            if not 0 <= value <= 100:
                c.error(f"prune takes a percentage from 0% to 100%, not {tok.value}", tok)
            amount = Percent(value)
        return cls(c.target(node.children[0]), amount, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "prune", {"target": True, "percent": True})
        if not f or "percent" not in f:
            return None
        return cls(_target(f, r), Percent(r.number(f["percent"], "percent")), span=span)

    def yaml(self, w):
        return {"prune": {"target": self.target, "percent": w.value(self.amount.value)}}


@dataclass(frozen=True)
class Freeze(WeightStatement):
    """``select all; freeze`` — set trainable to False (saved with the model)."""

    span: Span | None = field(**SPAN)
    keyword = "freeze"
    rules = ("freeze_stmt",)
    yaml_key = "freeze"
    yaml_bare = True
    needs = "archive"
    plan_tag = None  # the report marks it from the trainable flags (frozen)

    def __str__(self) -> str:
        return "freeze"

    @classmethod
    def compile(cls, c, node, span):
        return cls(span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        return cls(span=span)

    def yaml(self, w):
        return "freeze"


@dataclass(frozen=True)
class Unfreeze(WeightStatement):
    """``select last 2 where has weights; unfreeze``."""

    span: Span | None = field(**SPAN)
    keyword = "unfreeze"
    rules = ("unfreeze_stmt",)
    yaml_key = "unfreeze"
    yaml_bare = True
    needs = "archive"
    plan_tag = None

    def __str__(self) -> str:
        return "unfreeze"

    @classmethod
    def compile(cls, c, node, span):
        return cls(span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        return cls(span=span)

    def yaml(self, w):
        return "unfreeze"


@dataclass(frozen=True)
class LoadWeights(WeightStatement):
    """``select all; load weights from "base.keras"`` — matched by layer path, then by unique name."""

    path: str
    strict: bool = False
    span: Span | None = field(**SPAN)
    keyword = "load"
    rules = ("load_stmt",)
    yaml_key = "load_weights"

    def __str__(self) -> str:
        return f"load weights from {quote(self.path)}" + (" strict" if self.strict else "")

    @classmethod
    def compile(cls, c, node, span):
        return cls(unquote(node.children[0].value), len(node.children) > 1, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "load_weights", {"from": True, "strict": False})
        if not f or "from" not in f:
            return None
        strict = r.flag(f, "strict")
        return cls(r.string(f["from"], "from") or "", strict, span=span)

    def yaml(self, w):
        body = {"from": self.path}
        if self.strict:
            body["strict"] = True
        return {"load_weights": body}
