"""modelxform fmt RECIPE… [--check] — canonical formatting, in place."""
from __future__ import annotations

import pathlib

from . import add_include_option, add_recipe_arguments, include_root, recipe_inputs
from ..errors import ExitCode, ModelxformError, RecipeError


def add_parser(subparsers):
    p = subparsers.add_parser("fmt", help="rewrite recipes in canonical form (idempotent, keeps comments)",
                              description="Rewrite recipes in canonical form: one statement per line, "
                                          "canonical spelling, comments kept (in either form, and by "
                                          "--to). Never changes meaning. "
                                          "`-` reads a recipe from standard input and writes the formatted "
                                          "text to standard output.")
    add_recipe_arguments(p)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not formatted")
    p.add_argument("--stdout", action="store_true", help="print the formatted text instead of rewriting")
    p.add_argument("--to", choices=("recipe", "yaml"),
                   help="print the recipe converted to the text (recipe) or YAML form; rewrites nothing")
    add_include_option(p)
    return p


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace the recipe at ``path`` (a symbolic link's target: the link stays) with ``text``, keeping its
    permissions; atomically, and a ModelFileError (exit 3) naming it where it cannot be written."""
    from ..keras_io.outputs import write_text_atomically
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = None
    write_text_atomically(path, text, mode=mode)


def run(args, console) -> int:
    from ..errors import UsageError
    from ..lang.fmt import convert, format_text
    if args.check and (args.stdout or args.to):  # (a CI script would pass whatever the files held)
        raise UsageError(f"--check changes and prints nothing; it cannot go with {'--to' if args.to else '--stdout'}")
    if args.to and len(args.recipes) > 1:  # (the printed recipes would read as one)
        raise UsageError("--to converts one recipe at a time")
    status = ExitCode.OK
    root = include_root(args)
    for name, path, text in recipe_inputs(args, console):
        try:
            if isinstance(text, RecipeError):
                raise text
            if args.to:
                console.out.write(convert(text, name, args.to, include_root=root))
                continue
            formatted = format_text(text, name, include_root=root)
        except RecipeError as exc:
            console.error(exc.render())
            status = ExitCode.USAGE
            continue
        if args.stdout or (path is None and not args.check):  # `fmt -` writes to stdout, as black and ruff do
            console.out.write(formatted)
        elif formatted == text:
            continue
        elif args.check:
            console.print(f"{name}: not formatted")
            status = max(status, ExitCode.ASSERT_FAILED)
        else:
            try:
                _write_atomic(pathlib.Path(path), formatted)
            except ModelxformError as exc:  # (the other files are still formatted)
                console.error(exc.render())
                status = max(status, ExitCode.MODEL_FILE)
                continue
            console.print(f"{name}: formatted")
    return status
