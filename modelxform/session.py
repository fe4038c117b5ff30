"""The public API below the command line: recipes that apply themselves to models in memory.

    >>> import modelxform
    >>> recipe = modelxform.compile_recipe("select where type=Dense; scale kernel 0.5")
    >>> new_model, report = recipe.apply(model, seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import os

from .lang import compiler


class Recipe(compiler.Recipe):
    """A compiled recipe (program, source, warnings) that can plan and apply itself on a Keras model."""

    def plan(self, model, seed: int | None = None, params: dict | None = None):
        """Resolve every statement against ``model`` without changing it; returns the report."""
        from .runner import run
        return run(self, model, seed=seed, params=params, dry_run=True)[1]

    def apply(self, model, seed: int | None = None, params: dict | None = None):
        """Apply the recipe to a copy of ``model``: returns ``(new_model, report)``."""
        from .runner import run
        return run(self, model, seed=seed, params=params)


def compile_recipe(text: str, filename: str | os.PathLike | None = None) -> Recipe:
    """Compile recipe text (includes resolve relative to ``filename``, else the working folder).

    >>> compile_recipe('select all; freeze').program.statements[1]
    Freeze()
    """
    return compiler.compile_recipe(text, filename, recipe_class=Recipe)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and compile a recipe file (``.recipe`` or ``.yaml``)."""
    return compiler.load_recipe(path, recipe_class=Recipe)
