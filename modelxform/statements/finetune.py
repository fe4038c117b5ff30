"""Fine-tuning prep: lora, merge lora, quantize, cast.

They act on the selected layers of a built model (sublayers of attention and transformer blocks
included) with Keras's own primitives — ``enable_lora``, ``layer.quantize``, dtype policies — and make
sure the file written keeps what they did: each refuses, naming the layer, what Keras could not save or
load back (modelxform/keras_io/finetune.py says where Keras saves what).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Union

from ..errors import ApplyError
from ..ir import SPAN, Bare, ParamRef, Statement, format_value
from ..source import Span

QUANT_MODES = ("int8", "float8", "int4")
CAST_POLICIES = ("bfloat16", "float16", "float32", "mixed_bfloat16", "mixed_float16")
LORA_INITIALIZER = "he_uniform"  # what Keras's enable_lora draws A from


class FinetuneStatement(Statement):
    role = "finetune"
    needs_selection = True
    needs = "model"


def _refuse(stmt, reasons: list[str], hint: str) -> None:
    if reasons:
        more = f" (and {len(reasons) - 1} more: {', '.join(r.split(' ', 1)[0] for r in reasons[1:4])}" \
               + (" …)" if len(reasons) > 4 else ")") if len(reasons) > 1 else ""
        raise ApplyError(f"`{stmt}`: {reasons[0]}{more}", span=stmt.span, hint=hint)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _shape(v) -> str:
    return "(" + ", ".join(str(d) for d in v.shape) + ("," if len(v.shape) == 1 else "") + ")"


def _whole(c, tok, what: str, low: int, allow=()):
    """A whole number ≥ ``low`` (or one of ``allow``), or a $param."""
    value = c.number(tok)
    if not isinstance(value, ParamRef) and (not isinstance(value, int) or (value < low and value not in allow)):
        c.error(f"{what} is a whole number ≥ {low}" + (f" (or {', '.join(map(str, allow))})" if allow else "")
                + f", not {tok.value}", tok)
    return value


def _word(c, tok, expected: str, usage: str) -> None:
    if tok.value != expected:
        c.error(f"expected `{expected}` here, not `{tok.value}`: {usage}", tok)


@dataclass(frozen=True)
class Lora(FinetuneStatement):
    """``select "*/query", "*/value"; lora rank 8 alpha 16`` — LoRA adapters on the selected layers:
    A drawn from the seed (he_uniform, as Keras would), B zeros, the base kernel frozen."""

    rank: Union[int, ParamRef]
    alpha: Union[int, float, ParamRef, None] = None
    span: Span | None = field(**SPAN)
    keyword = "lora"
    rules = ("lora_stmt",)
    yaml_key = "lora"
    plan_tag = "lora"

    def __str__(self) -> str:
        return f"lora rank {format_value(self.rank)}" + \
            (f" alpha {format_value(self.alpha)}" if self.alpha is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        kids = node.children
        usage = "write `lora rank 8` or `lora rank 8 alpha 16`"
        _word(c, kids[0], "rank", usage)
        rank = _whole(c, kids[1], "a LoRA rank", 1)
        alpha = None
        if len(kids) > 2:
            _word(c, kids[2], "alpha", usage)
            alpha = c.number(kids[3])
            if isinstance(alpha, (int, float)) and alpha <= 0:
                c.error(f"alpha is a number > 0, not {kids[3].value}", kids[3])
        return cls(rank, alpha, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        f = r.mapping(body, "lora", {"rank": True, "alpha": False})
        if not f or "rank" not in f:
            return None
        return cls(r.number(f["rank"], "rank"), r.number(f["alpha"], "alpha") if "alpha" in f else None, span=span)

    def yaml(self, w):
        body = {"rank": w.value(self.rank)}
        if self.alpha is not None:
            body["alpha"] = w.value(self.alpha)
        return {"lora": body}

    def run(self, ctx):
        rank = ctx.number(self.rank, self)
        if not isinstance(rank, int) or rank < 1:
            raise ApplyError(f"`{self}`: a LoRA rank is a whole number ≥ 1, not {format_value(rank)}", span=self.span)
        alpha = None if self.alpha is None else ctx.number(self.alpha, self)
        if alpha is not None and alpha <= 0:
            raise ApplyError(f"`{self}`: alpha is a number > 0, not {format_value(alpha)}", span=self.span)
        infos = ctx.selected(self)
        _refuse(self, [r for r in map(ctx.lora_refusal, infos) if r],
                "select the layers to adapt, e.g. `select \"*/query\", \"*/value\"` or `select where type in "
                "(Dense, EinsumDense)`")
        report = ctx.report(self)
        before = ctx.trainable_params()
        initializers = ctx.keras().initializers
        for info in infos:
            kernel = next((v for v in info.weights if v.name in ("kernel", "embeddings")), None)
            a, b = ctx.enable_lora(info, rank, alpha)
            used = rank if alpha is None else alpha
            seed = ctx.derive_seed(self, info.path, a.name) % (2**31 - 1)
            report.layers.append(info.path)
            report.changes.append(f"{info.path}: LoRA rank {rank}, alpha {format_value(used)} (scale "
                                  f"{used / rank:g}): {a.name} {_shape(a)} seeded {LORA_INITIALIZER}, {b.name} "
                                  f"{_shape(b)} zeros" + (f"; {kernel.name} {_shape(kernel)} frozen" if kernel is not None else ""))
            # numpy's values, the same on every backend (keras_io/initializers.py)
            values = ctx.initial_values(initializers.get(LORA_INITIALIZER), tuple(a.shape), "float32", seed)
            report.then(lambda a=a, values=values: a.assign(values))
        after = ctx.trainable_params()
        report.changes.append(f"trainable parameters: {before:,} -> {after:,}")
        report.notes.append("the file written keeps the factors (modelxform.lora.h5): load it with "
                            "modelxform.load_model to train them; keras.saving.load_model zeroes them")
        return report


@dataclass(frozen=True)
class MergeLora(Bare, FinetuneStatement):
    """``select all; merge lora`` — fold the selected layers' LoRA factors into their kernels
    (kernel + alpha/rank · A·B) and drop LoRA: the same outputs, plain layers again."""

    span: Span | None = field(**SPAN)
    keyword = "merge lora"
    words = "merge lora"
    rules = ("merge_stmt",)
    yaml_key = "merge_lora"
    plan_tag = "lora"

    def run(self, ctx):
        infos = ctx.selected(self)
        with_lora = [i for i in infos if ctx.lora_state(i) is not None]
        if not with_lora:
            raise ApplyError(f"`{self}`: none of the selected layers has LoRA adapters", span=self.span,
                             hint="a file saved by model.save (or keras.saving.load_model's model) holds merged "
                                  "kernels and no factors; modelxform.load_model restores the factors of a file "
                                  "modelxform wrote")
        _refuse(self, [f"{i.path} is quantized ({ctx.quantization_mode(i)}): merging into its kernel would "
                       "re-quantize it" for i in with_lora if ctx.quantization_mode(i)], "merge lora before `quantize`")
        report = ctx.report(self)
        before = ctx.trainable_params()
        for info in with_lora:
            rank, alpha = ctx.lora_state(info)
            ctx.merge_lora(info)
            report.layers.append(info.path)
            report.changes.append(f"{info.path}: LoRA rank {rank}, alpha {format_value(alpha)} merged into its "
                                  "kernel; LoRA removed")
        report.changes.append(f"trainable parameters: {before:,} -> {ctx.trainable_params():,}")
        skipped = [i.path for i in infos if i not in with_lora]
        if skipped:
            report.notes.append(f"skipped {len(skipped)} selected layer(s) without LoRA: " + ", ".join(skipped[:5])
                                + (" …" if len(skipped) > 5 else ""))
        return report


@dataclass(frozen=True)
class Quantize(FinetuneStatement):
    """``select where type in (Dense, EinsumDense); quantize int8`` — Keras's own quantization of the
    selected layers only (int8, float8, int4 with an optional ``block size``)."""

    mode: str
    block_size: Union[int, ParamRef, None] = None
    span: Span | None = field(**SPAN)
    keyword = "quantize"
    rules = ("quantize_stmt",)
    yaml_key = "quantize"
    plan_tag = "quantized"

    def __str__(self) -> str:
        return f"quantize {self.mode}" + (f" block size {format_value(self.block_size)}"
                                          if self.block_size is not None else "")

    @classmethod
    def compile(cls, c, node, span):
        kids = node.children
        mode = kids[0].value
        if mode not in QUANT_MODES:
            guess = difflib.get_close_matches(mode, QUANT_MODES, n=1)
            c.error(f"unknown quantization mode {mode!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
                    + "; modes: " + ", ".join(QUANT_MODES), kids[0])
        block = None
        if len(kids) > 1:
            usage = "write `quantize int4 block size 64`"
            _word(c, kids[1], "block", usage)
            _word(c, kids[2], "size", usage)
            block = _whole(c, kids[3], "a block size", 1, allow=(-1,))
            if mode != "int4":
                c.error(f"`block size` is for int4 only, not {mode}", kids[1])
        return cls(mode, block, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        if not r.is_mapping(body):
            mode = r.string(body, "quantize")
            block = None
        else:
            f = r.mapping(body, "quantize", {"mode": True, "block_size": False})
            if not f or "mode" not in f:
                return None
            mode = r.string(f["mode"], "mode")
            block = r.number(f["block_size"], "block_size") if "block_size" in f else None
        if mode is None:
            return None
        if mode not in QUANT_MODES:
            r.error(body, f"unknown quantization mode {mode!r}; modes: {', '.join(QUANT_MODES)}")
            return None
        return cls(mode, block, span=span)

    def yaml(self, w):
        if self.block_size is None:
            return {"quantize": self.mode}
        return {"quantize": {"mode": self.mode, "block_size": w.value(self.block_size)}}

    def run(self, ctx):
        block = None if self.block_size is None else ctx.number(self.block_size, self)
        if block is not None and (not isinstance(block, int) or (block < 1 and block != -1)):
            raise ApplyError(f"`{self}`: a block size is a whole number ≥ 1 (or -1), not {format_value(block)}",
                             span=self.span)
        infos = ctx.selected(self)
        _refuse(self, [r for r in (ctx.quantize_refusal(i, self.mode) for i in infos) if r],
                "select the layers to quantize, e.g. `select where type in (Dense, EinsumDense)`; Keras quantizes "
                "Dense, EinsumDense and Embedding layers")
        before = {i.path: (ctx.policy_name(i), ctx.variable_bytes(i)) for i in infos}
        try:
            ctx.quantize(infos, self.mode, block)
        except (ValueError, NotImplementedError) as exc:  # Keras's own refusal names the layer
            raise ApplyError(f"`{self}`: {str(exc).strip().splitlines()[0]}", span=self.span) from None
        report = ctx.report(self, layers=[i.path for i in infos])
        total_before = total_after = 0
        for info in infos:
            policy, size = before[info.path]
            after = ctx.variable_bytes(info)
            total_before, total_after = total_before + size, total_after + after
            report.changes.append(f"{info.path}: {policy} -> {ctx.policy_name(info)}, {size:,} -> {after:,} bytes")
        report.changes.append(f"bytes of the quantized layers: {_bytes(total_before)} -> {_bytes(total_after)}")
        return report


@dataclass(frozen=True)
class Cast(FinetuneStatement):
    """``select all; cast bfloat16`` — the selected layers' dtype policy (bfloat16, float16, float32,
    mixed_bfloat16, mixed_float16), and their stored weights with it."""

    policy: str
    span: Span | None = field(**SPAN)
    keyword = "cast"
    rules = ("cast_stmt",)
    yaml_key = "cast"
    plan_tag = "cast"

    def __str__(self) -> str:
        return f"cast {self.policy}"

    @classmethod
    def compile(cls, c, node, span):
        tok = node.children[0]
        if tok.value not in CAST_POLICIES:
            guess = difflib.get_close_matches(tok.value, CAST_POLICIES, n=1)
            c.error(f"unknown dtype policy {tok.value!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
                    + "; policies: " + ", ".join(CAST_POLICIES), tok)
        return cls(tok.value, span=span)

    @classmethod
    def read_yaml(cls, r, body, span):
        policy = r.string(body, "cast")
        if policy is None:
            return None
        if policy not in CAST_POLICIES:
            r.error(body, f"unknown dtype policy {policy!r}; policies: {', '.join(CAST_POLICIES)}")
            return None
        return cls(policy, span=span)

    def yaml(self, w):
        return {"cast": self.policy}

    def run(self, ctx):
        infos = ctx.selected(self)
        _refuse(self, [r for r in (ctx.cast_refusal(i, self.policy) for i in infos) if r],
                "cast before `quantize` and `lora`")
        before = {i.path: (ctx.policy_name(i), ctx.variable_bytes(i)) for i in infos}
        ctx.cast(infos, self.policy, self)
        report = ctx.report(self, layers=[i.path for i in infos])
        total_before = total_after = 0
        for info in ctx.selected(self):
            policy, size = before[info.path]
            after = ctx.variable_bytes(info)
            total_before, total_after = total_before + size, total_after + after
            if policy != self.policy:
                report.changes.append(f"{info.path}: {policy} -> {self.policy}, {size:,} -> {after:,} bytes")
        if not report.changes:
            report.notes.append(f"every selected layer was already {self.policy}")
        else:
            report.changes.append(f"bytes of the cast layers: {_bytes(total_before)} -> {_bytes(total_after)}")
        return report
