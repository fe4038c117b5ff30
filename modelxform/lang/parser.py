"""The one Lark parser of the recipe language, and syntax errors that say what was meant.

The grammar lives in grammar/recipe.lark at the top of the repository; the wheel ships it inside the
package (see pyproject.toml), so it is looked up in both places.
"""
from __future__ import annotations

import functools
import re

import lark
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .. import statements
from ..errors import Diagnostic, RecipeError
from ..grammar_file import grammar_path
from ..source import Source, Span

MAX_RECIPE_BYTES = 1_000_000
# Brackets deeper than this are refused before the compiler sees the tree: the compiler walks values
# recursively, and 1000 nested `(` would end in a RecursionError instead of a message.
MAX_NESTING = 64
# Longer digit runs are refused: int() of more than 4300 digits raises ValueError (CPython's guard
# against quadratic conversion), and no recipe needs a 100-digit number.
MAX_NUMBER_DIGITS = 100


def _keyword_is_a_whole_word(terminal) -> None:
    """lark's edit_terminals: a keyword of the grammar (`select`, `freeze`, `batchnorm`) matches a whole
    word only. As plain strings, where a name could not stand the lexer took a keyword from the start
    of a longer word: `selectall` read as `select all`, `freezes` as `freeze` then `s`. Made patterns
    that no word character may follow, and put before NAME where both are allowed (as lark's own rule
    for strings did), a longer word is a name where a name can stand and a syntax error elsewhere."""
    pattern = terminal.pattern
    if isinstance(pattern, lark.lexer.PatternStr) and _WORD.fullmatch(pattern.value):
        terminal.pattern = lark.lexer.PatternRE(pattern.value + _WHOLE_WORD, pattern.flags)
        terminal.priority = 2  # (NAME's is 0)


def keyword_text(pattern) -> str | None:
    """The text of a grammar keyword (`with`) or symbol (`(`), from its terminal's pattern; None for a
    terminal such as NAME or NUMBER."""
    if pattern.type == "str":
        return pattern.value
    if pattern.value.endswith(_WHOLE_WORD) and _WORD.fullmatch(pattern.value[:-len(_WHOLE_WORD)]):
        return pattern.value[:-len(_WHOLE_WORD)]
    return None


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # (re.escape leaves such a word as it is)
_WHOLE_WORD = r"(?![A-Za-z0-9_])"
PARSER_OPTIONS = dict(parser="lalr", propagate_positions=True, maybe_placeholders=False,
                      edit_terminals=_keyword_is_a_whole_word)
KEYWORDS_AS_WORDS = "keywords-as-whole-words-1"  # (part of the tables' cache key: they hold the edited terminals)


def _cache_file(grammar: str) -> str | None:
    """Where lark keeps its LALR tables: building them costs ~0.3 s, loading them ~0.05 s."""
    import hashlib
    import os
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "modelxform")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    key = hashlib.sha256((grammar + lark.__version__ + KEYWORDS_AS_WORDS).encode()).hexdigest()[:16]
    return os.path.join(folder, f"grammar-{key}.lark-cache")


@functools.lru_cache(maxsize=1)
def get_parser() -> lark.Lark:
    """The parser, built from the grammar (strictness is checked by tests/test_compiler.py, which
    builds it with lark's strict=True so that any terminal collision fails there)."""
    grammar = grammar_path().read_text(encoding="utf-8")
    cache = _cache_file(grammar)
    if cache is not None:
        try:
            return lark.Lark(grammar, cache=cache, **PARSER_OPTIONS)
        except OSError:  # an unwritable cache is only slower
            pass
    return lark.Lark(grammar, **PARSER_OPTIONS)


