"""Lark tree -> ir.Program, with includes, parameters and the static checks.

Never imports TensorFlow or Keras: ``check`` and ``fmt`` must start in a fraction of a second. The
compiler knows Keras layer class names from the snapshot in keras_names.py.
"""
from __future__ import annotations

import difflib
import os
import pathlib
import re

from lark import Token, Tree

from . import ir, safe_regex
from .errors import Diagnostic, RecipeError
from .keras_names import INITIALIZERS, LAYER_CLASSES
from .parser import parse
from .source import Source, Span

MAX_INCLUDE_DEPTH = 16
MAX_PRED_DEPTH = 64
NOISE_DISTRIBUTIONS = {"normal": ("mean", "stddev"), "uniform": ("low", "high")}
# Names that select nested models by type: keras.Model subclasses, not in keras.layers.
MODEL_CLASSES = ("Functional", "Sequential", "Model")
_CAMEL = re.compile(r"[A-Z][A-Za-z0-9]*\Z")


def is_layer_type(word: str) -> bool:
    """A CamelCase word that names a Keras layer class (or a model class) is a type."""
    return word in LAYER_CLASSES or word in MODEL_CLASSES


def canonical_type(word: str) -> str:
    """Aliases (MaxPool2D) map to the class name Keras reports (MaxPooling2D)."""
    return LAYER_CLASSES.get(word, word)


def suggest(word: str, candidates) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return matches[0] if matches else None


def requires_problem(spec: str) -> tuple[str, str | None] | None:
    """(message, hint) when the running modelxform does not satisfy ``requires modelxform SPEC``."""
    from .version import VersionSpecError, __version__, satisfies
    try:
        if satisfies(__version__, spec):
            return None
    except VersionSpecError as exc:
        return str(exc), None
    return (f"this recipe requires modelxform {spec}, but this is modelxform {__version__}",
            "upgrade modelxform, or relax the `requires` line")


def _span(meta_or_token, filename: str | None) -> Span | None:
    if isinstance(meta_or_token, Token):
        t = meta_or_token
        return Span(t.line, t.column, t.end_line or t.line, t.end_column or t.column + 1, filename)
    m = meta_or_token.meta if isinstance(meta_or_token, Tree) else meta_or_token
    if getattr(m, "empty", True):
        return None
    return Span(m.line, m.column, m.end_line, m.end_column, filename)


