"""Canonical formatting of recipe text: one statement per line, comments kept where they were."""
from __future__ import annotations

from .compiler import compile_recipe


def _comments(text: str) -> list[tuple[int, str, bool]]:
    """(line, comment text, whole-line?) for every ``#`` comment outside a string."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
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


def format_text(text: str, filename: str | None = None, *, include_root=None) -> str:
    """The canonical form of a recipe. Raises RecipeError when it does not compile.

    >>> format_text('select   where type=Dense ; scale kernel 0.50  # halve')
    'select where type=Dense\\nscale kernel 0.5  # halve\\n'
    """
    from .compiler import is_yaml_name
    if is_yaml_name(filename):
        from .yaml_form import to_yaml
        return to_yaml(compile_recipe(text, filename, include_root=include_root).program)
    program = compile_recipe(text, filename, include_root=include_root).program
    lines = text.splitlines()
    comments = _comments(text)
    out: list[str] = []

    def emit(line_no: int, item: str) -> None:
        # keep one blank line where the author left one or more
        if out and out[-1] != "" and line_no >= 2 and line_no - 2 < len(lines) and not lines[line_no - 2].strip():
            out.append("")
        out.append(item)

    statements = list(program.statements)
    for n, stmt in enumerate(statements):
        line = stmt.span.line if stmt.span else 0
        while comments and comments[0][0] < line:
            number, comment, whole = comments.pop(0)
            if whole:
                emit(number, comment)
            elif out:
                out[-1] += "  " + comment
        emit(line, str(stmt))
        end_line = stmt.span.end_line if stmt.span else line
        next_line = statements[n + 1].span.line if n + 1 < len(statements) and statements[n + 1].span else None
        if comments and comments[0][0] == end_line and not comments[0][2] and next_line != end_line:
            out[-1] += "  " + comments.pop(0)[1]
    for number, comment, _ in comments:
        emit(number, comment)
    return "\n".join(out) + "\n" if out else ""


def convert(text: str, filename: str | None, to: str, *, include_root=None) -> str:
    """The recipe in the other form: ``to`` is "yaml" or "recipe". Both compile to equal programs.
    Comments survive text -> text formatting only (YAML has no place for them here)."""
    from .yaml_form import to_yaml
    program = compile_recipe(text, filename, include_root=include_root).program
    return to_yaml(program) if to == "yaml" else str(program)
