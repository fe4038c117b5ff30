"""The language front end: grammar, compiler, canonical text, errors with positions. No TensorFlow."""
from __future__ import annotations

import os
import pathlib

import lark
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, position, position_of
from modelxform import RecipeError, compile_recipe, ir, load_recipe
from modelxform import statements as stmts
from modelxform.lang.fmt import format_text
from modelxform.lang.parser import PARSER_OPTIONS, SYNTAX_EXAMPLES, grammar_path

GOLDEN = pathlib.Path(__file__).parent / "golden"


def ok_cases():
    return sorted((GOLDEN / "ok").glob("*.recipe"))


def error_cases():
    return sorted((GOLDEN / "errors").glob("*.recipe"))


@pytest.mark.parametrize("path", ok_cases(), ids=lambda p: p.stem)
def test_golden_canonical_text(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    formatted = format_text(path.read_text(), path.name)
    assert formatted == path.with_suffix(".expected").read_text()
    # canonical text compiles back to the same program, and fmt is idempotent
    assert compile_recipe(formatted, path.name).program == compile_recipe(path.read_text(), path.name).program
    assert format_text(formatted, path.name) == formatted


@pytest.mark.parametrize("path", error_cases(), ids=lambda p: p.stem)
def test_golden_errors(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    with pytest.raises(RecipeError) as info:
        load_recipe(path.name)
    got = [d.render().splitlines()[0] for d in info.value.diagnostics]
    assert got == path.with_suffix(".expected").read_text().splitlines()
    # the exception exposes the first position as fields, not only as text
    first = got[0].split(":")
    assert (info.value.line, info.value.column) == (int(first[1]), int(first[2]))


def test_error_shows_source_line_and_caret():
    with pytest.raises(RecipeError) as info:
        compile_recipe("select all\nselect where type=Dens and trainable\n", "bad.recipe")
    text = info.value.render()
    assert text.splitlines() == [
        "bad.recipe:2:19: error: unknown layer type 'Dens' (did you mean 'Dense'?)",
        "    select where type=Dens and trainable",
        "                      ^^^^",
    ]
    assert (info.value.line, info.value.column, info.value.filename) == (2, 19, "bad.recipe")


def test_all_semantic_errors_at_once_with_more_marker():
    text = "select all\n" + "".join(f"scale kernel $p{i}\n" for i in range(8))
    with pytest.raises(RecipeError) as info:
        compile_recipe(text, "many.recipe")
    assert len(info.value.diagnostics) == 8
    assert [d.line for d in info.value.diagnostics] == list(range(2, 10))
    assert info.value.render().splitlines()[-1] == "… and 3 more errors"


# The token each syntax example goes wrong at (None: the example ends where more is needed). Words such as
# `to` and `with` are not reserved: where a name may stand they are read as one, and the token after them is
# the first the grammar cannot take.
SYNTAX_EXAMPLE_TOKENS = {
    "select": None, "select ;": ";", "select 3": "3",
    "select where": None, "select random where": None, "select where ;": ";", "select first 2 where": None,
    "scale": None, "scale weights": None, "scale 0.8": "0.8", "scale weights ;": ";",
    "scale kernel $p%": "%",
    "add": None, "add noise": None, "add noise to kernel": "kernel", "add noise normal(stddev=0.1)": None,
    "add noise normal(stddev=0.1) kernel": "kernel", "add noise normal(stddev=0.1) to": None,
    "clip": None, "clip kernel": None, "clip kernel 1": None, "clip kernel 1 ;": ";",
    "prune": None, "prune kernel": None, "prune kernel 50": "50", "prune kernel 0.5": "0.5",
    "prune channels": None, "prune channels 25": "25", "prune channels 0.25": "0.25",
    "fold": None, "fold bn": "bn", "fold batchnorms": "batchnorms",
    "set input": None, "set input shape": None, "set input 1": None, "set input shape 96": "96",
    "set input shape (": None,
    "reinit": None, "reinit kernel with": None, "reinit with he_normal": "he_normal",
    "set": None, "set bias": None, "set bias to": None, "set bias zeros": "zeros",
    "replace": None, "replace MaxPooling2D": None, "replace MaxPooling2D AveragePooling2D": "AveragePooling2D",
    "replace MaxPooling2D with": None, "replace with Dense(units=3)": "Dense", "replace selected": None,
    "tap": None, "tap ;": ";",
    "assert": None, "assert count": None, "assert count 3": "3", "assert params": None, "assert output": None,
    "assert output shape": None, "assert output shape (None, 10)": "(", "assert foo": "foo",
    "lora": None, "lora rank": None, "lora 8": "8", "lora rank 8 alpha": None, "lora rank 8 16": "16",
    "merge": None, "merge all": "all",
    "quantize": None, "quantize 8": "8", "quantize int4 block": None, "quantize int4 block size": None,
    "cast": None, "cast 16": "16",
    "param": None, "param x": None, "param x 3": "3", "param x =": None,
    "recipe": None, "recipe name": "name", 'recipe "x" version': None,
    "include": None, "include common.recipe": "common",
    "replace dense with Dense(units=3": None, "replace dense with Dense(units=3;": ";",
    "add noise normal(stddev=0.1 to kernel": "to",
    "replace dense with Dense(units=)": ")", "replace dense with Dense(units=,)": ",",
    "freeze unfreeze": "unfreeze", "freeze select all": "select", "select all freeze": "freeze",
    "tap conv2d_1 freeze": "freeze",
    "select where type": None, "select where name": None, "select where params": None, "select where has": None,
    "select where type=": None, "select where foo": "foo", "select where type=Dense and": None,
    "select where (type=Dense": None, "select where not": None,
}


def test_every_syntax_example_has_its_token():
    assert sorted(SYNTAX_EXAMPLE_TOKENS) == sorted(ex for exs in SYNTAX_EXAMPLES.values() for ex in exs)


@pytest.mark.parametrize("label,example", [(label, ex) for label, exs in SYNTAX_EXAMPLES.items() for ex in exs])
def test_syntax_examples_get_their_label(label, example):
    # the same mistake is recognised on the first line and further down a recipe
    for text in (example, "select all\n" + example):
        with pytest.raises(RecipeError) as info:
            compile_recipe(text)
        assert info.value.message == label


@pytest.mark.parametrize("example", SYNTAX_EXAMPLE_TOKENS)
def test_syntax_examples_point_at_the_token_they_go_wrong_at(example):
    for text in (example, "select all\n" + example):
        with pytest.raises(RecipeError) as info:
            compile_recipe(text)
        line = text.count("\n") + 1
        token = SYNTAX_EXAMPLE_TOKENS[example]
        assert position(info.value) == (position_of(text, token, line) if token else (line, len(example) + 1))


@pytest.mark.parametrize("text, position, message", [
    ("selectall\n", (1, 1), "unknown statement `selectall` (did you mean `select`?)"),
    ("select all; freezes\n", (1, 13), "unknown statement `freezes` (did you mean `freeze`?)"),
    ("select all\nunfreeze2\n", (2, 1), "unknown statement `unfreeze2` (did you mean `unfreeze`?)"),
    ("select all\nscales kernel 2\n", (2, 1), "unknown statement `scales` (did you mean `scale`?)"),
    ("fold batchnorms\n", (1, 6), "`fold` is written `fold batchnorm`"),
])
def test_a_keyword_is_a_whole_word(text, position, message):
    """The lexer took a keyword from the start of a longer word where no name could stand: `selectall`
    compiled as `select all`, and `freezes` said to write `select s; freeze`."""
    with pytest.raises(RecipeError) as info:
        compile_recipe(text, "r.recipe")
    assert ((info.value.line, info.value.column), info.value.message) == (position, message)


def test_a_word_that_begins_with_a_keyword_is_a_name_where_a_name_stands():
    program = compile_recipe("select alls, wherever, type_1\nfreeze\n", "r.recipe")
    assert str(program).splitlines()[0] == "select alls, wherever, type_1"


@pytest.mark.parametrize("text, hint", [
    ("select where", "unexpected end of statement; expected `(`, `has`, `name`, `not`, `params`, `trainable`, "
                     "`type`"),
    ("fold", "unexpected end of statement; expected `batchnorm`"),
])
def test_a_syntax_error_lists_the_keywords_it_expected_as_written(text, hint):
    with pytest.raises(RecipeError) as info:
        compile_recipe(text, "r.recipe")
    assert info.value.hint == hint


@pytest.mark.parametrize("label, examples", list(SYNTAX_EXAMPLES.items()))
def test_no_syntax_error_shows_a_terminal_s_internal_name(label, examples):
    for example in examples:
        with pytest.raises(RecipeError) as info:
            compile_recipe(example + "\n", "r.recipe")
        assert "__anon" not in str(info.value) and "__anon" not in (info.value.hint or ""), example


def test_grammar_is_strict_lalr_without_collisions():
    # strict=True makes any terminal collision or grammar conflict an error
    lark.Lark(grammar_path().read_text(), strict=True, **PARSER_OPTIONS)


def test_keras_name_snapshot_matches_installed_keras():
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, 'tools'); import gen_keras_names as g; "
            "import modelxform.lang.keras_names as k; "
            "assert g.layer_names() == k.LAYER_CLASSES, 'rerun tools/gen_keras_names.py'; "
            "assert tuple(g.initializer_names()) == k.INITIALIZERS, 'rerun tools/gen_keras_names.py'")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_camelcase_keras_class_is_a_type_else_a_layer():
    program = compile_recipe("select Dense, dense_1, MyBlock, layer Dense, type Conv2D, MaxPool2D").program
    refs = program.statements[0].selector.refs
    assert [(r.kind, r.text) for r in refs] == [
        ("type", "Dense"), ("name", "dense_1"), ("name", "MyBlock"), ("name", "Dense"),
        ("type", "Conv2D"), ("type", "MaxPooling2D")]


