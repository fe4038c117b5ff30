"""modelxform verify MODEL --input ORIGINAL — re-make MODEL from ORIGINAL and compare."""
from __future__ import annotations

from . import add_model_options
from ..errors import ExitCode


def add_parser(subparsers):
    p = subparsers.add_parser(
        "verify", help="re-run a model's recorded recipes from the original and check the result is identical",
        description="Re-run the chain of recipes recorded in MODEL's provenance, starting from ORIGINAL, and "
                    "compare. Exit 0 when identical, 1 with what differs.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input", required=True, metavar="ORIGINAL", help="the model file the chain started from")
    add_model_options(p)
    return p


def run(args, console) -> int:
    from ..session import verify_file
    differences, notes = verify_file(args.model, args.input, unsafe=args.unsafe, imports=args.imports)
    for line in notes:
        console.print(line)
    if differences:
        console.print(f"{args.model}: differs from what its recorded recipes make of {args.input}:")
        for line in differences:
            console.print(f"  - {line}")
        return ExitCode.ASSERT_FAILED
    console.print(f"{args.model}: verified")
    return ExitCode.OK
