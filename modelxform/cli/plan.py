"""modelxform plan RECIPE MODEL — what each statement would do, without writing anything."""
from __future__ import annotations

from . import add_model_options, add_run_options, parse_params
from .apply import execute


def add_parser(subparsers):
    p = subparsers.add_parser(
        "plan", help="show the layers each statement resolves to and the change it would make",
        description="Resolve every statement of RECIPE against MODEL and report the layers it matches and "
                    "the change it would make (types, shapes, parameter counts). Writes nothing.")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("model", metavar="MODEL")
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_model_options(p)
    return p


def run(args, console) -> int:
    from ..compiler import load_recipe
    recipe = load_recipe(args.recipe)
    return execute(recipe, args, parse_params(args.params), None, console, dry_run=True)
