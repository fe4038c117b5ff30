"""What both YAML readers — a recipe's YAML form (lang/yaml_form.py) and a batch file (batch/zoo.py) —
do with PyYAML's nodes: place an error at a node, and read a mapping whose keys are known."""
from __future__ import annotations

import difflib

import yaml

from ..errors import Diagnostic
from ..source import Source, Span


class NodeReader:
    """Collects the errors of one YAML file (``errors``), each placed at the node it is about."""

    def __init__(self, source: Source):
        self.source = source
        self.errors: list[Diagnostic] = []

    def span(self, node) -> Span:
        start, end = node.start_mark, node.end_mark
        return Span(start.line + 1, start.column + 1, end.line + 1, end.column + 1, self.source.filename)

    def error(self, node, message: str, hint: str | None = None) -> None:
        span = self.span(node) if node is not None else Span(1, 1, 1, 2, self.source.filename)
        self.errors.append(Diagnostic(message, span, self.source, hint))

    def keyed(self, node, what: str, allowed: dict[str, bool]) -> dict | None:
        """key -> (key node, value node) of a mapping node; an unknown key (with did-you-mean), a key
        given twice (the first is kept) and a missing required one are errors. ``allowed`` maps key ->
        required; None when ``node`` is not a mapping."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping with the keys {', '.join(allowed)}")
            return None
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in allowed:
                guess = difflib.get_close_matches(str(key), list(allowed), n=1)
                self.error(key_node, f"unknown key {key!r} in {what}"
                           + (f" (did you mean {guess[0]!r}?)" if guess else f"; it takes {', '.join(allowed)}"))
                continue
            if key in out:
                self.error(key_node, f"key {key!r} is given twice in {what}")
                continue
            out[key] = (key_node, value_node)
        for key, required in allowed.items():
            if required and key not in out:
                self.error(node, f"{what} needs the key {key!r}")
        return out
