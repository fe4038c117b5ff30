"""modelxform apply RECIPE MODEL -o OUT — apply a recipe and save the result atomically."""
from __future__ import annotations

import json

from . import add_model_options, add_run_options, parse_params
from ..errors import ExitCode, UsageError


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
    return p


def run(args, console) -> int:
    from ..lang.compiler import load_recipe
    from ..keras_io.files import model_format, same_file

    recipe = load_recipe(args.recipe)
    params = parse_params(args.params)
    output = args.output
    if output is None:
        if args.in_place:
            output = args.model
        elif not args.dry_run:
            raise UsageError("apply needs -o OUT (or --in-place to overwrite MODEL, or --dry-run)")
    savedmodel = args.format == "savedmodel"
    if savedmodel and (args.in_place or output is None and not args.dry_run):
        raise UsageError("--format savedmodel needs -o DIR (a SavedModel is a folder, not the input model file)")
    if output is not None:
        import pathlib
        if not savedmodel:
            fmt = model_format(output)
            if args.format is not None and args.format != fmt:
                raise UsageError(f"--format {args.format} does not match -o {output} (a .{fmt} file name)")
        folder = pathlib.Path(output).parent
        if not folder.is_dir():
            from ..errors import ModelFileError
            raise ModelFileError(f"{output}: folder {folder} does not exist")
        if same_file(output, args.model) and not args.in_place:
            raise UsageError(f"-o {output} is the input model; refusing to overwrite it (use --in-place)")
    return execute(recipe, args, params, output, console, dry_run=args.dry_run)


def execute(recipe, args, params, output, console, *, dry_run: bool) -> int:
    from ..keras_io.files import load_model, save_model
    from ..runner import run as run_recipe

    savedmodel = getattr(args, "format", None) == "savedmodel"  # plan and batch pass args without it
    if not args.imports and not savedmodel:  # weight-only recipes on .keras files: no TensorFlow (fastpath.py)
        from .. import fastpath
        report = fastpath.try_apply(recipe, args.model, output, args.seed, params, dry_run)
        if report is not None:
            return _print_report(report, args, output, console, dry_run, report.summary, report.summary)
    done = None
    if not args.imports:  # structural recipes on .keras files: the input model is never built (archive_run.py)
        from .. import archive_run
        done = archive_run.try_run(recipe, args.model, args.seed, params, dry_run)
    if done is not None:
        new_model, report, (layers_before, params_before), input_sha256 = done
    else:
        model = load_model(args.model, unsafe=args.unsafe, imports=args.imports)
        layers_before, params_before = _summary(model)
        new_model, report = run_recipe(recipe, model, seed=args.seed, params=params, dry_run=dry_run, copy=False)
        del model  # the working copy became new_model; nothing else needs the input's variables
        input_sha256 = None
    layers_after, params_after = _summary(new_model)
    if not dry_run and output is not None:
        from ..passes.weights import SUBCLASSED_TRAINABLE_NOTE
        lost = [s for s in report.statements if SUBCLASSED_TRAINABLE_NOTE in s.notes]
        if lost:
            from ..errors import ApplyError
            raise ApplyError(f"`{lost[0].statement}` changed trainable flags inside a subclassed model, and Keras "
                             "does not save those: the written file would silently lose them; nothing was written",
                             span=lost[0].statement.span, source=recipe.sources.get(
                                 lost[0].statement.span.filename or "", recipe.source) if lost[0].statement.span else None,
                             hint="set `trainable` in the model's own code, or rebuild it as a functional model")
        from ..keras_io.files import read_provenance, sha256_file
        from ..provenance import entry, extend
        record = extend(read_provenance(args.model),
                        entry(recipe, report, input_sha256 or sha256_file(args.model)))
        if savedmodel:
            from ..export import export_savedmodel
            export_savedmodel(new_model, output, provenance=record)
        else:
            save_model(new_model, output, provenance=record)
    return _print_report(report, args, output, console, dry_run, (layers_before, params_before),
                         (layers_after, params_after))


def _print_report(report, args, output, console, dry_run, before, after, html: str | None = None) -> int:
    """The report as text or (--json) as data; ``html``: the HTML report plan --html wrote."""
    (layers_before, params_before), (layers_after, params_after) = before, after
    if getattr(args, "json", False):
        data = report.to_dict()
        data.update({"model": args.model, "output": None if dry_run else output,
                     "layer_count": [layers_before, layers_after], "param_count": [params_before, params_after]})
        if html is not None:
            data["html"] = html
        console.print(json.dumps(data, indent=2))
        return ExitCode.OK
    for line in report.lines():
        console.print(line)
    console.print(f"model: {layers_before} layers, {params_before:,} params -> "
                  f"{layers_after} layers, {params_after:,} params")
    if dry_run:
        console.print("dry run: nothing was written")
    else:
        console.print(f"wrote {output}")
    if html is not None:
        console.print(f"wrote the report {html}")
    return ExitCode.OK


def _summary(model) -> tuple[int, int]:
    from ..keras_io.layers import walk
    return len(walk(model)), int(model.count_params())
