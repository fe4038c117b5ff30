"""Transformation passes, one registered function per IR statement class.

A pass takes the run context and its statement, changes the working model (or queues a graph edit) and
returns a StatementReport. ``register`` refuses a second pass for the same class, and
tests/test_passes.py checks that every statement class has one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PASSES: dict[type, object] = {}


def register(*statement_types):
    def decorate(fn):
        for cls in statement_types:
            if cls in PASSES:
                raise RuntimeError(f"a pass for {cls.__name__} is already registered ({PASSES[cls].__name__})")
            PASSES[cls] = fn
        return fn
    return decorate


@dataclass
class StatementReport:
    statement: object
    layers: list = field(default_factory=list)  # paths the statement acted on
    changes: list = field(default_factory=list)  # one human-readable line per change
    notes: list = field(default_factory=list)  # things worth knowing that are not changes

    @property
    def location(self) -> str:
        span = getattr(self.statement, "span", None)
        return span.location() if span else ""

    def to_dict(self) -> dict:
        span = getattr(self.statement, "span", None)
        return {"statement": str(self.statement),
                "file": span.filename if span else None,
                "line": span.line if span else None, "column": span.column if span else None,
                "layers": list(self.layers), "changes": list(self.changes), "notes": list(self.notes)}


def load_all() -> None:
    """Import every pass module so that their decorators run."""
    from . import checks, structure, surgery, weights  # noqa: F401
