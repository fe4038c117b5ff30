"""Where the recipe grammar lives: grammar/recipe.lark at the top of the repository, shipped by the wheel
inside the package (see pyproject.toml), so it is looked up in both places."""
from __future__ import annotations

import functools
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent
_CANDIDATES = (_HERE / "grammar" / "recipe.lark", _HERE.parent / "grammar" / "recipe.lark")


def grammar_path() -> pathlib.Path:
    for candidate in _CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("grammar/recipe.lark is missing from this installation")


@functools.lru_cache(maxsize=1)
def grammar_text() -> str:
    return grammar_path().read_text(encoding="utf-8")
