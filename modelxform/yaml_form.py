"""The YAML form of a recipe, for people who generate recipes from other tools.

A YAML recipe is a list of statements in the order they run; each item is a one-key mapping (or, for
``freeze``/``unfreeze``, a bare word). Predicates, comparisons and counts are written in the text
language's own syntax (``where: "type=Dense and trainable"``) and parsed by the same grammar, so both
forms compile to equal programs. YAML is read with the safe loader's composer only (nothing is ever
constructed from tags); anchors and aliases are refused, which also rules out alias bombs. Errors name
the line and column of the YAML node. See docs/language.md ("The YAML form").
"""
from __future__ import annotations

import difflib
import math
import re

import yaml

from . import ir
from .errors import Diagnostic, RecipeError
from .source import Source, Span

MAX_NODES = 100_000
# Deeper collections are refused while events stream in: PyYAML's composer recurses once per level
# (10000 nested lists end in a RecursionError) and its scanner slows down quadratically with depth.
MAX_DEPTH = 64
# Longer numeric scalars are refused: int() of more than 4300 digits raises ValueError.
MAX_NUMBER_LENGTH = 100


class _Reader:
    def __init__(self, source: Source):
        self.source = source
        self.errors: list[Diagnostic] = []

    # -- positions and errors ---------------------------------------------------------------------
    def span(self, node) -> Span:
        start, end = node.start_mark, node.end_mark
        return Span(start.line + 1, start.column + 1, end.line + 1, end.column + 1, self.source.filename)

    def error(self, node, message: str, hint: str | None = None) -> None:
        span = self.span(node) if node is not None else Span(1, 1, 1, 2, self.source.filename)
        self.errors.append(Diagnostic(message, span, self.source, hint))

    # -- node helpers -------------------------------------------------------------------------------
    def mapping(self, node, what: str, allowed: dict[str, bool]) -> dict | None:
        """Keys of a mapping node -> value nodes; unknown keys and missing required ones are errors.
        ``allowed`` maps key -> required."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping with keys: {', '.join(allowed)}")
            return None
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in allowed:
                guess = difflib.get_close_matches(str(key), list(allowed), n=1)
                self.error(key_node, f"unknown key {key!r} in {what}"
                           + (f" (did you mean {guess[0]!r}?)" if guess else f"; it takes {', '.join(allowed)}"))
                continue
            if key in out:
                self.error(key_node, f"key {key!r} is given twice in {what}")
            out[key] = value_node
        for key, required in allowed.items():
            if required and key not in out:
                self.error(node, f"{what} needs the key {key!r}")
        return out

    def string(self, node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return node.value
        if isinstance(node, yaml.ScalarNode) and node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            return node.value  # a version such as 1.2 written without quotes
        self.error(node, f"{what} must be a string")
        return None

    def value(self, node):
        """A literal value: number, string, bool, null, list (a tuple), {list: […]}, or "$param"."""
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:str":
                if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", node.value):
                    return ir.ParamRef(node.value[1:], span=self.span(node))
                return node.value
            try:
                return _LOADER.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self.error(node, f"not a value: {exc}")
                return None
        if isinstance(node, yaml.SequenceNode):
            return tuple(self.value(item) for item in node.value)
        if isinstance(node, yaml.MappingNode) and len(node.value) == 1 and node.value[0][0].value == "list":
            inner = node.value[0][1]
            if isinstance(inner, yaml.SequenceNode):
                return [self.value(item) for item in inner.value]
        self.error(node, "a value is a number, string, true/false, null, a list, or {list: [...]}")
        return None

    def number(self, node, what: str):
        value = self.value(node)
        if isinstance(value, float) and not math.isfinite(value):
            self.error(node, f"{what}: number {node.value} is out of range")
            return 0
        if isinstance(value, ir.ParamRef) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        self.error(node, f"{what} must be a number or a \"$param\"")
        return 0

    # -- pieces in the text syntax --------------------------------------------------------------------
    def text_piece(self, node, prefix: str, what: str):
        """Compile ``prefix + <scalar>`` with the text grammar; errors point into the YAML scalar."""
        from .compiler import compile_fragment
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{what} must be written as a string, e.g. \"type=Dense and trainable\"")
            return None
        text = str(node.value)
        stmt, diagnostics = compile_fragment(prefix + text + "\n")
        if diagnostics:
            for d in diagnostics:
                span = self.span(node)
                if d.span is not None and d.span.line == 1 and node.style in (None, "", '"', "'") \
                        and node.start_mark.line == node.end_mark.line:
                    quote = 1 if node.style in ('"', "'") else 0
                    col = node.start_mark.column + 1 + quote + max(0, d.span.column - 1 - len(prefix))
                    span = Span(span.line, col, span.line, col + max(1, d.span.end_column - d.span.column),
                                self.source.filename)
                self.errors.append(Diagnostic(f"{what}: {d.message}", span, self.source, d.hint))
            return None
        return stmt

    def pred(self, node):
        stmt = self.text_piece(node, "select where ", "predicate")
        return stmt.selector.pred if stmt is not None else None

    def ref(self, node) -> ir.Ref | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            stmt = self.text_piece(node, "select ", "layer")
            if stmt is None:
                return None
            if not isinstance(stmt.selector, ir.SelRefs) or len(stmt.selector.refs) != 1 \
                    or stmt.selector.refs[0].kind == "glob":
                self.error(node, f"{node.value!r} is not one layer name; use {{glob: \"…\"}} for a pattern")
                return None
            ref = stmt.selector.refs[0]
            return ir.Ref(ref.kind, ref.text, ref.explicit, span=self.span(node))
        fields = self.mapping(node, "a layer reference", {"glob": False, "layer": False, "type": False})
        if not fields or len(fields) != 1:
            if fields is not None:
                self.error(node, "a layer reference has exactly one of: glob, layer, type")
            return None
        (kind, value_node), = fields.items()
        text = self.string(value_node, kind)
        if text is None:
            return None
        from .compiler import canonical_type
        if kind == "glob":
            return ir.Ref("glob", text, span=self.span(node))
        if kind == "type":
            return ir.Ref("type", canonical_type(text), explicit=True, span=self.span(node))
        return ir.Ref("name", text, explicit=True, span=self.span(node))

    def refs(self, node) -> tuple:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        return tuple(r for r in (self.ref(item) for item in items) if r is not None)

    def call(self, node, what: str) -> ir.Call | None:
        """``Name`` (bare), ``{Name: {k: v}}`` (keywords), ``{Name: [v, …]}`` (positional),
        ``{Name: null}`` (no arguments), ``{Name: {"*": [v], k: v}}`` (both)."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return ir.Call(node.value, bare=True, span=self.span(node))
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.error(node, f"{what} is a name, or a one-key mapping {{Name: {{argument: value}}}}")
            return None
        name_node, args_node = node.value[0]
        name = self.string(name_node, f"{what} name")
        positional, keywords = [], []
        if isinstance(args_node, yaml.SequenceNode):
            positional = [self.value(item) for item in args_node.value]
        elif isinstance(args_node, yaml.MappingNode):
            for key_node, value_node in args_node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key == "*" and isinstance(value_node, yaml.SequenceNode):
                    positional = [self.value(item) for item in value_node.value]
                elif not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) \
                        or key_node.tag != "tag:yaml.org,2002:str":
                    self.error(key_node, "an argument name is a word such as units")
                else:
                    keywords.append((key, self.value(value_node)))
        elif not (isinstance(args_node, yaml.ScalarNode) and args_node.tag == "tag:yaml.org,2002:null"):
            self.error(args_node, f"the arguments of {name} are a mapping, a list or null")
        return ir.Call(name or "?", tuple(positional), tuple(keywords), span=self.span(node))

    # -- statements -------------------------------------------------------------------------------
    def statement(self, node):
        if isinstance(node, yaml.ScalarNode) and node.value in BARE_STATEMENTS:
            return BARE_STATEMENTS[node.value](span=self.span(node))
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.error(node, "each statement is a one-key mapping such as `- scale: {target: kernel, factor: 0.8}`"
                             " (or the word freeze / unfreeze)")
            return None
        key_node, body = node.value[0]
        kind = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        method = getattr(self, f"st_{kind}", None) if isinstance(kind, str) else None
        if method is None:
            guess = difflib.get_close_matches(str(kind), STATEMENT_KEYS, n=1)
            self.error(key_node, f"unknown statement {kind!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""),
                       hint="statements: " + ", ".join(STATEMENT_KEYS))
            return None
        return method(body, self.span(node))

    def st_recipe(self, body, span):
        f = self.mapping(body, "recipe", {"name": True, "version": False})
        if f is None or "name" not in f:
            return None
        version = self.string(f["version"], "version") if "version" in f else None
        return ir.RecipeHeader(self.string(f["name"], "name") or "", version, span=span)

    def st_requires(self, body, span):
        from .compiler import requires_problem
        spec = self.string(body, "requires") or ""
        problem = requires_problem(spec)
        if problem:
            self.error(body, problem[0], hint=problem[1])
        return ir.Requires(spec, span=span)

    def st_seed(self, body, span):
        return ir.Seed(self.number(body, "seed"), span=span)

    def st_param(self, body, span):
        f = self.mapping(body, "param", {"name": True, "value": True})
        if not f or len(f) < 2:
            return None
        return ir.Param(self.string(f["name"], "name") or "", self.value(f["value"]), span=span)

    def st_include(self, body, span):
        path = self.string(body, "include")
        if path is None:
            return None
        return self.include(path, span, body)

    def st_select(self, body, span):
        if isinstance(body, yaml.ScalarNode) and body.value == "all":
            return ir.Select(ir.SelAll(), span=span)
        f = self.mapping(body, "select", {"all": False, "layers": False, "where": False, "random": False,
                                          "first": False, "last": False})
        if f is None:
            return None
        modes = [m for m in ("random", "first", "last") if m in f]
        if "layers" in f:
            if set(f) != {"layers"}:
                self.error(body, "select: `layers` does not combine with other keys")
            return ir.Select(ir.SelRefs(self.refs(f["layers"])), span=span)
        if len(modes) > 1:
            self.error(body, "select takes one of random, first, last")
            return None
        pred = self.pred(f["where"]) if "where" in f else None
        if not modes:
            if pred is None:
                if "where" not in f:
                    self.error(body, "select needs `all`, `layers`, `where`, or `random`/`first`/`last`")
                return None
            return ir.Select(ir.SelWhere(pred), span=span)
        mode = modes[0]
        count_node = f[mode]
        count = None
        if not (isinstance(count_node, yaml.ScalarNode) and count_node.tag == "tag:yaml.org,2002:null"):
            stmt = self.text_piece(count_node, f"select {mode} ", f"select {mode}")
            count = stmt.selector.count if stmt is not None else None
        return ir.Select(ir.SelSample(mode, count, pred), span=span)

    def _target(self, f) -> str:
        return self.string(f["target"], "target") or "weights" if "target" in f else "weights"

    def st_scale(self, body, span):
        f = self.mapping(body, "scale", {"target": True, "factor": True})
        if not f or "factor" not in f:
            return None
        return ir.Scale(self._target(f), self.number(f["factor"], "factor"), span=span)

    def st_add_noise(self, body, span):
        f = self.mapping(body, "add_noise", {"target": True, "normal": False, "uniform": False})
        if f is None:
            return None
        dists = [d for d in ("normal", "uniform") if d in f]
        if len(dists) != 1:
            self.error(body, "add_noise takes exactly one of: normal, uniform")
            return None
        name = dists[0]
        args_node = f[name]
        kwargs = []
        if isinstance(args_node, yaml.MappingNode):
            allowed = {"normal": ("mean", "stddev"), "uniform": ("low", "high")}[name]
            args = self.mapping(args_node, name, {k: False for k in allowed})
            kwargs = [(k, self.number(v, k)) for k, v in (args or {}).items()]
        elif not (isinstance(args_node, yaml.ScalarNode) and args_node.tag == "tag:yaml.org,2002:null"):
            self.error(args_node, f"{name} takes a mapping of its arguments")
        call = ir.Call(name, (), tuple(kwargs), span=self.span(args_node))
        return ir.AddNoise(call, self._target(f), span=span)

    def st_reinit(self, body, span):
        f = self.mapping(body, "reinit", {"target": True, "with": False})
        if f is None:
            return None
        init = self.call(f["with"], "an initializer") if "with" in f else None
        return ir.Reinit(self._target(f), init, span=span)

    def st_set(self, body, span):
        f = self.mapping(body, "set", {"target": True, "to": True})
        if not f or "to" not in f:
            return None
        init = self.call(f["to"], "an initializer")
        return ir.Fill(self._target(f), init, span=span) if init else None

    def st_clip(self, body, span):
        f = self.mapping(body, "clip", {"target": True, "low": True, "high": True})
        if not f or "low" not in f or "high" not in f:
            return None
        return ir.Clip(self._target(f), self.number(f["low"], "low"), self.number(f["high"], "high"), span=span)

    def st_prune(self, body, span):
        f = self.mapping(body, "prune", {"target": True, "percent": True})
        if not f or "percent" not in f:
            return None
        return ir.Prune(self._target(f), ir.Percent(self.number(f["percent"], "percent")), span=span)

    def st_freeze(self, body, span):
        return ir.Freeze(span=span)

    def st_unfreeze(self, body, span):
        return ir.Unfreeze(span=span)

    def st_replace(self, body, span):
        f = self.mapping(body, "replace", {"source": True, "with": True})
        if not f or "source" not in f or "with" not in f:
            return None
        src = f["source"]
        source = None if isinstance(src, yaml.ScalarNode) and src.value == "selected" else self.ref(src)
        call = self.call(f["with"], "a layer type or constructor")
        if call is None:
            return None
        from .compiler import canonical_type
        return ir.Replace(source, ir.Call(canonical_type(call.name), call.args, call.kwargs, call.bare,
                                          span=call.span), span=span)

    def st_tap(self, body, span):
        f = self.mapping(body, "tap", {"layers": True, "only": False})
        if not f or "layers" not in f:
            return None
        only = False
        if "only" in f:
            only = self.value(f["only"])
            if not isinstance(only, bool):
                self.error(f["only"], "only must be true or false")
                only = False
        return ir.Tap(self.refs(f["layers"]), only, span=span)

    def st_assert(self, body, span):
        f = self.mapping(body, "assert", {"count": False, "params": False, "output_shape": False,
                                          "op": False, "index": False, "equivalent": False, "tolerance": False})
        if f is None:
            return None
        kinds = [k for k in ("count", "params", "output_shape", "equivalent") if k in f]
        if len(kinds) != 1:
            self.error(body, "assert takes exactly one of: count, params, output_shape, equivalent")
            return None
        kind = kinds[0]
        if kind == "equivalent":
            if self.value(f["equivalent"]) is not True:
                self.error(f["equivalent"], "write `equivalent: true`")
            tolerance = self.number(f["tolerance"], "tolerance") if "tolerance" in f else None
            return ir.AssertEquivalent(tolerance, span=span)
        if kind in ("count", "params"):
            stmt = self.text_piece(f[kind], f"assert {kind} ", f"assert {kind}")
            if stmt is not None:
                stmt = type(stmt)(stmt.op, stmt.value, span=span)
            return stmt
        shape_node = f["output_shape"]
        if not isinstance(shape_node, yaml.SequenceNode):
            self.error(shape_node, "output_shape is a list such as [null, 10]")
            return None
        dims = []
        for item in shape_node.value:
            value = self.value(item)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                self.error(item, "a dimension is a whole number or null")
            dims.append(value)
        op = self.string(f["op"], "op") if "op" in f else "=="
        if op not in ("==", "!="):
            self.error(f["op"], "op is == or !=")
        index = self.value(f["index"]) if "index" in f else None
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            self.error(f["index"], "index is a whole number ≥ 0")
            index = None
        return ir.AssertShape(op, tuple(dims), index, span=span)

    def _constructor(self, node, what: str):
        from .compiler import canonical_type
        call = self.call(node, what)
        if call is None:
            return None
        return ir.Call(canonical_type(call.name), call.args, call.kwargs, span=call.span)

    def st_insert(self, body, span):
        f = self.mapping(body, "insert", {"layer": True, "after": False, "before": False})
        if not f or "layer" not in f:
            return None
        where = [w for w in ("after", "before") if w in f]
        if len(where) != 1:
            self.error(body, "insert takes exactly one of: after, before")
            return None
        layer, anchor = self._constructor(f["layer"], "a layer constructor"), self.ref(f[where[0]])
        return ir.Insert(layer, where[0], anchor, span=span) if layer and anchor else None

    def st_remove(self, body, span):
        if isinstance(body, yaml.ScalarNode) and body.value == "selected":
            return ir.Remove(selected=True, span=span)
        f = self.mapping(body, "remove", {"layers": False, "where": False})
        if f is None or len(f) != 1:
            if f is not None:
                self.error(body, "remove takes `selected`, or exactly one of: layers, where")
            return None
        if "where" in f:
            pred = self.pred(f["where"])
            return ir.Remove(pred=pred, span=span) if pred is not None else None
        return ir.Remove(refs=self.refs(f["layers"]), span=span)

    def st_swap(self, body, span):
        f = self.mapping(body, "swap", {"layers": True})
        if not f or "layers" not in f:
            return None
        refs = self.refs(f["layers"])
        if len(refs) != 2:
            self.error(f["layers"], "swap takes exactly two layers")
            return None
        return ir.Swap(refs[0], refs[1], span=span)

    def st_shuffle(self, body, span):
        return ir.Shuffle(span=span)

    def st_cut(self, body, span):
        f = self.mapping(body, "cut", {"after": True})
        if not f or "after" not in f:
            return None
        ref = self.ref(f["after"])
        return ir.Cut(ref, span=span) if ref else None

    def st_append(self, body, span):
        f = self.mapping(body, "append", {"layer": True, "after": False})
        if not f or "layer" not in f:
            return None
        layer = self._constructor(f["layer"], "a layer constructor")
        anchor = self.ref(f["after"]) if "after" in f else None
        return ir.Append(layer, anchor, span=span) if layer else None

    def st_set_field(self, body, span):
        f = self.mapping(body, "set_field", {"field": True, "value": True})
        if not f or len(f) < 2:
            return None
        return ir.SetConfig(self.string(f["field"], "field") or "", self.value(f["value"]), span=span)

    def st_rename(self, body, span):
        f = self.mapping(body, "rename", {"to": False, "prefix": False})
        if f is None or len(f) != 1:
            if f is not None:
                self.error(body, "rename takes exactly one of: to, prefix")
            return None
        (mode, node), = f.items()
        return ir.Rename(mode, self.string(node, mode) or "", span=span)

    def st_load_weights(self, body, span):
        f = self.mapping(body, "load_weights", {"from": True, "strict": False})
        if not f or "from" not in f:
            return None
        strict = self.value(f["strict"]) if "strict" in f else False
        if not isinstance(strict, bool):
            self.error(f["strict"], "strict must be true or false")
            strict = False
        return ir.LoadWeights(self.string(f["from"], "from") or "", strict, span=span)

    include = None  # set by read_yaml: includes compile through compile_recipe's loader


