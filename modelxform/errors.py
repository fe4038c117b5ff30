"""The error hierarchy and the exit codes of the command line.

Every error can render itself as ``file:line:col: error: message`` followed by the source line and a
caret, so the CLI never needs to know which kind it is holding.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .source import Source, Span


class ExitCode(enum.IntEnum):
    OK = 0
    ASSERT_FAILED = 1  # a recipe assert failed (also: verify/diff found a difference)
    USAGE = 2  # bad command line, or a recipe that does not compile
    MODEL_FILE = 3  # a model file could not be read or written
    APPLY = 4  # a statement could not be applied to this model


@dataclass
class Diagnostic:
    message: str
    span: Span | None = None
    source: Source | None = None
    hint: str | None = None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def render(self, kind: str = "error") -> str:
        where = ""
        if self.span is not None:
            name = self.span.filename or (self.source.name if self.source else "<recipe>")
            where = f"{name}:{self.span.line}:{self.span.column}: "
        out = f"{where}{kind}: {self.message}"
        if self.span is not None and self.source is not None:
            excerpt = self.source.excerpt(self.span)
            if excerpt:
                out += "\n" + excerpt
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out


class ModelxformError(Exception):
    """Base class of every error modelxform raises on purpose."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, span: Span | None = None, source: Source | None = None,
                 hint: str | None = None, diagnostics: list[Diagnostic] | None = None):
        self.diagnostics = diagnostics or [Diagnostic(message, span, source, hint)]
        first = self.diagnostics[0]
        super().__init__(first.message)
        self.message = first.message
        self.span = first.span
        self.source = first.source
        self.hint = first.hint

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def place_at(self, span: Span | None) -> None:
        """Put the error at ``span`` (the statement that ran into it) where nothing placed it."""
        if span is not None and self.span is None:
            self.diagnostics[0].span = self.span = span

    @property
    def filename(self) -> str | None:
        if self.span and self.span.filename:
            return self.span.filename
        return self.source.filename if self.source else None

    def render(self, limit: int = 5) -> str:
        shown = [d.render() for d in self.diagnostics[:limit]]
        more = len(self.diagnostics) - limit
        if more > 0:
            shown.append(f"… and {more} more error{'s' if more > 1 else ''}")
        return "\n".join(shown)

    def __str__(self) -> str:
        return self.render()


class UsageError(ModelxformError):
    """A bad command-line argument."""

    exit_code = ExitCode.USAGE


class RecipeError(ModelxformError):
    """A recipe that does not parse or does not pass the static checks."""

    exit_code = ExitCode.USAGE


class ModelFileError(ModelxformError):
    """A model file that cannot be read or written."""

    exit_code = ExitCode.MODEL_FILE


class ApplyError(ModelxformError):
    """A statement that cannot be applied to this model (empty selection, shape mismatch, ...)."""

    exit_code = ExitCode.APPLY


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt so that the same cleanup runs (temporary
    files removed, running batch jobs stopped); the command line exits with 143 (128 + 15)."""


class AssertionFailed(ModelxformError):
    """A recipe ``assert`` statement did not hold."""

    exit_code = ExitCode.ASSERT_FAILED

