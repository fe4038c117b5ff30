"""Which layers a selection, a reference or a predicate resolves to.

A model is seen as a list of leaf layers in graph order, each named by its path: ``conv2d_1`` at the top
level, ``backbone/block1_conv1`` inside a nested model. Naming a nested model selects every layer in it.
The layers are keras_io.layers.LayerInfo of a built model, or their stand-ins for a .keras archive
(keras_io.archive) or a config (keras_io.config): the selectors read only a layer's path, name, type,
the types of the models around it, its trainable flag, weights and parameter count.
"""
from __future__ import annotations

import collections
import difflib
import fnmatch
import math

from .. import ir
from .. import statements as st
from ..errors import ApplyError
from ..lang.safe_regex import search


# ---- predicates ----------------------------------------------------------------------------

def matches(pred: ir.Pred, info, params) -> bool:
    if isinstance(pred, ir.PAnd):
        return matches(pred.left, info, params) and matches(pred.right, info, params)
    if isinstance(pred, ir.POr):
        return matches(pred.left, info, params) or matches(pred.right, info, params)
    if isinstance(pred, ir.PNot):
        return not matches(pred.operand, info, params)
    if isinstance(pred, ir.PType):
        if info.type_name in pred.names:
            return True
        return any(t in pred.names for t in info.ancestor_types)
    if isinstance(pred, ir.PName):
        return info.name == pred.name or info.path == pred.name
    if isinstance(pred, ir.PRegex):
        # (safe_regex refuses patterns and names that could make re backtrack for ever)
        return search(pred.pattern, info.name, span=pred.span) is not None
    if isinstance(pred, ir.PTrainable):
        return bool(info.layer.trainable)
    if isinstance(pred, ir.PHasWeights):
        return len(info.weights) > 0
    if isinstance(pred, ir.PParams):
        return ir.compare(pred.op, info.params(), params.value(pred.value))
    raise TypeError(f"unknown predicate {pred!r}")


def type_counts(layers: list) -> str:
    counts = collections.Counter(i.type_name for i in layers)
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _empty(what: str, layers: list, span, near: str | None = None) -> ApplyError:
    msg = f"{what} matches no layer"
    hint = f"the model has: {type_counts(layers) or 'no layers'}"
    if near:
        msg += f" (did you mean {near!r}?)"
    return ApplyError(msg, span=span, hint=hint)


def nothing_matches(what: str, pred: ir.Pred, layers: list, span) -> ApplyError:
    """The error of a predicate that matches no layer: ``what`` matches no layer, with did-you-mean for
    a type or name the predicate gives that the model does not have but has one close to
    (`type=MultiHeadAttention` where keras_hub's GPT-2 has CachedMultiHeadAttention)."""
    return _empty(what, layers, span, near=_near_in(pred, layers))


def _near_in(pred: ir.Pred, layers: list) -> str | None:
    """A close type or name for a part of ``pred`` that names only types or names the model lacks (a
    part under `not` is no part to fix)."""
    if isinstance(pred, (ir.PAnd, ir.POr)):
        return _near_in(pred.left, layers) or _near_in(pred.right, layers)
    if isinstance(pred, ir.PType):
        types = {i.type_name for i in layers} | {t for i in layers for t in i.ancestor_types}
        if any(n in types for n in pred.names):
            return None
        return next((f"type={g}" for n in pred.names if (g := closest(n, types))), None)
    if isinstance(pred, ir.PName) and isinstance(pred.name, str):
        names = {i.name for i in layers} | {i.path for i in layers}
        if pred.name not in names and (g := closest(pred.name, names)):
            return f"name={g}"
    return None


