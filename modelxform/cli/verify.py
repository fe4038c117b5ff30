"""modelxform verify MODEL --input ORIGINAL — re-make MODEL from ORIGINAL and compare."""
from __future__ import annotations

from . import add_include_option, add_model_options, include_root
from ..errors import ExitCode


def add_parser(subparsers):
    p = subparsers.add_parser(
        "verify", help="re-run a model's recorded recipes from the original and check the result is identical",
        description="Re-run the chain of recipes recorded in MODEL's provenance, starting from ORIGINAL, and "
                    "compare the model and every field of its record. Exit 0 when identical, 1 with what "
                    "differs, 2 when MODEL has no record (or a recorded file must be named with --load-weights), "
                    "3 when a file cannot be read or the record is malformed or altered (it may not include "
                    "files, and files it loads weights from are read only when their sha256 matches or you "
                    "name them).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input", required=True, metavar="ORIGINAL", help="the model file the chain started from")
    p.add_argument("--load-weights", dest="weights", action="append", default=[], metavar="PATH[=FILE]",
                   help="let a recorded `load weights from PATH` read FILE (default: PATH itself) although its "
                        "sha256 is not the recorded one (or none is recorded); repeatable. Without it, verify "
                        "reads such a file only when its sha256 matches the record")
    add_model_options(p)
    add_include_option(p, "only let a recorded `load weights from` read files inside DIR (symbolic links "
                          "resolved; --load-weights names files it may read anyway); default: "
                          "$MODELXFORM_INCLUDE_ROOT, else anywhere. For records you did not make, e.g. in CI")
    return p


def run(args, console) -> int:
    from ..errors import UsageError
    from ..session import verify_file
    weights = {}
    for item in args.weights:
        path, sep, file = item.partition("=")
        if not path:
            raise UsageError(f"--load-weights {item!r}: write PATH or PATH=FILE")
        weights[path] = file if sep else path
    differences, notes = verify_file(args.model, args.input, unsafe=args.unsafe, imports=args.imports,
                                     weights=weights, include_root=include_root(args))
    for line in notes:
        console.print(line)
    if differences:
        console.print(f"{args.model}: differs from what its recorded recipes make of {args.input}:")
        for line in differences:
            console.print(f"  - {line}")
        return ExitCode.ASSERT_FAILED
    console.print(f"{args.model}: verified")
    return ExitCode.OK
