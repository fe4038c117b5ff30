"""modelxform apply RECIPE MODEL -o OUT — apply a recipe and save the result atomically."""
from __future__ import annotations

from . import add_include_option, add_model_options, add_run_options, include_root, parse_params, print_plan
from ..errors import UsageError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "apply", help="apply a recipe to a model file and save the result",
        description="Apply RECIPE to MODEL and write the result to OUT (.keras or .h5, by extension). "
                    "The input is never modified; OUT is written atomically or not at all.")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the result (.keras or .h5)")
    p.add_argument("--format", choices=("keras", "h5", "savedmodel"),
                   help="what to write (default: by OUT's extension); savedmodel: a TensorFlow SavedModel "
                        "folder OUT for serving, written with Keras's model.export")
    add_run_options(p)
    p.add_argument("--dry-run", action="store_true", help="resolve and report everything, write nothing")
    p.add_argument("--in-place", action="store_true", help="allow OUT to be MODEL itself (or omit -o)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_model_options(p)
    add_include_option(p)
    return p


def run(args, console) -> int:
    input_digest = None
    if not args.dry_run and (args.output is not None or args.in_place):
        # (the output's record will hold the input's sha256: hashing a large model is the floor of a
        # weight-only edit's first run, so it begins before the rest of modelxform is imported)
        from ..keras_io.digests import begin
        input_digest = begin(args.model)
    from ..session import apply_file, load_recipe

    recipe = load_recipe(args.recipe, include_root=include_root(args))
    if args.output is not None:  # (-o MODEL, without --in-place, is refused by apply_file)
        from ..keras_io.outputs import refuse_overwriting_inputs
        from ..lang.compiler import files_read
        refuse_overwriting_inputs("-o", args.output, files_read(recipe))
    output = args.output
    savedmodel = args.format == "savedmodel"
    if output is None and not args.in_place and not args.dry_run and not savedmodel:
        raise UsageError("apply needs -o OUT (or --in-place to overwrite MODEL, or --dry-run)")
    if savedmodel and args.in_place:  # (-o DIR given or not: the message said "needs -o DIR" either way)
        raise UsageError("--format savedmodel cannot go with --in-place (a SavedModel is a folder, not the input "
                         "model file); write it with -o DIR")
    if savedmodel and output is None and not args.dry_run:
        raise UsageError("--format savedmodel needs -o DIR (a SavedModel is a folder, not the input model file)")
    result = apply_file(recipe, args.model, output, seed=args.seed, params=parse_params(args.params),
                        unsafe=args.unsafe, imports=args.imports, format=args.format, in_place=args.in_place,
                        dry_run=args.dry_run, input_digest=input_digest)
    return print_plan(result.plan, args, console, output=result.output)