# Labelled bad examples: a syntax error is matched against these (lark's match_examples) so the
# message says what was probably meant instead of listing terminals.
SYNTAX_EXAMPLES: dict[str, list[str]] = {
    "`select` needs what to select: `all`, layer names, `where <predicate>`, or `random`/`first`/`last`":
        ["select", "select ;", "select 3"],
    "a predicate is expected after `where`, e.g. `where type=Dense`":
        ["select where", "select random where", "select where ;", "select first 2 where"],
    "`scale` needs a target and a factor, e.g. `scale weights 0.8`":
        ["scale", "scale weights", "scale 0.8", "scale weights ;"],
    "`scale` takes a factor, `0.9`, or a percentage, `90%`; a parameter is a factor: `scale kernel $factor`":
        ["scale kernel $p%"],
    "`add noise` needs a distribution and a target, e.g. `add noise normal(stddev=0.1) to kernel`":
        ["add", "add noise", "add noise to kernel", "add noise normal(stddev=0.1)",
         "add noise normal(stddev=0.1) kernel", "add noise normal(stddev=0.1) to"],
    "`clip` needs a target and two bounds, e.g. `clip kernel -1 1`":
        ["clip", "clip kernel", "clip kernel 1", "clip kernel 1 ;"],
    "`prune` needs a target and a percentage, e.g. `prune kernel 50%`":
        ["prune", "prune kernel", "prune kernel 50", "prune kernel 0.5"],
    "`prune channels` needs a percentage, e.g. `prune channels 25%`":
        ["prune channels", "prune channels 25", "prune channels 0.25"],
    "`fold` is written `fold batchnorm`":
        ["fold", "fold bn", "fold batchnorms"],
    "`set input shape` needs a shape, e.g. `set input shape (None, 96, 96, 3)` or `set input 1 shape (None, 128)`":
        ["set input", "set input shape", "set input 1", "set input shape 96", "set input shape ("],
    "`reinit` needs a target, e.g. `reinit kernel` or `reinit kernel with he_normal`":
        ["reinit", "reinit kernel with", "reinit with he_normal"],
    "`set` needs a target and a value, e.g. `set bias to zeros`":
        ["set", "set bias", "set bias to", "set bias zeros"],
    "`replace` is written `replace <layer or type> with <type or Constructor(...)>`":
        ["replace", "replace MaxPooling2D", "replace MaxPooling2D AveragePooling2D",
         "replace MaxPooling2D with", "replace with Dense(units=3)", "replace selected"],
    "`tap` needs at least one layer name, e.g. `tap conv2d_1`":
        ["tap", "tap ;"],
    "`assert` checks `count`, `params` or `output shape`, e.g. `assert count == 3`":
        ["assert", "assert count", "assert count 3", "assert params", "assert output",
         "assert output shape", "assert output shape (None, 10)", "assert foo"],
    "`lora` is written `lora rank 8`, optionally with `alpha 16`":
        ["lora", "lora rank", "lora 8", "lora rank 8 alpha", "lora rank 8 16"],
    "`merge` is written `merge lora`: it folds the selected layers' LoRA factors into their kernels":
        ["merge", "merge all"],
    "`quantize` names a mode: `quantize int8`, `quantize float8`, `quantize int4` (optionally `block size 64`)":
        ["quantize", "quantize 8", "quantize int4 block", "quantize int4 block size"],
    "`cast` names a dtype policy, e.g. `cast bfloat16`":
        ["cast", "cast 16"],
    "`param` is written `param name = value`":
        ["param", "param x", "param x 3", "param x ="],
    "`recipe` is written `recipe \"name\" version \"1.0.0\"`":
        ["recipe", "recipe name", "recipe \"x\" version"],
    "`include` needs a quoted path, e.g. `include \"common.recipe\"`":
        ["include", "include common.recipe"],
    "a constructor call is not closed: expected `)`":
        ["replace dense with Dense(units=3", "replace dense with Dense(units=3;",
         "add noise normal(stddev=0.1 to kernel"],
    "an argument is written `name=value`, e.g. `Dense(units=10, activation=\"softmax\")`":
        ["replace dense with Dense(units=)", "replace dense with Dense(units=,)"],
    "two statements on one line must be separated by `;`":
        ["freeze unfreeze", "freeze select all", "select all freeze", "tap conv2d_1 freeze"],
    "a predicate combines `type=…`, `name=…`, `name ~ \"regex\"`, `trainable`, `params > N` and `has weights` with and/or/not":
        ["select where type", "select where name", "select where params", "select where has",
         "select where type=", "select where foo", "select where type=Dense and",
         "select where (type=Dense", "select where not"],
}

