"""Hostile and broken input (issue 8): recipes, YAML, regexes, model files, killed processes.

Every case must end in a ModelxformError that names a position (recipes) or the file and cause (model
files), quickly, with nothing written and nothing left behind; never a traceback, a RecursionError or
a hang. docs/robustness.md lists the classes of bad input tried here and what the user sees.

The property tests are derandomized, so a run is reproducible; set MODELXFORM_FUZZ=N to run N times
as many examples with fresh random seeds (a longer fuzzing session, e.g. before a release).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import pathlib
import random
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import types
import zipfile

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, make_cnn, run_cli
from modelxform import ModelxformError, RecipeError, compile_recipe, ir, load_recipe
from modelxform.lang import safe_regex
from modelxform.errors import ApplyError
from modelxform.lang.parser import MAX_NESTING, MAX_NUMBER_DIGITS, MAX_RECIPE_BYTES, grammar_path
from modelxform.lang.yaml_form import MAX_DEPTH, to_yaml

# Seconds per example, compile included. Measured as CPU time, so that other work on a shared machine
# cannot fail a test; wall time gets a looser bound that still catches a compile blocked on I/O.
BUDGET = 2.0
WALL_BUDGET = 10.0
FUZZ = int(os.environ.get("MODELXFORM_FUZZ", "0") or 0)


def fuzz_settings(examples: int):
    """Derandomized unless MODELXFORM_FUZZ=N asks for N times as many fresh examples."""
    return settings(max_examples=examples * max(FUZZ, 1), deadline=None, derandomize=not FUZZ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---- the property every recipe must have ---------------------------------------------------------

def _lines(text: str) -> int:
    """Lines as the most generous reader counts them (str.splitlines breaks on \\r, \\x0c, \\u2028…;
    lark only on \\n and YAML on \\r, \\n, \\x85, \\u2028, \\u2029, so both count no more)."""
    return len(text.splitlines())


def compiles_or_fails_cleanly(text: str, filename: str | None = None) -> ModelxformError | None:
    """compile_recipe returns, or raises a ModelxformError whose every diagnostic has a position inside
    the text it is about; within BUDGET seconds. Returns the error (or None)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    error = None
    try:
        compile_recipe(text, filename)
    except ModelxformError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - this is the property under test
        raise AssertionError(f"compile_recipe raised {type(exc).__name__}: {str(exc)[:200]}") from exc
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    assert cpu < BUDGET and wall < WALL_BUDGET, f"compile took {cpu:.2f} s of CPU, {wall:.2f} s in all"
    if error is not None:
        assert_positions(error, text, filename)
    return error


def assert_positions(error: ModelxformError, text: str, filename: str | None) -> None:
    assert error.diagnostics
    for d in error.diagnostics:
        assert d.span is not None, f"no position: {d.message}"
        own = d.span.filename in (None, filename)
        about = text if own or d.source is None else d.source.text
        assert 1 <= d.span.line <= _lines(about) + 1, (d.span, d.message)
        assert d.span.column >= 1, (d.span, d.message)
        if own and not (filename or "").endswith((".yaml", ".yml")):
            # lark counts lines by "\n" only and columns within them
            lines = about.split("\n")
            if d.span.line <= len(lines):
                assert d.span.column <= len(lines[d.span.line - 1]) + 2, (d.span, d.message)
    rendered = error.render()
    assert "error: " in rendered
    assert (error.line, error.column) == (error.diagnostics[0].line, error.diagnostics[0].column)


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    """Random `include "…"` paths resolve here (an empty folder), not in the repository."""
    return tmp_path_factory.mktemp("empty")


# ---- (a) recipes from the grammar's vocabulary ---------------------------------------------------

def _grammar_literals() -> list[str]:
    rules = [line for line in grammar_path().read_text(encoding="utf-8").splitlines()
             if not re.match(r"\s*([A-Z_]+(\.\d+)?\s*:|%|//)", line)]  # skip terminals, directives
    return sorted(set(re.findall(r'"([^"]+)"', "\n".join(rules))))


KEYWORDS = _grammar_literals()
NAMES = ["dense", "dense_1", "conv2d_1", "Dense", "Conv2D", "MaxPool2D", "Dens", "kernel", "bias", "weights",
         "backbone", "conv1", "he_normal", "zeros", "constant", "normal", "uniform", "stddev", "units", "x",
         "Sequential", "Functional", "_", "a" * 300]
NUMBERS = ["0", "1", "-1", "+2", "0.5", ".5", "1.", "3", "100", "1e400", "-1e400", "1e-400", "1e999999999", "30M",
           "1.5K", "2G", "50%", "0%", "100%", "101%", "0.5%", "9" * (MAX_NUMBER_DIGITS + 1), "1" + "0" * 5000,
           "2" * 4301, "0." + "0" * 5000 + "1", "12345678901234567890"]
STRINGS = ['"conv*"', '"dense_?"', '"(a+)+$"', r'"conv\d+"', '"(("', '""', '"a\\"b"', '"\\n"', '"unterminated',
           '"', "'single'", '"backbone/*"', '"common.recipe"', '"../x.recipe"', '">=0.1"', '"1.0.0"', '"x"']
ODD = ["\x00", "\ufeff", "\u2028", "\r", "\t", "\x0c", "\x85", "é", "中", "\ud800", "\U0001f600", "\\", "@", "`",
       "$", "$x", "$f", "$undefined", "#", "# comment", "'", "(" * 100, ")" * 100, "[" * 70, "{", "}", "&", "*"]
TOKEN = st.one_of(
    st.sampled_from(KEYWORDS), st.sampled_from(NAMES), st.sampled_from(NUMBERS), st.sampled_from(STRINGS),
    st.sampled_from(ODD), st.sampled_from(["\n", ";", "\n\n"]),
    st.integers().map(str), st.floats(allow_nan=False).map(repr),
    st.text(max_size=4), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
    st.text(max_size=6).map(lambda s: '"' + s.replace("\\", "").replace('"', "").replace("\n", "") + '"'))
SEPARATOR = st.sampled_from([" ", " ", " ", "", "\n", "\t", ";"])
RECIPE_TEXT = st.lists(st.tuples(TOKEN, SEPARATOR), max_size=40).map(lambda ts: "".join(t + s for t, s in ts))


def test_vocabulary_comes_from_the_grammar():
    for word in ("select", "where", "scale", "replace", "with", "assert", "(", "~", "%"):
        assert word in KEYWORDS
    # words and short punctuation only: no terminal regex leaked in
    assert all(re.fullmatch(r"\w+|[^\w\s]{1,2}", w) for w in KEYWORDS), KEYWORDS


@fuzz_settings(600)
@given(RECIPE_TEXT)
def test_random_recipes_compile_or_fail_with_a_position(empty_dir, text):
    with contextlib.chdir(empty_dir):
        compiles_or_fails_cleanly(text)
        compiles_or_fails_cleanly(text, "random.recipe")


# Statements shaped like the grammar's rules, with random (often hostile) values in their slots, so
# that most examples get past the parser and exercise the compiler's checks.
WORD = st.one_of(st.sampled_from(NAMES + ["weights", "kernel", "bias", "x", "f", "selected"]),
                 st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True))
TYPE = st.sampled_from(["Dense", "Conv2D", "MaxPool2D", "MaxPooling2D", "Dens", "dense", "Sequential", "Foo"])
NUM = st.one_of(st.sampled_from(NUMBERS[:20] + ["$x", "$f", "$nope"]), st.integers(-10**6, 10**6).map(str))
QUOTED = st.sampled_from(STRINGS[:10] + ['"conv\\d+"', '"^block[1-3]_"', '"(conv|bn)_\\d"', '"[a-"'])
LITERAL = st.one_of(NUM, QUOTED, st.sampled_from(["True", "False", "None", "true", "none"]))
VALUE = st.recursive(LITERAL, lambda inner: st.lists(inner, max_size=3).map(
    lambda xs: st_wrap(xs)), max_leaves=12)
CMP = st.sampled_from(["<", ">", "<=", ">=", "==", "!=", "="])


def st_wrap(items):
    body = ", ".join(items)
    return f"({body})" if len(items) != 1 or not body else f"[{body}]"