class _Compiler:
    def __init__(self, source: Source, stack: tuple[str, ...], loader):
        self.source = source
        self.filename = source.filename
        self.stack = stack
        self.loader = loader
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []

    # -- helpers ------------------------------------------------------------------------------
    def error(self, message: str, node, hint: str | None = None) -> None:
        span = node if isinstance(node, Span) or node is None else _span(node, self.filename)
        self.errors.append(Diagnostic(message, span, self.source, hint))

    def span(self, node) -> Span | None:
        return _span(node, self.filename)

    def number(self, tok):
        if isinstance(tok, Tree):
            tok = tok.children[0]
        if tok.type == "PARAM":
            return ir.ParamRef(tok.value[1:], span=self.span(tok))
        text = tok.value
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            self.error(f"number {text} is out of range", tok)
        return value

    def quantity(self, tok):
        if isinstance(tok, Tree):
            tok = tok.children[0]
        if tok.type == "SIZE":
            scale = {"K": 10**3, "M": 10**6, "G": 10**9}[tok.value[-1]]
            digits = tok.value[:-1]
            value = int(digits) * scale if digits.isdigit() else float(digits) * scale
            return int(value) if float(value).is_integer() else value
        return self.number(tok)

    def value(self, node):
        if isinstance(node, Token):
            if node.type == "NUMBER":
                return self.number(node)
            if node.type == "STRING":
                return ir.unquote(node.value)
            if node.type == "PARAM":
                return ir.ParamRef(node.value[1:], span=self.span(node))
            self.error(f"unexpected {node.value!r} where a value was expected", node)
            return None
        kind = node.data
        if kind == "number":
            return self.number(node.children[0])
        if kind == "string":
            return ir.unquote(node.children[0].value)
        if kind == "param_ref":
            return ir.ParamRef(node.children[0].value[1:], span=self.span(node))
        if kind == "true":
            return True
        if kind == "false":
            return False
        if kind == "none":
            return None
        if kind == "tuple":
            return tuple(self.value(c) for c in node.children)
        if kind == "list":
            return [self.value(c) for c in node.children]
        self.error(f"unexpected {kind} where a value was expected", node)
        return None

    def call(self, node: Tree) -> ir.Call:
        name_tok, *args = node.children
        positional, keywords, seen = [], [], set()
        for arg in args:
            if arg.data == "kwarg":
                key = arg.children[0].value
                if key in seen:
                    self.error(f"argument {key!r} is given twice", arg.children[0])
                seen.add(key)
                keywords.append((key, self.value(arg.children[1])))
            else:
                if keywords:
                    self.error("a positional argument cannot follow a keyword argument", arg)
                positional.append(self.value(arg.children[0]))
        return ir.Call(name_tok.value, tuple(positional), tuple(keywords), span=self.span(node))

    def ref(self, node: Tree, *, allow_type: bool = True) -> ir.Ref:
        span = self.span(node)
        kind = node.data
        if kind == "ref_glob":
            return ir.Ref("glob", ir.unquote(node.children[0].value), span=span)
        if kind == "ref_type":
            word = node.children[0].value
            self.check_type_name(word, node.children[0], strict=False)
            return ir.Ref("type", canonical_type(word), explicit=True, span=span)
        path = "/".join(t.value for t in node.children)
        if kind == "ref_layer":
            return ir.Ref("name", path, explicit=True, span=span)
        if "/" not in path and is_layer_type(path):
            return ir.Ref("type", canonical_type(path), span=span)
        return ir.Ref("name", path, span=span)

    def check_type_name(self, word: str, node, *, strict: bool) -> None:
        """Unknown class names that look like a typo of a Keras class are errors; other unknown
        names may be custom layers registered by --import and are checked against the model."""
        if is_layer_type(word):
            return
        guess = suggest(word, list(LAYER_CLASSES) + list(MODEL_CLASSES))
        if guess is not None:
            self.error(f"unknown layer type {word!r} (did you mean {guess!r}?)", node)
        elif strict and not _CAMEL.match(word):
            self.error(f"{word!r} is not a layer type: layer classes are CamelCase, e.g. Dense", node)

    # -- predicates ---------------------------------------------------------------------------
    def pred(self, node: Tree, depth: int = 0):
        if depth > MAX_PRED_DEPTH:
            self.error(f"predicate is nested more than {MAX_PRED_DEPTH} levels deep", node)
            return ir.PTrainable(span=self.span(node))
        span = self.span(node)
        kind = node.data
        kids = node.children
        if kind == "p_or":
            return ir.POr(self.pred(kids[0], depth + 1), self.pred(kids[1], depth + 1), span=span)
        if kind == "p_and":
            return ir.PAnd(self.pred(kids[0], depth + 1), self.pred(kids[1], depth + 1), span=span)
        if kind == "p_not":
            return ir.PNot(self.pred(kids[0], depth + 1), span=span)
        if kind in ("p_type", "p_type_in"):
            names = [t for t in kids if isinstance(t, Token)]
            for t in names:
                self.check_type_name(t.value, t, strict=True)
            return ir.PType(tuple(canonical_type(t.value) for t in names), span=span)
        if kind == "p_name":
            tok = kids[-1]
            return ir.PName(ir.unquote(tok.value) if tok.type == "STRING" else tok.value, span=span)
        if kind == "p_regex":
            pattern = ir.unquote(kids[0].value)
            try:
                safe_regex.check(pattern)  # compiles it, and refuses patterns that could hang a run
            except re.error as exc:
                self.error(f"invalid regular expression: {exc}", kids[0])
            return ir.PRegex(pattern, span=span)
        if kind == "p_trainable":
            return ir.PTrainable(span=span)
        if kind == "p_has_weights":
            return ir.PHasWeights(span=span)
        if kind == "p_params":
            op = self.cmp(kids[0])
            return ir.PParams(op, self.quantity(kids[1]), span=span)
        self.error(f"unknown predicate {kind}", node)  # unreachable while grammar and compiler agree
        return ir.PTrainable(span=span)

    @staticmethod
    def cmp(node: Tree) -> str:
        op = node.children[0].value
        return "==" if op == "=" else op

    def count(self, node: Tree):
        if node.data == "param_percent":
            return ir.Percent(ir.ParamRef(node.children[0].value[1:], span=self.span(node)))
        tok = node.children[0]
        if tok.type == "PERCENT":
            value = self.number(Token("NUMBER", tok.value[:-1]))
            if not 0 < value <= 100:
                self.error("a percentage of layers must be above 0% and at most 100%", tok)
            return ir.Percent(value)
        value = self.number(tok)
        if not isinstance(value, ir.ParamRef) and (not isinstance(value, int) or value < 1):
            self.error(f"a count of layers must be a whole number of at least 1, not {tok.value}", tok)
        return value

    # -- statements ---------------------------------------------------------------------------
    def statement(self, node: Tree):
        method = getattr(self, "s_" + node.data, None)
        if method is None:  # a grammar rule without a handler: tests/test_compiler.py guards this
            self.error(f"statement {node.data!r} is not supported yet", node)
            return None
        return method(node, self.span(node))

    def s_recipe_stmt(self, node, span):
        toks = node.children
        name = ir.unquote(toks[0].value)
        version = ir.unquote(toks[1].value) if len(toks) > 1 else None
        if version is not None and not re.fullmatch(r"\d+(\.\d+)*([.-]?[A-Za-z0-9]+)*", version):
            self.error(f"recipe version {version!r} is not a version number such as \"1.2.0\"", toks[1])
        return ir.RecipeHeader(name, version, span=span)

    def s_requires_stmt(self, node, span):
        spec = ir.unquote(node.children[0].value)
        problem = requires_problem(spec)
        if problem:
            self.error(problem[0], node.children[0], hint=problem[1])
        return ir.Requires(spec, span=span)

    def s_seed_stmt(self, node, span):
        value = self.number(node.children[0])
        if not isinstance(value, ir.ParamRef) and (not isinstance(value, int) or value < 0):
            self.error(f"seed must be a whole number ≥ 0, not {node.children[0].value}", node.children[0])
        return ir.Seed(value, span=span)

    def s_param_stmt(self, node, span):
        value = self.value(node.children[1])
        if isinstance(value, ir.ParamRef):
            self.error("a parameter's default must be a literal value, not another parameter", node.children[1])
        return ir.Param(node.children[0].value, value, span=span)

    def s_include_stmt(self, node, span):
        path = ir.unquote(node.children[0].value)
        sub = self.loader(path, span, self)
        return ir.Include(path, sub, span=span) if sub is not None else None

    def s_select_stmt(self, node, span):
        sel = node.children[0]
        kind = sel.data
        if kind == "sel_all":
            selector = ir.SelAll()
        elif kind == "sel_refs":
            selector = ir.SelRefs(tuple(self.ref(r) for r in sel.children))
        elif kind == "sel_where":
            selector = ir.SelWhere(self.pred(sel.children[0]))
        else:
            mode = sel.children[0].data
            count = pred = None
            for child in sel.children[1:]:
                if child.data in ("count", "param_percent"):
                    count = self.count(child)
                else:
                    pred = self.pred(child)
            selector = ir.SelSample(mode, count, pred)
        return ir.Select(selector, span=span)

    def target(self, tok: Token) -> str:
        return tok.value

    def s_scale_stmt(self, node, span):
        return ir.Scale(self.target(node.children[0]), self.number(node.children[1]), span=span)

    def s_noise_stmt(self, node, span):
        dist = self.call(node.children[0])
        allowed = NOISE_DISTRIBUTIONS.get(dist.name)
        if allowed is None:
            guess = suggest(dist.name, NOISE_DISTRIBUTIONS)
            self.error(f"unknown noise distribution {dist.name!r}"
                       + (f" (did you mean {guess!r}?)" if guess else "")
                       + "; use normal(mean=…, stddev=…) or uniform(low=…, high=…)", node.children[0])
        else:
            if dist.args:
                self.error(f"{dist.name}(…) takes keyword arguments: {', '.join(a + '=' for a in allowed)}",
                           node.children[0])
            for key, value in dist.kwargs:
                if key not in allowed:
                    self.error(f"{dist.name}() has no argument {key!r}; it takes {', '.join(allowed)}",
                               node.children[0])
                elif not isinstance(value, (int, float, ir.ParamRef)) or isinstance(value, bool):
                    self.error(f"{dist.name}({key}=…) must be a number", node.children[0])
        return ir.AddNoise(dist, self.target(node.children[1]), span=span)

    def initializer(self, node: Tree) -> ir.Call:
        if node.data == "init_name":
            tok = node.children[0]
            call = ir.Call(tok.value, bare=True, span=self.span(tok))
        else:
            call = self.call(node.children[0])
        if call.name not in INITIALIZERS:
            guess = suggest(call.name, INITIALIZERS)
            self.error(f"unknown initializer {call.name!r}" + (f" (did you mean {guess!r}?)" if guess else ""),
                       node, hint="any name from keras.initializers works, e.g. zeros, he_normal, constant(0.1)")
        return call

    def s_reinit_stmt(self, node, span):
        init = self.initializer(node.children[1]) if len(node.children) > 1 else None
        return ir.Reinit(self.target(node.children[0]), init, span=span)

    def s_fill_stmt(self, node, span):
        return ir.Fill(self.target(node.children[0]), self.initializer(node.children[1]), span=span)

    def s_clip_stmt(self, node, span):
        low, high = self.number(node.children[1]), self.number(node.children[2])
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            self.error(f"clip bounds are in the wrong order: {low} > {high}", node)
        return ir.Clip(self.target(node.children[0]), low, high, span=span)

    def s_prune_stmt(self, node, span):
        pnode = node.children[1]
        tok = pnode.children[0]
        if tok.type == "PARAM":
            amount = ir.Percent(ir.ParamRef(tok.value[1:], span=self.span(tok)))
        else:
            value = self.number(Token("NUMBER", tok.value[:-1]))
            if not 0 <= value <= 100:
                self.error(f"prune takes a percentage from 0% to 100%, not {tok.value}", tok)
            amount = ir.Percent(value)
        return ir.Prune(self.target(node.children[0]), amount, span=span)

    def s_freeze_stmt(self, node, span):
        return ir.Freeze(span=span)

    def s_unfreeze_stmt(self, node, span):
        return ir.Unfreeze(span=span)

    def s_replace_stmt(self, node, span):
        src_node, repl_node = node.children
        source = None if src_node.data == "src_selected" else self.ref(src_node.children[0])
        if repl_node.data == "repl_type":
            tok = repl_node.children[0]
            replacement = ir.Call(canonical_type(tok.value), bare=True, span=self.span(tok))
            self.check_type_name(tok.value, tok, strict=True)
        else:
            replacement = self.call(repl_node.children[0])
            self.check_type_name(replacement.name, repl_node, strict=True)
            replacement = ir.Call(canonical_type(replacement.name), replacement.args, replacement.kwargs,
                                  span=replacement.span)
            if replacement.args:
                self.error("layer constructors take keyword arguments only, e.g. Dense(units=10)", repl_node)
        return ir.Replace(source, replacement, span=span)

    def s_tap_stmt(self, node, span):
        refs, only = [], False
        for child in node.children:
            if child.data == "only":
                only = True
                continue
            ref = self.ref(child)
            if ref.kind == "type":
                self.error(f"tap takes layer names, and {ref.text!r} is a layer type",
                           child, hint=f"write `layer {ref.text}` for a layer named so")
            refs.append(ref)
        return ir.Tap(tuple(refs), only, span=span)

    def constructor(self, node) -> ir.Call:
        call = self.call(node)
        self.check_type_name(call.name, node, strict=True)
        if call.args:
            self.error("layer constructors take keyword arguments only, e.g. Dropout(rate=0.5)", node)
        return ir.Call(canonical_type(call.name), call.args, call.kwargs, span=call.span)

    def layer_ref(self, node, what: str) -> ir.Ref:
        ref = self.ref(node)
        if ref.kind == "type":
            self.error(f"{what} takes a layer name, and {ref.text!r} is a layer type", node,
                       hint=f"write `layer {ref.text}` for a layer named so")
        return ref

    def s_insert_stmt(self, node, span):
        call_node, pos, anchor = node.children
        return ir.Insert(self.constructor(call_node), pos.data, self.layer_ref(anchor, "insert"), span=span)

    def s_remove_selected(self, node, span):
        return ir.Remove(selected=True, span=span)

    def s_remove_where(self, node, span):
        return ir.Remove(pred=self.pred(node.children[0]), span=span)

    def s_remove_refs(self, node, span):
        return ir.Remove(refs=tuple(self.ref(r) for r in node.children), span=span)

    def s_swap_stmt(self, node, span):
        a, b = (self.layer_ref(r, "swap") for r in node.children)
        return ir.Swap(a, b, span=span)

    def s_shuffle_stmt(self, node, span):
        return ir.Shuffle(span=span)

    def s_cut_stmt(self, node, span):
        return ir.Cut(self.layer_ref(node.children[0], "cut"), span=span)

    def s_append_stmt(self, node, span):
        anchor = self.layer_ref(node.children[1], "append … after") if len(node.children) > 1 else None
        return ir.Append(self.constructor(node.children[0]), anchor, span=span)

    def s_config_stmt(self, node, span):
        key = node.children[0].value
        if key == "name":
            self.error("a layer's name is changed with `rename to \"…\"`, not `set name = …`", node.children[0])
        return ir.SetConfig(key, self.value(node.children[1]), span=span)

    def s_rename_to(self, node, span):
        return self._rename("to", node, span)

    def s_rename_prefix(self, node, span):
        return self._rename("prefix", node, span)

    def _rename(self, mode, node, span):
        text = ir.unquote(node.children[0].value)
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", text):
            self.error(f"layer names use letters, digits, '_', '.' and '-', not {text!r}", node.children[0])
        return ir.Rename(mode, text, span=span)

    def s_load_stmt(self, node, span):
        return ir.LoadWeights(ir.unquote(node.children[0].value), len(node.children) > 1, span=span)

    def s_assert_equivalent(self, node, span):
        tolerance = self.number(node.children[0]) if node.children else None
        if isinstance(tolerance, (int, float)) and tolerance < 0:
            self.error("a tolerance is a number ≥ 0", node.children[0])
        return ir.AssertEquivalent(tolerance, span=span)

    def s_assert_count(self, node, span):
        value = self.number(node.children[1])
        if isinstance(value, float):
            self.error("assert count compares with a whole number", node.children[1])
        return ir.AssertCount(self.cmp(node.children[0]), value, span=span)

    def s_assert_params(self, node, span):
        return ir.AssertParams(self.cmp(node.children[0]), self.quantity(node.children[1]), span=span)

    def s_assert_shape(self, node, span):
        kids = list(node.children)
        index = None
        if isinstance(kids[0], Token):
            index = self.number(kids.pop(0))
            if not isinstance(index, int) or index < 0:
                self.error("an output index is a whole number ≥ 0", node)
                index = 0
        op = self.cmp(kids[0])
        if op not in ("==", "!="):
            self.error("shapes compare with == or !=", kids[0])
        dims = []
        for dim in kids[1].children:
            tok = dim.children[0] if dim.children else None
            if tok is None or tok.type != "NUMBER":
                dims.append(None)
            else:
                value = self.number(tok)
                if not isinstance(value, int) or value < 0:
                    self.error(f"a dimension is a whole number or None, not {tok.value}", tok)
                dims.append(value)
        return ir.AssertShape(op, tuple(dims), index, span=span)

    # -- whole program --------------------------------------------------------------------------
    def compile(self) -> ir.Program:
        tree = parse(self.source)
        statements = []
        for node in tree.children:
            stmt = self.statement(node)
            if stmt is not None:
                statements.append(stmt)
        return ir.Program(tuple(statements), filename=self.filename)


