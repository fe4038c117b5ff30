"""Structural statements: replace, tap, insert, remove, swap, shuffle, cut, append, set FIELD = VALUE,
rename.

They never touch a live model: each resolves its layers, checks what it can before anything changes,
and queues an edit on the graph editor's copy of the config; the model is rebuilt once per run of
consecutive structural statements.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field

from ..errors import ApplyError, Diagnostic
from ..ir import SPAN, Bare, Call, Pred, Ref, Statement, Value, format_value, keywords, quote, unquote
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

    def run(self, ctx):
        # resolve the selection first: it may rebuild pending edits, which starts a new editor
        wanted = {info.path for info in ctx.selected(self)} if self.source is None else None
        editor = ctx.editor(self)
        leaves = editor.leaves()
        if wanted is not None:
            targets = [leaf for leaf in leaves if leaf.path in wanted]
            outside = sorted(wanted - {leaf.path for leaf in leaves})
            if outside:
                from ..ir import Ref
                raise ctx.not_a_node(Ref("name", outside[0], span=self.span)) or \
                    ApplyError(f"replace selected: {outside[0]} is no node of the model's graph", span=self.span)
        else:
            try:
                targets = ctx.resolve(self.source, leaves)
            except ApplyError as exc:
                raise (ctx.not_a_node(self.source) or exc) from None
        cls = ctx.layer_class(self.replacement.name, self.span)
        kwargs = {} if self.replacement.bare else constructor_arguments(ctx, self, cls, self.replacement)
        taken = {leaf.path for leaf in leaves}
        report = ctx.report(self)
        plans = []
        for target in targets:
            old_config = target.entry["config"]
            if self.replacement.bare:
                layer, carried = carried_config(cls, old_config, self.span, target.type_name)
                detail = f" (kept {', '.join(carried)})" if carried else ""
            else:
                args = dict(kwargs)
                args.setdefault("name", old_config["name"])
                if args["name"] != old_config["name"]:
                    new_path = "/".join(target.path.split("/")[:-1] + [args["name"]])
                    if new_path in taken:
                        raise ApplyError(f"replacement name {args['name']!r} is already used by another layer",
                                         span=self.span)
                layer = construct(cls, args, self.span)
                detail = ""
            serialized = ctx.keras().saving.serialize_keras_object(layer)
            new_name = serialized["config"]["name"]
            new_path = "/".join(target.path.split("/")[:-1] + [new_name])
            plans.append((target.path, new_path, serialized))
            ctx.obligations.pop(target.path, None)  # a replaced layer gets fresh weights: nothing owed
            report.layers.append(target.path)
            report.changes.append(f"{target.path}: {target.type_name} -> {cls.__name__}{detail}")
        parts = ctx.rng_parts(self)

        def apply(ed):
            for path, new_path, serialized in plans:
                ed.replace(path, serialized, parts)
        editor.queue(self, apply)
        report.rebuilt = [new for _, new, _ in plans]
        return report


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

    def run(self, ctx):
        editor = ctx.editor(self)
        paths = self._paths(ctx, editor)
        editor.queue(self, lambda ed: ed.tap(paths, self.only, self.span))
        report = ctx.report(self, layers=list(paths))
        verb = "outputs are now exactly" if self.only else "added as outputs"
        report.changes.append(f"{verb}: {', '.join(paths)}")
        return report

    def _paths(self, ctx, editor) -> list[str]:
        top = [e["config"]["name"] for e in editor.top_entries()]
        paths: list[str] = []
        for ref in self.refs:
            if ref.kind == "glob":
                found = [n for n in top if fnmatch.fnmatchcase(n, ref.text)]
            elif ref.text in top:
                found = [ref.text]
            elif "/" in ref.text:
                if ref.text not in editor.entry_paths():
                    error = ctx.not_a_node(ref)
                    if error is not None:
                        raise error
                    ctx.resolve(ref, editor.leaves())  # says "no layer named …" (with a suggestion)
                found = [ref.text]
            else:
                found = []
            if not found:
                guess = ctx.closest(ref.text, top)
                raise ctx.not_a_node(ref) or ApplyError(
                    f"tap: no layer named {ref.text!r}" + (f" (did you mean {guess!r}?)" if guess else ""), span=ref.span)
            paths.extend(p for p in found if p not in paths)
        return paths


@dataclass(frozen=True)
class Insert(StructuralStatement):
    """``insert Dropout(0.5) after fc1`` / ``insert BatchNormalization() before conv2d_2``; after a
    shared layer, the new layer follows every call of it (and is itself shared)."""

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

    def run(self, ctx):
        serialized = new_layer(ctx, self, self.layer)
        editor = ctx.editor(self)
        anchor = entry_path(ctx, editor, self.anchor, f"insert … {self.where}")
        parts = ctx.rng_parts(self)
        result = {}

        def apply(ed):
            result["path"] = ed.insert(serialized, self.where, anchor, parts, self.span, _named(self.layer))
            result["moved"] = ed.outputs_moved
        editor.queue(self, apply)
        report = ctx.report(self, layers=[result["path"]])
        report.changes.append(f"added {result['path']} ({self.layer.name}) {self.where} {anchor}")
        # (a model output is one of the readers, a `tap`'s too: said, as that depends on the statements' order;
        # a note, not a change, so that the provenance record, which holds the changes, stays as it was)
        for owner, k, old, new in result["moved"]:
            whose = f"{owner}'s" if owner else "the model's"
            report.notes.append(f"{whose} output {k}, which read {old}, now reads {new}")
        report.rebuilt = [result["path"]]
        return report


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

    def run(self, ctx):
        if self.selected:
            targets = [i.path for i in ctx.selected(self)]
        elif self.pred is not None:
            targets = [i.path for i in ctx.matching(self.pred, f"remove where {self.pred}", self.span)]
        else:
            targets = []
        # shapes come from the last built model: right for every layer that pending edits did not add
        live = {i.path: i.layer for i in ctx.built_layers()}
        editor = ctx.editor(self)
        for ref in self.refs:
            path = entry_path(ctx, editor, ref, "remove")
            if path not in targets:
                targets.append(path)
        report = ctx.report(self, layers=list(targets))
        for path in targets:
            layer = live.get(path)
            shapes = ctx.io_shapes(layer) if layer is not None else None
            if shapes and shapes[0][1:] != shapes[1][1:]:
                raise ApplyError(f"remove {path}: its consumers expect {_shape(shapes[1])} but would receive "
                                 f"{_shape(shapes[0])}", span=self.span,
                                 hint="only layers whose output has their input's shape can be removed")
            report.changes.append(f"removed {path}" + (f" {_shape(shapes[0])}" if shapes else ""))

        def apply(ed):
            for path in targets:
                ed.remove(path, self.span)
        editor.queue(self, apply)
        ctx.forget(targets)
        return report


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

    def run(self, ctx):
        layers = ctx.layers()
        a = ctx.resolve(self.first, layers)
        b = ctx.resolve(self.second, layers)
        if len(a) != 1 or len(b) != 1:
            raise ApplyError("swap takes two single layers", span=self.span)
        if a[0].path == b[0].path:
            raise ApplyError(f"swap {a[0].path} with itself changes nothing", span=self.span)
        return _move(ctx, self, [a[0].path, b[0].path], [1, 0])


@dataclass(frozen=True)
class Shuffle(Bare, StructuralStatement):
    """``select where type=Dense; shuffle`` — a seeded permutation of the selected layers' places."""

    span: Span | None = field(**SPAN)
    keyword = "shuffle"
    words = "shuffle"
    rules = ("shuffle_stmt",)
    yaml_key = "shuffle"
    needs_selection = True
    needs = "model"  # checks shapes on the built model

    def run(self, ctx):
        paths = [i.path for i in ctx.selected(self)]
        if len(paths) < 2:
            raise ApplyError("shuffle needs at least two selected layers", span=self.span)
        rng = ctx.rng(self)
        order = [int(x) for x in rng.permutation(len(paths))]
        report = _move(ctx, self, paths, order)
        if not report.changes:
            # Drawing again would change the outcome of recipes whose first draw was the identity; the
            # warning keeps every seeded result as it was and says what happened.
            import math
            report.warnings.append(Diagnostic(
                f"shuffle left all {len(paths)} selected layers in place: seed {ctx.seed} drew the order they "
                "already have, so the shuffle changed nothing", self.span,
                hint=f"another --seed draws another order (with {len(paths)} layers, 1 seed in "
                     f"{math.factorial(len(paths)):,} draws it)"))
        return report


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

    def run(self, ctx):
        editor = ctx.editor(self)
        anchor = entry_path(ctx, editor, self.anchor, "cut after")
        before = set(editor.entry_paths())
        editor.queue(self, lambda ed: ed.cut(anchor, self.span))
        dropped = [p for p in before if p not in set(editor.entry_paths())]
        report = ctx.report(self, layers=[anchor])
        report.changes.append(f"output is now {anchor}; dropped {len(dropped)} layer(s)"
                              + (": " + ", ".join(sorted(dropped)[:8]) + (" …" if len(dropped) > 8 else "")
                                 if dropped else ""))
        ctx.forget(dropped)
        return report


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

    def run(self, ctx):
        serialized = new_layer(ctx, self, self.layer)
        editor = ctx.editor(self)
        anchor = entry_path(ctx, editor, self.anchor, "append … after") if self.anchor is not None else None
        parts = ctx.rng_parts(self)
        result = {}

        def apply(ed):
            result["path"] = ed.append(serialized, anchor, parts, self.span, _named(self.layer))
        editor.queue(self, apply)
        report = ctx.report(self, layers=[result["path"]])
        report.changes.append(f"added {result['path']} ({self.layer.name}) on the output"
                              + (f" of {anchor}" if anchor else ""))
        report.rebuilt = [result["path"]]
        return report


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

    def run(self, ctx):
        paths = [i.path for i in ctx.selected(self)]
        value = ctx.value(self.value, self)
        if isinstance(value, tuple):
            value = list(value)
        editor = ctx.editor(self)
        old = {p: editor.entry(p)["config"].get(self.key, "(unset)") for p in paths}

        def apply(ed):
            for path in paths:
                ed.set_field(path, self.key, value, self, self.span)
        editor.queue(self, apply)
        report = ctx.report(self, layers=list(paths))
        for path in paths:
            report.changes.append(f"{path}: {self.key} {format_value(_plain(old[path]))} -> "
                                  f"{format_value(_plain(value))}")
        report.rebuilt = list(paths)
        return report


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

    def run(self, ctx):
        paths = [i.path for i in ctx.selected(self)]
        if self.mode == "to" and len(paths) != 1:
            raise ApplyError(f"rename to {quote(self.text)} needs exactly one selected layer, not {len(paths)}",
                             span=self.span, hint='use rename prefix "…" for several layers')
        editor = ctx.editor(self)
        new_names = {p: (self.text if self.mode == "to" else self.text + p.split("/")[-1]) for p in paths}
        result = {}

        def apply(ed):
            result.clear()
            for path in paths:
                result[path] = ed.rename(path, new_names[path], self.span)
        editor.queue(self, apply)
        ctx.selection = [result.get(p, p) for p in ctx.selection]
        for old_path, new_path in result.items():  # a `set` obligation follows the layer's new name
            if old_path in ctx.obligations:
                ctx.obligations[new_path] = ctx.obligations.pop(old_path)
        report = ctx.report(self, layers=[result[p] for p in paths])
        report.changes.extend(f"{p} -> {result[p]}" for p in paths if result[p] != p)
        return report