PRED = st.recursive(
    st.one_of(TYPE.map(lambda t: f"type={t}"), st.lists(TYPE, min_size=1, max_size=3).map(
        lambda ts: f"type in ({', '.join(ts)})"), WORD.map(lambda w: f"name={w}"), QUOTED.map(lambda q: f"name ~ {q}"),
        st.just("trainable"), st.just("has weights"),
        st.tuples(CMP, st.sampled_from(["3", "30M", "1.5K", "$x", "9" * 200])).map(lambda c: f"params {c[0]} {c[1]}")),
    lambda inner: st.one_of(inner.map(lambda p: f"not {p}"), inner.map(lambda p: f"({p})"),
                            st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(" ".join)),
    max_leaves=8)
COUNT = st.sampled_from(["", "1", "3", "50%", "0%", "101%", "0", "-1", "2.5", "$x", "$x%"])
REF = st.one_of(WORD, TYPE.map(lambda t: f"type {t}"), WORD.map(lambda w: f"layer {w}"), QUOTED,
                st.tuples(WORD, WORD).map("/".join))
SHAPE = st.lists(st.sampled_from(["None", "none", "10", "-1", "2.5", "$x"]), max_size=4).map(
    lambda ds: "(" + ", ".join(ds) + ("," if len(ds) == 1 else "") + ")")
CALL = st.tuples(WORD | TYPE, st.lists(st.one_of(st.tuples(WORD, VALUE).map("=".join), VALUE), max_size=3)).map(
    lambda c: f"{c[0]}({', '.join(c[1])})")
STATEMENT = st.one_of(
    st.tuples(QUOTED, QUOTED).map(lambda v: f"recipe {v[0]} version {v[1]}"),
    QUOTED.map(lambda v: f"requires modelxform {v}"), NUM.map(lambda n: f"seed {n}"),
    st.tuples(WORD, VALUE).map(lambda v: f"param {v[0]} = {v[1]}"), QUOTED.map(lambda v: f"include {v}"),
    st.just("select all"), st.lists(REF, min_size=1, max_size=3).map(lambda rs: "select " + ", ".join(rs)),
    PRED.map(lambda p: f"select where {p}"),
    st.tuples(st.sampled_from(["random", "first", "last"]), COUNT, st.none() | PRED).map(
        lambda v: f"select {v[0]} {v[1]}" + (f" where {v[2]}" if v[2] else "")),
    st.tuples(WORD, NUM).map(lambda v: f"scale {v[0]} {v[1]}"),
    st.tuples(CALL, WORD).map(lambda v: f"add noise {v[0]} to {v[1]}"),
    st.tuples(WORD, st.none() | WORD | CALL).map(lambda v: f"reinit {v[0]}" + (f" with {v[1]}" if v[1] else "")),
    st.tuples(WORD, WORD | CALL).map(lambda v: f"set {v[0]} to {v[1]}"),
    st.tuples(WORD, NUM, NUM).map(lambda v: f"clip {v[0]} {v[1]} {v[2]}"),
    st.tuples(WORD, st.sampled_from(["50%", "0%", "100%", "101%", "$x%", "12.5%"])).map(lambda v: f"prune {v[0]} {v[1]}"),
    st.sampled_from(["freeze", "unfreeze"]),
    st.tuples(st.just("selected") | REF, TYPE | CALL).map(lambda v: f"replace {v[0]} with {v[1]}"),
    st.tuples(st.lists(REF, min_size=1, max_size=2), st.booleans()).map(
        lambda v: "tap " + ", ".join(v[0]) + (" only" if v[1] else "")),
    st.tuples(CMP, NUM).map(lambda v: f"assert count {v[0]} {v[1]}"),
    st.tuples(CMP, st.sampled_from(["30M", "100", "$x", "1.5G"])).map(lambda v: f"assert params {v[0]} {v[1]}"),
    st.tuples(st.sampled_from(["", "0 ", "1 ", "-1 "]), CMP, SHAPE).map(lambda v: f"assert output {v[0]}shape {v[1]} {v[2]}"),
)
SHAPED_RECIPE = st.lists(st.tuples(STATEMENT, st.sampled_from(["\n", "\n", "; ", "  # note\n"])), max_size=10).map(
    lambda ss: "".join(a + b for a, b in ss))


@fuzz_settings(400)
@given(SHAPED_RECIPE)
def test_grammar_shaped_recipes_compile_or_fail_with_a_position(empty_dir, text):
    with contextlib.chdir(empty_dir):
        compiles_or_fails_cleanly(text, "shaped.recipe")


# ---- (b) mutations of the real recipes ------------------------------------------------------------

REAL_RECIPES = sorted((ROOT / "recipes").glob("*.recipe")) + sorted((ROOT / "tests" / "golden" / "ok").glob("*.recipe"))
_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\$?\w+(?:\.\d+)?%?|[<>=!]=|\s+|\S')
JUNK = st.one_of(
    st.binary(min_size=1, max_size=8).map(lambda b: b.decode("latin-1")), st.text(min_size=1, max_size=8),
    st.sampled_from(["1e400", "9" * 5000, "(" * 10_000, ")" * 10_000, "[" * 10_000, '"', '"open', "\x00", "\ufeff",
                     "\ud800", "\n", ";", "$nope", "not " * 200, " and trainable" * 100, "%", "/", "~"]))


def tokens_of(text: str) -> list[str]:
    out = _TOKENS.findall(text)
    assert "".join(out) == text
    return out


def test_there_are_real_recipes_to_mutate():
    assert len(REAL_RECIPES) >= 10
    for path in REAL_RECIPES:
        assert len(tokens_of(path.read_text(encoding="utf-8"))) > 5


@st.composite
def mutated_recipe(draw, paths=tuple(REAL_RECIPES)):
    path = draw(st.sampled_from(paths))
    toks = tokens_of(path.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]))
        i = draw(st.integers(0, len(toks) - 1))
        if op == "delete" and len(toks) > 1:
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "insert":
            toks.insert(i, draw(JUNK))
        else:
            toks[i] = draw(st.one_of(JUNK, TOKEN))
    return path, "".join(toks)


@fuzz_settings(400)
@given(mutated_recipe())
def test_mutated_real_recipes_compile_or_fail_with_a_position(case):
    path, text = case
    # compiled as if it were the file, so that its includes resolve next to it
    compiles_or_fails_cleanly(text, str(path))


# ---- specific hostile texts ---------------------------------------------------------------------

