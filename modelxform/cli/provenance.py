"""modelxform provenance MODEL [--json] — how a model file was made."""
from __future__ import annotations

import json

from ..errors import ExitCode, UsageError


def add_parser(subparsers):
    p = subparsers.add_parser("provenance", help="show how a model file was made (recipes, seeds, versions)",
                              description="Print the provenance record modelxform wrote into MODEL "
                                          "(the modelxform.json member of a .keras file, the modelxform_provenance "
                                          "attribute of an .h5 file, or, for an .h5 file written before that, "
                                          "OUT.provenance.json beside it). Does not import TensorFlow. Exit "
                                          "status 2 when MODEL has no record, 3 when it is not a readable model "
                                          "file or its record is malformed.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print the raw record")
    return p


def run(args, console) -> int:
    import pathlib

    from ..errors import ModelFileError
    from ..keras_io.files import check_readable
    from ..provenance import read_record, render
    if not pathlib.Path(args.model).exists():
        raise ModelFileError(f"{args.model}: no such file")
    check_readable(pathlib.Path(args.model))
    record = read_record(args.model)
    if record is None:
        raise UsageError(f"{args.model}: has no modelxform provenance record")
    if args.json:
        console.print(json.dumps(record, indent=2, sort_keys=True))
    else:
        for line in render(record):
            console.print(line)
    return ExitCode.OK