def _check_program(program: ir.Program, source: Source, errors: list, warnings: list) -> None:
    """Checks that need the whole program (includes expanded): parameters, selections, headers."""
    def diag(msg, span, hint=None):
        return Diagnostic(msg, span, source if span is None or span.filename == source.filename else None, hint)

    declared: dict[str, ir.Param] = {}
    used: set[str] = set()
    seen_select = False
    headers: dict[type, ir.Statement] = {}

    def walk_values(obj):
        if isinstance(obj, ir.ParamRef):
            yield obj
        elif isinstance(obj, ir.Percent):
            yield from walk_values(obj.value)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                yield from walk_values(item)
        elif isinstance(obj, ir.Call):
            yield from walk_values(obj.args)
            for _, value in obj.kwargs:
                yield from walk_values(value)
        elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, ir.Program):
            for name in obj.__dataclass_fields__:
                if name != "span":
                    yield from walk_values(getattr(obj, name))

    flat = list(program.flat())
    for stmt in flat:
        if isinstance(stmt, ir.Param):
            if stmt.name in declared:
                first = declared[stmt.name].span
                errors.append(diag(f"parameter {stmt.name!r} is declared twice (first at "
                                   f"{first.location() if first else '?'})", stmt.span))
            declared[stmt.name] = stmt
    for stmt in flat:
        if isinstance(stmt, (ir.RecipeHeader, ir.Seed)):  # at most one of each (requires may repeat)
            if type(stmt) in headers:
                errors.append(diag(f"`{str(stmt).split()[0]}` is given twice", stmt.span))
            headers.setdefault(type(stmt), stmt)
        if isinstance(stmt, ir.Param):
            continue
        for ref in walk_values(stmt):
            used.add(ref.name)
            if ref.name not in declared:
                guess = suggest(ref.name, declared)
                errors.append(diag(f"unknown parameter ${ref.name}" + (f" (did you mean ${guess}?)" if guess else ""),
                                   ref.span or stmt.span, hint=f"declare it: param {ref.name} = …"))
        if isinstance(stmt, ir.Select):
            seen_select = True
        elif stmt.needs_selection and not seen_select:
            word = str(stmt).split()[0]
            errors.append(diag(f"`{word}` acts on the selected layers, but nothing is selected before it",
                               stmt.span, hint="add a `select …` statement before it, e.g. `select all`"))
    for name, stmt in declared.items():
        if name not in used:
            warnings.append(diag(f"parameter {name!r} is declared but never used", stmt.span))
    header = program.header()
    if header is None or header.version is None:
        warnings.append(Diagnostic("recipe has no version header, e.g. `recipe \"name\" version \"1.0.0\"`",
                                   Span(1, 1, 1, 2, source.filename), source))


