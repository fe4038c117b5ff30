"""modelxform check RECIPE… — parse and static checks, without loading any model."""
from __future__ import annotations

from . import add_include_option, add_recipe_arguments, include_root, recipe_inputs
from ..errors import ExitCode, RecipeError


def add_parser(subparsers):
    p = subparsers.add_parser("check", help="parse recipes and run the static checks (fast: no TensorFlow)",
                              description="Parse recipes and run the static checks. Loads no model. "
                                          "`-` reads a recipe from standard input.")
    add_recipe_arguments(p)
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    add_include_option(p)
    return p


def run(args, console) -> int:
    from ..lang.compiler import compile_recipe
    status = ExitCode.OK
    root = include_root(args)
    for name, _, text in recipe_inputs(args, console):
        try:
            if isinstance(text, RecipeError):
                raise text
            recipe = compile_recipe(text, name, include_root=root)
        except RecipeError as exc:
            console.error(exc.render())
            status = ExitCode.USAGE
            continue
        for warning in recipe.warnings:
            console.error(warning.render("warning"))
        n = sum(1 for _ in recipe.program.flat())
        if args.strict and recipe.warnings:
            status = ExitCode.USAGE
            console.error(f"{name}: {len(recipe.warnings)} warning(s), failing because of --strict")
        else:
            console.print(f"{name}: ok ({n} statement{'s' if n != 1 else ''})")
    return status