STATEMENT_KEYS = ["recipe", "requires", "seed", "param", "include", "select", "scale", "add_noise", "reinit",
                  "set", "clip", "prune", "freeze", "unfreeze", "replace", "tap", "insert", "remove", "swap",
                  "shuffle", "cut", "append", "set_field", "rename", "load_weights", "assert"]
BARE_STATEMENTS = {"freeze": ir.Freeze, "unfreeze": ir.Unfreeze, "shuffle": ir.Shuffle}
_LOADER = yaml.SafeLoader("")
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def compose(source: Source):
    """The YAML node tree, refusing anchors/aliases and oversized documents."""
    from .parser import MAX_RECIPE_BYTES

    def refuse(message, mark):
        return RecipeError(message, source=source, span=Span(mark.line + 1, mark.column + 1, mark.line + 1,
                                                             mark.column + 2, source.filename))
    if len(source.text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES} bytes", source=source,
                          span=Span(1, 1, 1, 2, source.filename))
    try:
        count = depth = 0
        for event in yaml.parse(source.text, Loader=yaml.SafeLoader):
            count += 1
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise refuse(f"YAML lists and mappings are nested more than {MAX_DEPTH} deep",
                                 event.start_mark)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_NUMBER_LENGTH:
                tag = event.tag if event.tag not in (None, "!") else \
                    _LOADER.resolve(yaml.ScalarNode, event.value, event.implicit)
                if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                    raise refuse(f"number is {len(event.value)} characters long; at most {MAX_NUMBER_LENGTH}"
                                 " are allowed", event.start_mark)
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise RecipeError("YAML anchors and aliases are not allowed in recipes",
                                  span=Span(mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2,
                                            source.filename), source=source)
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in _CORE_TAGS and tag != "!":
                mark = event.start_mark
                raise RecipeError(f"YAML tag {tag!r} is not allowed in recipes (only plain data)",
                                  span=Span(mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2,
                                            source.filename), source=source)
            if count > MAX_NODES:
                raise RecipeError(f"YAML recipe has more than {MAX_NODES} nodes", source=source,
                                  span=Span(1, 1, 1, 2, source.filename))
        return yaml.compose(source.text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:
        span = source.span_at(exc.position)
        raise RecipeError(f"invalid YAML: character {chr(exc.character)!r} is not allowed", source=source,
                          span=span) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise RecipeError(f"invalid YAML: {exc.problem or exc}", source=source,
                          span=Span(line, col, line, col + 1, source.filename)) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid YAML: {exc}", source=source, span=Span(1, 1, 1, 2, source.filename)) from None


def read_yaml(source: Source, include) -> tuple[ir.Program, list[Diagnostic]]:
    """YAML text -> (Program, errors). ``include(path, span, node)`` compiles an included file."""
    root = compose(source)
    reader = _Reader(source)
    reader.include = lambda path, span, node: include(path, span, reader, node)
    statements = []
    if root is None:
        return ir.Program((), filename=source.filename), reader.errors
    if not isinstance(root, yaml.SequenceNode):
        reader.error(root, "a YAML recipe is a list of statements, e.g. `- select: all`")
        return ir.Program((), filename=source.filename), reader.errors
    for node in root.value:
        stmt = reader.statement(node)
        if stmt is not None:
            statements.append(stmt)
    return ir.Program(tuple(statements), filename=source.filename), reader.errors


# ---- IR -> YAML -----------------------------------------------------------------------------------

def _value(v):
    if isinstance(v, ir.ParamRef):
        return f"${v.name}"
    if isinstance(v, ir.Percent):
        return str(v)
    if isinstance(v, tuple):
        return [_value(x) for x in v]
    if isinstance(v, list):
        return {"list": [_value(x) for x in v]}
    return v


def _ref(r: ir.Ref):
    if r.kind == "glob":
        return {"glob": r.text}
    if r.explicit:
        return {"type" if r.kind == "type" else "layer": r.text}
    if r.kind == "name" and any(part in ir._KEYWORDS for part in r.text.split("/")):
        return {"layer": r.text}
    return r.text


def _call(c: ir.Call):
    if c.bare:
        return c.name
    if not c.args and not c.kwargs:
        return {c.name: None}
    if not c.kwargs:
        return {c.name: [_value(a) for a in c.args]}
    args = {k: _value(v) for k, v in c.kwargs}
    if c.args:
        args = {"*": [_value(a) for a in c.args], **args}
    return {c.name: args}


def _count(c):
    if c is None:
        return None
    if isinstance(c, ir.Percent):
        return str(c)
    return _value(c)


def statement_to_yaml(s):
    if isinstance(s, ir.RecipeHeader):
        return {"recipe": {"name": s.name, **({"version": s.version} if s.version is not None else {})}}
    if isinstance(s, ir.Requires):
        return {"requires": s.spec}
    if isinstance(s, ir.Seed):
        return {"seed": _value(s.value)}
    if isinstance(s, ir.Param):
        return {"param": {"name": s.name, "value": _value(s.value)}}
    if isinstance(s, ir.Include):
        return {"include": s.path}
    if isinstance(s, ir.Select):
        sel = s.selector
        if isinstance(sel, ir.SelAll):
            return {"select": "all"}
        if isinstance(sel, ir.SelRefs):
            return {"select": {"layers": [_ref(r) for r in sel.refs]}}
        if isinstance(sel, ir.SelWhere):
            return {"select": {"where": str(sel.pred)}}
        body = {sel.mode: _count(sel.count)}
        if sel.pred is not None:
            body["where"] = str(sel.pred)
        return {"select": body}
    if isinstance(s, ir.Scale):
        return {"scale": {"target": s.target, "factor": _value(s.factor)}}
    if isinstance(s, ir.AddNoise):
        return {"add_noise": {"target": s.target,
                              s.distribution.name: {k: _value(v) for k, v in s.distribution.kwargs} or None}}
    if isinstance(s, ir.Reinit):
        body = {"target": s.target}
        if s.initializer is not None:
            body["with"] = _call(s.initializer)
        return {"reinit": body}
    if isinstance(s, ir.Fill):
        return {"set": {"target": s.target, "to": _call(s.initializer)}}
    if isinstance(s, ir.Clip):
        return {"clip": {"target": s.target, "low": _value(s.low), "high": _value(s.high)}}
    if isinstance(s, ir.Prune):
        return {"prune": {"target": s.target, "percent": _value(s.amount.value)}}
    if isinstance(s, ir.Freeze):
        return "freeze"
    if isinstance(s, ir.Unfreeze):
        return "unfreeze"
    if isinstance(s, ir.Replace):
        return {"replace": {"source": "selected" if s.source is None else _ref(s.source),
                            "with": _call(s.replacement)}}
    if isinstance(s, ir.Tap):
        body = {"layers": [_ref(r) for r in s.refs]}
        if s.only:
            body["only"] = True
        return {"tap": body}
    if isinstance(s, ir.Insert):
        return {"insert": {"layer": _call(s.layer), s.where: _ref(s.anchor)}}
    if isinstance(s, ir.Remove):
        if s.selected:
            return {"remove": "selected"}
        if s.pred is not None:
            return {"remove": {"where": str(s.pred)}}
        return {"remove": {"layers": [_ref(r) for r in s.refs]}}
    if isinstance(s, ir.Swap):
        return {"swap": {"layers": [_ref(s.first), _ref(s.second)]}}
    if isinstance(s, ir.Shuffle):
        return "shuffle"
    if isinstance(s, ir.Cut):
        return {"cut": {"after": _ref(s.anchor)}}
    if isinstance(s, ir.Append):
        body = {"layer": _call(s.layer)}
        if s.anchor is not None:
            body["after"] = _ref(s.anchor)
        return {"append": body}
    if isinstance(s, ir.SetConfig):
        return {"set_field": {"field": s.key, "value": _value(s.value)}}
    if isinstance(s, ir.Rename):
        return {"rename": {s.mode: s.text}}
    if isinstance(s, ir.LoadWeights):
        body = {"from": s.path}
        if s.strict:
            body["strict"] = True
        return {"load_weights": body}
    if isinstance(s, ir.AssertEquivalent):
        body = {"equivalent": True}
        if s.tolerance is not None:
            body["tolerance"] = _value(s.tolerance)
        return {"assert": body}
    if isinstance(s, ir.AssertCount):
        return {"assert": {"count": f"{s.op} {ir.format_value(s.value)}"}}
    if isinstance(s, ir.AssertParams):
        return {"assert": {"params": f"{s.op} {ir.format_size(s.value)}"}}
    if isinstance(s, ir.AssertShape):
        body = {"output_shape": list(s.shape)}
        if s.op != "==":
            body["op"] = s.op
        if s.index is not None:
            body["index"] = s.index
        return {"assert": body}
    raise TypeError(f"no YAML form for {type(s).__name__}")


class _Dumper(yaml.SafeDumper):
    pass


def _flow_small(dumper, data):
    flow = all(not isinstance(v, (dict, list)) for v in data.values()) and len(data) <= 4
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)


def _flow_list(dumper, data):
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                     flow_style=all(not isinstance(v, (dict, list)) for v in data))


_Dumper.add_representer(dict, _flow_small)
_Dumper.add_representer(list, _flow_list)


def to_yaml(program: ir.Program) -> str:
    """The YAML form of a program (its statements as written; includes stay includes)."""
    items = [statement_to_yaml(s) for s in program.statements]
    if not items:
        return "[]\n"
    out = []
    for item in items:
        text = yaml.dump(item, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
        if text.endswith("\n...\n"):  # a bare scalar document
            text = text[: -len("...\n")]
        lines = text.rstrip("\n").split("\n")
        out.append("- " + lines[0] + "\n" + "".join(f"  {line}\n" for line in lines[1:]))
    return "".join(out)


def is_yaml_name(filename: str | None) -> bool:
    return bool(filename) and str(filename).lower().endswith((".yaml", ".yml"))
