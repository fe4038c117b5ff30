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

from .. import ir, statements
from ..errors import Diagnostic, RecipeError
from ..source import Source, Span
from .names import canonical_type
from .parser import MAX_RECIPE_BYTES
from .yaml_nodes import NodeReader

MAX_NODES = 100_000
# Deeper collections are refused while events stream in: PyYAML's composer recurses once per level
# (10000 nested lists end in a RecursionError) and its scanner slows down quadratically with depth.
MAX_DEPTH = 64
# Longer numeric scalars are refused: int() of more than 4300 digits raises ValueError.
MAX_NUMBER_LENGTH = 100


class _Reader(NodeReader):
    def mapping(self, node, what: str, allowed: dict[str, bool]) -> dict | None:
        """Keys of a mapping node -> value nodes (NodeReader.keyed)."""
        keyed = self.keyed(node, what, allowed)
        return None if keyed is None else {key: value for key, (_, value) in keyed.items()}

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
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{what} must be written as a string, e.g. \"type=Dense and trainable\"")
            return None
        text = str(node.value)
        stmt, diagnostics = self.fragment(prefix + text + "\n")
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
            if not isinstance(stmt.selector, statements.SelRefs) or len(stmt.selector.refs) != 1 \
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
        if isinstance(node, yaml.ScalarNode) and node.value in statements.BARE_YAML:
            return statements.BARE_YAML[node.value](span=self.span(node))
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.error(node, "each statement is a one-key mapping such as `- scale: {target: kernel, factor: 0.8}`"
                             " (or the word freeze / unfreeze)")
            return None
        key_node, body = node.value[0]
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        kind = statements.BY_YAML_KEY.get(key) if isinstance(key, str) else None
        if kind is None:
            keys = statements.yaml_keys()
            guess = difflib.get_close_matches(str(key), keys, n=1)
            self.error(key_node, f"unknown statement {key!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""),
                       hint="statements: " + ", ".join(keys))
            return None
        return kind.read_yaml(self, body, self.span(node))

    # -- helpers the statement kinds use ------------------------------------------------------------
    @staticmethod
    def is_word(node, word: str) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.value == word

    @staticmethod
    def is_null(node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    @staticmethod
    def is_mapping(node) -> bool:
        return isinstance(node, yaml.MappingNode)

    @staticmethod
    def is_sequence(node) -> bool:
        return isinstance(node, yaml.SequenceNode)

    @staticmethod
    def items(node) -> list:
        return list(node.value)

    def flag(self, fields: dict, key: str) -> bool:
        """An optional true/false field (False when absent)."""
        if key not in fields:
            return False
        value = self.value(fields[key])
        if not isinstance(value, bool):
            self.error(fields[key], f"{key} must be true or false")
            return False
        return value

    canonical_type = staticmethod(canonical_type)

    def constructor(self, node, what: str):
        """A layer constructor: a call whose name is a layer class (aliases map to Keras's name)."""
        call = self.call(node, what)
        if call is None:
            return None
        return ir.Call(canonical_type(call.name), call.args, call.kwargs, span=call.span)

    include = None  # set by read_yaml: includes compile through compile_recipe's loader


_LOADER = yaml.SafeLoader("")
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def compose(source: Source):
    """The YAML node tree, refusing anchors/aliases and oversized documents. Every refusal is marked
    ``not_recipe_text`` (an included file that does not compose is not quoted; compiler.py)."""
    try:
        return _compose(source)
    except RecipeError as exc:
        exc.not_recipe_text = "not a YAML document a recipe can be"
        raise


def _compose(source: Source):
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


def read_yaml(source: Source, include, fragment, included: bool = False) -> tuple[ir.Program, list[Diagnostic]]:
    """YAML text -> (Program, errors). ``include(path, span, reader, node)`` compiles an included file,
    ``fragment(text)`` one statement of text syntax (the compiler passes both: this module does not
    import it). An ``included`` file that is not a list of statements is no YAML recipe: a RecipeError
    marked ``not_recipe_text`` (its text is not quoted)."""
    root = compose(source)
    reader = _Reader(source)
    reader.fragment = fragment
    reader.include = lambda path, span, node: include(path, span, reader, node)
    found = []
    if root is None:
        return ir.Program((), filename=source.filename), reader.errors
    if included:
        _refuse_non_recipe(source, root)
    if not isinstance(root, yaml.SequenceNode):
        reader.error(root, "a YAML recipe is a list of statements, e.g. `- select: all`")
        return ir.Program((), filename=source.filename), reader.errors
    for node in root.value:
        stmt = reader.statement(node)
        if stmt is not None:
            found.append(stmt)
    return ir.Program(tuple(found), filename=source.filename), reader.errors


def _refuse_non_recipe(source: Source, root) -> None:
    """An included YAML file must look like a recipe (a list of statement words or one-key mappings
    with statement keys) before any message may quote it."""
    def refuse(node, reason):
        mark = node.start_mark
        exc = RecipeError(reason, span=Span(mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2,
                                            source.filename))
        exc.not_recipe_text = reason
        raise exc
    if not isinstance(root, yaml.SequenceNode):
        refuse(root, "a YAML document that is not a list of statements")
    for node in root.value:
        if isinstance(node, yaml.ScalarNode) and node.value in statements.BARE_YAML:
            continue
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            refuse(node, "a list item that is not a statement")
        key = node.value[0][0]
        if not (isinstance(key, yaml.ScalarNode) and key.value in statements.BY_YAML_KEY):
            refuse(key, "a key that is not a statement")


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
    if r.kind == "name" and any(part in ir.keywords() for part in r.text.split("/")):
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


class _Writer:
    """What a statement kind's ``yaml(w)`` uses to write its parts."""

    value = staticmethod(_value)
    ref = staticmethod(_ref)
    call = staticmethod(_call)
    count = staticmethod(_count)


def statement_to_yaml(s):
    return s.yaml(_Writer)


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
    if not program.statements:
        return "[]\n"
    return "".join(yaml_item(s) + "\n" for s in program.statements)


def yaml_item(statement) -> str:
    """One statement as an item of a YAML recipe's list (one line or more, no newline at the end)."""
    text = yaml.dump(statement_to_yaml(statement), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    if text.endswith("\n...\n"):  # a bare scalar document
        text = text[: -len("...\n")]
    lines = text.rstrip("\n").split("\n")
    return "\n".join(["- " + lines[0]] + [f"  {line}" for line in lines[1:]])


def comments(text: str) -> list[tuple[int, str, bool]]:
    """(line, comment text, whole-line?) for every comment of a YAML document that PyYAML reads: a ``#``
    at the start of a line or after white space, outside every scalar (a quoted one may hold ``#``)."""
    import bisect
    spans = sorted((t.start_mark.index, t.end_mark.index) for t in yaml.scan(text)
                   if isinstance(t, yaml.ScalarToken))
    starts = [a for a, _ in spans]
    out, at = [], 0
    for number, line in enumerate(re.findall(r"[^\n\r\x85\u2028\u2029]*(?:\r\n|[\n\r\x85\u2028\u2029]|$)", text)[:-1]
                                  if text else [], start=1):  # (the line breaks PyYAML counts)
        for i, ch in enumerate(line):
            if ch != "#" or (i and line[i - 1] not in " \t"):
                continue
            k = bisect.bisect_right(starts, at + i) - 1
            if k >= 0 and spans[k][0] <= at + i < spans[k][1]:
                continue  # (inside a scalar)
            out.append((number, line[i:].rstrip("\r\n\x85\u2028\u2029 \t"), not line[:i].strip()))
            break
        at += len(line)
    return out


def is_yaml_name(filename: str | None) -> bool:
    return bool(filename) and str(filename).lower().endswith((".yaml", ".yml"))
