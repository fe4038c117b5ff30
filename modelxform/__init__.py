"""modelxform: declarative transformation recipes for Keras 3 models.

    >>> import modelxform
    >>> recipe = modelxform.compile_recipe("select where type=Dense; scale kernel 0.5")
    >>> new_model, report = recipe.apply(model, seed=0)   # doctest: +SKIP

Importing this package does not import TensorFlow; applying a recipe does.
"""
from .session import Recipe, compile_recipe, load_recipe
from .errors import (
    ApplyError, AssertionFailed, ExitCode, ModelFileError, ModelxformError, RecipeError, UsageError,
)
from .version import __version__

__all__ = [
    "Recipe", "compile_recipe", "load_recipe",
    "ModelxformError", "RecipeError", "ApplyError", "AssertionFailed", "ModelFileError", "UsageError",
    "ExitCode", "__version__",
]
