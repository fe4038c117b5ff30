"""The YAML form: both forms compile to equal programs, errors carry YAML positions, the schema holds."""
from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest
import yaml

from conftest import ROOT, position, position_of, run_cli
from modelxform import RecipeError, compile_recipe, ir, load_recipe, statements
from modelxform.lang.fmt import convert, format_text
from modelxform.lang.yaml_form import to_yaml

GOLDEN = pathlib.Path(__file__).parent / "golden" / "ok"
TEXT_RECIPES = sorted(GOLDEN.glob("*.recipe")) + sorted((ROOT / "recipes").glob("*.recipe"))
SCHEMA = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())


@pytest.mark.parametrize("path", TEXT_RECIPES, ids=lambda p: p.stem)
def test_text_and_yaml_forms_compile_to_equal_programs(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    program = compile_recipe(path.read_text(), path.name).program
    yaml_text = to_yaml(program)
    assert compile_recipe(yaml_text, path.stem + ".yaml").program == program
    # and back again, and fmt of the YAML form is idempotent
    assert compile_recipe(convert(yaml_text, "x.yaml", "recipe"), path.name).program == program
    assert format_text(yaml_text, "x.yaml") == yaml_text
    jsonschema.validate(yaml.safe_load(yaml_text), SCHEMA)


def test_yaml_recipes_in_repo_validate_against_schema():
    found = sorted((ROOT / "recipes").glob("*.yaml"))
    assert found
    for path in found:
        jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)
        load_recipe(path)


def test_schema_rejects_what_the_reader_rejects():
    # (the document, the reader's first error, the YAML node it is at)
    bad = [([{"scale": {"target": "kernel"}}], "scale needs the key 'factor'", "target"),
           ([{"frobnicate": 1}], "unknown statement 'frobnicate'", "frobnicate"),
           ([{"select": {"where": "x", "bogus": 1}}], "unknown key 'bogus' in select", "bogus")]
    for doc, message, node in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, SCHEMA)
        text = yaml.safe_dump(doc)
        with pytest.raises(RecipeError, match=re.escape(message)) as info:
            compile_recipe(text, "bad.yaml")
        assert position(info.value) == position_of(text, node), text


def errors_of(text: str):
    with pytest.raises(RecipeError) as info:
        compile_recipe(text, "r.yaml")
    return [(d.line, d.column, d.message) for d in info.value.diagnostics]


def test_unknown_key_is_an_error_at_the_key_with_suggestion():
    text = "- select: all\n- scale: {target: kernel, factr: 0.8}\n"
    assert errors_of(text) == [  # reported in position order
        (2, 10, "scale needs the key 'factor'"),
        (2, 27, "unknown key 'factr' in scale (did you mean 'factor'?)"),
    ]


def test_unknown_statement_and_wrong_types():
    text = "- selct: all\n- select: all\n- scale: {target: kernel, factor: lots}\n- tap: {layers: [a], only: 3}\n"
    got = errors_of(text)
    assert got[0][:2] == (1, 3) and "unknown statement 'selct' (did you mean 'select'?)" == got[0][2]
    assert (3, 35, "factor must be a number or a \"$param\"") in got
    assert (4, 28, "only must be true or false") in got


BARE = [kind for kind in statements.KINDS if issubclass(kind, ir.Bare)]


def test_the_bare_kinds_are_those_the_yaml_form_lists_as_words():
    assert {kind.yaml_key for kind in BARE} == set(statements.BARE_YAML) - {"unwrap"}  # (unwrap takes a layer)


@pytest.mark.parametrize("kind", BARE, ids=lambda kind: kind.yaml_key)
def test_a_statement_without_arguments_refuses_them_in_yaml(kind):
    key = kind.yaml_key
    text = f"- select: all\n- {key}\n"
    assert str(compile_recipe(text, "r.yaml")) == f"select all\n{kind.words}\n" == \
        str(compile_recipe(f"- select: all\n- {key}:\n", "r.yaml")) == str(compile_recipe(f"select all; {kind.words}"))
    for given in ("[dense_1]", "3", "yes", "{layers: [dense_1]}"):
        # (was accepted and dropped: `- freeze: [dense_1]` froze the whole selection)
        assert errors_of(f"- select: all\n- {key}: {given}\n") == \
            [(2, len(key) + 5, f"{key} takes no arguments: write `- {key}`")]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(f"- {key}: {given}\n"), SCHEMA)


