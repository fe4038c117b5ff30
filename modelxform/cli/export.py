"""modelxform export MODEL DIR — write a TensorFlow SavedModel for serving."""
from __future__ import annotations

import argparse

from . import add_model_options
from ..errors import ExitCode

EPILOG = """\
The SavedModel is what Keras's model.export(DIR, format="tf_saved_model") writes, with each variable
stored once (Keras stores every weight twice with the TensorFlow backend): its endpoint `serve`
(signature `serving_default`) runs the model in inference mode. Load it with

  import tensorflow as tf
  served = tf.saved_model.load("DIR")
  y = served.serve(x)

DIR is written atomically (a temporary folder beside it, then a rename); its missing parent folders
are made, as mkdir -p does (TensorFlow Serving reads MODEL/VERSION folders: export m.keras serving/m/1).
--force replaces a DIR that holds something, unless it holds MODEL. MODEL's provenance record, if it
has one, is kept in DIR/assets.extra/modelxform.json. MODEL and DIR are checked before TensorFlow is
imported.

It needs TensorFlow, whatever Keras's backend (KERAS_BACKEND=jax converts the model with jax2tf);
without TensorFlow it stops at once with one line and exit status 2.

exit status: 0 written; 2 usage error (also: TensorFlow is not installed); 3 MODEL could not be read, or DIR could not be written.
"""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="write a model file as a TensorFlow SavedModel folder, for serving",
        description="Export MODEL (.keras or .h5) as a TensorFlow SavedModel in the folder DIR, loadable by "
                    "tf.saved_model.load and TensorFlow Serving.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("directory", metavar="DIR", help="the SavedModel folder to create (must not exist, or be empty)")
    p.add_argument("--force", action="store_true", help="replace DIR if it already holds something")
    add_model_options(p)
    return p


def run(args, console) -> int:
    from ..export import check_export_destination, export_savedmodel
    from ..errors import ModelxformError
    from ..keras_io.backend import require_tensorflow
    from ..keras_io.files import check_model_file
    from ..provenance import read_record
    from ..session import model_to_look_at
    # every check of the arguments before TensorFlow's import (seconds): MODEL is a model file, DIR can
    # be written (its missing parents are made) and, replaced with --force, does not hold MODEL
    check_model_file(args.model, unsafe=args.unsafe)
    check_export_destination(args.directory, overwrite=args.force, inputs=[args.model], force_option="--force")
    require_tensorflow("export")  # before the model is loaded
    try:
        record = read_record(args.model)  # only a well-formed record travels along
    except ModelxformError:  # an unreadable record is no reason not to export
        record = None
    # built from the .keras archive as apply builds it (each array read from the file once, no random
    # initial values first), else loaded with Keras
    with model_to_look_at(args.model, unsafe=args.unsafe, imports=args.imports) as model:
        export_savedmodel(model, args.directory, provenance=record, overwrite=args.force, inputs=[args.model],
                          force_option="--force")
        ins = ", ".join(f"{getattr(t, 'name', '?')} {tuple(t.shape)}" for t in model.inputs)
        outs = ", ".join(str(tuple(t.shape)) for t in model.outputs)
    console.print(f"wrote {args.directory} (TensorFlow SavedModel; endpoint `serve`, signature `serving_default`)")
    console.print(f"  inputs: {ins}")
    console.print(f"  outputs: {outs}")
    return ExitCode.OK