def resolve_ref(ref: ir.Ref, layers: list) -> list:
    """The leaf layers a reference names; an error when it names none."""
    if ref.kind == "type":
        found = [i for i in layers if matches(ir.PType((ref.text,)), i, None)]
        if not found:
            raise _empty(f"type {ref.text}", layers, ref.span,
                         near=closest(ref.text, {i.type_name for i in layers}))
        return found
    if ref.kind == "glob":
        found = [i for i in layers
                 if fnmatch.fnmatchcase(i.path, ref.text) or fnmatch.fnmatchcase(i.name, ref.text)
                 or any(fnmatch.fnmatchcase(p, ref.text) for p in _model_paths(i))]
        if not found:
            raise _empty(f'"{ref.text}"', layers, ref.span,
                         near=closest(ref.text, [i.path for i in layers]))
        return found
    # a name or path; a nested model's path selects everything inside it
    text = ref.text
    exact = [i for i in layers if i.path == text or text in _model_paths(i)]
    if exact:
        return exact
    if "/" not in text:
        # a bare name: a nested layer, or a nested model (all of its layers), when it names one thing
        nested = sorted({p for i in layers for p in _model_paths(i) if p.rsplit("/", 1)[-1] == text})
        if len(nested) == 1:
            return [i for i in layers if nested[0] in _model_paths(i)]
        if len(nested) > 1:
            raise ApplyError(f"name {text!r} is ambiguous: it names the nested models " + ", ".join(nested),
                             span=ref.span, hint="write its full path, e.g. " + nested[0])
        by_name = [i for i in layers if i.name == text]
        if len(by_name) == 1:
            return by_name
        if len(by_name) > 1:
            raise ApplyError(f"layer name {text!r} is ambiguous: it names "
                             + ", ".join(i.path for i in by_name), span=ref.span,
                             hint="write its full path, e.g. " + by_name[0].path)
    candidates = [i.path for i in layers] + [i.name for i in layers]
    raise ApplyError(f"no layer named {text!r}"
                     + (f" (did you mean {g!r}?)" if (g := closest(text, candidates)) else ""),
                     span=ref.span, hint=f"the model has: {type_counts(layers)}")


def _model_paths(info) -> list[str]:
    parts = info.path.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def closest(word: str, candidates) -> str | None:
    got = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return got[0] if got else None


def resolve_selector(selector, layers: list, params, rng_factory, span) -> list:
    """Resolve a select statement's selector to leaf layers in graph order."""
    if isinstance(selector, st.SelAll):
        if not layers:
            raise ApplyError("the model has no layers to select", span=span)
        return list(layers)
    if isinstance(selector, st.SelRefs):
        chosen: dict = {}
        for ref in selector.refs:
            for info in resolve_ref(ref, layers):
                chosen.setdefault(id(info), info)
        order = {id(i): n for n, i in enumerate(layers)}
        return sorted(chosen.values(), key=lambda i: order[id(i)])
    if isinstance(selector, st.SelWhere):
        found = [i for i in layers if matches(selector.pred, i, params)]
        if not found:
            raise nothing_matches(f"where {selector.pred}", selector.pred, layers, span)
        return found
    if isinstance(selector, st.SelSample):
        pool = layers if selector.pred is None else [i for i in layers if matches(selector.pred, i, params)]
        if not pool:
            raise nothing_matches(f"where {selector.pred}", selector.pred, layers, span)
        count = params.value(selector.count) if selector.count is not None else 1
        if isinstance(count, ir.Percent):
            pct = params.value(count.value)
            if not 0 < pct <= 100:
                raise ApplyError(f"a percentage of layers must be above 0% and at most 100%, not {pct}%", span=span)
            k = max(1, math.ceil(len(pool) * pct / 100))
        else:
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ApplyError(f"a count of layers must be a whole number ≥ 1, not {count!r}", span=span)
            k = count
            if k > len(pool):
                raise ApplyError(f"select {selector.mode} {k} needs {k} layers but only {len(pool)} match",
                                 span=span, hint="matching: " + ", ".join(i.path for i in pool))
        if selector.mode == "first":
            return pool[:k]
        if selector.mode == "last":
            return pool[-k:]
        rng = rng_factory()
        picks = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
        return [pool[n] for n in picks]
    raise TypeError(f"unknown selector {selector!r}")
