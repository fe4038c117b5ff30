"""Weight statements: scale, add noise, reinit, set … to, clip, prune, freeze, unfreeze, load weights.

They change variables of the selected layers in place and never rebuild the graph. Layers that no
statement touches keep bit-identical weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Union

from ..errors import ApplyError
from ..ir import SPAN, Bare, Call, ParamRef, Percent, Statement, format_value, quote, unquote
from ..source import Span



class _Numpy:
    """numpy, imported when a pass first uses it: the compiler imports this module, and ``check`` and
    ``fmt`` start faster without numpy."""

    def __getattr__(self, name):
        import numpy
        return getattr(numpy, name)


np = _Numpy()

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
        target, amount = node.children[0], node.children[-1]
        if target.value == "by":
            c.error("`scale` names what it scales before `by`, e.g. `scale weights by 0.9`", target)
        if c.is_token(amount) and amount.type == "PERCENT":  # `scale kernel 90%` is `scale kernel 0.9`
            return cls(c.target(target), c.percent_factor(amount), span=span)
        return cls(c.target(target), c.number(amount), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "scale", {"target": True, "factor": True})
        if not f or "factor" not in f:
            return None
        return cls(_target(f, r), r.number(f["factor"], "factor"), span=span)

    def yaml(self, w):
        return {"scale": {"target": self.target, "factor": w.value(self.factor)}}

    def run(self, ctx):
        factor = ctx.number(self.factor, self)
        def scale(info, var):
            return lambda a: np.multiply(a, np.asarray(factor, a.dtype), out=a)
        return _map_variables(ctx, self, self.target, _whole(scale), f"× {factor}", blockwise=scale)


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
            for problem in _noise_problems(dist):
                c.error(problem, node.children[0])
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
        positional, kwargs = [], []
        if r.is_sequence(args_node):  # normal: [0, 0.1], as normal(0, 0.1)
            positional = [r.number(v, name) for v in r.items(args_node)]
        elif r.is_mapping(args_node):
            args = r.mapping(args_node, name, {k: False for k in NOISE_DISTRIBUTIONS[name]})
            kwargs = [(k, r.number(v, k)) for k, v in (args or {}).items()]
        elif not r.is_null(args_node):
            r.error(args_node, f"{name} takes a list or a mapping of its arguments")
        call = Call(name, tuple(positional), tuple(kwargs), span=r.span(args_node))
        for problem in _noise_problems(call):
            r.error(args_node, problem)
        return cls(call, _target(f, r), span=span)

    def yaml(self, w):
        dist = self.distribution
        if dist.args:
            return {"add_noise": {"target": self.target, dist.name: [w.value(v) for v in dist.args]}}
        return {"add_noise": {"target": self.target,
                              dist.name: {k: w.value(v) for k, v in dist.kwargs} or None}}

    def run(self, ctx):
        dist = self.distribution
        names = NOISE_DISTRIBUTIONS[dist.name]
        args = {k: ctx.number(v, self) for k, v in zip(names, dist.args)}  # normal(0, 0.1): mean, stddev
        args.update({k: ctx.number(v, self) for k, v in dist.kwargs})
        if dist.name == "normal":
            mean, stddev = args.get("mean", 0.0), args.get("stddev", 1.0)
            if stddev < 0:
                raise ApplyError(f"normal(): stddev must be ≥ 0, not {stddev}", span=self.span)
            draw = lambda rng, shape: rng.normal(mean, stddev, size=shape)  # noqa: E731
        else:
            low, high = args.get("low", -1.0), args.get("high", 1.0)
            if low > high:
                raise ApplyError(f"uniform(): low ({low}) is above high ({high})", span=self.span)
            draw = lambda rng, shape: rng.uniform(low, high, size=shape)  # noqa: E731

        def noise(info, var):
            rng = ctx.rng(self, info.path, var.name)

            def add(a):
                flat = a.reshape(-1)  # a view: the array is contiguous
                for start in range(0, flat.size, NOISE_BLOCK):
                    block = flat[start:start + NOISE_BLOCK]
                    block += draw(rng, block.size).astype(a.dtype)
                return a
            return add
        return _map_variables(ctx, self, self.target, _whole(noise), f"+ {dist} noise", blockwise=noise)


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

    def run(self, ctx):
        explicit = self.initializer is not None
        chosen = _keras_initializer(ctx, self, self.initializer) if explicit else None
        user_seed = explicit and any(k == "seed" for k, _ in self.initializer.kwargs)
        inits = {}
        if not explicit:  # decided for every selected variable now, so that a plan says what apply would
            pairs, _ = _variables(ctx, self, self.target)
            missing = []
            for info, var in pairs:
                inits[id(var)] = ctx.own_initializer(info.layer, var.name)
                if inits[id(var)] is None:
                    missing.append(f"{info.path}: {var.name}")
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ApplyError(f"`{self}`: no initializer is known for {', '.join(missing[:3])}{more} (its layer "
                                 "names none in its config or attributes)", span=self.span,
                                 hint=f"name one: reinit {self.target} with glorot_uniform")

        def fn(info, var, a):
            return _init_values(ctx, self, info, var, chosen if explicit else inits[id(var)], user_seed)
        desc = f"reinitialised with {self.initializer}" if explicit else "reinitialised with its own initializer"
        report = _map_variables(ctx, self, self.target, fn, desc)
        for path in report.layers:
            ctx.obligations.pop(path, None)
        return report


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

    def run(self, ctx):
        source = _constant_source(ctx, self, self.initializer) if ctx.on_archive else None
        if ctx.on_archive:
            pairs, _ = _variables(ctx, self, self.target)
            if source is None or any(np.dtype(var.np_dtype).kind != "f" for _, var in pairs):
                ctx.require_model()  # only Keras's initializer can say what the values are
        blockwise = None
        if ctx.on_archive:
            def fill(info, var):
                def put(a):
                    a[...] = source.astype(a.dtype)
                    return a
                return put
            blockwise = fill
            fn = _whole(fill)
        else:
            init = _keras_initializer(ctx, self, self.initializer)
            user_seed = any(k == "seed" for k, _ in self.initializer.kwargs)
            fn = lambda info, var, a: _init_values(ctx, self, info, var, init, user_seed)  # noqa: E731
        report = _map_variables(ctx, self, self.target, fn, f"set to {self.initializer}", blockwise=blockwise)
        for path in report.layers:
            ctx.obligations.pop(path, None)
        return report


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

    def run(self, ctx):
        low, high = ctx.number(self.low, self), ctx.number(self.high, self)
        if low > high:
            raise ApplyError(f"clip bounds are in the wrong order: {low} > {high}", span=self.span)
        def clip(info, var):
            return lambda a: np.clip(a, np.asarray(low, a.dtype), np.asarray(high, a.dtype), out=a)
        return _map_variables(ctx, self, self.target, _whole(clip), f"clipped to [{low}, {high}]",
                              blockwise=clip)


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

    def run(self, ctx):
        percent = ctx.number(self.amount.value, self)
        if not 0 <= percent <= 100:
            raise ApplyError(f"prune takes a percentage from 0% to 100%, not {percent}%", span=self.span)
        return _map_variables(ctx, self, self.target, lambda info, var, a: prune_array(a, percent),
                              f"smallest {percent}% set to zero")


@dataclass(frozen=True)
class Freeze(Bare, WeightStatement):
    """``select all; freeze`` — set trainable to False (saved with the model)."""

    span: Span | None = field(**SPAN)
    keyword = "freeze"
    words = "freeze"
    rules = ("freeze_stmt",)
    yaml_key = "freeze"
    needs = "archive"
    plan_tag = None  # the report marks it from the trainable flags (frozen)

    def run(self, ctx):
        return _set_trainable(ctx, self, False)


@dataclass(frozen=True)
class Unfreeze(Bare, WeightStatement):
    """``select last 2 where has weights; unfreeze``."""

    span: Span | None = field(**SPAN)
    keyword = "unfreeze"
    words = "unfreeze"
    rules = ("unfreeze_stmt",)
    yaml_key = "unfreeze"
    needs = "archive"
    plan_tag = None

    def run(self, ctx):
        return _set_trainable(ctx, self, True)


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

    def run(self, ctx):
        base = os.getcwd()
        if self.span is not None and self.span.filename and not self.span.filename.startswith("<"):
            base = os.path.dirname(os.path.abspath(self.span.filename))
        source_layers = ctx.load_layers(os.path.join(base, self.path), self)
        by_path = {i.path: i for i in source_layers}
        by_name: dict = {}
        for i in source_layers:
            by_name.setdefault(i.name, []).append(i)
        report = ctx.report(self)
        missing = []
        for info in ctx.selected(self):
            if not info.weights:
                continue
            refuse_quantized(ctx, self, info, [v.name for v in info.weights])
            match = by_path.get(info.path)
            how = "path"
            if match is None and len(by_name.get(info.name, [])) == 1:
                match, how = by_name[info.name][0], "name"
            if match is None:
                missing.append(info.path)
                continue
            have = [tuple(v.shape) for v in info.weights]
            got = [tuple(v.shape) for v in match.weights]
            if have != got:
                raise ApplyError(f"load weights: {info.path} has weights {have} but {self.path}'s {match.path} "
                                 f"has {got}", span=self.span)
            report.layers.append(info.path)
            report.changes.append(f"{info.path} <- {self.path}:{match.path} (by {how})")
            report.then(lambda mine=info.weights, theirs=match.weights: [v.assign(w.numpy()) for v, w in zip(mine, theirs)])
        if missing:
            if self.strict:
                raise ApplyError(f"load weights … strict: no match in {self.path} for " + ", ".join(missing),
                                 span=self.span)
            report.notes.append("no match for: " + ", ".join(missing))
        return report


# ---- what the passes share ---------------------------------------------------------------------

def _noise_problems(dist: Call) -> list[str]:
    """What is wrong with the arguments of ``normal(…)``/``uniform(…)``: positional ones are taken in the
    order (mean, stddev) / (low, high), as numpy and Keras order them."""
    allowed = NOISE_DISTRIBUTIONS[dist.name]
    problems = []
    if len(dist.args) > len(allowed):
        problems.append(f"{dist.name}() takes at most {len(allowed)} arguments ({', '.join(allowed)}), "
                        f"not {len(dist.args)}")
    given = list(allowed[:len(dist.args)])
    for key, _ in dist.kwargs:
        if key not in allowed:
            problems.append(f"{dist.name}() has no argument {key!r}; it takes {', '.join(allowed)}")
        elif key in given:
            problems.append(f"{dist.name}(): {key} is given by position and by name")
        given.append(key)
    for key, value in list(zip(allowed, dist.args)) + list(dist.kwargs):
        if key in allowed and (not isinstance(value, (int, float, ParamRef)) or isinstance(value, bool)):
            problems.append(f"{dist.name}({key}=…) must be a number")
    return problems


def _variables(ctx, stmt, target: str):
    """(layer, variable) pairs of the selection that ``target`` names; an error when none do."""
    pairs, missing = [], []
    for info in ctx.selected(stmt):
        found = [v for v in info.weights
                 if (target == "weights" and _is_float(v)) or v.name == target]
        refuse_quantized(ctx, stmt, info, [v.name for v in found])
        if found:
            pairs.extend((info, v) for v in found)
        else:
            missing.append(info)
    if not pairs:
        have = sorted({v.name for i in ctx.selected(stmt) for v in i.weights})
        what = "no weights" if target == "weights" else f"no variable {target!r}"
        raise ApplyError(f"the selected layers have {what}", span=stmt.span,
                         hint=(("they have: " + ", ".join(have)) if have else
                               "the selection holds only layers without weights (e.g. pooling, dropout)")
                         + "; `modelxform inspect MODEL --weights` lists every layer's variables")
    return pairs, missing


def _is_float(v) -> bool:
    dtype = str(v.dtype)
    return dtype in ("bfloat16", "float16", "float32", "float64") or (not dtype.startswith("float8")
                                                                       and np.dtype(dtype).kind == "f")


def refuse_quantized(ctx, stmt, info, names) -> None:
    """Weight statements change float arrays; a quantized layer's kernel holds int8 (or two int4 values
    packed in each int8) with scales, and float8's scales and histories drive its quantizer: none of them
    may be treated as float weights. Only its bias is one."""
    mode = ctx.quantization_mode(info)
    touched = [n for n in names if n != "bias"]
    if mode is not None and touched:
        raise ApplyError(f"`{stmt}`: {info.path} is quantized ({mode}): its {touched[0]} is part of the "
                         "quantized kernel, not a float weight, so weight statements cannot change it",
                         span=stmt.span, hint="apply weight statements before `quantize` (a quantized layer's "
                                              "bias is the one array they may change)")


def _shape(v) -> str:
    return "(" + ", ".join(str(d) for d in v.shape) + ("," if len(v.shape) == 1 else "") + ")"


def _private_array(var) -> np.ndarray:
    """The variable's values in an array nobody else holds, which a pass may change in place: a Keras
    variable's ``numpy()`` may share memory with the variable, so it is copied; an archive's stand-in
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


