"""modelxform plan RECIPE MODEL — what each statement would do, without writing anything."""
from __future__ import annotations

from . import add_include_option, add_model_options, add_run_options, include_root, parse_params, print_plan


def add_parser(subparsers):
    p = subparsers.add_parser(
        "plan", help="show the layers each statement resolves to and the change it would make",
        description="Resolve every statement of RECIPE against MODEL and report the layers it matches and "
                    "the change it would make (types, shapes, parameter counts). Writes no model. "
                    "With --html FILE, also writes a self-contained page drawing the model's graph with "
                    "each layer coloured by what the recipe would do to it (needs Graphviz's `dot`).")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("model", metavar="MODEL")
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--html", metavar="FILE",
                   help="write a visual report (one HTML file that works offline: the graph laid out by "
                        "Graphviz, layers coloured by change, details on hover/click)")
    add_model_options(p)
    add_include_option(p)
    return p


def run(args, console) -> int:
    from ..session import load_recipe, plan_file
    recipe = load_recipe(args.recipe, include_root=include_root(args))
    if args.html is not None:  # before any work: the page replaces no file read, and its folder can take it
        from ..keras_io.outputs import check_output_folder, refuse_overwriting_inputs
        from ..lang.compiler import files_read
        refuse_overwriting_inputs("--html", args.html, [(args.model, "the input model")] + files_read(recipe))
        check_output_folder(args.html)
    plan = plan_file(recipe, args.model, seed=args.seed, params=parse_params(args.params), unsafe=args.unsafe,
                     imports=args.imports, html=getattr(args, "html", None))
    return print_plan(plan, args, console, html=getattr(args, "html", None))