@dataclass(frozen=True)
class Unwrap(Statement):
    """``unwrap`` — turn the model, a Functional subclass such as a keras_hub BertBackbone or
    BertTextClassifier (whose saved config holds its constructor arguments, not its layers), into a
    plain functional model of its layers, so that structural statements can edit it; ``unwrap
    bert_backbone`` does that to a nested one. Weights are unchanged; the wrapper class is dropped (its
    layers stay, keras_hub's registered ones included)."""

    target: Ref | None = None
    span: Span | None = field(**SPAN)
    keyword = "unwrap"
    rules = ("unwrap_stmt",)
    yaml_key = "unwrap"
    yaml_bare = True
    role = "structure"
    needs = "model"  # it rebuilds the model at once (later structural statements edit the result)

    def __str__(self) -> str:
        return "unwrap" + (f" {self.target}" if self.target is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        target = c.layer_ref(node.children[0], "unwrap") if node.children else None
        return cls(target, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        if r.is_null(body) or r.is_word(body, "model"):
            return cls(None, span=span)
        ref = r.ref(body)
        return cls(ref, span=span) if ref is not None else None

    def yaml(self, w):
        return "unwrap" if self.target is None else {"unwrap": w.ref(self.target)}

    def run(self, ctx):
        path = None
        if self.target is not None:
            paths = [c.path for c in ctx.nested_models()]
            path = self.target.text if self.target.text in paths else \
                next((p for p in paths if p.split("/")[-1] == self.target.text), None)
            if path is None:
                guess = ctx.closest(self.target.text, paths)
                raise ApplyError(f"unwrap: no nested model named {self.target.text!r}"
                                 + (f" (did you mean {guess!r}?)" if guess else ""), span=self.target.span,
                                 hint="nested models: " + (", ".join(paths) or "none"))
        before, after = ctx.unwrap(path, self)
        report = ctx.report(self, layers=[path or "(the model)"])
        what = path or "the model"
        if before == after:
            report.notes.append(f"{what} is already a plain {after} model: nothing to unwrap")
        else:
            report.changes.append(f"{what}: {before} -> {after} (the {before} class is dropped; its layers and "
                                  "weights stay)")
        return report


# ---- what the passes share ---------------------------------------------------------------------

BASE_LAYER_ARGS = ("name", "trainable", "dtype")


def construct(cls, kwargs: dict, span):
    try:
        return cls(**kwargs)
    except Exception as exc:  # the constructor's own message says what is wrong with the arguments
        unknown = _unknown_arguments(cls, kwargs)
        if unknown:  # (`Dense(unitz=1)`: Keras's message is that `units` is missing)
            import difflib
            known = sorted(_arguments_along(cls))
            guess = difflib.get_close_matches(unknown[0], known, n=1)
            raise ApplyError(f"{cls.__name__} has no argument {unknown[0]!r}"
                             + (f" (did you mean {guess[0]!r}?)" if guess else ""), span=span,
                             hint=f"{cls.__name__} takes " + ", ".join(known)) from None
        raise ApplyError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {exc}",
                         span=span) from None


def _arguments_along(cls) -> set:
    """The keyword arguments the constructors of ``cls`` and its bases name (Keras layers pass what they do
    not take to their base's, up to Layer's)."""
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            names |= {p.name for p in list(inspect.signature(init).parameters.values())[1:]
                      if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
        except (TypeError, ValueError):
            continue
    return names | set(BASE_LAYER_ARGS)


def _unknown_arguments(cls, kwargs: dict) -> list:
    known = _arguments_along(cls)
    return [k for k in kwargs if k not in known]


def carried_config(cls, old_config: dict, span, old_type: str):
    """Config fields the old layer and ``cls`` share (pool_size, strides, padding, name, …)."""
    accepted = set(inspect.signature(cls.__init__).parameters) | set(BASE_LAYER_ARGS)
    keep = {k: v for k, v in old_config.items() if k in accepted}
    try:
        layer = cls.from_config(dict(keep))
    except TypeError as exc:
        raise ApplyError(f"cannot replace {old_type} with {cls.__name__} by carrying its settings over: {exc}",
                         span=span, hint=f"give the arguments: replace … with {cls.__name__}(…)") from None
    except Exception as exc:
        raise ApplyError(f"{cls.__name__} does not accept {old_type}'s settings: {exc}", span=span) from None
    return layer, sorted(k for k in keep if k not in BASE_LAYER_ARGS)


def entry_path(ctx, editor, ref: Ref, what: str) -> str:
    """The path of the one layer (or nested model) a reference names, in the edited graph."""
    paths = editor.entry_paths()
    if ref.kind == "glob":
        found = [p for p in paths if fnmatch.fnmatchcase(p, ref.text) or fnmatch.fnmatchcase(p.split("/")[-1], ref.text)]
    elif ref.text in paths:
        return ref.text
    else:
        found = [p for p in paths if p.split("/")[-1] == ref.text]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ApplyError(f"{what}: {ref} names {len(found)} layers ({', '.join(found[:5])}); name one",
                         span=ref.span)
    error = ctx.not_a_node(ref)
    if error is not None:
        raise error
    guess = ctx.closest(ref.text, paths + [p.split("/")[-1] for p in paths])
    raise ApplyError(f"{what}: no layer named {ref.text!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                     span=ref.span)


def constructor_arguments(ctx, stmt, cls, call: Call) -> dict:
    """A constructor's arguments by name: positional ones (``Dense(10, activation="relu")``,
    ``Dropout(0.5)``) are named through the class's signature, as Python would bind them."""
    kwargs = {k: ctx.value(v, stmt) for k, v in call.kwargs}
    if not call.args:
        return kwargs
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    names = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(call.args) > len(names):
        takes = f"({', '.join(names)})" if names else "none"
        raise ApplyError(f"{call}: {cls.__name__} takes {len(names)} positional argument"
                         f"{'s' if len(names) != 1 else ''} {takes}, not {len(call.args)}", span=stmt.span,
                         hint=f"name the others, e.g. {cls.__name__}(…, name=value)")
    named = {}
    for name, value in zip(names, call.args):
        if name in kwargs:
            raise ApplyError(f"{call}: {cls.__name__}'s argument {name!r} is given by position and by name",
                             span=stmt.span)
        named[name] = ctx.value(value, stmt)
    named.update(kwargs)
    return named


def new_layer(ctx, stmt, call: Call) -> dict:
    """The serialized config of a new layer ``call`` constructs; unnamed, it gets Keras's default name for
    its class without the process-wide counter (which would make names, and the seeded weights derived
    from them, depend on what else ran in the process)."""
    cls = ctx.layer_class(call.name, stmt.span)
    kwargs = constructor_arguments(ctx, stmt, cls, call)
    kwargs.setdefault("name", ctx.default_layer_name(cls.__name__))
    return ctx.keras().saving.serialize_keras_object(construct(cls, kwargs, stmt.span))


def _named(call: Call) -> bool:
    return any(k == "name" for k, _ in call.kwargs)


def _shape(t) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in t)
    return f"({dims},)" if len(t) == 1 else f"({dims})"


def _move(ctx, stmt, paths: list[str], order: list[int]):
    ctx.flush()  # validation reads the live model's shapes
    graph_order = [i.path for i in ctx.layers()]
    pairs = sorted(zip(paths, [paths[o] for o in order]), key=lambda pr: graph_order.index(pr[0]))
    positions = [a for a, _ in pairs]
    order_sorted = [positions.index(b) for _, b in pairs]
    ctx.check_moves(positions, order_sorted, stmt)
    editor = ctx.editor(stmt)
    editor.queue(stmt, lambda ed: ed.permute(positions, order_sorted, stmt.span))
    report = ctx.report(stmt, layers=list(positions))
    for k, path in enumerate(positions):
        if order_sorted[k] != k:
            report.changes.append(f"the place of {path} now holds {positions[order_sorted[k]]}")
    if not report.changes:
        report.notes.append("the permutation left every layer in place")
    return report


def _plain(value):
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return value.get("class_name", "…")
    return value
