"""Weight statements: scale, add noise, reinit, set, clip, prune, freeze, unfreeze.

They change variables of the selected layers in place and never rebuild the graph. Layers that no
statement touches keep bit-identical weights.
"""
from __future__ import annotations

import inspect

import numpy as np

from .. import ir
from .. import statements as st
from ..errors import ApplyError, ModelxformError
from ..keras_io.graph import initializer_for, seeded
from ..keras_io.layers import model_kind
from ..rng import derive_seed
from . import StatementReport, register


def _variables(ctx, stmt, target: str):
    """(layer info, variable) pairs of the selection that ``target`` names; an error when none do."""
    pairs, missing = [], []
    for info in ctx.selected(stmt):
        found = [v for v in info.layer.weights
                 if (target == "weights" and np.dtype(v.dtype).kind == "f") or v.name == target]
        if found:
            pairs.extend((info, v) for v in found)
        else:
            missing.append(info)
    if not pairs:
        have = sorted({v.name for i in ctx.selected(stmt) for v in i.layer.weights})
        what = "no weights" if target == "weights" else f"no variable {target!r}"
        raise ApplyError(f"the selected layers have {what}", span=stmt.span,
                         hint=("they have: " + ", ".join(have)) if have else
                         "the selection holds only layers without weights (e.g. pooling, dropout)")
    return pairs, missing


def _shape(v) -> str:
    return "(" + ", ".join(str(d) for d in v.shape) + ("," if len(v.shape) == 1 else "") + ")"


def _private_array(var) -> np.ndarray:
    """The variable's values in an array nobody else holds, which a pass may change in place: a Keras
    variable's ``numpy()`` may share memory with the variable, so it is copied; a fast-path stand-in
    (keras_io.archive.ArchiveVariable) hands over its own array."""
    take = getattr(var, "take_array", None)
    a = take() if take is not None else np.array(var.numpy(), copy=True)
    if not (a.flags.c_contiguous and a.flags.writeable):  # the passes write through reshape(-1) views
        a = np.array(a, order="C", copy=True)
    return a


# Arrays are changed in place, and noise is drawn a block at a time, so that a pass holds one array at
# a time, not two (VGG16's fc1 kernel alone is 392 MiB). numpy's Generator draws the same stream in
# blocks as at once, so the values do not depend on the block size.
NOISE_BLOCK = 1 << 20


def _map_variables(ctx, stmt, target: str, fn, describe: str) -> StatementReport:
    """Apply ``fn(info, variable, array) -> new array`` to every targeted variable; ``array`` is private
    to the pass, and ``fn`` may change it in place and return it."""
    pairs, missing = _variables(ctx, stmt, target)
    report = StatementReport(stmt)
    for info, var in pairs:
        if info.path not in report.layers:
            report.layers.append(info.path)
        report.changes.append(f"{info.path}: {var.name} {_shape(var)} {describe}")
        if isinstance(stmt, (st.Reinit, st.Fill)):
            ctx.obligations.pop(info.path, None)
        if not ctx.dry_run:
            old = _private_array(var)
            dtype = old.dtype
            new = np.asarray(fn(info, var, old))
            var.assign(new.astype(dtype, copy=False))
    if missing:
        report.notes.append(f"skipped {len(missing)} selected layer(s) without {target!r}: "
                            + ", ".join(i.path for i in missing[:5]) + (" …" if len(missing) > 5 else ""))
    return report


@register(st.Scale)
def scale(ctx, stmt: st.Scale):
    """``select where type=Dense; scale kernel 0.8`` — multiply the arrays by a factor."""
    factor = ctx.number(stmt.factor, stmt)
    return _map_variables(ctx, stmt, stmt.target,
                          lambda info, var, a: np.multiply(a, np.asarray(factor, a.dtype), out=a), f"× {factor}")