STATEMENT_KEYWORDS = statements.keywords()

_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a quoted string", "PARAM": "a $parameter",
    "PERCENT": "a percentage", "SIZE": "a size such as 30M", "_SEP": "end of statement",
    "LPAR": "`(`", "RPAR": "`)`", "COMMA": "`,`", "EQUAL": "`=`", "SLASH": "`/`", "EQ": "`=`",
    "CMP": "a comparison", "$END": "end of recipe",
}


def _describe_expected(expected) -> str:
    words = []
    for term in sorted(expected):
        if term in _TERMINAL_NAMES:
            words.append(_TERMINAL_NAMES[term])
        else:
            try:
                text = keyword_text(get_parser().get_terminal(term).pattern)
                words.append(f"`{text}`" if text is not None else term.lower())
            except KeyError:
                words.append(term.lower())
    words = sorted(set(words))
    if len(words) > 8:
        words = words[:8] + ["…"]
    return ", ".join(words)


@functools.lru_cache(maxsize=1)
def _example_states() -> list[tuple[str, int, frozenset, str]]:
    """(label, LALR state, accepted terminals, unexpected token type) of every labelled example."""
    out = []
    for label, examples in SYNTAX_EXAMPLES.items():
        for example in examples:
            try:
                get_parser().parse(example + "\n")
            except UnexpectedToken as exc:
                out.append((label, exc.state.position, frozenset(exc.accepts or exc.expected), exc.token.type))
            except UnexpectedInput:
                pass
    return out


def match_example(exc: UnexpectedToken) -> str | None:
    """The label of the example that fails in the same parser state as ``exc``.

    lark's own match_examples compares whole parser stacks, so an example written as one line never
    matches the same mistake made further down a recipe; comparing the state on top of the stack does.
    """
    accepts = frozenset(exc.accepts or exc.expected)
    candidates = [(label, tok) for label, state, acc, tok in _example_states()
                  if state == exc.state.position and acc == accepts]
    for label, tok in candidates:
        if tok == exc.token.type:
            return label
    return candidates[0][0] if candidates else None


def parse(source: Source) -> lark.Tree:
    """Parse recipe text; raise RecipeError with a position on any syntax error."""
    text = source.text
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES} bytes", source=source,
                          span=Span(1, 1, 1, 2, source.filename))
    if text.startswith("\ufeff"):  # a byte-order mark some editors write: it counts as a blank column
        text = " " + text[1:]
    try:
        tree = get_parser().parse(text + "\n")
    except UnexpectedInput as exc:
        error = _syntax_error(exc, source)
        # an included file that does not parse is not recipe text: its text is not quoted (compiler.py)
        error.not_recipe_text = "a syntax error"
        raise error from None
    _check_limits(source)
    return tree


# Outside strings and comments: brackets, and digit runs that start a number (not inside a name).
_LIMIT_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|[(\[]|[)\]]|(?<![A-Za-z0-9_$])[0-9]+')


def _check_limits(source: Source) -> None:
    """Refuse nesting deeper than MAX_NESTING and numbers longer than MAX_NUMBER_DIGITS, at the
    position of the first offending bracket or number (only text that parsed gets here)."""
    depth = 0
    for match in _LIMIT_SCAN.finditer(source.text):
        token = match.group()
        first = token[0]
        if first in "([":
            depth += 1
            if depth > MAX_NESTING:
                raise RecipeError(f"brackets are nested more than {MAX_NESTING} deep",
                                  span=source.span_at(match.start()), source=source)
        elif first in ")]":
            depth = max(0, depth - 1)
        elif first.isdigit() and len(token) > MAX_NUMBER_DIGITS:
            raise RecipeError(f"number has {len(token)} digits; at most {MAX_NUMBER_DIGITS} are allowed",
                              span=source.span_at(match.start(), len(token)), source=source)


