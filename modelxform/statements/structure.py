"""Structural statements: replace, tap, insert, remove, swap, shuffle, cut, append, set FIELD = VALUE,
rename.

They never touch a live model: each resolves its layers, checks what it can before anything changes,
and queues an edit on the graph editor's copy of the config; the model is rebuilt once per run of
consecutive structural statements.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..ir import SPAN, Call, Pred, Ref, Statement, Value, format_value, keywords, quote, unquote
from ..source import Span


class StructuralStatement(Statement):
    role = "structure"
    structural = True
    needs = "config"


@dataclass(frozen=True)
class Replace(StructuralStatement):
    """``replace MaxPooling2D with AveragePooling2D``; ``replace dense_2 with Dense(units=10)``.
    ``source`` is a Ref (a layer, or every layer of a type) or None for ``selected``."""

    source: Ref | None
    replacement: Call
    span: Span | None = field(**SPAN)
    keyword = "replace"
    rules = ("replace_stmt",)
    yaml_key = "replace"
    plan_tag = "replaced"

    @property
    def needs_selection(self) -> bool:  # type: ignore[override]
        return self.source is None

    def __str__(self) -> str:
        source = "selected" if self.source is None else str(self.source)
        repl = str(self.replacement)
        if self.replacement.bare and self.replacement.name in keywords():
            repl = f"type {repl}"
        return f"replace {source} with {repl}"

    @classmethod
    def compile(cls, c, node, span):
        src_node, repl_node = node.children
        source = None if src_node.data == "src_selected" else c.ref(src_node.children[0])
        if repl_node.data == "repl_type":
            tok = repl_node.children[0]
            replacement = Call(c.canonical_type(tok.value), bare=True, span=c.span(tok))
            c.check_type_name(tok.value, tok, strict=True)
        else:
            replacement = c.call(repl_node.children[0])
            c.check_type_name(replacement.name, repl_node, strict=True)
            replacement = Call(c.canonical_type(replacement.name), replacement.args, replacement.kwargs,
                               span=replacement.span)
            if replacement.args:
                c.error("layer constructors take keyword arguments only, e.g. Dense(units=10)", repl_node)
        return cls(source, replacement, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "replace", {"source": True, "with": True})
        if not f or "source" not in f or "with" not in f:
            return None
        src = f["source"]
        source = None if r.is_word(src, "selected") else r.ref(src)
        call = r.call(f["with"], "a layer type or constructor")
        if call is None:
            return None
        return cls(source, Call(r.canonical_type(call.name), call.args, call.kwargs, call.bare, span=call.span),
                   span=span)

    def yaml(self, w):
        return {"replace": {"source": "selected" if self.source is None else w.ref(self.source),
                            "with": w.call(self.replacement)}}


@dataclass(frozen=True)
class Tap(StructuralStatement):
    """``tap conv2d_1`` adds conv2d_1's output after the model's outputs; ``… only`` keeps just the taps."""

    refs: tuple[Ref, ...]
    only: bool = False
    span: Span | None = field(**SPAN)
    keyword = "tap"
    rules = ("tap_stmt",)
    yaml_key = "tap"

    def __str__(self) -> str:
        return "tap " + ", ".join(str(r) for r in self.refs) + (" only" if self.only else "")

    @classmethod
    def compile(cls, c, node, span):
        refs, only = [], False
        for child in node.children:
            if child.data == "only":
                only = True
                continue
            ref = c.ref(child)
            if ref.kind == "type":
                c.error(f"tap takes layer names, and {ref.text!r} is a layer type",
                        child, hint=f"write `layer {ref.text}` for a layer named so")
            refs.append(ref)
        return cls(tuple(refs), only, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "tap", {"layers": True, "only": False})
        if not f or "layers" not in f:
            return None
        return cls(r.refs(f["layers"]), r.flag(f, "only"), span=span)

    def yaml(self, w):
        body = {"layers": [w.ref(r) for r in self.refs]}
        if self.only:
            body["only"] = True
        return {"tap": body}


@dataclass(frozen=True)
class Insert(StructuralStatement):
    """``insert Dropout(rate=0.5) after fc1`` / ``insert BatchNormalization() before conv2d_2``."""

    layer: Call
    where: str  # "after" or "before"
    anchor: Ref
    span: Span | None = field(**SPAN)
    keyword = "insert"
    rules = ("insert_stmt",)
    yaml_key = "insert"

    def __str__(self) -> str:
        return f"insert {self.layer} {self.where} {self.anchor}"

    @classmethod
    def compile(cls, c, node, span):
        call_node, pos, anchor = node.children
        return cls(c.constructor(call_node), pos.data, c.layer_ref(anchor, "insert"), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "insert", {"layer": True, "after": False, "before": False})
        if not f or "layer" not in f:
            return None
        where = [w for w in ("after", "before") if w in f]
        if len(where) != 1:
            r.error(body, "insert takes exactly one of: after, before")
            return None
        layer, anchor = r.constructor(f["layer"], "a layer constructor"), r.ref(f[where[0]])
        return cls(layer, where[0], anchor, span=span) if layer and anchor else None

    def yaml(self, w):
        return {"insert": {"layer": w.call(self.layer), self.where: w.ref(self.anchor)}}


@dataclass(frozen=True)
class Remove(StructuralStatement):
    """``remove dropout_1`` / ``remove selected`` / ``remove where type=Dropout``."""

    refs: tuple = ()
    pred: Pred | None = None
    selected: bool = False
    span: Span | None = field(**SPAN)
    keyword = "remove"
    rules = ("remove_selected", "remove_where", "remove_refs")
    yaml_key = "remove"
    needs = "model"  # checks shapes on the built model

    @property
    def needs_selection(self) -> bool:  # type: ignore[override]
        return self.selected

    def __str__(self) -> str:
        if self.selected:
            return "remove selected"
        if self.pred is not None:
            return f"remove where {self.pred}"
        return "remove " + ", ".join(str(r) for r in self.refs)

    @classmethod
    def compile(cls, c, node, span):
        if node.data == "remove_selected":
            return cls(selected=True, span=span)
        if node.data == "remove_where":
            return cls(pred=c.pred(node.children[0]), span=span)
        return cls(refs=tuple(c.ref(r) for r in node.children), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        if r.is_word(body, "selected"):
            return cls(selected=True, span=span)
        f = r.mapping(body, "remove", {"layers": False, "where": False})
        if f is None or len(f) != 1:
            if f is not None:
                r.error(body, "remove takes `selected`, or exactly one of: layers, where")
            return None
        if "where" in f:
            pred = r.pred(f["where"])
            return cls(pred=pred, span=span) if pred is not None else None
        return cls(refs=r.refs(f["layers"]), span=span)

    def yaml(self, w):
        if self.selected:
            return {"remove": "selected"}
        if self.pred is not None:
            return {"remove": {"where": str(self.pred)}}
        return {"remove": {"layers": [w.ref(r) for r in self.refs]}}


@dataclass(frozen=True)
class Swap(StructuralStatement):
    """``swap dense_1 dense_2`` — the two layers change places (their weights go with them)."""

    first: Ref
    second: Ref
    span: Span | None = field(**SPAN)
    keyword = "swap"
    rules = ("swap_stmt",)
    yaml_key = "swap"
    needs = "model"  # checks shapes on the built model

    def __str__(self) -> str:
        return f"swap {self.first} {self.second}"

    @classmethod
    def compile(cls, c, node, span):
        a, b = (c.layer_ref(r, "swap") for r in node.children)
        return cls(a, b, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "swap", {"layers": True})
        if not f or "layers" not in f:
            return None
        refs = r.refs(f["layers"])
        if len(refs) != 2:
            r.error(f["layers"], "swap takes exactly two layers")
            return None
        return cls(refs[0], refs[1], span=span)

    def yaml(self, w):
        return {"swap": {"layers": [w.ref(self.first), w.ref(self.second)]}}


@dataclass(frozen=True)
class Shuffle(StructuralStatement):
    """``select where type=Dense; shuffle`` — a seeded permutation of the selected layers' places."""

    span: Span | None = field(**SPAN)
    keyword = "shuffle"
    rules = ("shuffle_stmt",)
    yaml_key = "shuffle"
    yaml_bare = True
    needs_selection = True
    needs = "model"  # checks shapes on the built model

    def __str__(self) -> str:
        return "shuffle"

    @classmethod
    def compile(cls, c, node, span):
        return cls(span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        return cls(span=span)

    def yaml(self, w):
        return "shuffle"


@dataclass(frozen=True)
class Cut(StructuralStatement):
    """``cut after block5_pool`` — that output becomes the model's output; the rest is dropped."""

    anchor: Ref
    span: Span | None = field(**SPAN)
    keyword = "cut"
    rules = ("cut_stmt",)
    yaml_key = "cut"

    def __str__(self) -> str:
        return f"cut after {self.anchor}"

    @classmethod
    def compile(cls, c, node, span):
        return cls(c.layer_ref(node.children[0], "cut"), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "cut", {"after": True})
        if not f or "after" not in f:
            return None
        ref = r.ref(f["after"])
        return cls(ref, span=span) if ref else None

    def yaml(self, w):
        return {"cut": {"after": w.ref(self.anchor)}}


@dataclass(frozen=True)
class Append(StructuralStatement):
    """``append Dense(units=10, activation="softmax")`` — a new layer on the model's output."""

    layer: Call
    anchor: Ref | None = None
    span: Span | None = field(**SPAN)
    keyword = "append"
    rules = ("append_stmt",)
    yaml_key = "append"

    def __str__(self) -> str:
        return f"append {self.layer}" + (f" after {self.anchor}" if self.anchor is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        anchor = c.layer_ref(node.children[1], "append … after") if len(node.children) > 1 else None
        return cls(c.constructor(node.children[0]), anchor, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "append", {"layer": True, "after": False})
        if not f or "layer" not in f:
            return None
        layer = r.constructor(f["layer"], "a layer constructor")
        anchor = r.ref(f["after"]) if "after" in f else None
        return cls(layer, anchor, span=span) if layer else None

    def yaml(self, w):
        body = {"layer": w.call(self.layer)}
        if self.anchor is not None:
            body["after"] = w.ref(self.anchor)
        return {"append": body}


@dataclass(frozen=True)
class SetConfig(StructuralStatement):
    """``select where type=Dense; set activation = "relu6"`` — a config field of every selected layer."""

    key: str
    value: Value
    span: Span | None = field(**SPAN)
    keyword = "set"
    rules = ("config_stmt",)
    yaml_key = "set_field"
    needs_selection = True

    def __str__(self) -> str:
        return f"set {self.key} = {format_value(self.value)}"

    @classmethod
    def compile(cls, c, node, span):
        key = node.children[0].value
        if key == "name":
            c.error("a layer's name is changed with `rename to \"…\"`, not `set name = …`", node.children[0])
        return cls(key, c.value(node.children[1]), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "set_field", {"field": True, "value": True})
        if not f or len(f) < 2:
            return None
        return cls(r.string(f["field"], "field") or "", r.value(f["value"]), span=span)

    def yaml(self, w):
        return {"set_field": {"field": self.key, "value": w.value(self.value)}}


@dataclass(frozen=True)
class Rename(StructuralStatement):
    """``select conv1; rename to "stem_conv"`` (one selected layer) or ``rename prefix "ft_"``."""

    mode: str  # "to" or "prefix"
    text: str
    span: Span | None = field(**SPAN)
    keyword = "rename"
    rules = ("rename_to", "rename_prefix")
    yaml_key = "rename"
    needs_selection = True

    def __str__(self) -> str:
        return f"rename {self.mode} {quote(self.text)}"

    @classmethod
    def compile(cls, c, node, span):
        mode = "to" if node.data == "rename_to" else "prefix"
        text = unquote(node.children[0].value)
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", text):
            c.error(f"layer names use letters, digits, '_', '.' and '-', not {text!r}", node.children[0])
        return cls(mode, text, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "rename", {"to": False, "prefix": False})
        if f is None or len(f) != 1:
            if f is not None:
                r.error(body, "rename takes exactly one of: to, prefix")
            return None
        (mode, node), = f.items()
        return cls(mode, r.string(node, mode) or "", span=span)

    def yaml(self, w):
        return {"rename": {self.mode: self.text}}