def _map_variables(ctx, stmt, target: str, fn, describe: str, blockwise=None):
    """Report ``describe`` for every targeted variable and defer ``fn(info, variable, array) -> new
    array`` to when the recipe is applied; ``array`` is private to the pass, and ``fn`` may change it in
    place and return it. An elementwise pass also gives ``blockwise(info, variable) -> change(block)``,
    which changes consecutive blocks of the flat array in place: a variable of a .keras archive then
    changes as it streams into the saved file (ArchiveVariable.defer), never whole in memory."""
    pairs, missing = _variables(ctx, stmt, target)
    report = ctx.report(stmt)
    for info, var in pairs:
        if info.path not in report.layers:
            report.layers.append(info.path)
        report.changes.append(f"{info.path}: {var.name} {_shape(var)} {describe}")
        report.then(lambda info=info, var=var: _change(info, var, fn, report, blockwise))
    if missing:
        report.notes.append(f"skipped {len(missing)} selected layer(s) without {target!r}: "
                            + ", ".join(i.path for i in missing[:5]) + (" …" if len(missing) > 5 else ""))
    return report


def _whole(blockwise):
    """The whole-array pass of an elementwise one: its change applied to the array as one block."""
    return lambda info, var, a: blockwise(info, var)(a)


def _change(info, var, fn, report=None, blockwise=None) -> None:
    defer = getattr(var, "defer", None)
    if blockwise is not None and defer is not None:
        defer(_Elementwise(info, var, blockwise, report))
        return
    old = _private_array(var)
    dtype = old.dtype
    # Overflow (scale 1e38 twice) and invalid operations are said in the statement's report, once per
    # variable with how many values are no longer finite, not printed by numpy as RuntimeWarnings.
    trouble: list[str] = []
    with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                     call=lambda kind, flag: trouble.append(kind)):
        new = np.asarray(fn(info, var, old)).astype(dtype, copy=False)
    if trouble and report is not None:
        bad = int(np.count_nonzero(~np.isfinite(new))) if new.dtype.kind == "f" else 0
        report.notes.append(_trouble_note(info, var, trouble, bad, new.size))
    var.assign(new)