def _syntax_error(exc: UnexpectedInput, source: Source) -> RecipeError:
    text = source.text
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream
        char = text[pos] if pos < len(text) else ""
        span = source.span_at(pos)
        prefixed = _module_prefix(text, pos, source) if char == "." else None
        if prefixed is not None:
            return prefixed
        if char == '"':
            message = "unterminated string: a string must close with `\"` on the same line"
        elif char in "'":
            message = "strings use double quotes: write \"…\" instead of '…'"
        else:
            message = f"unexpected character {char!r}"
            if exc.allowed:
                message += f"; expected {_describe_expected(exc.allowed)}"
            line_start = text.rfind("\n", 0, pos) + 1
            if not text[line_start:pos].strip() and re.match(r"-[ \t]+[A-Za-z_{]", text[pos:]):
                return RecipeError(message, span=span, source=source,  # (a YAML recipe, read as text)
                                   hint="this looks like a YAML recipe, which is read as YAML when its name ends "
                                        "in .yaml or .yml (standard input: --stdin-filename NAME.yaml)")
        return RecipeError(message, span=span, source=source)
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END" or token.end_pos is None:
            span = source.span_at(max(len(text.rstrip()) , 0))
        elif token.type == "_SEP" and token.value == "\n" and token.start_pos >= len(text):
            span = source.span_at(len(text.rstrip()))
        else:
            span = Span(token.line, token.column, token.end_line or token.line,
                        token.end_column or token.column + 1, source.filename)
    else:  # UnexpectedEOF
        span = source.span_at(len(text.rstrip()))
    label = match_example(exc) if isinstance(exc, UnexpectedToken) else None
    expected = set(getattr(exc, "accepts", None) or getattr(exc, "expected", None) or ())
    if isinstance(exc, UnexpectedToken) and exc.token.type == "NAME" and {"SELECT", "FREEZE"} <= expected:
        import difflib
        word = exc.token.value
        guess = difflib.get_close_matches(word, STATEMENT_KEYWORDS, n=1, cutoff=0.6)
        message = f"unknown statement `{word}`" + (f" (did you mean `{guess[0]}`?)" if guess else "")
        return RecipeError(message, span=span, source=source,
                           hint="statements: " + ", ".join(STATEMENT_KEYWORDS))
    if isinstance(exc, UnexpectedToken):
        fixed = _bare_statement_with_argument(exc, source) or _predicate_without_where(exc, source)
        if fixed is not None:
            return fixed
        found = exc.token
        shown = "end of statement" if found.type in ("_SEP", "$END") else f"`{found.value}`"
        generic = f"unexpected {shown}; expected {_describe_expected(exc.accepts or exc.expected)}"
    else:
        generic = "unexpected end of recipe"
    if label:
        return RecipeError(label, span=span, source=source,
                           diagnostics=[Diagnostic(label, span, source, generic)])
    return RecipeError(generic, span=span, source=source)


# ---- mistakes recognised by what would fix them ------------------------------------------------------

# What a Keras user writes before a class name: `keras.layers.Dense`, `tf.keras.layers.Dense`, `layers.Dense`.
_MODULE_WORDS = ("keras", "tf", "tensorflow", "layers", "initializers", "tfk", "K")


def _module_prefix(text: str, pos: int, source: Source) -> RecipeError | None:
    """``keras.layers.Dense(units=10)``: the language names classes without their module."""
    from .keras_names import INITIALIZERS, LAYER_CLASSES
    start = pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_."):
        start -= 1
    end = pos
    while end < len(text) and (text[end].isalnum() or text[end] in "_."):
        end += 1
    dotted = text[start:end]
    parts = dotted.split(".")
    if len(parts) < 2 or not all(re.fullmatch(r"[A-Za-z_]\w*", p) for p in parts):
        return None
    name = parts[-1]
    if parts[0] not in _MODULE_WORDS and name not in LAYER_CLASSES and name not in INITIALIZERS:
        stmt_start, statement = _statement_at(text, pos)
        as_path = "/".join(parts)
        if _parses(text[stmt_start:start] + as_path + text[end:stmt_start + len(statement)]):
            return RecipeError(f"a layer inside a nested model is named by its path with `/`: `{as_path}`",
                               span=source.span_at(start, len(dotted)), source=source)
        return None
    prefix = dotted[: len(dotted) - len(name)]
    return RecipeError(f"write the class name without its module: `{name}`, not `{dotted}`",
                       span=source.span_at(start, len(prefix)), source=source,
                       hint="recipes name Keras layer classes and initializers by their class name alone")


