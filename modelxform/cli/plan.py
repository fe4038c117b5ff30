"""modelxform plan RECIPE MODEL — what each statement would do, without writing anything."""
from __future__ import annotations

from . import add_model_options, add_run_options, parse_params
from .apply import _print_report, execute


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
    return p


def run(args, console) -> int:
    from ..lang.compiler import load_recipe
    recipe = load_recipe(args.recipe)
    if getattr(args, "html", None):
        return _plan_with_report(recipe, args, parse_params(args.params), console)
    return execute(recipe, args, parse_params(args.params), None, console, dry_run=True)


def _plan_with_report(recipe, args, params, console) -> int:
    """The plan as `execute` prints it, plus the HTML report of the model before and after."""
    import pathlib

    from ..diff import diff, snapshot
    from ..keras_io.files import load_model
    from ..report_html import require_dot, statements_from_report, write_report
    from ..runner import run as run_recipe
    require_dot()  # before the slow part
    model = load_model(args.model, unsafe=args.unsafe, imports=args.imports)
    before = snapshot(model, name=str(args.model))
    new_model, report = run_recipe(recipe, model, seed=args.seed, params=params, dry_run=True, copy=False)
    after = snapshot(new_model, name=f"{args.model} after {args.recipe}")
    d = diff(before, after)
    title = f"plan: {pathlib.Path(args.recipe).name} on {pathlib.Path(args.model).name}"
    subtitle = f"seed {report.seed}" + (", params " + ", ".join(f"{k}={v}" for k, v in report.params.items())
                                        if report.params else "") + " — a plan: no arrays were changed"
    write_report(args.html, d, title=title, subtitle=subtitle, statements=statements_from_report(report))
    return _print_report(report, args, None, console, True, (len(before.layers), before.params),
                         (len(after.layers), after.params), html=args.html)