DEEP = 10_000
HOSTILE_TEXT = [
    # (id, text, message fragment, (line, column))
    ("deep-parens-in-predicate", "select where " + "(" * DEEP + "trainable" + ")" * DEEP,
     f"nested more than {MAX_NESTING} deep", (1, 14 + MAX_NESTING)),
    ("deep-tuple-value", "param x = " + "(" * DEEP + "1" + ")" * DEEP, "nested more than", (1, 11 + MAX_NESTING)),
    ("deep-list-value", "param x = " + "[" * DEEP + "]" * DEEP, "nested more than", (1, 11 + MAX_NESTING)),
    ("deep-constructor-arg", "select all\nreplace dense with Dense(units=" + "(" * DEEP + "1" + ")" * DEEP + ")",
     "nested more than", (2, 32 + MAX_NESTING - 1)),
    ("unclosed-parens", "select where " + "(" * DEEP, "unexpected end of statement", (1, 14 + DEEP)),
    ("not-chain", "select where " + "not " * 5000 + "trainable", "nested more than 64 levels", None),
    ("and-chain", "select where " + " and ".join(["trainable"] * 5000), "nested more than 64 levels", None),
    ("huge-float", "select all; scale kernel 1e400", "out of range", (1, 26)),
    ("huge-int-seed", "seed " + "1" + "0" * 5000, "5001 digits", (1, 6)),
    ("huge-int-scale", "select all\nscale kernel " + "9" * 5000, "digits", (2, 14)),
    ("huge-percent", "select all; prune kernel " + "9" * 5000 + "%", "digits", (1, 26)),
    ("huge-size", "select where params > " + "9" * 5000 + "M", "digits", (1, 23)),
    ("huge-count", "select first " + "9" * 5000, "digits", (1, 14)),
    ("huge-shape", "select all\nassert output shape == (None, " + "9" * 5000 + ")", "digits", (2, 31)),
    ("huge-decimal", "select all; clip kernel -1 1." + "0" * 5000, "digits", (1, 30)),
    ("unterminated-string", 'select "conv*', "unterminated string", (1, 8)),
    ("unterminated-string-line-2", 'select all\ntap "conv2d_1\nfreeze', "unterminated string", (2, 5)),
    ("single-quotes", "select 'conv*'", "double quotes", (1, 8)),
    ("nul-byte", "select all\x00", "unexpected character '\\x00'", (1, 11)),
    ("lone-surrogate", "select \ud800", "unexpected character", (1, 8)),
    ("bidi-override", "select \u202eall", "unexpected character", (1, 8)),
    ("too-large", "select all\n" * (MAX_RECIPE_BYTES // 11 + 1), f"larger than {MAX_RECIPE_BYTES} bytes", (1, 1)),
    ("long-name-chain", "select " + "/".join(["a"] * 2000) + " x", "unexpected `x`", (1, 4008)),
]


@pytest.mark.parametrize("text,fragment,position", [c[1:] for c in HOSTILE_TEXT], ids=[c[0] for c in HOSTILE_TEXT])
def test_hostile_text(text, fragment, position):
    error = compiles_or_fails_cleanly(text)
    assert error is not None
    assert fragment in error.message, error.message
    if position is not None:
        assert (error.line, error.column) == position


def test_nesting_at_the_limit_is_fine():
    ok = "param x = " + "(" * MAX_NESTING + "1," + ")" * MAX_NESTING + "\nselect all\nscale kernel 1\n"
    assert compiles_or_fails_cleanly(ok) is None
    assert compiles_or_fails_cleanly("param x = " + "9" * MAX_NUMBER_DIGITS + "\n") is None


def test_brackets_inside_strings_and_comments_do_not_count():
    text = 'tap "' + "(" * 200 + '"  # ' + "[" * 200 + "\nselect all\nfreeze\n"
    error = compiles_or_fails_cleanly(text)
    assert error is None or "nested" not in error.message


def test_byte_order_mark_is_ignored():
    recipe = compile_recipe("\ufeffselect all\nfreeze\n")
    assert [str(s) for s in recipe.program.statements] == ["select all", "freeze"]
    with pytest.raises(RecipeError) as info:
        compile_recipe("\ufeffselect all\nfreeze unfreeze\n")
    assert (info.value.line, info.value.column) == (2, 8)


@pytest.mark.parametrize("data,position", [
    (b"select all\nfreeze \xff\n", (2, 8)),
    (b"\xff\xfes\x00e\x00l\x00", (1, 1)),  # UTF-16 with its byte-order mark
    (b"select all\n# caf\xe9\n", (2, 6)),  # Latin-1
    (b"select all\n\xed\xa0\x80\n", (2, 1)),  # an encoded surrogate
    (b"select all; tap \"" + b"\xc3" + b"\"\n", (1, 18)),  # a truncated sequence
])
@pytest.mark.parametrize("suffix", [".recipe", ".yaml"])
def test_invalid_utf8_file(tmp_path, data, position, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    start = time.process_time()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.process_time() - start < BUDGET
    assert "not valid UTF-8" in info.value.message
    assert (info.value.line, info.value.column) == position
    assert info.value.filename == str(path)
    assert info.value.render().startswith(f"{path}:{position[0]}:{position[1]}: error: recipe is not valid UTF-8")


@pytest.mark.parametrize("kind,fragment", [
    ("binary", "cannot include 'inc.recipe': recipe is not valid UTF-8"),
    ("too-large", "larger than"),
    ("fifo", "cannot include 'inc.recipe': it is a FIFO (named pipe), not a recipe file"),  # never opened
    ("directory", "cannot include 'inc.recipe': it is a directory, not a recipe file"),
    ("deep-brackets", "nested more than"),
])
def test_hostile_included_file(tmp_path, kind, fragment):
    inc = tmp_path / "inc.recipe"
    if kind == "binary":
        inc.write_bytes(bytes(range(256)) * 4)
    elif kind == "too-large":
        inc.write_text("select all\n" * (MAX_RECIPE_BYTES // 11 + 1))
    elif kind == "fifo":
        os.mkfifo(inc)
    elif kind == "directory":
        inc.mkdir()
    else:
        inc.write_text("param x = " + "[" * 1000 + "]" * 1000 + "\n")
    main = tmp_path / "main.recipe"
    main.write_text('select all\ninclude "inc.recipe"\nfreeze\n')
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(main)
    assert time.perf_counter() - start < WALL_BUDGET
    assert fragment in info.value.message
    d = info.value.diagnostics[0]
    assert d.span is not None and d.span.line >= 1
    if kind in ("binary", "fifo", "directory"):
        assert (d.span.filename, d.line, d.column) == (str(main), 2, 1)


def test_excerpt_shows_the_line_the_position_names():
    with pytest.raises(RecipeError) as info:
        compile_recipe("# a\u2028comment\nselect all\nfreeze unfreeze\n", "x.recipe")
    assert (info.value.line, info.value.column) == (3, 8)
    assert info.value.render().splitlines()[1].strip() == "freeze unfreeze"


# ---- the YAML form --------------------------------------------------------------------------------

STATEMENT_WORDS = ["recipe", "requires", "seed", "param", "include", "select", "scale", "add_noise", "reinit", "set",
                   "clip", "prune", "freeze", "unfreeze", "replace", "tap", "assert", "insert", "remove", "swap"]
FIELD_WORDS = ["name", "version", "value", "all", "layers", "where", "random", "first", "last", "target", "factor",
               "normal", "uniform", "mean", "stddev", "low", "high", "with", "to", "percent", "source", "only",
               "count", "params", "output_shape", "op", "index", "glob", "layer", "type", "list", "*", "Dense",
               "units", "constant", "equivalent", "tolerance", "after", "before"]
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**120, max_value=10**130),
    st.floats(), st.text(max_size=12), st.sampled_from(STATEMENT_WORDS + FIELD_WORDS + NUMBERS[:12] + STRINGS[:6]
                                                       + ["type=Dense", "trainable and not", "== 3", "(" * 80,
                                                          'name ~ "conv\\d+"', "$x", "50%", "selected"]))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(STATEMENT_WORDS + FIELD_WORDS) | st.text(max_size=4), inner, max_size=4),
    max_leaves=25)
YAML_DOCS = st.one_of(
    st.lists(st.one_of(st.dictionaries(st.sampled_from(STATEMENT_WORDS), YAML_VALUES, min_size=1, max_size=2),
                       st.sampled_from(["freeze", "unfreeze", "select"]), YAML_VALUES), max_size=6),
    YAML_VALUES)
YAML_VOCABULARY = ["- ", ": ", "{", "}", "[", "]", ", ", "&a ", "*a", "&b ", "*b", "!!python/object/apply:os.system ",
                   "!!binary ", "!!str ", "!!int ", "!!set ", "!tag ", "|\n", ">\n", "'", '"', "# c", "\n", "  ", "    ",
                   "\t", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "? ", "<<: ", "\x00", "\ufeff",
                   "\u2028", "\x85", "\r", "select", "all", "scale", "target", "kernel", "factor", "0.5", "1e400",
                   "9" * 200, "where", "type=Dense", "freeze", "~", "null", "yes", "0x1F", "1:30", "2001-12-14", "-.inf"]
YAML_TEXT = st.lists(st.one_of(st.sampled_from(YAML_VOCABULARY), st.text(max_size=3)), max_size=40).map("".join)


def _dump(doc, flow: bool) -> str:
    return yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True, sort_keys=False)


@fuzz_settings(300)
@given(YAML_DOCS, st.booleans())
def test_random_yaml_documents(empty_dir, doc, flow):
    with contextlib.chdir(empty_dir):
        compiles_or_fails_cleanly(_dump(doc, flow), "random.yaml")


@fuzz_settings(300)
@given(YAML_TEXT)
def test_random_yaml_text(empty_dir, text):
    with contextlib.chdir(empty_dir):
        compiles_or_fails_cleanly(text, "random.yaml")


