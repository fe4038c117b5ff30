"""Deployment graph transforms: fold batchnorm, set input shape, prune channels.

Like the other structural statements they decide everything they can before the model changes (a
plan says which layers fold or shrink, and a refusal names the layer), then queue one edit on the
graph editor's copy of the config; the rebuild gives the changed layers arrays computed from the
model before the edit (the folded kernels, the kept channels).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ApplyError
from ..ir import SPAN, Bare, ParamRef, Percent, format_value
from ..source import Span
from .structure import StructuralStatement


def _percent(c, node) -> Percent:
    """``25%`` or ``$p%`` (the grammar's ``percent`` rule)."""
    tok = node.children[0]
    if tok.type == "PARAM":
        return Percent(ParamRef(tok.value[1:], span=c.span(tok)))
    value = c.number_text(tok.value[:-1], tok)
    if not 0 <= value < 100:
        c.error(f"prune channels takes a percentage from 0% to under 100%, not {tok.value}", tok)
    return Percent(value)


def _shape_text(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


@dataclass(frozen=True)
class FoldBatchNorm(Bare, StructuralStatement):
    """``fold batchnorm`` — every BatchNormalization that directly follows a Conv, DepthwiseConv,
    SeparableConv or Dense layer is folded into that layer's kernel and bias and removed (after a
    ``select``: only the selected ones, or those following a selected layer)."""

    span: Span | None = field(**SPAN)
    keyword = "fold"
    words = "fold batchnorm"
    rules = ("fold_stmt",)
    yaml_key = "fold_batchnorm"
    plan_tag = "weights"

    def run(self, ctx):
        # the layers as they stand (pending edits rebuilt first): their arrays are what folds
        infos = {info.path: info for info in ctx.layers()}
        wanted = set(ctx.selection) if ctx.selection is not None else None
        editor = ctx.editor(self)
        folds, skips = editor.batchnorm_folds(infos, wanted)
        if not folds and not skips:
            if wanted is not None:
                raise ApplyError("fold batchnorm: the selection holds no BatchNormalization layer and no layer "
                                 "that one follows", span=self.span)
            raise ApplyError("fold batchnorm: the model has no BatchNormalization layer", span=self.span)
        report = ctx.report(self)
        for fold in folds:
            into = infos[fold.into].params()
            report.layers.extend([fold.into, fold.bn])
            report.changes.append(
                f"{fold.bn} folded into {fold.into} ({fold.into_type}"
                + (", bias added" if fold.bias_added else "")
                + f"): params {into:,} + {fold.bn_params:,} -> {into + fold.bias_added:,}")
        for skip in skips:
            report.notes.append(f"skipped {skip.bn}: {skip.reason}")
        before = sum(info.params() for info in infos.values())
        after = before - sum(f.bn_params for f in folds) + sum(f.bias_added for f in folds)
        report.changes.append(f"folded {len(folds)} BatchNormalization layer{'s' if len(folds) != 1 else ''}, "
                              f"skipped {len(skips)}; model params {before:,} -> {after:,}")
        if folds:
            editor.queue(self, lambda ed: ed.fold_batchnorm(folds))
            ctx.forget([f.bn for f in folds])
        return report


@dataclass(frozen=True)
class SetInputShape(StructuralStatement):
    """``set input shape (None, 96, 96, 3)`` — rebuild the model for another input size (or a fixed
    batch: ``(1, 224, 224, 3)``), weights unchanged; ``set input 1 shape (None, 128)`` for the second
    input of a model with several."""

    shape: tuple
    index: int | None = None
    span: Span | None = field(**SPAN)
    keyword = "set"
    rules = ("input_shape_stmt",)
    yaml_key = "set_input_shape"
    plan_tag = "config"

    def __str__(self) -> str:
        where = "input" if self.index is None else f"input {self.index}"
        return f"set {where} shape {_shape_text(self.shape)}"

    @classmethod
    def compile(cls, c, node, span):
        kids = list(node.children)
        index = c.leading_index(kids, node, "an input index")
        dims = c.dims(kids[0], 1, "an input dimension is a whole number ≥ 1 or None")
        if len(dims) < 2:
            c.error("an input shape has the batch dimension and at least one more, e.g. (None, 128)", kids[0])
        return cls(tuple(dims), index, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "set_input_shape", {"shape": True, "input": False})
        if not f or "shape" not in f:
            return None
        if not r.is_sequence(f["shape"]):
            r.error(f["shape"], "shape is a list such as [null, 96, 96, 3]")
            return None
        dims = []
        for item in r.items(f["shape"]):
            value = r.value(item)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                r.error(item, "an input dimension is a whole number ≥ 1 or null")
            dims.append(value)
        if len(dims) < 2:
            r.error(f["shape"], "an input shape has the batch dimension and at least one more, e.g. [null, 128]")
        index = r.value(f["input"]) if "input" in f else None
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            r.error(f["input"], "input is a whole number ≥ 0")
            index = None
        return cls(tuple(dims), index, span=span)

    def yaml(self, w):
        body = {"shape": list(self.shape)}
        if self.index is not None:
            body["input"] = self.index
        return {"set_input_shape": body}

    def run(self, ctx):
        editor = ctx.editor(self)
        inputs = editor.inputs()
        if self.index is None and len(inputs) > 1:
            names = ", ".join(name for name, _ in inputs)
            raise ApplyError(f"the model has {len(inputs)} inputs ({names}); say which: set input N shape …",
                             span=self.span, hint="inputs count from 0: set input 1 shape … is the second")
        index = self.index or 0
        if index >= len(inputs):
            raise ApplyError(f"the model has {len(inputs)} input{'s' if len(inputs) != 1 else ''}; there is no "
                             f"input {index}", span=self.span)
        name, old = inputs[index]
        shape = list(self.shape)
        if old is not None and len(old) != len(shape):
            raise ApplyError(f"input {name} has {len(old)} dimensions {_shape_text(old)}; {_shape_text(shape)} has "
                             f"{len(shape)}", span=self.span)
        report = ctx.report(self, layers=[name])
        if old is not None and list(old) == shape:
            report.notes.append(f"input {name} already has the shape {_shape_text(shape)}")
            return report
        editor.queue(self, lambda ed: ed.set_input_shape(index, shape, self))
        report.changes.append(f"input {name}: {_shape_text(old) if old is not None else '?'} -> {_shape_text(shape)}; "
                              "weights unchanged")
        return report


@dataclass(frozen=True)
class PruneChannels(StructuralStatement):
    """``select where type=Conv2D; prune channels 25%`` — structured pruning: each selected Conv/Dense
    layer loses the 25% of its output channels with the smallest L1 norm, and every layer downstream
    shrinks to match (residual merge groups are pruned jointly)."""

    amount: Percent
    span: Span | None = field(**SPAN)
    keyword = "prune"
    rules = ("channels_stmt",)
    yaml_key = "prune_channels"
    needs_selection = True
    plan_tag = "weights"

    def __str__(self) -> str:
        return f"prune channels {self.amount}"

    @classmethod
    def compile(cls, c, node, span):
        return cls(_percent(c, node.children[0]), span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "prune_channels", {"percent": True})
        if not f or "percent" not in f:
            return None
        return cls(Percent(r.number(f["percent"], "percent")), span=span)

    def yaml(self, w):
        return {"prune_channels": {"percent": w.value(self.amount.value)}}

    def run(self, ctx):
        percent = ctx.number(self.amount.value, self)
        if not 0 <= percent < 100:
            raise ApplyError(f"prune channels takes a percentage from 0% to under 100%, not {format_value(percent)}%",
                             span=self.span)
        selected = [info.path for info in ctx.selected(self)]
        infos = {info.path: info for info in ctx.layers()}
        editor = ctx.editor(self)
        try:
            plan = editor.plan_channel_pruning(infos, selected, percent)
        except ApplyError as exc:
            raise ApplyError(exc.message, span=self.span, hint=exc.hint or
                             "select only layers whose channels can shrink everywhere they go") from None
        if not plan.groups:
            kinds = sorted({infos[p].type_name for p in selected if p in infos})
            raise ApplyError("prune channels acts on Conv and Dense layers, and the selection holds none "
                             f"(it holds {', '.join(kinds)})", span=self.span)
        report = ctx.report(self, layers=list(plan.changed))
        for _, producers, channels, kept in plan.groups:
            if len(producers) > 1:
                report.changes.append(f"pruned jointly (they meet at merge layers): {', '.join(producers)}: "
                                      f"channels {channels} -> {kept}")
        report.changes.extend(plan.lines)
        before = sum(info.params() for info in infos.values())
        after = before - plan.params_before + plan.params_after
        report.changes.append(f"model params {before:,} -> {after:,}")
        if plan.skipped:
            report.notes.append(f"skipped {len(plan.skipped)} selected layer(s) that are not Conv or Dense: "
                                + ", ".join(plan.skipped[:5]) + (" …" if len(plan.skipped) > 5 else ""))
        editor.queue(self, lambda ed: ed.prune_channels(plan))
        return report
