"""Structural statements: replace and tap.

They never touch the live model: each queues an edit on the GraphEditor's copy of the config, and the
runner rebuilds the model once per run of consecutive structural statements (graph.py).
"""
from __future__ import annotations

import fnmatch
import inspect

from .. import statements as st
from ..errors import ApplyError
from ..selectors import _closest, resolve_ref
from . import StatementReport, register

BASE_LAYER_ARGS = ("name", "trainable", "dtype")


def layer_class(name: str, span=None):
    """A Keras layer class by its name in keras.layers, or a custom class registered by --import."""
    import keras
    cls = getattr(keras.layers, name, None)
    if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
        return cls
    for key, obj in keras.saving.get_custom_objects().items():
        if (key == name or key.split(">")[-1] == name) and isinstance(obj, type) \
                and issubclass(obj, keras.layers.Layer):
            return obj
    known = [n for n in dir(keras.layers) if n[:1].isupper()]
    guess = _closest(name, known)
    raise ApplyError(f"unknown layer type {name!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                     span=span, hint="custom layers need --import MODULE for the module that registers them")


def _construct(cls, kwargs: dict, span):
    try:
        return cls(**kwargs)
    except Exception as exc:  # the constructor's own message says what is wrong with the arguments
        raise ApplyError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {exc}",
                         span=span) from None


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


@register(st.Replace)
def replace(ctx, stmt: st.Replace):
    """``replace MaxPooling2D with AveragePooling2D``; ``replace dense_2 with Dense(units=10)``."""
    import keras
    # resolve the selection first: it may rebuild pending edits, which starts a new editor
    wanted = {info.path for info in ctx.selected(stmt)} if stmt.source is None else None
    editor = ctx.editor(stmt)
    leaves = editor.leaves()
    if wanted is not None:
        targets = [leaf for leaf in leaves if leaf.path in wanted]
    else:
        targets = resolve_ref(stmt.source, None, leaves)
    cls = layer_class(stmt.replacement.name, stmt.span)
    kwargs = {k: ctx.value(v, stmt) for k, v in stmt.replacement.kwargs}
    taken = {leaf.path for leaf in leaves}
    report = StatementReport(stmt)
    plans = []
    for target in targets:
        old_config = target.entry["config"]
        if stmt.replacement.bare:
            layer, carried = carried_config(cls, old_config, stmt.span, target.type_name)
            detail = f" (kept {', '.join(carried)})" if carried else ""
        else:
            args = dict(kwargs)
            args.setdefault("name", old_config["name"])
            if args["name"] != old_config["name"]:
                new_path = "/".join(target.path.split("/")[:-1] + [args["name"]])
                if new_path in taken:
                    raise ApplyError(f"replacement name {args['name']!r} is already used by another layer",
                                     span=stmt.span)
            layer = _construct(cls, args, stmt.span)
            detail = ""
        serialized = keras.saving.serialize_keras_object(layer)
        new_name = serialized["config"]["name"]
        new_path = "/".join(target.path.split("/")[:-1] + [new_name])
        plans.append((target.path, new_path, serialized))
        ctx.obligations.pop(target.path, None)  # a replaced layer gets fresh weights: nothing owed
        report.layers.append(target.path)
        report.changes.append(f"{target.path}: {target.type_name} -> {cls.__name__}{detail}")
    parts = ctx.rng_parts(stmt)

    def apply(ed):
        for path, new_path, serialized in plans:
            ed.replace(path, serialized, parts)
    editor.queue(stmt, apply)
    report.rebuilt = [new for _, new, _ in plans]
    return report


def _tap_paths(ctx, stmt: st.Tap, editor) -> list[str]:
    top = [e["config"]["name"] for e in editor.top_entries()]
    paths: list[str] = []
    for ref in stmt.refs:
        if ref.kind == "glob":
            found = [n for n in top if fnmatch.fnmatchcase(n, ref.text)]
        elif ref.text in top:
            found = [ref.text]
        elif "/" in ref.text:
            if ref.text not in editor.entry_paths():
                resolve_ref(ref, None, editor.leaves())  # says "no layer named …" (with a suggestion)
            found = [ref.text]
        else:
            found = []
        if not found:
            guess = _closest(ref.text, top)
            raise ApplyError(f"tap: no layer named {ref.text!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                             span=ref.span)
        paths.extend(p for p in found if p not in paths)
    return paths


@register(st.Tap)
def tap(ctx, stmt: st.Tap):
    """``tap conv2d_1`` adds conv2d_1's output after the model's outputs; ``… only`` keeps just the taps."""
    editor = ctx.editor(stmt)
    paths = _tap_paths(ctx, stmt, editor)
    editor.queue(stmt, lambda ed: ed.tap(paths, stmt.only, stmt.span))
    report = StatementReport(stmt, layers=list(paths))
    verb = "outputs are now exactly" if stmt.only else "added as outputs"
    report.changes.append(f"{verb}: {', '.join(paths)}")
    report.rebuilt = []
    return report
