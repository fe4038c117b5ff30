"""modelxform: declarative transformation recipes for Keras 3 models.

    >>> import modelxform
    >>> result = modelxform.apply_file("prep.recipe", "cnn.keras", "out.keras", seed=7)  # doctest: +SKIP
    >>> recipe = modelxform.compile_recipe("select where type=Dense; scale kernel 0.5")
    >>> new_model, plan = recipe.apply(model, seed=0)   # doctest: +SKIP

Importing this package does not import TensorFlow; applying a recipe that needs Keras does.
"""
from .engine.plan import Plan, StatementReport
from .errors import (
    ApplyError, AssertionFailed, ExitCode, ModelFileError, ModelxformError, RecipeError, UsageError,
)
from .session import (
    ApplyResult, Recipe, apply_file, compile_recipe, load_model, load_recipe, plan_file, verify_file,
)
from .version import __version__

__all__ = [
    "Recipe", "compile_recipe", "load_recipe", "apply_file", "plan_file", "verify_file", "load_model",
    "ApplyResult", "Plan",
    "StatementReport",
    "ModelxformError", "RecipeError", "ApplyError", "AssertionFailed", "ModelFileError", "UsageError",
    "ExitCode", "__version__",
]