def test_spans_are_not_part_of_equality():
    a = compile_recipe("select all; freeze").program
    b = compile_recipe("\n\n   select   all\n\n freeze\n").program
    assert a == b
    assert a.statements[1].span.line == 1 and b.statements[1].span.line == 5


def test_include_inlines_relative_to_including_file(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "common.recipe").write_text('include "deeper.recipe"\nfreeze\n')
    (tmp_path / "lib" / "deeper.recipe").write_text("select all\n")
    main = tmp_path / "main.recipe"
    main.write_text('include "lib/common.recipe"\nunfreeze\n')
    monkeypatch.chdir("/")
    recipe = load_recipe(main)
    assert [str(s) for s in recipe.program.flat()] == ["select all", "freeze", "unfreeze"]
    assert str(recipe.program) == 'include "lib/common.recipe"\nunfreeze\n'
    assert recipe.program.inlined_text() == "select all\nfreeze\nunfreeze\n"


def test_include_error_points_into_the_included_file(tmp_path):
    (tmp_path / "inc.recipe").write_text("select all\nscale kernel $factor\n")
    main = tmp_path / "main.recipe"
    main.write_text('include "inc.recipe"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(main)
    assert info.value.line == 2 and info.value.filename.endswith("inc.recipe")
    assert "scale kernel $factor" in info.value.render()


def test_an_included_file_that_does_not_parse_is_reported_at_the_include(tmp_path):
    """It did not read as recipe text, so none of it is quoted (issue 16): the include names where it
    stopped parsing, and checking it on its own shows the error."""
    (tmp_path / "inc.recipe").write_text("select all\nscale kernel\n")
    main = tmp_path / "main.recipe"
    main.write_text('include "inc.recipe"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(main)
    assert (info.value.line, info.value.column, info.value.filename) == (1, 1, str(main))
    assert info.value.message == "cannot include 'inc.recipe': it is not a recipe (a syntax error at line 2, column 13)"
    assert info.value.hint.startswith("to see the error, check it on its own: modelxform check ")
    assert "scale kernel" not in info.value.render()


def test_unused_param_and_missing_version_are_warnings():
    recipe = compile_recipe("param x = 1\nselect all\nfreeze\n", "w.recipe")
    messages = [w.message for w in recipe.warnings]
    assert "parameter 'x' is declared but never used" in messages
    assert any("no version header" in m for m in messages)
    assert compile_recipe('recipe "a" version "1.0"\nselect all\n').warnings == []


def test_invalid_utf8_recipe_is_a_positioned_error(tmp_path):
    path = tmp_path / "bad.recipe"
    path.write_bytes(b"select all\nscale kernel \xff\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (info.value.line, info.value.column) == (2, 14)
    assert "not valid UTF-8" in info.value.message


def test_recipe_size_limit():
    with pytest.raises(RecipeError, match="larger than") as info:
        compile_recipe("freeze\n" * 200_000)
    assert position(info.value) == (1, 1)  # the recipe as a whole: where it starts


# ---- round trip on generated programs ----------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: s not in ir.keywords())
numbers = st.one_of(st.integers(-10**6, 10**6),
                    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32))
preds = st.recursive(
    st.one_of(st.just(ir.PTrainable()), st.just(ir.PHasWeights()),
              st.sampled_from(["Dense", "Conv2D", "BatchNormalization"]).map(lambda t: ir.PType((t,))),
              names.map(ir.PName), st.integers(0, 10**7).map(lambda n: ir.PParams(">", n))),
    lambda inner: st.one_of(st.tuples(inner, inner).map(lambda t: ir.PAnd(*t)),
                            st.tuples(inner, inner).map(lambda t: ir.POr(*t)),
                            inner.map(ir.PNot)),
    max_leaves=8)
statements = st.one_of(
    preds.map(lambda p: stmts.Select(stmts.SelWhere(p))),
    st.tuples(st.sampled_from(["random", "first", "last"]), st.integers(1, 20), preds).map(
        lambda t: stmts.Select(stmts.SelSample(t[0], t[1], t[2]))),
    st.tuples(names, numbers).map(lambda t: stmts.Scale(t[0], t[1])),
    st.tuples(names, numbers, numbers).map(lambda t: stmts.Clip(t[0], min(t[1:]), max(t[1:]))),
    st.tuples(names, st.integers(0, 100)).map(lambda t: stmts.Prune(t[0], ir.Percent(t[1]))),
    st.just(stmts.Freeze()), st.just(stmts.Unfreeze()),
    st.lists(names, min_size=1, max_size=3, unique=True).map(
        lambda ns: stmts.Tap(tuple(ir.Ref("name", n) for n in ns))),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(statements, min_size=1, max_size=8))
def test_canonical_text_round_trips(generated):
    program = ir.Program((stmts.Select(stmts.SelAll()),) + tuple(generated))
    text = str(program)
    assert compile_recipe(text).program == program
    assert format_text(text) == text


# ---- what a new user trips on (issue 17): messages that point to the fix, spellings that are accepted ----

def _error(text: str, filename: str = "r.recipe") -> RecipeError:
    with pytest.raises(RecipeError) as info:
        compile_recipe(text, filename)
    return info.value


@pytest.mark.parametrize("text,line,column,message", [
    ("select all\nreplace dense_3 with keras.layers.Dense(units=10)", 2, 22,
     "write the class name without its module: `Dense`, not `keras.layers.Dense`"),
    ("select all; reinit kernel with keras.initializers.HeNormal(seed=1)", 1, 32,
     "write the class name without its module: `HeNormal`, not `keras.initializers.HeNormal`"),
    ("select where type=tf.keras.layers.Conv2D", 1, 19,
     "write the class name without its module: `Conv2D`, not `tf.keras.layers.Conv2D`"),
    ("insert layers.Dropout(rate=0.5) after dense_1", 1, 8,
     "write the class name without its module: `Dropout`, not `layers.Dropout`"),
    ("select backbone.conv1", 1, 8, "a layer inside a nested model is named by its path with `/`: `backbone/conv1`"),
])
def test_module_prefixes_and_dotted_paths_say_what_to_write(text, line, column, message):
    error = _error(text)
    assert error.message == message
    assert (error.line, error.column) == (line, column)


def test_module_prefix_caret_covers_the_prefix():
    error = _error("replace dense_3 with keras.layers.Dense(units=10)")
    assert error.render().splitlines()[1:3] == [
        "    replace dense_3 with keras.layers.Dense(units=10)",
        "                         ^^^^^^^^^^^^^",
    ]


@pytest.mark.parametrize("text,line,column,message", [
    ("freeze all", 1, 8, "`freeze` acts on the selected layers and takes no argument: write `select all; freeze`"),
    ('recipe "r" version "1"\nunfreeze conv2d_1, dense_2  # the head', 2, 10,
     "`unfreeze` acts on the selected layers and takes no argument: write `select conv2d_1, dense_2; unfreeze`"),
    ('select all; freeze where type=Dense and name ~ "a;b"; scale kernel 2', 1, 20,
     '`freeze` acts on the selected layers and takes no argument: write '
     '`select where type=Dense and name ~ "a;b"; freeze`'),
    ("select all\nshuffle \"dense_*\"", 2, 9,
     '`shuffle` acts on the selected layers and takes no argument: write `select "dense_*"; shuffle`'),
])
def test_bare_statement_with_an_argument_says_select_first(text, line, column, message):
    error = _error(text)
    assert error.message == message
    assert (error.line, error.column) == (line, column)
    assert error.hint == "a `select` statement chooses the layers the statements after it act on"
    # the fix it names compiles
    fix = message.split("write `", 1)[1][:-1]
    compile_recipe(fix)


def test_bare_statement_followed_by_a_statement_still_asks_for_a_separator():
    assert _error("freeze unfreeze").message == "two statements on one line must be separated by `;`"
    assert _error("freeze select all").message == "two statements on one line must be separated by `;`"
    assert _error("freeze 3").message == "two statements on one line must be separated by `;`"
    # a layer named like the statement is not the statement
    assert not _error("select dense_1 freeze all").message.startswith("`freeze` acts")
    assert not _error("select freeze all").message.startswith("`freeze` acts")


@pytest.mark.parametrize("text,line,column,message", [
    ("select type=Dense", 1, 8, "a predicate follows `where`: write `select where type=Dense`"),
    ("select all\nselect type = Dense", 2, 8, "a predicate follows `where`: write `select where type = Dense`"),
    ("select random 2 type=Dense and trainable", 1, 17,
     "a predicate follows `where`: write `select random 2 where type=Dense and trainable`"),
    ("select first name=dense_1", 1, 14, "a predicate follows `where`: write `select first where name=dense_1`"),
    ("select params > 1K", 1, 8, "a predicate follows `where`: write `select where params > 1K`"),
    ("remove type=Dropout", 1, 8, "a predicate follows `where`: write `remove where type=Dropout`"),
])
def test_predicate_without_where_says_where(text, line, column, message):
    error = _error(text)
    assert error.message == message
    assert (error.line, error.column) == (line, column)
    word = text.split("\n")[-1].split()[0]
    assert error.hint == f"without `where`, `{word}` takes layer names or types, e.g. `{word} Dense`"


@pytest.mark.parametrize("word,meant", [("BatchNorm", "BatchNormalization"), ("LayerNorm", "LayerNormalization"),
                                        ("Embed", "Embedding"), ("GroupNorm", "GroupNormalization")])
def test_abbreviated_type_names_suggest_the_class(word, meant):
    error = _error(f"select all\nselect where type={word}")
    assert error.message == f"unknown layer type {word!r} (did you mean {meant!r}?)"
    assert (error.line, error.column) == (2, 19)


def test_ambiguous_or_short_prefixes_suggest_nothing_new():
    from modelxform.lang.names import suggest
    assert suggest("Conv", ["Conv1DTranspose", "Conv2DTranspose"]) is None  # which one?
    assert suggest("Conv1DTr", ["Conv1DTranspose", "Conv2DTranspose"]) == "Conv1DTranspose"
    assert suggest("Bat", ["BatchNormalization"]) is None  # too short to say
    assert suggest("batchnorm", ["BatchNormalization"]) == "BatchNormalization"


@pytest.mark.parametrize("written,canonical", [
    ("set activation = relu", 'set activation = "relu"'),
    ("set padding = same", 'set padding = "same"'),
    ("set activation = None", "set activation = None"),
    ("set use_bias = false", "set use_bias = False"),
    ("scale kernel 90%", "scale kernel 0.9"),
    ("scale kernel by 0.9", "scale kernel 0.9"),
    ("scale bias by 33.3%", "scale bias 0.333"),
    ("scale weights 250%", "scale weights 2.5"),
    ("scale weights by 100%", "scale weights 1"),
    ("replace dense_3 with Dense(units=3, activation=softmax)", 'replace dense_3 with Dense(units=3, activation="softmax")'),
])
def test_unambiguous_spellings_are_accepted_and_written_canonically(written, canonical):
    program = compile_recipe(f"select all\n{written}\n").program
    assert str(program.statements[1]) == canonical
    assert compile_recipe(f"select all\n{canonical}\n").program == program
    assert compile_recipe(str(program)).program == program
    assert format_text(f"select all\n{written}\n") == f"select all\n{canonical}\n"


def test_bare_word_values_equal_the_yaml_form():
    from modelxform.lang.fmt import convert
    text = 'param act = relu\nselect all\nset activation = $act\nset padding = same\n'
    yaml_text = convert(text, "r.recipe", "yaml")
    assert compile_recipe(yaml_text, "r.yaml").program == compile_recipe(text, "r.recipe").program
    assert compile_recipe(text).params == {"act": "relu"}


def test_scale_by_without_a_target_and_percent_parameters_say_what_is_meant():
    error = _error("select all\nscale by 0.9")
    assert error.message == "`scale` names what it scales before `by`, e.g. `scale weights by 0.9`"
    assert (error.line, error.column) == (2, 7)
    error = _error("param p = 90\nselect all\nscale kernel $p%")
    assert error.message == ("`scale` takes a factor, `0.9`, or a percentage, `90%`; a parameter is a factor: "
                             "`scale kernel $factor`")
    assert (error.line, error.column) == (3, 16)