class Recipe:
    """A compiled recipe: its program, its source and any warnings from the static checks.

    >>> recipe = compile_recipe('select where type=Dense; scale kernel 0.5')
    >>> str(recipe)
    'select where type=Dense\\nscale kernel 0.5\\n'
    """

    def __init__(self, program: ir.Program, source: Source, warnings: list[Diagnostic],
                 sources: dict[str, Source]):
        self.program = program
        self.source = source
        self.warnings = warnings
        self.sources = sources  # every file that went into it, by name (for error excerpts)

    def __str__(self) -> str:
        return str(self.program)

    @property
    def params(self) -> dict[str, ir.Value]:
        return {s.name: s.value for s in self.program.flat() if isinstance(s, ir.Param)}

    @property
    def seed(self) -> int | ir.ParamRef | None:
        for stmt in self.program.flat():
            if isinstance(stmt, ir.Seed):
                return stmt.value
        return None

    def plan(self, model, seed: int | None = None, params: dict | None = None):
        """Resolve every statement against ``model`` without changing it; returns a Report."""
        from .runner import run
        return run(self, model, seed=seed, params=params, dry_run=True)[1]

    def apply(self, model, seed: int | None = None, params: dict | None = None):
        """Apply the recipe to a copy of ``model``: returns ``(new_model, report)``."""
        from .runner import run
        return run(self, model, seed=seed, params=params)


