"""Canonical formatting of recipes, in either form: one statement per item, comments kept where they were."""
from __future__ import annotations

from .compiler import comments as _comments
from .compiler import compile_recipe, is_yaml_name


def format_text(text: str, filename: str | None = None, *, include_root=None) -> str:
    """The canonical form of a recipe, in the form its name says (YAML for ``.yaml``/``.yml``). Raises
    RecipeError when it does not compile.

    >>> format_text('select   where type=Dense ; scale kernel 0.50  # halve')
    'select where type=Dense\\nscale kernel 0.5  # halve\\n'
    """
    return convert(text, filename, "yaml" if is_yaml_name(filename) else "recipe", include_root=include_root)


def convert(text: str, filename: str | None, to: str, *, include_root=None) -> str:
    """The recipe in canonical form, in the text form (``to="recipe"``) or the YAML form (``"yaml"``),
    whichever form it is written in; both compile to equal programs. Comments are kept, in either
    direction: each where it was relative to the statements (one written inside a statement that spans
    lines goes before it, or at the end of its last line if it followed code), and one blank line where
    the author left one or more."""
    from . import yaml_form
    program = compile_recipe(text, filename, include_root=include_root).program
    found = yaml_form.comments(text) if is_yaml_name(filename) else _comments(text)
    render = yaml_form.yaml_item if to == "yaml" else str
    lines = text.splitlines() if is_yaml_name(filename) else text.split("\n")  # (the breaks each form's parser counts)
    whole_lines = {number for number, _, whole in found if whole}
    out: list[str] = []

    def emit(line_no: int, item: str) -> None:
        # keep one blank line where the author left one or more
        if out and out[-1] != "" and line_no >= 2 and line_no - 2 < len(lines) and not lines[line_no - 2].strip():
            out.append("")
        out.extend(item.split("\n"))

    statements = list(program.statements)
    for n, stmt in enumerate(statements):
        line = stmt.span.line if stmt.span else 0
        end = _last_line(stmt.span, lines, whole_lines) if stmt.span else line
        next_line = statements[n + 1].span.line if n + 1 < len(statements) and statements[n + 1].span else None
        while found and found[0][0] < line:  # before it
            number, comment, whole = found.pop(0)
            if whole or not out:  # (a comment after a YAML document's `---` or directive: a line of its own)
                emit(number, comment)
            else:
                out[-1] += "  " + comment
        trailing = []
        while found and found[0][0] <= end and not (found[0][0] == end == next_line):  # within it
            number, comment, whole = found.pop(0)
            if whole:
                emit(number, comment)
            else:
                trailing.append(comment)
        emit(line, render(stmt))
        for comment in trailing:
            out[-1] += "  " + comment
    if not statements and to == "yaml":
        found.append((len(lines) + 1, "[]", True))
    for number, comment, _ in found:
        emit(number, comment)
    return "\n".join(out) + "\n" if out else ""


def _last_line(span, lines: list[str], comment_lines: set[int]) -> int:
    """The last line a statement's text is on. A YAML item's span ends where the next token begins: at
    the start of a line, after any blank and comment lines."""
    end = max(span.line, span.end_line if span.end_column > 1 else span.end_line - 1)
    while end > span.line and (end > len(lines) or not lines[end - 1].strip() or end in comment_lines):
        end -= 1
    return end
