"""The README's two-minute tour, run as written: its recipe, its commands, and the outputs it shows
(the error message and `diff`'s report) compared to what they print."""
from __future__ import annotations

import re

from conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    """The indented block that follows the paragraph ending in ``marker``, unindented."""
    rest = README[README.index(marker) + len(marker):]
    lines = rest.split("\n")[1:]
    while lines and not lines[0].strip():
        lines.pop(0)
    out = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break
        out.append(line[4:])
    return "\n".join(out).strip("\n") + "\n"


def commands(block: str) -> list[list[str]]:
    return [re.sub(r"\s+#.*$", "", line).split()[1:] for line in block.splitlines()
            if line.startswith(".venv/bin/modelxform ")]


def test_the_tour_runs_as_written_and_prints_what_the_readme_shows(tmp_path, monkeypatch):
    from modelxform.samples import main as make_sample
    monkeypatch.chdir(tmp_path)
    assert make_sample(["cnn", "cnn.keras"]) == 0
    recipe = block_after("Write a recipe, `prep.recipe`:")
    (tmp_path / "prep.recipe").write_text(recipe, encoding="utf-8")
    ran = commands(block_after("Check it (fast: no TensorFlow), see what it would do, then do it:"))
    assert [argv[0] for argv in ran] == ["check", "plan", "apply"]
    for argv in ran:
        r = run_cli(*argv)
        assert r.status == 0, (argv, r.err)
    shown_error = block_after("Errors name the place and say\nwhat was meant:")
    line = int(shown_error.split(":")[1])
    wrong = recipe.splitlines()
    wrong[line - 1] = shown_error.splitlines()[1].strip()
    (tmp_path / "prep.recipe").write_text("\n".join(wrong) + "\n", encoding="utf-8")
    r = run_cli("check", "prep.recipe")
    assert r.status == 2 and r.err == shown_error
    shown_diff = block_after("    .venv/bin/modelxform diff cnn.keras out.keras      # after the tour's `apply` above")
    r = run_cli("diff", "cnn.keras", "out.keras")
    assert (r.status, r.out) == (1, shown_diff)