def _yaml_recipes() -> list[tuple[pathlib.Path, str]]:
    """recipes/*.yaml, and the YAML form of every text recipe (to have more YAML to mutate)."""
    out = [(p, p.read_text(encoding="utf-8")) for p in sorted((ROOT / "recipes").glob("*.yaml"))]
    for path in REAL_RECIPES:  # (every one compiles: test_recipes.py checks them; an error here stops the run)
        with contextlib.chdir(path.parent):
            out.append((path.with_suffix(".yaml"), to_yaml(load_recipe(path.name).program)))
    return out


YAML_RECIPES = _yaml_recipes()
_YAML_TOKENS = re.compile(r"\s+|[\[\]{},:\-]|[^\s\[\]{},:]+")


@st.composite
def mutated_yaml(draw):
    path, text = draw(st.sampled_from(YAML_RECIPES))
    toks = _YAML_TOKENS.findall(text)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]))
        i = draw(st.integers(0, len(toks) - 1))
        if op == "delete" and len(toks) > 1:
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        else:
            new = draw(st.one_of(JUNK, st.sampled_from(YAML_VOCABULARY)))
            if op == "insert":
                toks.insert(i, new)
            else:
                toks[i] = new
    return path, "".join(toks)


def test_there_are_yaml_recipes_to_mutate():
    assert any(p.parent.name == "recipes" for p, _ in YAML_RECIPES)
    assert len(YAML_RECIPES) >= 10


@fuzz_settings(300)
@given(mutated_yaml())
def test_mutated_yaml_recipes(case):
    path, text = case
    compiles_or_fails_cleanly(text, str(path))