def _trouble_note(info, var, trouble, bad: int, size: int) -> str:
    kinds = " and ".join(sorted(set(trouble)))
    if bad:
        return f"{info.path}: {var.name}: {kinds} in the arithmetic; {bad} of {size} values are now infinite or NaN"
    return f"{info.path}: {var.name}: {kinds} in the arithmetic"


class _Elementwise:
    """An elementwise pass deferred to a variable of a .keras archive (ArchiveVariable.defer). Each
    ``begin()`` starts it afresh (a noise pass's generator from its seed), so that every read of the
    array sees the same values; trouble in the arithmetic is reported once, as _change reports it (the
    values counted are those from the first block with trouble on: the blocks before it came through
    the arithmetic clean)."""

    def __init__(self, info, var, blockwise, report):
        self.info, self.var, self.blockwise, self.report = info, var, blockwise, report
        self.reported = False

    def begin(self):
        return _ElementwisePass(self)


class _ElementwisePass:
    def __init__(self, change: _Elementwise):
        self.change = change
        self.fn = change.blockwise(change.info, change.var)
        self.trouble: list[str] = []
        self.bad = self.size = 0

    def __call__(self, block) -> None:
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, flag: self.trouble.append(kind)):
            self.fn(block)
        if self.trouble and block.dtype.kind == "f":
            self.bad += int(np.count_nonzero(~np.isfinite(block)))
        self.size += block.size

    def end(self) -> None:
        c = self.change
        if self.trouble and c.report is not None and not c.reported:
            c.reported = True
            c.report.notes.append(_trouble_note(c.info, c.var, self.trouble, self.bad, self.size))