def test_a_yaml_predicate_is_one_predicate_without_comments():
    """What followed a `#` or a `;` in a YAML string of text syntax was dropped: `type=Dense # and
    name=dense_1` selected every Dense layer, and fmt then deleted the rest from the file."""
    assert errors_of('- select: {where: "type=Dense # and name=dense_1"}\n') == [
        (1, 31, "predicate: `#` starts a comment here, and the rest would be dropped; a predicate has no comments")]
    assert errors_of('- select: {where: "name=dense_1; select all; freeze"}\n') == [
        (1, 34, "predicate: one statement only: `select all` follows it")]
    assert str(compile_recipe('- select: {where: "name=\\"a#b\\""}\n', "r.yaml")) == 'select where name="a#b"\n'


def test_a_yaml_value_the_text_form_refuses_is_refused(tmp_path, model_file):
    """An output's record holds the recipe as text, which verify compiles again: a version the YAML form
    took and the text form refuses made an output that could be neither verified nor edited again."""
    assert errors_of('- recipe: {name: x, version: "1 #2"}\n- select: all\n- freeze\n') == [
        (1, 3, 'recipe version \'1 #2\' is not a version number such as "1.2.0"')]
    assert errors_of('- select: all\n- rename: {prefix: "a b/#\\n"}\n') == [
        (2, 3, "layer names use letters, digits, '_', '.' and '-', not 'a b/#\\n'")]
    good = tmp_path / "good.yaml"
    good.write_text('- recipe: {name: "x y", version: "1.2.0"}\n- select: {where: type=Dense}\n'
                    '- scale: {target: kernel, factor: 0.5}\n')
    model, out = model_file("cnn"), tmp_path / "out.keras"
    assert run_cli("apply", good, model, "-o", out).status == 0
    r = run_cli("verify", out, "--input", model)
    assert r.status == 0, r.err


def test_predicate_error_points_inside_the_yaml_string():
    text = '- select: {where: "type=Dense and tranable"}\n'
    (line, column, message), = errors_of(text)
    assert line == 1 and message.startswith("predicate:")
    # the caret sits on the bad word inside the quoted scalar
    assert text.splitlines()[0][column - 1:].startswith("tranable")


def test_not_a_list_and_bad_yaml():
    assert errors_of("select: all\n")[0][2] == "a YAML recipe is a list of statements, e.g. `- select: all`"
    (line, column, message), = errors_of("- select: [all\n- freeze\n")
    assert message.startswith("invalid YAML") and line >= 1


def test_aliases_are_refused_so_alias_bombs_cannot_expand():
    bomb = "- &a {select: all}\n" + "".join(f"- &b{i} [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" for i in range(3))
    (line, column, message), = errors_of(bomb)
    assert (line, column) == (1, 3) and "anchors and aliases" in message


def test_python_tags_are_not_constructed(monkeypatch):
    import os
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args) or 0)
    text = "- param: {name: x, value: !!python/object/apply:os.system ['echo hi']}\n"
    with pytest.raises(RecipeError, match=r"YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not "
                                          r"allowed in recipes \(only plain data\)") as info:
        compile_recipe(text, "evil.yaml")
    assert (info.value.line, info.value.column) == (1, text.index("!!") + 1) and calls == []


def test_yaml_and_text_forms_give_byte_identical_outputs(tmp_path, model_file):
    model = model_file("cnn")
    text = ROOT / "recipes" / "perturb-dense.recipe"
    yaml_path = tmp_path / "perturb.yaml"
    r = run_cli("fmt", "--to", "yaml", text)
    assert r.status == 0
    yaml_path.write_text(r.out)
    assert run_cli("apply", text, model, "-o", tmp_path / "a.keras").status == 0
    assert run_cli("apply", yaml_path, model, "-o", tmp_path / "b.keras").status == 0
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()


def test_yaml_include_of_a_text_recipe(tmp_path):
    (tmp_path / "common.recipe").write_text("select all\nfreeze\n")
    main = tmp_path / "main.yaml"
    main.write_text("- include: common.recipe\n- unfreeze\n")
    assert [str(s) for s in load_recipe(main).program.flat()] == ["select all", "freeze", "unfreeze"]
