"""Recipe text with a file name, and positions inside it.

Every IR node and every error carries a Span so that messages can say ``file:line:col`` and show the
offending line with a caret under it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# An error shows at most this many characters of its source line (a 100 MB one-line recipe is not echoed),
# starting up to EXCERPT_CONTEXT characters before the position.
MAX_EXCERPT = 160
EXCERPT_CONTEXT = 60


@dataclass(frozen=True)
class Span:
    """1-based line and column of the first character, and of the character after the last."""

    line: int
    column: int
    end_line: int
    end_column: int
    filename: str | None = None

    def location(self) -> str:
        return f"{self.filename or '<recipe>'}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Source:
    text: str
    filename: str | None = None

    @property
    def name(self) -> str:
        return self.filename or "<recipe>"

    def lines(self) -> list[str]:
        """Lines as positions count them: recipe text breaks at \n only (like the lexer); YAML also
        at \r, \x85, \u2028 and \u2029 (like PyYAML's marks). str.splitlines() breaks at more."""
        if self.filename and str(self.filename).lower().endswith((".yaml", ".yml")):
            return re.split(r"\r\n|[\r\n\x85\u2028\u2029]", self.text)
        return [line.rstrip("\r") for line in self.text.split("\n")]

    def line_text(self, line: int) -> str:
        lines = self.lines()
        if 1 <= line <= len(lines):
            return lines[line - 1]
        return ""

    def excerpt(self, span: Span) -> str:
        """The source line of ``span`` and a caret line under the spanned characters."""
        text = self.line_text(span.line).replace("\t", " ")
        if not text and span.line > len(self.lines()):
            return ""
        start = max(span.column, 1)
        if span.end_line == span.line and span.end_column > start:
            width = span.end_column - start
        else:
            width = max(len(text) - start + 1, 1)
        width = max(1, min(width, max(len(text) - start + 1, 1)))
        if len(text) > MAX_EXCERPT:  # a long line: the part around the position, not the whole line
            left = max(0, min(start - 1 - EXCERPT_CONTEXT, len(text) - MAX_EXCERPT))
            right = left + MAX_EXCERPT
            shown = ("…" if left else "") + text[left:right] + ("…" if right < len(text) else "")
            offset = start - 1 - left + (1 if left else 0)
            width = max(1, min(width, right - (start - 1)))
            return f"    {shown}\n    {' ' * offset}{'^' * width}"
        return f"    {text}\n    {' ' * (start - 1)}{'^' * width}"

    def span_at(self, pos: int, length: int = 1) -> Span:
        """A span from a 0-based character offset."""
        pos = max(0, min(pos, len(self.text)))
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return Span(line, col, line, col + max(length, 1), self.filename)