@register(st.AddNoise)
def add_noise(ctx, stmt: st.AddNoise):
    """``select all; add noise normal(stddev=0.01) to kernel`` — seeded, per layer and variable."""
    dist = stmt.distribution
    args = {k: ctx.number(v, stmt) for k, v in dist.kwargs}
    if dist.name == "normal":
        mean, stddev = args.get("mean", 0.0), args.get("stddev", 1.0)
        if stddev < 0:
            raise ApplyError(f"normal(): stddev must be ≥ 0, not {stddev}", span=stmt.span)
        draw = lambda rng, shape: rng.normal(mean, stddev, size=shape)  # noqa: E731
    else:
        low, high = args.get("low", -1.0), args.get("high", 1.0)
        if low > high:
            raise ApplyError(f"uniform(): low ({low}) is above high ({high})", span=stmt.span)
        draw = lambda rng, shape: rng.uniform(low, high, size=shape)  # noqa: E731

    def fn(info, var, a):
        rng = ctx.rng(stmt, info.path, var.name)
        flat = a.reshape(-1)  # a view: the array is contiguous
        for start in range(0, flat.size, NOISE_BLOCK):
            block = flat[start:start + NOISE_BLOCK]
            block += draw(rng, block.size).astype(a.dtype)
        return a
    return _map_variables(ctx, stmt, stmt.target, fn, f"+ {dist} noise")


def _initializer(ctx, stmt, call: ir.Call):
    import keras
    cls = getattr(keras.initializers, call.name, None)
    if not (isinstance(cls, type) and issubclass(cls, keras.initializers.Initializer)):
        raise ApplyError(f"unknown initializer {call.name!r}", span=stmt.span)
    args = [ctx.value(v, stmt) for v in call.args]
    kwargs = {k: ctx.value(v, stmt) for k, v in call.kwargs}
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # the initializer's own message names the bad argument
        raise ApplyError(f"initializer {call}: {exc}", span=stmt.span) from None


def _init_values(ctx, stmt, info, var, init, explicit_seed: bool):
    if not explicit_seed and "seed" in inspect.signature(type(init).__init__).parameters:
        init = seeded(init, derive_seed(ctx.seed, *ctx.rng_parts(stmt), info.path, var.name) % (2**31 - 1))
    try:
        return np.asarray(init(tuple(var.shape), dtype=var.dtype))
    except Exception as exc:
        raise ApplyError(f"{info.path}: {var.name}: initializer failed: {exc}", span=stmt.span) from None


@register(st.Reinit)
def reinit(ctx, stmt: st.Reinit):
    """``select last 1 where type=Dense; reinit weights`` — the layer's own initializers, seeded."""
    explicit = stmt.initializer is not None
    chosen = _initializer(ctx, stmt, stmt.initializer) if explicit else None
    user_seed = explicit and any(k == "seed" for k, _ in stmt.initializer.kwargs)

    def fn(info, var, a):
        init = chosen if explicit else initializer_for(info.layer, var.name)
        if init is None:
            raise ApplyError(f"{info.path}: its config names no initializer for {var.name!r}",
                             span=stmt.span, hint=f"name one: reinit {stmt.target} with glorot_uniform")
        return _init_values(ctx, stmt, info, var, init, user_seed)
    desc = f"reinitialised with {stmt.initializer}" if explicit else "reinitialised with its own initializer"
    return _map_variables(ctx, stmt, stmt.target, fn, desc)


@register(st.Fill)
def fill(ctx, stmt: st.Fill):
    """``select all; set bias to zeros`` — fill with a constant initializer (or any initializer)."""
    init = _initializer(ctx, stmt, stmt.initializer)
    user_seed = any(k == "seed" for k, _ in stmt.initializer.kwargs)
    return _map_variables(ctx, stmt, stmt.target,
                          lambda info, var, a: _init_values(ctx, stmt, info, var, init, user_seed),
                          f"set to {stmt.initializer}")


@register(st.Clip)
def clip(ctx, stmt: st.Clip):
    """``select all; clip kernel -1 1``."""
    low, high = ctx.number(stmt.low, stmt), ctx.number(stmt.high, stmt)
    if low > high:
        raise ApplyError(f"clip bounds are in the wrong order: {low} > {high}", span=stmt.span)
    return _map_variables(ctx, stmt, stmt.target,
                          lambda info, var, a: np.clip(a, np.asarray(low, a.dtype), np.asarray(high, a.dtype), out=a),
                          f"clipped to [{low}, {high}]")


