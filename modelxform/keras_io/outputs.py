"""Where a command writes: the checks every command makes on a file or folder named on its command line
before it does any work. No Keras and no numpy.

- an output is never one of the command's inputs, under any name: the same path, another spelling of it
  (``dir/../m.keras``), a symbolic link or a hard link (``refuse_overwriting_inputs``, exit 2);
- its folder exists (or, for a SavedModel, the nearest folder that exists), is a folder and can be
  written (``check_output_folder``, exit 3).
"""
from __future__ import annotations

import errno
import os
import pathlib
import stat

from ..errors import ModelFileError, UsageError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same file: the same path, another spelling of it, a symbolic link
    to it or a hard link (os.path.samefile); where either does not exist, whether the paths are the same
    once made absolute."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


def refuse_overwriting_inputs(option: str, output, inputs, remedy: str | None = None) -> None:
    """A UsageError (exit 2) when ``output``, the file that ``option`` names, is one of ``inputs`` —
    pairs (path, what it is: "the input model", "the recipe", …) — under any name (same_file). Every
    command that writes a file makes this check before any work: the file it would replace is never one
    it reads."""
    for path, what in inputs:
        if path is not None and same_file(output, path):
            raise UsageError(f"{option} {output} is {what}; refusing to overwrite it"
                             + (f" ({remedy})" if remedy else ""))


def folder_of(dest: str | os.PathLike) -> pathlib.Path:
    dest = pathlib.Path(dest)
    return dest.parent if str(dest.parent) else pathlib.Path(".")


def check_output_folder(dest: str | os.PathLike, *, create: bool = False) -> pathlib.Path:
    """The folder the file (or folder) ``dest`` is to be written in, once it is known that it can be:
    the folder exists and is a folder (with ``create``, the nearest one of its parents that exists,
    the others to be made as ``mkdir -p`` would), and the user may write in it. Otherwise a
    ModelFileError (exit 3), ``DEST: CAUSE``, before anything is written."""
    dest = pathlib.Path(dest)
    folder = folder_of(dest)
    existing, missing = folder, []
    while True:
        try:
            st = os.stat(existing)
        except FileNotFoundError:
            if not create or existing.parent == existing:
                raise ModelFileError(f"{dest}: folder {folder} does not exist") from None
            missing.append(existing)
            existing = existing.parent
            continue
        except NotADirectoryError:
            raise ModelFileError(f"{dest}: {_file_among(existing)} is not a folder") from None
        except OSError as exc:
            raise ModelFileError(f"{dest}: cannot write in {folder}: {exc.strerror or exc}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{dest}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # (also false for an immutable folder, a read-only mount)
        raise ModelFileError(f"{dest}: cannot write in {existing}: {os.strerror(errno.EACCES)}")
    return folder


def _file_among(path: pathlib.Path) -> pathlib.Path:
    """The first of ``path``'s leading folders that is a file (``m.keras`` in ``m.keras/sub``)."""
    for part in (*reversed(path.parents), path):
        try:
            if not stat.S_ISDIR(os.stat(part).st_mode):
                return part
        except OSError:
            break
    return path
