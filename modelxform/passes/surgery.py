"""Graph surgery: insert, remove, swap, shuffle, cut, append, set <field> = value, rename.

Like replace and tap, each pass resolves its layers, validates what it can before anything changes,
and queues an edit on the GraphEditor; the runner rebuilds once per run of structural statements.
"""
from __future__ import annotations

import re

from .. import ir
from .. import statements as st
from ..errors import ApplyError
from ..keras_io.layers import walk
from ..selectors import _closest, matches, resolve_ref
from . import StatementReport, register
from .structure import _construct, layer_class


def entry_path(editor, ref: ir.Ref, what: str) -> str:
    """The path of the one layer (or nested model) a reference names, in the edited graph."""
    paths = editor.entry_paths()
    if ref.kind == "glob":
        import fnmatch
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
    guess = _closest(ref.text, paths + [p.split("/")[-1] for p in paths])
    raise ApplyError(f"{what}: no layer named {ref.text!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                     span=ref.span)


def snake_case(name: str) -> str:
    """Keras's default layer name for a class (Dense -> dense, GlobalAveragePooling2D ->
    global_average_pooling2d), without its process-wide counter, which would make names (and the
    seeded weights derived from them) depend on what else ran in the process."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _new_layer(ctx, stmt, call: ir.Call):
    import keras
    cls = layer_class(call.name, stmt.span)
    kwargs = {k: ctx.value(v, stmt) for k, v in call.kwargs}
    kwargs.setdefault("name", snake_case(cls.__name__))
    return keras.saving.serialize_keras_object(_construct(cls, kwargs, stmt.span))


def _named(call: ir.Call) -> bool:
    return any(k == "name" for k, _ in call.kwargs)


def _shape(t) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in t)
    return f"({dims},)" if len(t) == 1 else f"({dims})"


def _io_shapes(layer):
    """(input shape, output shape) of a layer called once, or None."""
    try:
        return tuple(layer.input.shape), tuple(layer.output.shape)
    except Exception:  # shared, multi-input or not called: no single answer
        return None


@register(st.Insert)
def insert(ctx, stmt: st.Insert):
    """``insert Dropout(rate=0.5) after fc1``; ``insert BatchNormalization() before conv2d_2``."""
    serialized = _new_layer(ctx, stmt, stmt.layer)
    editor = ctx.editor(stmt)
    anchor = entry_path(editor, stmt.anchor, f"insert … {stmt.where}")
    parts = ctx.rng_parts(stmt)
    result = {}

    def apply(ed):
        result["path"] = ed.insert(serialized, stmt.where, anchor, parts, stmt.span, _named(stmt.layer))
    editor.queue(stmt, apply)
    report = StatementReport(stmt, layers=[result["path"]])
    report.changes.append(f"added {result['path']} ({stmt.layer.name}) {stmt.where} {anchor}")
    report.rebuilt = [result["path"]]
    return report


@register(st.Remove)
def remove(ctx, stmt: st.Remove):
    """``remove dropout_1``; ``remove selected``; ``remove where type=Dropout``."""
    if stmt.selected:
        targets = [i.path for i in ctx.selected(stmt)]
    elif stmt.pred is not None:
        targets = [i.path for i in ctx.layers() if matches(stmt.pred, i, ctx.params)]
        if not targets:
            raise ApplyError(f"remove where {stmt.pred} matches no layer", span=stmt.span)
    else:
        targets = []
    # shapes come from the last built model: right for every layer that pending edits did not add
    live = {i.path: i.layer for i in walk(ctx.model)}
    editor = ctx.editor(stmt)
    for ref in stmt.refs:
        path = entry_path(editor, ref, "remove")
        if path not in targets:
            targets.append(path)
    report = StatementReport(stmt, layers=list(targets))
    for path in targets:
        layer = live.get(path)
        shapes = _io_shapes(layer) if layer is not None else None
        if shapes and shapes[0][1:] != shapes[1][1:]:
            raise ApplyError(f"remove {path}: its consumers expect {_shape(shapes[1])} but would receive "
                             f"{_shape(shapes[0])}", span=stmt.span,
                             hint="only layers whose output has their input's shape can be removed")
        report.changes.append(f"removed {path}" + (f" {_shape(shapes[0])}" if shapes else ""))

    def apply(ed):
        for path in targets:
            ed.remove(path, stmt.span)
    editor.queue(stmt, apply)
    ctx.forget(targets)
    report.rebuilt = []
    return report


def _check_moves(ctx, paths: list[str], order: list[int], stmt) -> None:
    """Before anything changes: every moved layer, and every layer reading a moved position, must
    receive a shape it takes. Layers with weights take exactly their original input shape; layers
    without weights take anything Keras can compute an output shape for."""
    infos = {i.path: i.layer for i in ctx.layers()}
    layers = [infos[p] for p in paths]
    io = [_io_shapes(layer) for layer in layers]
    if any(x is None for x in io):
        return  # shared or multi-input layers are refused by the editor with their own message
    produced: dict[int, tuple] = {}  # position -> new output shape
    position_of = {id(layer): k for k, layer in enumerate(layers)}

    def source_position(k):
        try:
            history = layers[k].input._keras_history  # which layer feeds position k
            return position_of.get(id(history[0]))
        except Exception:
            return None
    for k in range(len(paths)):  # paths are in graph order
        incoming = layers[order[k]]
        src = source_position(k)
        received = produced[src] if src is not None and src in produced else io[k][0]
        expected = io[order[k]][0]
        if incoming.weights and received[1:] != expected[1:]:
            raise ApplyError(f"{incoming.name} expects {_shape(expected)} but would receive {_shape(received)}",
                             span=stmt.span)
        if incoming.weights:
            produced[k] = io[order[k]][1]
        else:
            try:
                produced[k] = tuple(incoming.compute_output_shape(received))
            except Exception as exc:
                raise ApplyError(f"{incoming.name} cannot take {_shape(received)}: {exc}", span=stmt.span) from None
    for k in range(len(paths)):
        if produced[k][1:] != io[k][1][1:]:
            consumers = [n.operation.name for n in getattr(layers[k], "_outbound_nodes", [])
                         if getattr(n, "operation", None) is not None and id(n.operation) not in position_of]
            who = consumers[0] if consumers else "the model's output"
            raise ApplyError(f"{who} expects {_shape(io[k][1])} but would receive {_shape(produced[k])}",
                             span=stmt.span)


def _move(ctx, stmt, paths: list[str], order: list[int]) -> StatementReport:
    ctx.flush()  # validation reads the live model's shapes
    graph_order = [i.path for i in ctx.layers()]
    pairs = sorted(zip(paths, [paths[o] for o in order]), key=lambda pr: graph_order.index(pr[0]))
    positions = [a for a, _ in pairs]
    order_sorted = [positions.index(b) for _, b in pairs]
    _check_moves(ctx, positions, order_sorted, stmt)
    editor = ctx.editor(stmt)
    editor.queue(stmt, lambda ed: ed.permute(positions, order_sorted, stmt.span))
    report = StatementReport(stmt, layers=list(positions))
    for k, path in enumerate(positions):
        if order_sorted[k] != k:
            report.changes.append(f"the place of {path} now holds {positions[order_sorted[k]]}")
    if not report.changes:
        report.notes.append("the permutation left every layer in place")
    report.rebuilt = []
    return report


@register(st.Swap)
def swap(ctx, stmt: st.Swap):
    """``swap dense_1 dense_2`` — the two layers change places (their weights go with them)."""
    layers = ctx.layers()
    a = resolve_ref(stmt.first, None, layers)
    b = resolve_ref(stmt.second, None, layers)
    if len(a) != 1 or len(b) != 1:
        raise ApplyError("swap takes two single layers", span=stmt.span)
    if a[0].path == b[0].path:
        raise ApplyError(f"swap {a[0].path} with itself changes nothing", span=stmt.span)
    return _move(ctx, stmt, [a[0].path, b[0].path], [1, 0])


@register(st.Shuffle)
def shuffle(ctx, stmt: st.Shuffle):
    """``select where type=Dense; shuffle`` — a seeded permutation of the selected layers' places."""
    paths = [i.path for i in ctx.selected(stmt)]
    if len(paths) < 2:
        raise ApplyError("shuffle needs at least two selected layers", span=stmt.span)
    rng = ctx.rng(stmt)
    order = [int(x) for x in rng.permutation(len(paths))]
    return _move(ctx, stmt, paths, order)


@register(st.Cut)
def cut(ctx, stmt: st.Cut):
    """``cut after block5_pool`` — that output becomes the model's output; the rest is dropped."""
    editor = ctx.editor(stmt)
    anchor = entry_path(editor, stmt.anchor, "cut after")
    before = set(editor.entry_paths())
    editor.queue(stmt, lambda ed: ed.cut(anchor, stmt.span))
    dropped = [p for p in before if p not in set(editor.entry_paths())]
    report = StatementReport(stmt, layers=[anchor])
    report.changes.append(f"output is now {anchor}; dropped {len(dropped)} layer(s)"
                          + (": " + ", ".join(sorted(dropped)[:8]) + (" …" if len(dropped) > 8 else "") if dropped else ""))
    ctx.forget(dropped)
    report.rebuilt = []
    return report


@register(st.Append)
def append(ctx, stmt: st.Append):
    """``append Dense(units=10, activation="softmax")`` — a new layer on the model's output."""
    serialized = _new_layer(ctx, stmt, stmt.layer)
    editor = ctx.editor(stmt)
    anchor = entry_path(editor, stmt.anchor, "append … after") if stmt.anchor is not None else None
    parts = ctx.rng_parts(stmt)
    result = {}

    def apply(ed):
        result["path"] = ed.append(serialized, anchor, parts, stmt.span, _named(stmt.layer))
    editor.queue(stmt, apply)
    report = StatementReport(stmt, layers=[result["path"]])
    report.changes.append(f"added {result['path']} ({stmt.layer.name}) on the output"
                          + (f" of {anchor}" if anchor else ""))
    report.rebuilt = [result["path"]]
    return report


@register(st.SetConfig)
def set_config(ctx, stmt: st.SetConfig):
    """``select where type=Dense; set activation = "relu6"`` — weights kept where shapes allow."""
    paths = [i.path for i in ctx.selected(stmt)]
    value = ctx.value(stmt.value, stmt)
    if isinstance(value, tuple):
        value = list(value)
    editor = ctx.editor(stmt)
    old = {p: editor.entry(p)["config"].get(stmt.key, "(unset)") for p in paths}

    def apply(ed):
        for path in paths:
            ed.set_field(path, stmt.key, value, stmt, stmt.span)
    editor.queue(stmt, apply)
    report = StatementReport(stmt, layers=list(paths))
    for path in paths:
        report.changes.append(f"{path}: {stmt.key} {ir.format_value(_plain(old[path]))} -> {ir.format_value(_plain(value))}")
    report.rebuilt = list(paths)
    return report


def _plain(value):
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return value.get("class_name", "…")
    return value


@register(st.Rename)
def rename(ctx, stmt: st.Rename):
    """``select conv1; rename to "stem_conv"``; ``select all; rename prefix "ft_"``."""
    paths = [i.path for i in ctx.selected(stmt)]
    if stmt.mode == "to" and len(paths) != 1:
        raise ApplyError(f"rename to {ir.quote(stmt.text)} needs exactly one selected layer, not {len(paths)}",
                         span=stmt.span, hint='use rename prefix "…" for several layers')
    editor = ctx.editor(stmt)
    new_names = {p: (stmt.text if stmt.mode == "to" else stmt.text + p.split("/")[-1]) for p in paths}
    result = {}

    def apply(ed):
        result.clear()
        for path in paths:
            result[path] = ed.rename(path, new_names[path], stmt.span)
    editor.queue(stmt, apply)
    ctx.selection = [result.get(p, p) for p in ctx.selection]
    for old_path, new_path in result.items():  # a `set` obligation follows the layer's new name
        if old_path in ctx.obligations:
            ctx.obligations[new_path] = ctx.obligations.pop(old_path)
    report = StatementReport(stmt, layers=[result[p] for p in paths])
    report.changes.extend(f"{p} -> {result[p]}" for p in paths if result[p] != p)
    report.rebuilt = []
    return report