def prune_array(a: np.ndarray, percent: float) -> np.ndarray:
    """Zero, in place, the ``percent`` % entries of ``a`` of smallest magnitude (ties broken by position,
    stably); returns ``a``."""
    k = int(np.floor(a.size * percent / 100.0))
    if k > 0:
        flat = a.reshape(-1)  # a view of a contiguous array
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:k]] = 0
    return a


@register(st.Prune)
def prune(ctx, stmt: st.Prune):
    """``select where type=Dense; prune kernel 50%`` — magnitude pruning of each array."""
    percent = ctx.number(stmt.amount.value, stmt)
    if not 0 <= percent <= 100:
        raise ApplyError(f"prune takes a percentage from 0% to 100%, not {percent}%", span=stmt.span)
    return _map_variables(ctx, stmt, stmt.target, lambda info, var, a: prune_array(a, percent),
                          f"smallest {percent}% set to zero")


def _set_trainable(ctx, stmt, flag: bool) -> StatementReport:
    report = StatementReport(stmt)
    for info in ctx.selected(stmt):
        report.layers.append(info.path)
        if bool(info.layer.trainable) != flag:
            report.changes.append(f"{info.path}: trainable {info.layer.trainable} -> {flag}")
            info.layer.trainable = flag  # cheap and needed for later `trainable` predicates, even in a plan
    if not report.changes:
        report.notes.append(f"every selected layer was already {'trainable' if flag else 'frozen'}")
    elif model_kind(ctx.model) == "subclassed":
        report.notes.append(SUBCLASSED_TRAINABLE_NOTE)
    return report


# Keras saves a subclassed model's weights but not its sublayers' trainable flags (they are not in its
# config), so the flag holds in memory but not in a saved file. The CLI refuses to save such a result.
SUBCLASSED_TRAINABLE_NOTE = ("this is a subclassed model: the new trainable flags hold in memory, but Keras "
                             "does not save them with the model")


@register(st.Freeze)
def freeze(ctx, stmt):
    """``select all; freeze`` — set trainable to False (saved with the model)."""
    return _set_trainable(ctx, stmt, False)


@register(st.Unfreeze)
def unfreeze(ctx, stmt):
    """``select last 2 where has weights; unfreeze``."""
    return _set_trainable(ctx, stmt, True)


@register(st.LoadWeights)
def load_weights(ctx, stmt: st.LoadWeights):
    """``select all; load weights from "base.keras"`` — matched by layer path, then by unique name."""
    import os

    from ..keras_io.files import load_model
    from ..keras_io.layers import walk
    base = os.getcwd()
    if stmt.span is not None and stmt.span.filename and not stmt.span.filename.startswith("<"):
        base = os.path.dirname(os.path.abspath(stmt.span.filename))
    path = os.path.join(base, stmt.path)
    if path not in ctx.loaded:
        try:
            ctx.loaded[path] = load_model(path)
        except ModelxformError as exc:
            raise type(exc)(f"load weights from {stmt.path!r}: {exc.message}", span=stmt.span) from None
    source_layers = walk(ctx.loaded[path])
    by_path = {i.path: i for i in source_layers}
    by_name: dict = {}
    for i in source_layers:
        by_name.setdefault(i.name, []).append(i)
    report = StatementReport(stmt)
    missing = []
    for info in ctx.selected(stmt):
        if not info.layer.weights:
            continue
        match = by_path.get(info.path)
        how = "path"
        if match is None and len(by_name.get(info.name, [])) == 1:
            match, how = by_name[info.name][0], "name"
        if match is None:
            missing.append(info.path)
            continue
        have = [tuple(v.shape) for v in info.layer.weights]
        got = [tuple(v.shape) for v in match.layer.weights]
        if have != got:
            raise ApplyError(f"load weights: {info.path} has weights {have} but {stmt.path}'s {match.path} has {got}",
                             span=stmt.span)
        report.layers.append(info.path)
        report.changes.append(f"{info.path} <- {stmt.path}:{match.path} (by {how})")
        if not ctx.dry_run:
            info.layer.set_weights(match.layer.get_weights())
    if missing:
        if stmt.strict:
            raise ApplyError(f"load weights … strict: no match in {stmt.path} for " + ", ".join(missing),
                             span=stmt.span)
        report.notes.append("no match for: " + ", ".join(missing))
    return report
