"""modelxform: declarative transformation recipes for Keras 3 models.

    >>> import modelxform
    >>> result = modelxform.apply_file("prep.recipe", "cnn.keras", "out.keras", seed=7)  # doctest: +SKIP
    >>> recipe = modelxform.compile_recipe("select where type=Dense; scale kernel 0.5")
    >>> new_model, plan = recipe.apply(model, seed=0)   # doctest: +SKIP

Importing this package does not import TensorFlow; applying a recipe that needs Keras does.
"""
# The names below are imported when first used (PEP 562): importing the package (which the command line
# does first) costs next to nothing, so that Ctrl-C in the first moments of `modelxform …` reaches the
# command line's handler rather than an import in progress.
_WHERE = {
    "Plan": "engine.plan", "StatementReport": "engine.plan",
    "ApplyError": "errors", "AssertionFailed": "errors", "ExitCode": "errors", "ModelFileError": "errors",
    "ModelxformError": "errors", "RecipeError": "errors", "UsageError": "errors",
    "ApplyResult": "session", "Recipe": "session", "apply_file": "session", "compile_recipe": "session",
    "load_model": "session", "load_recipe": "session", "plan_file": "session", "verify_file": "session",
    "__version__": "version",
}

__all__ = [
    "Recipe", "compile_recipe", "load_recipe", "apply_file", "plan_file", "verify_file", "load_model",
    "ApplyResult", "Plan",
    "StatementReport",
    "ModelxformError", "RecipeError", "ApplyError", "AssertionFailed", "ModelFileError", "UsageError",
    "ExitCode", "__version__",
]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'modelxform' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
