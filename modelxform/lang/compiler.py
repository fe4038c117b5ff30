"""Lark tree -> ir.Program, with includes, parameters and the static checks.

Never imports TensorFlow or Keras: ``check`` and ``fmt`` must start in a fraction of a second. The
compiler knows Keras layer class names from the snapshot in keras_names.py. Each grammar rule of a
statement is compiled by its kind (modelxform/statements/), with the helpers of :class:`_Compiler`
that read values, layer references and predicates.
"""
from __future__ import annotations

import os
import pathlib
import re

from lark import Token, Tree

from .. import ir, statements
from ..errors import Diagnostic, RecipeError
from ..source import Source, Span
from ..statements.header import Include, Param, RecipeHeader, Seed, requires_problem  # noqa: F401  (re-exported)
from . import safe_regex
from .keras_names import INITIALIZERS, LAYER_CLASSES
from .names import CAMEL, MODEL_CLASSES, canonical_type, is_layer_type, suggest  # noqa: F401  (re-exported)
from .files import ReadRefused, read_bounded
from .parser import MAX_RECIPE_BYTES, parse

MAX_INCLUDE_DEPTH = 16
MAX_PRED_DEPTH = 64
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

    def percent_factor(self, tok):
        """``90%`` as the factor it means, 0.9: computed in decimal, so that the factor prints as the
        percentage reads (33.3% is 0.333, not 0.33299999999999996)."""
        from decimal import Decimal
        factor = Decimal(tok.value[:-1]) / 100
        if factor == factor.to_integral_value():
            return int(factor)
        return self.number(Token("NUMBER", format(factor.normalize(), "f"), tok.start_pos, tok.line, tok.column,
                                 tok.end_line, tok.end_column, tok.end_pos))

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
        if kind == "word":  # a bare word is the string it spells (the YAML form reads it so too)
            return node.children[0].value
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
        elif strict and not CAMEL.match(word):
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
        kind = statements.BY_RULE.get(node.data)
        if kind is None:  # a grammar rule without a statement kind: tests/test_statements.py guards this
            self.error(f"statement {node.data!r} is not supported yet", node)
            return None
        return kind.compile(self, node, self.span(node))

    def target(self, tok: Token) -> str:
        return tok.value

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

    def constructor(self, node) -> ir.Call:
        """A layer constructor, as Keras users write it: ``Dense(10, activation="relu")``. Positional
        arguments stay positional here (the compiler does not know the class's signature); the pass maps
        them to the class's parameters when the recipe is bound to a model."""
        call = self.call(node)
        self.check_type_name(call.name, node, strict=True)
        return ir.Call(canonical_type(call.name), call.args, call.kwargs, span=call.span)

    def layer_ref(self, node, what: str) -> ir.Ref:
        ref = self.ref(node)
        if ref.kind == "type":
            self.error(f"{what} takes a layer name, and {ref.text!r} is a layer type", node,
                       hint=f"write `layer {ref.text}` for a layer named so")
        return ref

    # helpers the statement kinds use besides the ones above
    suggest = staticmethod(suggest)
    canonical_type = staticmethod(canonical_type)
    canonical_type = staticmethod(lambda word: canonical_type(word))

    @staticmethod
    def is_token(node) -> bool:
        return isinstance(node, Token)

    def leading_index(self, kids: list, node, what: str):
        """The N of ``input N`` or ``output N`` when ``kids`` (the children of ``node``) begin with it, taken
        off ``kids``; else None. ``what`` names it in the error."""
        if not kids or not self.is_token(kids[0]):
            return None
        index = self.number(kids.pop(0))
        if not isinstance(index, int) or index < 0:
            self.error(f"{what} is a whole number ≥ 0", node)
            index = 0
        return index

    def dims(self, node, least: int, what: str) -> list:
        """The dimensions of a written shape ``(None, 96, 3)``: ints, or None where ``None`` is written;
        a number below ``least`` or not whole is an error that ``what`` begins."""
        dims = []
        for dim in node.children:
            tok = dim.children[0] if dim.children else None
            if tok is None or tok.type != "NUMBER":
                dims.append(None)
                continue
            value = self.number(tok)
            if not isinstance(value, int) or value < least:
                self.error(f"{what}, not {tok.value}", tok)
            dims.append(value)
        return dims

    def number_text(self, text: str, token):
        """A number written inside another token (the 50 of ``50%``), positioned at that token."""
        return self.number(Token("NUMBER", text, token.start_pos, token.line, token.column, token.end_line,
                                 token.end_column, token.end_pos))

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

    declared: dict[str, Param] = {}
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
        if isinstance(stmt, Param):
            if stmt.name in declared:
                first = declared[stmt.name].span
                errors.append(diag(f"parameter {stmt.name!r} is declared twice (first at "
                                   f"{first.location() if first else '?'})", stmt.span))
            declared[stmt.name] = stmt
    for stmt in flat:
        if isinstance(stmt, (RecipeHeader, Seed)):  # at most one of each (requires may repeat)
            if type(stmt) in headers:
                errors.append(diag(f"`{str(stmt).split()[0]}` is given twice", stmt.span))
            headers.setdefault(type(stmt), stmt)
        if isinstance(stmt, Param):
            continue
        for ref in walk_values(stmt):
            used.add(ref.name)
            if ref.name not in declared:
                guess = suggest(ref.name, declared)
                errors.append(diag(f"unknown parameter ${ref.name}" + (f" (did you mean ${guess}?)" if guess else ""),
                                   ref.span or stmt.span, hint=f"declare it: param {ref.name} = …"))
        if stmt.role == "select":
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
    """A compiled recipe: its program, its source and any warnings from the static checks (the
    public modelxform.Recipe adds plan() and apply()).

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
        return {s.name: s.value for s in self.program.flat() if isinstance(s, Param)}

    @property
    def seed(self) -> int | ir.ParamRef | None:
        for stmt in self.program.flat():
            if isinstance(stmt, Seed):
                return stmt.value
        return None



INCLUDE_ROOT_ENV = "MODELXFORM_INCLUDE_ROOT"  # confines includes to a folder (docs/language.md#include)


def include_root_from(include_root: str | os.PathLike | None) -> pathlib.Path | None:
    """The folder includes are confined to: ``include_root``, else $MODELXFORM_INCLUDE_ROOT, else none."""
    chosen = os.fspath(include_root) if include_root is not None else os.environ.get(INCLUDE_ROOT_ENV) or None
    return pathlib.Path(chosen).resolve() if chosen else None


def compile_recipe(text: str, filename: str | os.PathLike | None = None, *, recipe_class=Recipe,
                   include_root: str | os.PathLike | None = None, allow_include: bool = True,
                   foreign: bool = False) -> Recipe:
    """Compile recipe text. Includes are resolved relative to the including file (``filename``, or the
    working folder for text without one); with ``include_root`` (or $MODELXFORM_INCLUDE_ROOT) only files
    inside that folder may be included, symbolic links resolved. ``allow_include=False`` refuses every
    include (verify: a recorded recipe never holds one). ``recipe_class``: what to return
    (modelxform.Recipe adds plan() and apply()). ``foreign``: the file was named by someone else (a
    ZOO.yaml's `recipes`), so it is held to an included file's rule: a YAML file that is not a list of
    statements is refused as not recipe text (a RecipeError marked ``not_recipe_text``), not quoted.

    An included file is read only when it is a regular file of at most MAX_RECIPE_BYTES bytes, and its
    text is quoted in an error only when it read as recipe text (it parsed): otherwise the error is at the
    `include` and says no more than where the file stopped reading as a recipe.

    >>> compile_recipe('select all; freeze').program.statements[1]
    Freeze()
    """
    name = os.fspath(filename) if filename is not None else None
    source = Source(text, name)
    sources: dict[str, Source] = {source.name: source}
    errors: list[Diagnostic] = []
    warnings: list[Diagnostic] = []
    root = pathlib.Path(name).resolve() if name else None
    confine = include_root_from(include_root) if allow_include else None

    def loader(path: str, span: Span | None, parent):
        """Compile an included file (text or YAML); ``parent`` has .filename, .stack and .error()."""
        if not allow_include:
            parent.error(f"`include {ir.quote(path)}` is not allowed here", span)
            return None
        base = pathlib.Path(parent.filename).resolve().parent if parent.filename else pathlib.Path.cwd()
        target = (base / path).resolve()
        if confine is not None and not target.is_relative_to(confine):
            parent.error(f"cannot include {path!r}: it is outside the include root {confine}", span,
                         hint=f"includes are confined to that folder (--include-root, ${INCLUDE_ROOT_ENV})")
            return None
        if len(parent.stack) >= MAX_INCLUDE_DEPTH:
            parent.error(f"includes are nested more than {MAX_INCLUDE_DEPTH} deep", span)
            return None
        if str(target) in parent.stack:
            chain = " -> ".join(pathlib.Path(p).name for p in parent.stack + (str(target),))
            parent.error(f"include cycle: {chain}", span)
            return None
        where = f"next to {pathlib.Path(parent.filename).name}" if parent.filename else "in the working folder"
        try:
            data = read_bounded(target, MAX_RECIPE_BYTES)
        except ReadRefused as exc:
            if exc.kind == "missing":
                parent.error(f"included file {path!r} does not exist {where}", span)
            elif exc.kind in ("directory", "special"):
                parent.error(f"cannot include {path!r}: it {exc.reason}, not a recipe file", span)
            else:
                parent.error(f"cannot include {path!r}: it {exc.reason}" if exc.kind == "too-large"
                             else f"cannot include {path!r}: {exc.reason}", span)
            return None
        try:
            sub_text = data.decode("utf-8")
        except UnicodeDecodeError:  # (no byte or position of a file that is not text)
            parent.error(f"cannot include {path!r}: recipe is not valid UTF-8 text", span)
            return None
        rel = os.path.relpath(target) if not os.path.isabs(path) else str(target)
        sub_source = Source(sub_text, rel)
        try:
            program, sub_errors = compile_unit(sub_source, parent.stack + (str(target),), included=True)
        except RecipeError as exc:
            reason = getattr(exc, "not_recipe_text", None)
            if reason:  # not recipe text: say where it stopped reading as one, quote nothing of it
                where_in = f" at line {exc.line}, column {exc.column}" if exc.line else ""
                parent.error(f"cannot include {path!r}: it is not a recipe ({reason}{where_in})", span,
                             hint=f"to see the error, check it on its own: modelxform check {rel}")
                return None
            sources[rel] = sub_source
            errors.extend(exc.diagnostics)
            return None
        sources[rel] = sub_source
        errors.extend(sub_errors)
        return program

    def compile_unit(unit: Source, stack: tuple, included: bool = False) -> tuple[ir.Program, list[Diagnostic]]:
        if not is_yaml_name(unit.filename):
            compiler = _Compiler(unit, stack, loader)
            return compiler.compile(), compiler.errors
        from .yaml_form import read_yaml
        parent = _Compiler(unit, stack, loader)  # used only for .filename, .stack and .error()

        def include(path, span, reader, node):
            sub = loader(path, span, parent)
            return Include(path, sub, span=span) if sub is not None else None
        program, yaml_errors = read_yaml(unit, include, compile_fragment, included=included)
        return program, yaml_errors + parent.errors

    program, unit_errors = compile_unit(source, (str(root),) if root else (), included=foreign)
    errors[:0] = unit_errors
    if confine is not None and program is not None:
        errors.extend(_outside_root(program, confine))
    if not errors:
        _check_program(program, source, errors, warnings)
    if not errors and is_yaml_name(source.filename):
        errors.extend(_unlike_their_text(program))
    if errors:
        for d in errors:  # attach the right file's text so each error can show its line
            if d.span is not None and d.span.filename in sources:
                d.source = sources[d.span.filename]
        errors.sort(key=lambda d: (d.span.filename or "", d.span.line, d.span.column) if d.span else ("", 0, 0))
        raise RecipeError(errors[0].message, diagnostics=errors)
    return recipe_class(program, source, warnings, sources)


def statement_file(stmt) -> pathlib.Path:
    """The file a ``load weights from`` statement reads, as LoadWeights.run resolves it (relative to the
    recipe that holds it; the working folder for recipe text without a file), symbolic links resolved."""
    base = os.getcwd()
    span = stmt.span
    if span is not None and span.filename and not span.filename.startswith("<"):
        base = os.path.dirname(os.path.abspath(span.filename))
    return pathlib.Path(base, stmt.path).resolve()


def _unlike_their_text(program: ir.Program) -> list[Diagnostic]:
    """The statements of a YAML recipe whose text form does not compile back to them. The provenance
    record holds a recipe's canonical text, which `verify` compiles again, and `fmt --to recipe` writes
    it: a value the YAML form took and the text form refuses (`version: "1 #2"`) made an output that
    could not be verified, nor edited again."""
    out = []
    for stmt in program.flat():
        if stmt.keyword == "include":
            continue
        again, errors = compile_fragment(str(stmt))
        if errors or again != stmt:
            why = errors[0].message if errors else f"`{stmt}` reads back as `{again}` in the text form"
            out.append(Diagnostic(why, stmt.span, None, "the YAML form takes what the text form takes: an output's "
                                                        "provenance record holds the recipe as text"))
    return out


def files_read(recipe) -> list[tuple[str, str]]:
    """(path, what it is) of every file a compiled recipe is read from: itself, the files it includes and
    those it loads weights from. A command's output must be none of them (keras_io.outputs)."""
    own = recipe.source.filename
    out = [(own, "the recipe")] if own and not str(own).startswith("<") else []
    out += [(name, "a file the recipe includes") for name in recipe.sources
            if name and name != own and not str(name).startswith("<")]
    out += [(str(statement_file(stmt)), "a file the recipe loads weights from") for stmt in recipe.program.flat()
            if stmt.keyword == "load"]
    return out


def _outside_root(program: ir.Program, confine: pathlib.Path) -> list[Diagnostic]:
    """A ``load weights from`` of a file outside the include root, in the recipe or a file it includes:
    an error at the statement (the file is not read). A recipe someone else wrote must not copy the
    weights of a model it can name into an output (a CI artifact)."""
    out = []
    for stmt in program.flat():
        if stmt.keyword == "load" and not statement_file(stmt).is_relative_to(confine):
            out.append(Diagnostic(f"cannot load weights from {stmt.path!r}: it is outside the include root "
                                  f"{confine}", stmt.span, None,
                                  f"with --include-root (or ${INCLUDE_ROOT_ENV}) the files a recipe loads "
                                  "weights from are confined to that folder too"))
    return out


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
    return program.statements[0], _more_than_one_piece(text, program)


COMMENT_IN_PIECE = "`#` starts a comment here, and the rest would be dropped; a predicate has no comments"


def _more_than_one_piece(text: str, program: ir.Program) -> list[Diagnostic]:
    """A piece of text syntax (a YAML predicate) is one statement (see beyond_one_statement)."""
    beyond = beyond_one_statement(text, program)
    if beyond is None:
        return []
    kind, span, what = beyond
    return [Diagnostic(COMMENT_IN_PIECE if kind == "comment" else f"one statement only: `{what}` follows it",
                       span, None)]


def beyond_one_statement(text: str, program: ir.Program) -> tuple[str, Span, str] | None:
    """What a piece of text syntax holds beyond its first statement, which would be dropped without a
    word (``type=Dense # and name=dense_1`` selected every Dense layer): ("comment", the ``#``'s span,
    the comment) or ("statement", the second statement's span, its text); None when nothing. For the
    pieces the YAML form writes in text syntax and ``inspect --where``."""
    found = comments(text)
    if found:
        line, comment, _ = found[0]
        column = text.split("\n")[line - 1].index(comment) + 1
        return "comment", Span(line, column, line, column + 1, None), comment
    if len(program.statements) > 1:
        extra = program.statements[1]
        return "statement", extra.span, str(extra)
    return None


def comments(text: str) -> list[tuple[int, str, bool]]:
    """(line, comment text, whole-line?) for every ``#`` comment of recipe text, outside strings."""
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string, escaped = False, False
        for i, ch in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "#":
                out.append((number, line[i:].rstrip(), not line[:i].strip()))
                break
    return out


def read_recipe_text(path: str | os.PathLike) -> str:
    """Read a recipe file as UTF-8, turning every I/O problem into a RecipeError. Only a regular file of
    at most MAX_RECIPE_BYTES bytes is read (lang/files.py): a FIFO or a device is refused, not waited on."""
    try:
        data = read_bounded(path, MAX_RECIPE_BYTES)
    except ReadRefused as exc:
        if exc.kind == "missing":
            raise RecipeError(f"{path}: no such recipe file") from None
        if exc.kind in ("directory", "special"):
            raise RecipeError(f"{path}: {exc.reason}, not a recipe file") from None
        if exc.kind == "too-large":
            raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES} bytes",
                              span=Span(1, 1, 1, 2, os.fspath(path))) from None
        raise RecipeError(f"{path}: {exc.reason}") from None
    return decode_recipe(data, str(path))


def decode_recipe(data: bytes, name: str) -> str:
    """Recipe bytes (a file's, or standard input's) as text: UTF-8, or an error at the first bad byte."""
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES} bytes", span=Span(1, 1, 1, 2, name))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError(f"recipe is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                          span=Span(line, col, line, col + 1, name)) from None


def load_recipe(path: str | os.PathLike, *, recipe_class=Recipe,
                include_root: str | os.PathLike | None = None) -> Recipe:
    """Read and compile a recipe file (``.recipe`` or ``.yaml``); ``include_root``: see compile_recipe."""
    return compile_recipe(read_recipe_text(path), os.fspath(path), recipe_class=recipe_class,
                          include_root=include_root)


def parse_value(text: str):
    """A ``--param`` value as the language reads a value: a number, True/False/None, a quoted string,
    a tuple or list; anything else is the text itself."""
    compiler = _Compiler(Source(f"param _ = {text}\n", None), (), None)
    try:
        program = compiler.compile()
    except RecipeError:
        return text
    if compiler.errors or len(program.statements) != 1 or not isinstance(program.statements[0], Param):
        return text
    return program.statements[0].value
