"""modelxform diff A B [--json] [--html FILE] — what differs between two model files, layer by layer."""
from __future__ import annotations

import argparse
import json

from . import add_model_options
from ..errors import ExitCode

EPILOG = """\
what is compared:
  layers are matched by path (nested models expanded, as `inspect` shows them):
  added / removed    a path in one model only
  replaced           the same path with another layer type
  renamed            a layer only in A and one only in B with the same type, config
                     (apart from the name) and bit-identical weights
  changed            config fields, weights (shape, max absolute difference, relative
                     L2 change ||B-A||/||A||), trainable flag, the layers feeding it
  inputs, outputs    the model's inputs and outputs (name or producing layer, shape)

exit status (like diff):
  0  the models are the same
  1  they differ
  2  usage error (e.g. an unknown file extension, or --html without Graphviz's dot)
  3  a model file could not be read

examples:
  modelxform diff base.keras tuned.keras
  modelxform diff base.keras tuned.keras --json | jq .counts
  modelxform diff base.keras tuned.keras --html report.html
"""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "diff", help="compare two model files layer by layer (exit 0 same, 1 differ, 3 unreadable)",
        description="Compare model files A and B layer by layer: layers added, removed, replaced or renamed; "
                    "config fields, weights and trainable flags that changed; inputs and outputs. "
                    "When B was written by `modelxform apply` from A, the report names the recipe "
                    "statements that touched each layer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="the first model file (.keras or .h5)")
    p.add_argument("b", metavar="B", help="the second model file")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.add_argument("--html", metavar="FILE",
                   help="also write a visual report: one offline HTML file drawing B's graph (with A's removed "
                        "layers) coloured by what changed; needs Graphviz's `dot`")
    add_model_options(p)
    return p


def run(args, console) -> int:
    import pathlib

    from ..diff import diff, snapshot
    from ..keras_io.files import check_model_file
    from ..session import model_to_look_at
    if args.html:  # before any work: the page replaces neither model, and its folder can take it
        from ..keras_io.outputs import check_output_folder, refuse_overwriting_inputs
        refuse_overwriting_inputs("--html", args.html, [(args.a, "model A"), (args.b, "model B")])
    check_model_file(args.a, unsafe=args.unsafe)  # both, before either is loaded
    check_model_file(args.b, unsafe=args.unsafe)
    if args.html:
        from ..report_html import require_dot
        check_output_folder(args.html)
        require_dot()
    # each model built from its archive as apply builds it, where the engine reads the file: the values
    # of its large variables stay in the file and are compared a block of rows at a time
    with model_to_look_at(args.a, unsafe=args.unsafe, imports=args.imports) as model_a, \
            model_to_look_at(args.b, unsafe=args.unsafe, imports=args.imports) as model_b:
        d = diff(snapshot(model_a, name=str(args.a)), snapshot(model_b, name=str(args.b)))
    if args.html:
        from ..keras_io.files import sha256_file
        from ..provenance import read_record
        from ..report_html import statements_from_provenance, write_report
        record = read_record(args.b)  # a malformed record is refused (exit 3), as everywhere
        statements = statements_from_provenance(record, sha256_file(args.a)) if record else []
        write_report(args.html, d, title=f"diff: {pathlib.Path(args.a).name} -> {pathlib.Path(args.b).name}",
                     subtitle=f"A = {args.a}, B = {args.b}" + ("; statements from B's provenance record"
                                                                 if statements else ""),
                     statements=statements)
    if args.json:
        data = d.to_dict()
        data.update({"a": dict(data["a"], file=str(args.a)), "b": dict(data["b"], file=str(args.b)),
                     "html": args.html})
        console.print(json.dumps(data, indent=2))
    else:
        console.print(f"A: {args.a} ({len(d.a.layers)} layers, {d.a.params:,} params)")
        console.print(f"B: {args.b} ({len(d.b.layers)} layers, {d.b.params:,} params)")
        for line in d.lines():
            console.print(line)
        console.print(d.summary())
        if args.html:
            console.print(f"wrote the report {args.html}")
    return ExitCode.OK if d.same else ExitCode.ASSERT_FAILED