def _laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{n}: &a{n} [" + ",".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def _block_lists(depth: int) -> str:
    return "".join("  " * i + "-\n" for i in range(depth))


HOSTILE_YAML = [
    ("billion-laughs", _laughs(), "anchors and aliases", (1, 5)),
    ("alias-in-a-statement", "- &s {select: all}\n- *s\n", "anchors and aliases", (1, 3)),
    ("deep-flow-lists", "[" * DEEP + "]" * DEEP, f"nested more than {MAX_DEPTH} deep", (1, MAX_DEPTH + 1)),
    ("deep-unclosed-lists", "[" * DEEP, "nested more than", (1, MAX_DEPTH + 1)),
    ("deep-flow-mappings", "{a: " * DEEP + "1" + "}" * DEEP, "nested more than", (1, 4 * MAX_DEPTH + 1)),
    ("deep-block-lists", _block_lists(400), "nested more than", (MAX_DEPTH + 1, 2 * MAX_DEPTH + 1)),
    ("deep-value", "- param: {name: x, value: " + "[" * DEEP + "]" * DEEP + "}\n", "nested more than", (1, 88)),
    ("deep-predicate", '- select: {where: "' + "(" * DEEP + "trainable" + ")" * DEEP + '"}\n',
     f"nested more than {MAX_NESTING} deep", (1, 20 + MAX_NESTING)),
    ("huge-int", "- seed: " + "9" * 5000 + "\n", "5000 characters long", (1, 9)),
    ("huge-int-tagged", "- seed: !!int '" + "9" * 5000 + "'\n", "characters long", (1, 9)),
    ("huge-sexagesimal", "- seed: 1:" + ":".join(["59"] * 2000) + "\n", "characters long", (1, 9)),
    ("huge-count-string", '- select: {first: "' + "9" * 5000 + '"}\n', "digits", (1, 20)),
    ("too-large", "- freeze\n" * (MAX_RECIPE_BYTES // 9 + 1), "larger than", (1, 1)),
    ("python-tag", "- !!python/object/apply:os.system ['echo pwned']\n", "not allowed", (1, 3)),
    ("binary-tag", "- select: !!binary aGVsbG8=\n", "not allowed", (1, 11)),
    ("set-tag", "- seed: !!set {a, b}\n", "not allowed", (1, 9)),
    ("not-a-list", "select: all\n", "list of statements", (1, 1)),
    ("a-number", "42\n", "list of statements", (1, 1)),
    ("statement-is-a-list", "- [select, all]\n", "one-key mapping", (1, 3)),
    ("statement-key-is-a-list", "- {[1, 2]: 3}\n", "unknown statement", (1, 4)),
    ("select-is-a-number", "- select: 3\n", "select must be a mapping", (1, 11)),
    ("factor-is-a-string", "- select: all\n- scale: {target: kernel, factor: lots}\n", "must be a number", (2, 35)),
    ("factor-is-a-list", "- select: all\n- scale: {target: kernel, factor: [1]}\n", "must be a number", (2, 35)),
    ("where-is-a-mapping", "- select: {where: {type: Dense}}\n", "must be written as a string", (1, 19)),
    ("layers-is-a-mapping", "- select: {layers: {a: 1}}\n", "unknown key", (1, 20)),
    ("timestamp-seed", "- seed: 2001-12-14\n", "must be a number", (1, 9)),
    ("tab-indent", "- select:\n\t- all\n", "invalid YAML", (2, 1)),
    ("nul", "- select: all\x00\n", "invalid YAML", (1, 14)),
    ("two-documents", "- select: all\n---\n- freeze\n", "invalid YAML", (2, 1)),
    ("unclosed-flow", "- select: [all\n- freeze\n", "invalid YAML", None),
]


@pytest.mark.parametrize("text,fragment,position", [c[1:] for c in HOSTILE_YAML], ids=[c[0] for c in HOSTILE_YAML])
def test_hostile_yaml(text, fragment, position):
    error = compiles_or_fails_cleanly(text, "hostile.yaml")
    assert error is not None
    assert any(fragment in d.message for d in error.diagnostics), [d.message for d in error.diagnostics]
    if position is not None:
        assert (error.line, error.column) == position, error.message


@pytest.mark.parametrize("text,position", [("- select: all\x00\n", (1, 14)), ("- freeze\n- select: \x07all\n", (2, 11))])
def test_yaml_control_character_is_reported_where_it_is(text, position):
    error = compiles_or_fails_cleanly(text, "x.yaml")
    assert error is not None and (error.line, error.column) == position
    assert len(error.render().splitlines()) <= 3  # the message, the line and the caret


@pytest.mark.parametrize("factor", ["1.0e+400", ".inf", ".nan"])
def test_yaml_non_finite_numbers_are_refused(factor):
    error = compiles_or_fails_cleanly(f"- select: all\n- scale: {{target: kernel, factor: {factor}}}\n", "x.yaml")
    assert error is not None and (error.line, error.column) == (2, 35)


@pytest.mark.parametrize("call", ["{Dense: {[1]: 2}}", "{Dense: {{a: 1}: 2}}", "{Dense: {3: 2}}"])
def test_yaml_non_string_argument_names_are_refused(call):
    text = f"- select: all\n- replace: {{source: selected, with: {call}}}\n"
    error = compiles_or_fails_cleanly(text, "x.yaml")
    assert error is not None and error.line == 2


# ---- regular expressions ------------------------------------------------------------------------

PATHOLOGICAL = [
    # (pattern, message fragment, position in the pattern)
    ("(a+)+$", "nested quantifier: `(a+)+` repeats `a+`", 0),
    ("(a*)*", "nested quantifier", 0),
    ("^x(?:a+)+$", "nested quantifier", 2),
    ("(a?a)+$", "nested quantifier", 0),
    ("(\\d\\d?)+$", "nested quantifier", 0),
    ("(a?){30}a{30}", "nested quantifier", 0),
    ("((?=a+)b)+", "nested quantifier", 0),
    ("(a|a)*", "ambiguous repetition", 0),
    ("(a|ab)+$", "ambiguous repetition", 0),
    ("(aa|a)*$", "ambiguous repetition", 0),
    ("(\\w|\\d)+$", "ambiguous repetition", 0),
    ("(|a)*", "matches nothing", 0),
    ("(?i)(A|a)+", "ambiguous repetition", 4),
    ("(a)\\1", "backreferences", 3),
    ("(?P<x>a)(?P=x)", "backreferences", 8),
    ("(a)(?(1)b|c)", "conditional", 3),
    (".*.*.*x", "too many quantifiers in a row", 4),
    ("\\w*\\d*\\w*!", "too many quantifiers in a row", 6),
    ("a?" * 30 + "a" * 30, "too many quantifiers in a row", 4),
    ("x" * (safe_regex.MAX_PATTERN_LENGTH + 1), "characters long", safe_regex.MAX_PATTERN_LENGTH),
]
LEGITIMATE = [
    # (pattern, names it matches, names it does not)
    (r"conv\d+", ["conv2d_1"[:4] + "1", "block1_conv2"], ["conv", "dense_1"]),
    (r"^block[1-3]_", ["block1_conv1", "block3_pool"], ["block4_conv1", "xblock1_"]),
    (r"(conv|bn)_\d", ["conv_1", "stem_bn_2"], ["conv1", "relu_1"]),
    (r"^block\d+_conv\d+$", ["block12_conv3"], ["block12_conv3_bn"]),
    (r".*conv.*", ["conv"], ["dense"]),
    (r"^(conv|bn)\d+_(relu|bn)?$", ["conv1_", "bn2_relu"], ["conv1_x"]),
    (r"(?i)^DENSE", ["dense_1"], ["a_dense"]),
    (r"_\d{1,3}$", ["dense_12"], ["dense_1234"]),
    (r"(?:conv|dense)+_", ["convdense_"], ["relu_"]),
    (r"(ab{2})+", ["abbabb"], ["aab"]),
    (r"^(?!.*_bn).*conv", ["block_conv"], ["conv_bn"]),
    (r"\(a+\)+", ["(aa))"], ["aa"]),
]


@pytest.mark.parametrize("pattern,fragment,pos", PATHOLOGICAL, ids=[p[:20] for p, _, _ in PATHOLOGICAL])
def test_pathological_patterns_are_refused(pattern, fragment, pos):
    with pytest.raises(safe_regex.UnsafePattern) as info:
        safe_regex.check(pattern)
    assert fragment in str(info.value)
    assert info.value.pos == pos
    assert isinstance(info.value, __import__("re").error)  # callers that report re.error report these too


@pytest.mark.parametrize("pattern,yes,no", LEGITIMATE, ids=[p for p, _, _ in LEGITIMATE])
def test_legitimate_patterns_work(pattern, yes, no):
    compiled = safe_regex.check(pattern)
    for name in yes:
        assert safe_regex.search(pattern, name) is not None, name
    for name in no:
        assert compiled.search(name) is None, name
    recipe = compile_recipe(f'select where name ~ "{pattern}"\nfreeze\n')
    assert recipe.program.statements[0].selector.pred == ir.PRegex(pattern)


def _pathological_names(n: int) -> list[str]:
    return [c * n + "!" for c in "ab1A_ "] + ["ab" * (n // 2) + "!", "a_" * (n // 2), "a1" * (n // 2) + "!"]


REGEX_PIECES = ["a", "b", "ab", "(", ")", "(?:", "|", "*", "+", "?", "{2}", "{1,3}", "{,}", "{2,}", ".", r"\d", r"\w",
                r"\s", "[ab]", "[^a]", "^", "$", r"\b", "(?=", "(?!", "*?", "+?", "(?i)", "\\", "[", "]", "{", "}",
                "(?P<n>", r"\1", "(?>", "++", "(?#c)", "_", "1", " ", "#", "(?x)", r"\x41", "[a-]", "[]a]", "(?s:"]
PATTERNS = st.one_of(st.lists(st.sampled_from(REGEX_PIECES), max_size=14).map("".join), st.text(max_size=12))


@fuzz_settings(1500)
@given(PATTERNS)
def test_accepted_patterns_match_fast_and_the_checker_only_raises_re_errors(pattern):
    import re
    try:
        compiled = safe_regex.check(pattern)
    except re.error:
        return
    names = _pathological_names(safe_regex.MAX_NAME_LENGTH - 1)

    def too_slow(signum, frame):
        raise TimeoutError
    # a CPU-time alarm (immune to other work on the machine); re checks for signals, so it interrupts
    # a runaway match instead of hanging the test
    previous = signal.signal(signal.SIGVTALRM, too_slow)
    try:
        for name in names:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0.5)
            try:
                compiled.search(name)
            except TimeoutError:
                raise AssertionError(f"accepted pattern {pattern!r} takes > 0.5 s on {name[:12]!r}…") from None
            finally:
                signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    finally:
        signal.signal(signal.SIGVTALRM, previous)


def _info(name: str):
    from modelxform.keras_io.layers import LayerInfo
    return LayerInfo(name, types.SimpleNamespace(name=name, trainable=True, weights=[]))


def test_unsafe_pattern_is_refused_at_match_time_with_its_position():
    """Even a PRegex that did not go through the compiler cannot hang a run."""
    from modelxform.engine.selectors import matches
    from modelxform.source import Span
    span = Span(3, 14, 3, 28, "r.recipe")
    start = time.process_time()
    with pytest.raises(ApplyError) as info:
        matches(ir.PRegex("(a+)+$", span=span), _info("a" * 40 + "!"), None)
    assert time.process_time() - start < 0.5
    assert "nested quantifier" in info.value.message and "(a+)+" in info.value.message
    assert (info.value.line, info.value.column) == (3, 14)


def test_overlong_name_is_refused_at_match_time():
    from modelxform.engine.selectors import matches
    from modelxform.source import Span
    span = Span(2, 14, 2, 22, "r.recipe")
    assert matches(ir.PRegex(r"^a+$", span=span), _info("a" * safe_regex.MAX_NAME_LENGTH), None)
    with pytest.raises(ApplyError) as info:
        matches(ir.PRegex(r"^a+$", span=span), _info("a" * (safe_regex.MAX_NAME_LENGTH + 1)), None)
    assert f"at most {safe_regex.MAX_NAME_LENGTH} characters" in info.value.message
    assert (info.value.line, info.value.column) == (2, 14)


@pytest.mark.parametrize("pattern,fragment,pos", PATHOLOGICAL[:6] + PATHOLOGICAL[13:16],
                         ids=[p[:20] for p, _, _ in PATHOLOGICAL[:6] + PATHOLOGICAL[13:16]])
def test_pathological_pattern_is_a_compile_error_with_position(pattern, fragment, pos):
    text = f'select all\nselect where name ~ "{pattern}"\nfreeze\n'
    error = compiles_or_fails_cleanly(text, "r.recipe")
    assert error is not None
    assert (error.line, error.column) == (2, 21)  # the pattern's string
    assert fragment in error.message and f"at position {pos}" in error.message


def test_pathological_pattern_in_yaml_is_a_compile_error():
    error = compiles_or_fails_cleanly("- select: {where: 'name ~ \"(a+)+$\"'}\n", "r.yaml")
    assert error is not None and error.line == 1 and "nested quantifier" in error.message


def test_unsafe_pattern_through_the_cli_fails_fast_with_its_position(tmp_path, cnn):
    recipe = tmp_path / "rx.recipe"
    recipe.write_text('select all\nselect where name ~ "(a+)+$"\nfreeze\n')
    r = run_cli("plan", recipe, cnn)
    assert r.status == 2, r.err  # refused when the recipe is compiled, before the model is read
    first = r.err.splitlines()[0]
    assert first.startswith(f"{recipe}:2:21: error:") and "nested quantifier" in first and "(a+)+" in first, r.err
    assert "Traceback" not in r.err
    assert 'select where name ~ "(a+)+$"' in r.err  # the excerpt


# ---- model files -----------------------------------------------------------------------------------

def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def listing(folder) -> set[str]:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def only_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert "Traceback" not in err


WEIGHT_ONLY = "select where type=Dense\nscale kernel 0.5\n"  # may take the TensorFlow-free fast path
STRUCTURAL = "replace MaxPooling2D with AveragePooling2D\n"  # always loads the model with Keras
RECIPES = {"weight-only": WEIGHT_ONLY, "structural": STRUCTURAL}


@pytest.fixture(scope="module")
def cnn_bytes(tmp_path_factory) -> bytes:
    from modelxform.keras_io.files import save_model
    path = tmp_path_factory.mktemp("cnn") / "cnn.keras"
    save_model(make_cnn(), path)
    return path.read_bytes()


@pytest.fixture
def cnn(tmp_path, cnn_bytes) -> pathlib.Path:
    path = tmp_path / "cnn.keras"
    path.write_bytes(cnn_bytes)
    return path


def _rewrite_archive(src: pathlib.Path, dst: pathlib.Path, member: str, change) -> None:
    """Copy the .keras zip ``src`` to ``dst`` with ``member``'s bytes passed through change(bytes) -> bytes
    (None drops the member)."""
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in members:
            if info.filename == member:
                data = change(data)
                if data is None:
                    continue
            zout.writestr(info, data)


def _edit_weights(edit):
    """change() for model.weights.h5: open it with h5py and apply edit(h5file)."""
    def change(data: bytes) -> bytes:
        import h5py
        with tempfile.TemporaryDirectory() as folder:
            path = pathlib.Path(folder) / "w.h5"
            path.write_bytes(data)
            with h5py.File(path, "r+") as f:
                edit(f)
            return path.read_bytes()
    return change


# The CNN's weights file names its layers by class and index: layers/dense_1 is the second Dense
# layer, which the model calls dense_2 (kernel (32, 16), bias (16,)).
SECOND_DENSE = "layers/dense_1/vars"


def _delete(name):
    def edit(f):
        del f[name]
    return edit


def _reshape(f):
    data = f[f"{SECOND_DENSE}/0"][...]
    del f[f"{SECOND_DENSE}/0"]
    f[f"{SECOND_DENSE}/0"] = data.reshape(-1)[:100].reshape(10, 10)


def _extra(f):
    f[f"{SECOND_DENSE}/2"] = np.zeros(3, "float32")


def _strings(f):
    del f[f"{SECOND_DENSE}/1"]
    f[f"{SECOND_DENSE}/1"] = np.array([b"x"] * 16)


DAMAGED = {
    # kind: (member, change, message fragments)
    "missing-array": ("model.weights.h5", _edit_weights(_delete(f"{SECOND_DENSE}/1")),
                      ["the weights do not fit the model", "'dense_2'", "expected 2 variables, but received 1"]),
    "missing-layer": ("model.weights.h5", _edit_weights(_delete("layers/conv2d_1")),
                      ["the weights do not fit the model", "received 0 variables"]),
    "extra-array": ("model.weights.h5", _edit_weights(_extra), ["the weights do not fit the model", "received 3"]),
    "wrong-shape": ("model.weights.h5", _edit_weights(_reshape),
                    ["dense_2/kernel has shape (10, 10) in the file, but the model needs (32, 16)"]),
    "wrong-dtype": ("model.weights.h5", _edit_weights(_strings), ["the weights do not fit the model", "'dense_2'"]),
    "no-weights": ("model.weights.h5", lambda data: None, ["the archive holds no weights"]),
    "garbage-weights": ("model.weights.h5", lambda data: b"\x00garbage" * 64,
                        ["model.weights.h5", "not a readable HDF5 file"]),
    "truncated-weights": ("model.weights.h5", lambda data: data[: len(data) // 2],
                          ["model.weights.h5", "not a readable HDF5 file", "truncated"]),
    "config-mismatch": ("config.json", lambda data: data.replace(b'"units": 16', b'"units": 17', 1),
                        ["cannot load the model", "incompatible"]),
}


def _damaged_params():
    for kind in DAMAGED:
        for recipe in RECIPES:
            yield pytest.param(kind, recipe, id=f"{kind}-{recipe}")


@pytest.mark.parametrize("kind,recipe_kind", list(_damaged_params()))
def test_damaged_weights_file(tmp_path, cnn, kind, recipe_kind):
    member, change, fragments = DAMAGED[kind]
    model = tmp_path / f"{kind}.keras"
    _rewrite_archive(cnn, model, member, change)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = tmp_path / "out.keras"
    before, files = sha256(model), listing(tmp_path)
    r = run_cli("apply", recipe, model, "-o", out)
    assert r.status == 3, (r.status, r.err, r.out)
    only_error_line(r.err, str(model), *fragments)
    assert r.out == ""
    assert sha256(model) == before
    assert listing(tmp_path) == files  # no output, no temporary file


@pytest.mark.parametrize("kind", ["missing-array", "wrong-shape", "no-weights", "truncated-weights"])
def test_damaged_weights_file_inspect(tmp_path, cnn, kind):
    member, change, fragments = DAMAGED[kind]
    model = tmp_path / f"{kind}.keras"
    _rewrite_archive(cnn, model, member, change)
    r = run_cli("inspect", model)
    assert r.status == 3, r.err
    only_error_line(r.err, str(model), *fragments)


def run_cli_held_to_permissions(*argv):
    """run_cli, where file permissions hold: in this process; as root, in a process without the
    capabilities that let root past them (setpriv: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped),
    so that chmod 000 and 500 stop it as they stop any user."""
    if os.geteuid() != 0:
        return run_cli(*argv)
    import shutil
    from conftest import Captured
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permissions do not stop root "
                    "(the _simulated test covers the same message)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    dropped = "-dac_override,-dac_read_search"
    proc = subprocess.run([setpriv, f"--inh-caps={dropped}", f"--bounding-set={dropped}", sys.executable, "-m",
                           "modelxform", *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)
    if proc.stderr.startswith("setpriv:"):  # (no CAP_SETPCAP here, say: the _simulated test covers it)
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    return Captured(proc.returncode, proc.stdout, proc.stderr)


def test_unreadable_model_file(tmp_path, cnn):
    recipe = tmp_path / "r.recipe"
    recipe.write_text(WEIGHT_ONLY)
    cnn.chmod(0)
    try:
        r = run_cli_held_to_permissions("apply", recipe, cnn, "-o", tmp_path / "out.keras")
    finally:
        cnn.chmod(0o644)
    assert r.status == 3
    only_error_line(r.err, str(cnn), "permission denied")
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("command", ["apply", "inspect"])
def test_unreadable_model_file_simulated(tmp_path, cnn, monkeypatch, command):
    """As root, a file that refuses reading is simulated by os.access (the check model_io makes)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(cnn)
                        else real_access(p, mode, *a, **k))
    recipe = tmp_path / "r.recipe"
    recipe.write_text(STRUCTURAL)
    files = listing(tmp_path)
    argv = ["apply", recipe, cnn, "-o", tmp_path / "out.keras"] if command == "apply" else ["inspect", cnn]
    r = run_cli(*argv)
    assert r.status == 3
    only_error_line(r.err, str(cnn), "permission denied")
    assert listing(tmp_path) == files


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_output_that_is_the_input_under_another_name(tmp_path, cnn, how):
    """test_cli covers the same path and a dotted spelling; a link is the same file too."""
    alias = tmp_path / "alias.keras"
    (os.symlink if how == "symlink" else os.link)(cnn, alias)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(WEIGHT_ONLY)
    before, files = sha256(cnn), listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", alias)
    assert r.status == 2
    only_error_line(r.err, str(alias), "is the input model", "--in-place")
    assert sha256(cnn) == before
    assert listing(tmp_path) == files


@pytest.mark.parametrize("recipe_kind", list(RECIPES))
def test_output_is_a_directory(tmp_path, cnn, recipe_kind):
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = tmp_path / "out.keras"
    out.mkdir()
    files = listing(tmp_path)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3
    only_error_line(r.err, str(out), "is a directory")
    assert listing(tmp_path) == files


def _previous_output(tmp_path) -> pathlib.Path:
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / "out.keras"
    out.write_bytes(b"previous output")
    return out


def test_unwritable_output_folder(tmp_path, cnn):
    recipe = tmp_path / "r.recipe"
    recipe.write_text(WEIGHT_ONLY)
    out = _previous_output(tmp_path)
    out.parent.chmod(0o500)
    try:
        r = run_cli_held_to_permissions("apply", recipe, cnn, "-o", out)
    finally:
        out.parent.chmod(0o700)
    assert r.status == 3
    only_error_line(r.err, str(out), "Permission denied")
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.keras"]


@pytest.mark.parametrize("recipe_kind", list(RECIPES))
def test_unwritable_output_folder_simulated(tmp_path, cnn, monkeypatch, recipe_kind):
    """The first write into the output folder is a temporary file: refuse it as a read-only folder would."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and pathlib.Path(dir).resolve() == out.parent.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = _previous_output(tmp_path)
    before = sha256(cnn)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3, r.err
    only_error_line(r.err, str(out), "Permission denied")
    assert out.read_bytes() == b"previous output"
    assert sha256(cnn) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.keras"]


# ---- output names: the longest a file system allows, and one byte more ---------------------------------

NAME_MAX = 255


def _name(letter: str, suffix: str, size: int = NAME_MAX) -> str:
    return letter * (size - len(suffix)) + suffix


def hidden(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("recipe_kind,suffix", [("weight-only", ".keras"), ("structural", ".keras"),
                                                ("structural", ".h5")])
def test_the_longest_output_name_is_written(tmp_path, cnn, recipe_kind, suffix):
    """A valid 246-character name was refused (`cannot write in .: File name too long`): the temporary
    file's name (`.NAME.modelxform-tmp-HOST-PID-…`) was longer than the file system allows. Its copy of
    NAME is now shortened where it must be, so every name an output may have works."""
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = tmp_path / _name("b", suffix)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 0, r.err
    assert out.is_file() and hidden(tmp_path) == []
    assert run_cli("verify", out, "--input", cnn).status == 0  # (its record read back, an .h5's included)


@pytest.mark.parametrize("command", ["apply", "apply-h5", "plan --html", "diff --html", "apply --format savedmodel"])
def test_an_output_name_too_long_is_one_line(tmp_path, cnn, command):
    """A name over 255 bytes was a traceback (OSError: [Errno 36] File name too long, from
    write_atomically's dest.is_dir()), exit 1. Now one line, exit 3, before any work."""
    recipe = tmp_path / "r.recipe"
    recipe.write_text(WEIGHT_ONLY)
    suffix = {"apply": ".keras", "apply-h5": ".h5", "plan --html": ".html", "diff --html": ".html",
              "apply --format savedmodel": ""}[command]
    out = tmp_path / _name("a", suffix, NAME_MAX + 1)
    argv = {"apply": ["apply", recipe, cnn, "-o", out], "apply-h5": ["apply", recipe, cnn, "-o", out],
            "plan --html": ["plan", recipe, cnn, "--html", out], "diff --html": ["diff", cnn, cnn, "--html", out],
            "apply --format savedmodel": ["apply", recipe, cnn, "-o", out, "--format", "savedmodel"]}[command]
    files = listing(tmp_path)
    r = run_cli(*argv)
    assert r.status == 3, r.err
    assert r.err == f"error: {out}: the name is 256 bytes long; this file system allows at most 255\n"
    assert r.out == "" and listing(tmp_path) == files


def test_temporary_names_of_long_outputs_fit_stay_apart_and_are_cleaned_up(tmp_path, cnn):
    """Two 255-byte names that differ only at their end: their temporary names fit, differ, and a save
    of one removes what a killed save of that one left, not the other's."""
    from modelxform.keras_io.files import stale_temp_files, temp_prefix
    first, second = tmp_path / _name("c", "1.keras"), tmp_path / _name("c", "2.keras")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {out: tmp_path / (temp_prefix(out, 4194304) + "k2j4h5l6.keras.norm") for out in (first, second)}
    for path in stale.values():  # (the longest a temporary name gets: a 7-digit PID, .keras.norm)
        assert len(path.name.encode()) <= NAME_MAX, len(path.name.encode())
    assert temp_prefix(first, pid) != temp_prefix(second, pid)
    stale = {out: tmp_path / (temp_prefix(out, pid) + "k2j4h5l6.keras") for out in (first, second)}
    for path in stale.values():
        path.write_bytes(b"partial")
    assert stale_temp_files(first) == [stale[first]]
    recipe = tmp_path / "r.recipe"
    recipe.write_text(WEIGHT_ONLY)
    assert run_cli("apply", recipe, cnn, "-o", first).status == 0
    assert not stale[first].exists() and stale[second].exists()


# ---- fmt: a folder it cannot write in, a recipe that is a symbolic link ---------------------------------

UNFORMATTED = "select  all\nfreeze\n"
FORMATTED = "select all\nfreeze\n"


@contextlib.contextmanager
def _unwritable(folder: pathlib.Path, monkeypatch, how: str):
    """``folder`` made unwritable: for real (chattr +i, which stops root too, or chmod 500 for others),
    or simulated (os.access says no, and creating a file in it fails, as a read-only mount does)."""
    if how == "real":
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i is not available here (the simulated case covers the same path)")
            try:
                yield
            finally:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o500)
            try:
                yield
            finally:
                folder.chmod(0o700)
        return
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and pathlib.Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if pathlib.Path(p).resolve() == folder.resolve()
                        else real_access(p, mode, *a, **k))
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield


@pytest.mark.parametrize("how", ["real", "simulated"])
def test_fmt_in_a_folder_it_cannot_write(tmp_path, monkeypatch, how):
    """fmt ended in a PermissionError traceback; now one line, exit 3, the recipe untouched, nothing
    left, and the other recipes still formatted."""
    folder = tmp_path / "ro"
    folder.mkdir()
    recipe = folder / "r.recipe"
    recipe.write_text(UNFORMATTED)
    other = tmp_path / "other.recipe"
    other.write_text(UNFORMATTED)
    with _unwritable(folder, monkeypatch, how):
        r = run_cli("fmt", recipe, other)
    assert r.status == 3, r.err
    assert r.err == f"error: {recipe}: cannot write in {folder}: Permission denied\n"
    assert r.out == f"{other}: formatted\n"
    assert recipe.read_text() == UNFORMATTED and other.read_text() == FORMATTED
    assert sorted(os.listdir(folder)) == ["r.recipe"]


def test_fmt_formats_the_target_of_a_symbolic_link(tmp_path):
    """fmt link.recipe replaced the link with a regular file and left its target unformatted."""
    target = tmp_path / "real.recipe"
    target.write_text(UNFORMATTED)
    target.chmod(0o640)
    link = tmp_path / "link.recipe"
    link.symlink_to("real.recipe")
    r = run_cli("fmt", link)
    assert r.status == 0, r.err
    assert r.out == f"{link}: formatted\n"
    assert link.is_symlink() and os.readlink(link) == "real.recipe"
    assert target.read_text() == FORMATTED and target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.recipe", "real.recipe"]


def test_fmt_of_the_longest_recipe_name(tmp_path):
    recipe = tmp_path / _name("r", ".recipe")
    recipe.write_text(UNFORMATTED)
    r = run_cli("fmt", recipe)
    assert r.status == 0, r.err
    assert recipe.read_text() == FORMATTED and hidden(tmp_path) == []


@pytest.mark.parametrize("writer", ["archive", "archive-through-a-file", "keras"])
def test_disk_full_while_the_model_is_written(tmp_path, cnn, monkeypatch, capfd, writer):
    """ENOSPC half-way through writing the model — in model_io's archive writer, h5py writing the weights
    in place inside the zip (or, where their size cannot be bounded beforehand, into a file beside it
    that is then streamed into the zip), or in Keras's model.save (which writes models that save assets)
    — the partial temporary file goes, the old output stays."""
    import shutil

    import keras

    from modelxform.keras_io import files as model_io
    from modelxform.keras_io import streams

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if writer == "archive":
        write = streams.FileWindow.write
        writes = []

        def write_some(self, data):
            writes.append(len(data))
            if len(writes) > 3:  # some of the weights file, then the disk is full
                full()
            return write(self, data)
        monkeypatch.setattr(streams.FileWindow, "write", write_some)
    elif writer == "archive-through-a-file":
        def copy_half(src, dst, length=0):
            dst.write(src.read(1000))  # some of the weights, then the disk is full
            full()
        monkeypatch.setattr(model_io, "_weights_file_size_hint", lambda model: None)
        monkeypatch.setattr(shutil, "copyfileobj", copy_half)
    else:
        def save(self, filepath, *args, **kwargs):
            with open(filepath, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            full()
        monkeypatch.setattr(model_io, "_write_keras_archive", lambda *args: False)
        monkeypatch.setattr(keras.Model, "save", save)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(STRUCTURAL)
    out = _previous_output(tmp_path)
    before = sha256(cnn)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3, r.err
    only_error_line(r.err, str(out), "No space left on device")
    assert out.read_bytes() == b"previous output"
    assert sha256(cnn) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.keras"]
    assert "Traceback" not in capfd.readouterr().err
    if writer == "archive":
        assert len(writes) > 3  # the failure came from the in-place writer (h5py writes again as it closes)


@pytest.mark.parametrize("recipe_kind", ["weight-only", "structural"])
def test_a_disk_error_met_by_the_background_writeback_fails_the_write(tmp_path, cnn, monkeypatch, recipe_kind):
    """Large outputs are written to disk in the background while they are made (streams.Writeback). A
    write error is reported by Linux to the sync that meets it, not to the fsync made after it, so an
    error of the background sync must fail the write itself: exit 3, one line naming the output, the
    old output kept, no temporary file left."""
    from modelxform.keras_io import streams
    monkeypatch.setattr(streams, "WRITEBACK_MIN_BYTES", 0)  # (this small model's output, too)
    syncs = []

    def failing_fdatasync(fd):
        syncs.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = _previous_output(tmp_path)
    before = sha256(cnn)
    r = run_cli("apply", recipe, cnn, "-o", out)
    assert r.status == 3, r.err
    only_error_line(r.err, str(out), "Input/output error")
    assert syncs, "no background sync ran"
    assert out.read_bytes() == b"previous output"
    assert sha256(cnn) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.keras"]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Real write failures in every writer (Keras, h5py, zipfile, the fast path): files may not grow
    past ``limit`` bytes, so writes fail with EFBIG as they would with ENOSPC on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# weight-only recipes take the fast path (fastpath.py), structural ones the Keras engine: a failed
# write must read the same, with no traceback, either way
@pytest.mark.parametrize("recipe_kind", ["weight-only", "structural"])
def test_write_fails_for_real_half_way(tmp_path, cnn, capfd, caplog, recipe_kind):
    recipe = tmp_path / "r.recipe"
    recipe.write_text(RECIPES[recipe_kind])
    out = _previous_output(tmp_path)
    before = sha256(cnn)
    assert len(cnn.read_bytes()) > 4 * 65536  # so the limit below cuts the write half-way
    with file_size_limit(65536):
        r = run_cli("apply", recipe, cnn, "-o", out)
    stderr = capfd.readouterr().err
    assert r.status == 3, r.err
    only_error_line(r.err, str(out), "cannot write", "File too large")
    assert out.read_bytes() == b"previous output"
    assert sha256(cnn) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.keras"]
    assert "Traceback" not in stderr
    # nothing configures logging, so outside pytest a warning (and its traceback) would reach the terminal
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---- SIGKILL during a save ------------------------------------------------------------------------

SAVER = r"""
import os, pathlib, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from modelxform.keras_io.files import import_keras, save_model
keras = import_keras()
folder = pathlib.Path(sys.argv[1])
init = keras.initializers.GlorotUniform(seed=1)
inp = keras.Input((512,), name="x")
out = keras.layers.Dense(8, name="y", kernel_initializer=init)(
    keras.layers.Dense(512, name="h", kernel_initializer=init)(inp))
model = keras.Model(inp, out, name="victim")
base = model.get_weights()
for k in range(3):  # the three outputs the loop below writes, each saved once, completely
    model.set_weights([w * (k + 1) for w in base])
    save_model(model, folder / "refs" / f"ref{k}.keras")
model.set_weights(base)
save_model(model, folder / "out" / "model.keras")  # the first good save: from now on it must always be there
print("READY", flush=True)
i = 1
while True:
    k = i % 3
    model.set_weights([w * (k + 1) for w in base])
    save_model(model, folder / "out" / "model.keras")
    i += 1
"""
KILLS = 5


def test_sigkill_during_saves_never_leaves_a_truncated_output(tmp_path):
    """Kill savers at seeded random moments: the output is always byte-identical to a complete save.

    A kill cannot run any cleanup, so the temporary file of the save in progress may stay behind; it
    is always a hidden file (".model.keras.XXXX.keras" or its ".norm" companion) next to the output,
    never the output itself (docs/robustness.md)."""
    rng = random.Random(8)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for n in range(KILLS):
        folder = tmp_path / f"run{n}"
        (folder / "refs").mkdir(parents=True)
        (folder / "out").mkdir()
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, cwd=folder)
        procs.append((folder, proc))
    try:
        deadline = time.monotonic() + 300  # (five TensorFlow imports at once: 20 s alone, minutes under load)
        for folder, proc in procs:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.stdout.readline().strip() == b"READY", f"saver in {folder} did not start"
        delays = sorted(rng.uniform(0.0, 1.5) for _ in procs)
        started = time.monotonic()
        for (folder, proc), delay in zip(procs, delays):
            time.sleep(max(0.0, started + delay - time.monotonic()))
            assert proc.poll() is None, "the saver stopped on its own"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()

    from modelxform.keras_io.files import load_model
    outputs = 0
    for folder, _ in procs:
        refs = {p.read_bytes() for p in (folder / "refs").iterdir()}
        assert len(refs) == 3
        names = sorted(p.name for p in (folder / "out").iterdir())
        visible = [n for n in names if not n.startswith(".")]
        assert visible == ["model.keras"], names  # a good save happened before the kill: it must survive
        outputs += 1
        data = (folder / "out" / "model.keras").read_bytes()
        assert data in refs, f"{folder.name}: the output is not one of the complete saves ({len(data)} bytes)"
        assert load_model(folder / "out" / "model.keras").name == "victim"
    assert outputs == KILLS


def test_an_output_that_is_a_fifo_or_a_link_to_one_is_not_replaced(tmp_path, model_file):
    """Writing to a temporary file renamed over the output replaced whatever was there: `--html /dev/null`
    run as root replaced the machine's /dev/null with a file. A FIFO stands in for a device here."""
    import os
    import stat
    from conftest import run_cli
    model = model_file("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text('recipe "t" version "1"\nselect where type=Dense; scale kernel 0.5\n')
    fifo = tmp_path / "pipe.keras"
    os.mkfifo(fifo)
    (tmp_path / "link.keras").symlink_to(fifo)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(f"models: [{model.name}]\nrecipes: [r.recipe]\noutput: \"o/{{model}}.keras\"\n")
    for out in (fifo, tmp_path / "link.keras"):
        for argv in (["apply", recipe, model, "-o", out], ["plan", recipe, model, "--html", out],
                     ["diff", model, model, "--html", out], ["batch", zoo, "--report", out, "--dry-run"],
                     ["export", model, out]):
            r = run_cli(*argv)
            assert r.status == 3, argv
            assert r.err == f"error: {out}: is a FIFO (named pipe), not a file; refusing to replace it\n", argv
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cnn.keras", "r.recipe", "pipe.keras", "link.keras",
                                                                 "zoo.yaml"])


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interruption_inside_mkstemp_leaves_no_temporary_file(tmp_path, monkeypatch, interruption):
    """Ctrl-C or SIGTERM can land inside tempfile.mkstemp after it made the file and before it returned its
    name (a clean-clone CI run met it: SIGTERM's test found the file left). The file is found by this
    process's prefix and removed; the previous output is untouched."""
    from modelxform.keras_io import files
    real = tempfile.mkstemp
    made = []

    def interrupted_mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        made.append(name)
        raise interruption()
    monkeypatch.setattr(tempfile, "mkstemp", interrupted_mkstemp)
    dest = tmp_path / "out.keras"
    dest.write_bytes(b"previous output")
    other = tmp_path / ".out.keras.modelxform-tmp-elsewhere-1-abcdefgh.keras"  # (another host's: not ours)
    other.write_bytes(b"")
    with pytest.raises(interruption):
        files.write_atomically(dest, lambda tmp: tmp.write_bytes(b"new"))
    assert made and not os.path.exists(made[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, other.name])
    assert dest.read_bytes() == b"previous output"
