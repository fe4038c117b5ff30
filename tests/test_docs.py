"""Every ```recipe example in docs/language.md runs, and the doc covers the whole language."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, make_bert, make_cnn, make_nested, position
from modelxform import ModelxformError, RecipeError, compile_recipe
from modelxform import statements as stmts

DOC = ROOT / "docs" / "language.md"
BLOCK = re.compile(r"```recipe\n(.*?)```", re.S)


def blocks():
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def directive(text: str, key: str) -> str | None:
    first = text.splitlines()[0] if text.strip() else ""
    m = re.match(rf"#\s*{key}:\s*(.*)", first)
    return m.group(1).strip() if m else None


_MODELS = {}


def model(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = {"cnn": make_cnn, "nested": make_nested, "bert": make_bert}[kind]()
    return _MODELS[kind]


EXAMPLES = [b for b in blocks() if directive(b, "file") is None]


def write_example_files(folder):
    """Files the examples name: recipe text is written as is; a .keras file is the sample CNN."""
    from modelxform.keras_io.files import save_model
    for other in blocks():
        name = directive(other, "file")
        if name and name.endswith(".keras"):
            save_model(model("cnn"), folder / name)
        elif name:
            (folder / name).write_text(other)


@pytest.mark.parametrize("text", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_runs(text, tmp_path, monkeypatch):
    write_example_files(tmp_path)
    recipe_path = tmp_path / "example.recipe"
    recipe_path.write_text(text)
    expected_error = directive(text, "expect-error")
    kind = directive(text, "model") or "cnn"
    if expected_error:
        with pytest.raises(ModelxformError) as info:
            recipe = compile_recipe(text, str(recipe_path))
            recipe.apply(model(kind), seed=3)
        assert expected_error in info.value.render()
        # every such example ends with the statement that fails: the error is at it, or, for a `requires`
        # that is not met, at its requirement
        lines = text.rstrip("\n").split("\n")
        column = lines[-1].index('"') + 1 if lines[-1].startswith("requires ") else 1
        assert position(info.value) == (len(lines), column)
        return
    recipe = compile_recipe(text, str(recipe_path))
    new_model, report = recipe.apply(model(kind), seed=3)
    ran = [s for s in recipe.program.flat() if not isinstance(s, stmts.HEADER_TYPES)]
    assert len(report.statements) == len(ran)
    # the canonical text of every example compiles back to the same program
    assert compile_recipe(str(recipe.program), str(recipe_path)).program == recipe.program


def test_every_statement_kind_has_an_example():
    seen = set()
    for text in blocks():
        try:
            program = compile_recipe(text, str(ROOT / "docs" / "x.recipe")).program
        except ModelxformError:
            continue  # includes resolve in the test above; error examples are counted by their kind below
        seen.update(type(s) for s in program.statements)
    seen.add(stmts.Include)  # exercised by test_example_runs (needs the included file on disk)
    missing = [cls.__name__ for cls in stmts.KINDS if cls not in seen]
    assert not missing, f"docs/language.md has no runnable example of: {missing}"


def test_every_keyword_is_documented():
    grammar = (ROOT / "grammar" / "recipe.lark").read_text()
    keywords = set(re.findall(r'"([A-Za-z][A-Za-z_]*)"', grammar))
    doc = DOC.read_text()
    missing = sorted(k for k in keywords if not re.search(rf"\b{re.escape(k)}\b", doc))
    assert not missing, f"keywords missing from docs/language.md: {missing}"


YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("text", YAML_BLOCKS, ids=[f"yaml{i}" for i in range(len(YAML_BLOCKS))])
def test_yaml_example_runs_and_equals_its_text_form(text, tmp_path):
    from modelxform.lang.fmt import convert
    write_example_files(tmp_path)
    recipe = compile_recipe(text, str(tmp_path / "example.yaml"))
    new_model, report = recipe.apply(model("cnn"), seed=3)
    assert len(report.statements) == sum(1 for s in recipe.program.flat() if not isinstance(s, stmts.HEADER_TYPES))
    text_form = convert(text, "example.yaml", "recipe")
    assert compile_recipe(text_form, str(tmp_path / "example.recipe")).program == recipe.program


def test_yaml_form_covers_every_statement_kind():
    kinds = {type(s) for text in YAML_BLOCKS for s in compile_recipe(text, "x.yaml").program.statements}
    missing = [c.__name__ for c in stmts.KINDS if c not in kinds and c is not stmts.Include]
    assert not missing, f"the YAML example in docs/language.md lacks: {missing}"


def test_the_error_table_says_what_each_written_line_is_told():
    """docs/language.md's table of syntax errors: each `written` line, compiled, fails with its `message`."""
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    table = text[text.index("| written | message |"):].split("\n\n")[0].splitlines()[2:]
    rows = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in table]
    assert len(rows) >= 6
    for written, message in rows:
        with pytest.raises(RecipeError) as info:
            compile_recipe(written.strip("`") + "\n", "r.recipe")
        assert message in str(info.value), (written, str(info.value))