def _keras_initializer(ctx, stmt, call: Call):
    keras = ctx.keras()
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
    # the recipe's seed, per statement, layer and variable, unless the recipe gave the initializer one
    seed = None if explicit_seed else ctx.derive_seed(stmt, info.path, var.name) % (2**31 - 1)
    try:
        return ctx.initial_values(init, tuple(var.shape), var.dtype, seed)
    except Exception as exc:
        raise ApplyError(f"{info.path}: {var.name}: initializer failed: {exc}", span=stmt.span) from None


def prune_array(a: np.ndarray, percent: float) -> np.ndarray:
    """Zero, in place, the ``percent`` % entries of ``a`` of smallest magnitude (ties broken by position,
    stably); returns ``a``."""
    k = int(np.floor(a.size * percent / 100.0))
    if k > 0:
        flat = a.reshape(-1)  # a view of a contiguous array
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:k]] = 0
    return a


def _constant_source(ctx, stmt, call: Call):
    """``zeros``/``ones``/``constant(v)`` as the array keras.initializers would fill with, or None when
    only Keras can say (Constant is ``ops.cast(value, dtype) * ops.ones(shape, dtype)``, and TensorFlow
    first makes a Python float a float32 tensor, an int an int32 one: a float64 array gets float32(v)
    widened)."""
    kind = CONSTANT_FILLS.get(call.name)
    if kind is None:
        return None
    args = [ctx.value(v, stmt) for v in call.args]
    kwargs = {k: ctx.value(v, stmt) for k, v in call.kwargs}
    if kind != "constant":
        return None if args or kwargs else np.asarray(0 if kind == "zeros" else 1, np.int8)
    if len(args) + len(kwargs) > 1 or set(kwargs) - {"value"}:
        return None
    value = args[0] if args else kwargs.get("value", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not -2**31 <= value < 2**31:
        return None
    if isinstance(value, float) and not abs(value) <= float(np.finfo(np.float32).max):
        return None
    return np.asarray(value, np.float32 if isinstance(value, float) else np.int32)


def _set_trainable(ctx, stmt, flag: bool):
    report = ctx.report(stmt)
    infos = ctx.selected(stmt)
    report.layers.extend(info.path for info in infos)
    word = "trainable" if flag else "frozen"
    for target in ctx.flag_targets(infos, flag):
        if target.path in target.covers and len(target.covers) == 1:  # the layer's own flag
            if bool(target.layer.trainable) != flag:
                report.changes.append(f"{target.path}: trainable {target.layer.trainable} -> {flag}")
                target.layer.trainable = flag  # cheap and needed for later `trainable` predicates, even in a plan
        else:  # a model's or a composite layer's flag, for every selected layer inside it
            what = target.path or "the model"
            if bool(target.layer.trainable) != flag:
                report.changes.append(f"{what}: trainable {target.layer.trainable} -> {flag} (its "
                                      f"{len(target.covers)} layers)")
            target.layer.trainable = flag  # the setter passes it on to every layer inside
        if target.status == "not restored":
            report.notes.append(f"Keras saves {target.path}'s flag but its loader does not pass it on to the "
                                f"sublayers {target.path} builds: load the file with modelxform.load_model, or set "
                                f"the flag again after keras.saving.load_model")
        elif target.status == "not saved":
            report.unsaved.append(target.why)
    if not report.changes and not report.unsaved:
        report.notes.append(f"every selected layer was already {word}")
    elif ctx.is_subclassed() and report.changes:
        report.notes.append(SUBCLASSED_TRAINABLE_NOTE)
    return report


# Keras saves a subclassed model's weights but not its sublayers' trainable flags (they are not in its
# config), so the flag holds in memory but not in a saved file; apply_file refuses to save such a result.
SUBCLASSED_TRAINABLE_NOTE = ("this is a subclassed model: the new trainable flags hold in memory, but Keras "
                             "does not save them with the model")