def _statement_at(text: str, offset: int) -> tuple[int, str]:
    """(start offset, text) of the statement around ``offset``: statements end at `;`, a newline or a
    comment, and strings may hold any of those."""
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line = text[line_start: len(text) if line_end < 0 else line_end]
    start = 0
    for match in re.finditer(r'"(?:[^"\\\n]|\\.)*"?|#.*|;', line):
        token = match.group()
        if match.start() >= offset - line_start:
            if token[0] in ";#":
                return line_start + start, line[start:match.start()]
            continue
        if token[0] == ";":
            start = match.end()
        elif token[0] == "#":
            break
    return line_start + start, line[start:]


def _parses(text: str) -> bool:
    try:
        get_parser().parse(text + "\n")
    except UnexpectedInput:
        return False
    return True


# statements written as their keyword alone (freeze, unfreeze, shuffle, unwrap), not `fold batchnorm`
_BARE_KEYWORDS = tuple(kind.keyword for kind in statements.KINDS if kind.yaml_bare and str(kind()) == kind.keyword)


def _bare_statement_with_argument(exc: UnexpectedToken, source: Source) -> RecipeError | None:
    """``freeze all``: statements that act on the selection take no argument; the argument is what
    a `select` before them names."""
    stack = getattr(exc.state, "value_stack", None) or []
    keyword = stack[-1] if stack else None
    if not isinstance(keyword, Token) or keyword.value not in _BARE_KEYWORDS or exc.token.type in ("_SEP", "$END"):
        return None
    if keyword.type != keyword.value.upper():  # a layer named `freeze`, not the statement
        return None
    if exc.token.value in {k.split()[0] for k in STATEMENT_KEYWORDS}:
        return None  # `freeze select all`: two statements without a separator
    start, statement = _statement_at(source.text, exc.token.start_pos)
    rest = source.text[exc.token.start_pos: start + len(statement)].rstrip()
    if not rest or not _parses(f"select {rest}"):
        return None
    fix = f"select {rest}; {keyword.value}"
    return RecipeError(f"`{keyword.value}` acts on the selected layers and takes no argument: write `{fix}`",
                       span=source.span_at(exc.token.start_pos, len(rest)), source=source,
                       hint="a `select` statement chooses the layers the statements after it act on")


_WHERE_STATEMENTS = ("select", "remove")


def _predicate_without_where(exc: UnexpectedToken, source: Source) -> RecipeError | None:
    """``select type=Dense``: a predicate needs `where` before it; found by putting `where` in the first
    place, after the statement's first words, where the statement then parses."""
    if exc.token.type in ("_SEP", "$END"):
        return None
    start, statement = _statement_at(source.text, exc.token.start_pos)
    words = list(re.finditer(r"\S+", statement))
    if not words or words[0].group() not in _WHERE_STATEMENTS or "where" in (w.group() for w in words):
        return None
    error_at = exc.token.start_pos - start
    for i in range(1, min(len(words), 4)):
        cut = words[i].start()
        if cut > error_at:
            break
        fixed = statement[:cut] + "where " + statement[cut:]
        if _parses(fixed.strip()):
            word = words[0].group()
            return RecipeError(f"a predicate follows `where`: write `{fixed.strip()}`",
                               span=source.span_at(start + cut, len(statement.rstrip()) - cut), source=source,
                               hint=f"without `where`, `{word}` takes layer names or types, e.g. `{word} Dense`")
    return None


__all__ = ["parse", "get_parser", "grammar_path", "SYNTAX_EXAMPLES", "UnexpectedEOF"]