def compile_recipe(text: str, filename: str | os.PathLike | None = None) -> Recipe:
    """Compile recipe text. Includes are resolved relative to ``filename`` (or the working folder).

    >>> compile_recipe('select all; freeze').program.statements[1]
    Freeze()
    """
    name = os.fspath(filename) if filename is not None else None
    source = Source(text, name)
    sources: dict[str, Source] = {source.name: source}
    errors: list[Diagnostic] = []
    warnings: list[Diagnostic] = []
    root = pathlib.Path(name).resolve() if name else None

    def loader(path: str, span: Span | None, parent):
        """Compile an included file (text or YAML); ``parent`` has .filename, .stack and .error()."""
        base = pathlib.Path(parent.filename).resolve().parent if parent.filename else pathlib.Path.cwd()
        target = (base / path).resolve()
        if len(parent.stack) >= MAX_INCLUDE_DEPTH:
            parent.error(f"includes are nested more than {MAX_INCLUDE_DEPTH} deep", span)
            return None
        if str(target) in parent.stack:
            chain = " -> ".join(pathlib.Path(p).name for p in parent.stack + (str(target),))
            parent.error(f"include cycle: {chain}", span)
            return None
        where = f"next to {pathlib.Path(parent.filename).name}" if parent.filename else "in the working folder"
        if not target.is_file():
            parent.error(f"included file {path!r} does not exist {where}", span)
            return None
        try:
            sub_text = read_recipe_text(target)
        except RecipeError as exc:
            parent.error(f"cannot include {path!r}: {exc.message.split(': ', 1)[-1]}", span)
            return None
        rel = os.path.relpath(target) if not os.path.isabs(path) else str(target)
        sub_source = Source(sub_text, rel)
        sources[rel] = sub_source
        try:
            program, sub_errors = compile_unit(sub_source, parent.stack + (str(target),))
        except RecipeError as exc:
            errors.extend(exc.diagnostics)
            return None
        errors.extend(sub_errors)
        return program

    def compile_unit(unit: Source, stack: tuple) -> tuple[ir.Program, list[Diagnostic]]:
        if not is_yaml_name(unit.filename):
            compiler = _Compiler(unit, stack, loader)
            return compiler.compile(), compiler.errors
        from .yaml_form import read_yaml
        parent = _Compiler(unit, stack, loader)  # used only for .filename, .stack and .error()

        def include(path, span, reader, node):
            sub = loader(path, span, parent)
            return ir.Include(path, sub, span=span) if sub is not None else None
        program, yaml_errors = read_yaml(unit, include)
        return program, yaml_errors + parent.errors

    program, unit_errors = compile_unit(source, (str(root),) if root else ())
    errors[:0] = unit_errors
    if not errors:
        _check_program(program, source, errors, warnings)
    if errors:
        for d in errors:  # attach the right file's text so each error can show its line
            if d.span is not None and d.span.filename in sources:
                d.source = sources[d.span.filename]
        errors.sort(key=lambda d: (d.span.filename or "", d.span.line, d.span.column) if d.span else ("", 0, 0))
        raise RecipeError(errors[0].message, diagnostics=errors)
    return Recipe(program, source, warnings, sources)


def is_yaml_name(filename) -> bool:
    return bool(filename) and str(filename).lower().endswith((".yaml", ".yml"))


def compile_fragment(text: str):
    """One statement of text syntax, without whole-program checks: (statement or None, errors).
    The YAML form uses it for the pieces it writes in text syntax (predicates, comparisons)."""
    compiler = _Compiler(Source(text, None), (), None)
    try:
        program = compiler.compile()
    except RecipeError as exc:
        return None, exc.diagnostics
    if compiler.errors or not program.statements:
        return None, compiler.errors
    return program.statements[0], []


def read_recipe_text(path: str | os.PathLike) -> str:
    """Read a recipe file as UTF-8, turning every I/O problem into a RecipeError."""
    p = pathlib.Path(path)
    try:
        if p.is_dir():
            raise RecipeError(f"{path}: is a directory, not a recipe file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except PermissionError:
        raise RecipeError(f"{path}: permission denied") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError(f"recipe is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                          span=Span(line, col, line, col + 1, str(path))) from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and compile a recipe file (``.recipe``)."""
    return compile_recipe(read_recipe_text(path), os.fspath(path))
