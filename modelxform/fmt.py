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


def format_text(text: str, filename: str | None = None) -> str:
    """The canonical form of a recipe. Raises RecipeError when it does not compile.

    >>> format_text('select   where type=Dense ; scale kernel 0.50  # halve')
    'select where type=Dense\\nscale kernel 0.5  # halve\\n'
    """
    program = compile_recipe(text, filename).program
    comments = _comments(text)
    out: list[str] = []
    last_line = 0
    statements = list(program.statements)
    for n, stmt in enumerate(statements):
        line = stmt.span.line if stmt.span else last_line
        while comments and comments[0][0] < line:
            _, comment, whole = comments.pop(0)
            if whole:
                out.append(comment)
            elif out:
                out[-1] += "  " + comment
        if out and line > last_line + 1 and stmt.span is not None and last_line and \
                text.splitlines()[line - 2].strip() == "":
            out.append("")  # keep one blank line where the author left blank lines
        out.append(str(stmt))
        end_line = stmt.span.end_line if stmt.span else line
        next_line = statements[n + 1].span.line if n + 1 < len(statements) and statements[n + 1].span else None
        if comments and comments[0][0] == end_line and not comments[0][2] and next_line != end_line:
            out[-1] += "  " + comments.pop(0)[1]
        last_line = end_line
    for _, comment, whole in comments:
        out.append(comment)
    return "\n".join(out) + "\n" if out else ""
