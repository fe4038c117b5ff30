"""Where a command writes: the checks every command makes on a file or folder named on its command line
before it does any work, the names of the temporary files it writes beside it, and the atomic writing
of a text file (fmt, the HTML report, batch --report). No Keras and no numpy: `fmt` uses it.

- an output is never one of the command's inputs, under any name: the same path, another spelling of it
  (``dir/../m.keras``), a symbolic link or a hard link (``refuse_overwriting_inputs``, exit 2);
- its folder exists (or, for a SavedModel, the nearest folder that exists), is a folder, can be
  written, and its name fits the file system (``check_output_folder``, exit 3);
- a temporary file beside it keeps a copy of its name short enough that any valid output name works
  (``temp_stem``): NAME where it fits, else its first characters and a digest of all of it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import stat
import tempfile

from ..errors import ModelFileError, UsageError

DEFAULT_NAME_MAX = 255  # bytes in one name (ext4, xfs, btrfs, tmpfs), where pathconf does not say
DIGEST_MARK = "~"  # between the first characters of a long name and the digest of all of it
DIGEST_CHARS = 12


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


def name_max(folder: str | os.PathLike) -> int:
    """How many bytes a name may take in ``folder`` (its file system's NAME_MAX)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX
    return limit if limit and limit > 0 else DEFAULT_NAME_MAX


def check_output_folder(dest: str | os.PathLike, *, create: bool = False) -> pathlib.Path:
    """The folder the file (or folder) ``dest`` is to be written in, once it is known that it can be:
    the folder exists and is a folder (with ``create``, the nearest one of its parents that exists,
    the others to be made as ``mkdir -p`` would), the user may write in it, and ``dest``'s name (and the
    names of the folders to be made) fit the file system. Otherwise a ModelFileError (exit 3),
    ``DEST: CAUSE``, before anything is written."""
    dest = pathlib.Path(dest)
    try:
        there = os.stat(dest)  # (through a symbolic link: what it names)
    except OSError:
        there = None
    if there is not None and not (stat.S_ISREG(there.st_mode) or stat.S_ISDIR(there.st_mode)):
        # (renaming a file over it would replace /dev/null, a FIFO or a socket with that file)
        raise ModelFileError(f"{dest}: is {_special_kind(there.st_mode)}, not a file; refusing to replace it")
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
            if exc.errno == errno.ENAMETOOLONG:
                _refuse_long_names(dest, existing)
            raise ModelFileError(f"{dest}: cannot write in {folder}: {exc.strerror or exc}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{dest}: {existing} is not a folder")
    limit = name_max(existing)
    for what, name in (("name", dest.name), *(("name of the folder " + _clip(m.name), m.name) for m in missing)):
        size = len(os.fsencode(name))
        if size > limit:
            raise ModelFileError(f"{dest}: the {what} is {size} bytes long; this file system allows at most "
                                 f"{limit}")
    if not os.access(existing, os.W_OK | os.X_OK):  # (also false for an immutable folder, a read-only mount)
        raise ModelFileError(f"{dest}: cannot write in {existing}: {os.strerror(errno.EACCES)}")
    return folder


def _special_kind(mode: int) -> str:
    return ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a regular file")


def _refuse_long_names(dest: pathlib.Path, folder: pathlib.Path) -> None:
    """A ModelFileError naming the first of ``folder``'s names longer than the file system allows."""
    for part in (*reversed(folder.parents), folder):
        size = len(os.fsencode(part.name))
        if size > DEFAULT_NAME_MAX:  # (a folder that is not there has no NAME_MAX to ask for)
            raise ModelFileError(f"{dest}: the name of the folder {_clip(part.name)} is {size} bytes long; "
                                 f"this file system allows at most {DEFAULT_NAME_MAX}")


def _file_among(path: pathlib.Path) -> pathlib.Path:
    """The first of ``path``'s leading folders that is a file (``m.keras`` in ``m.keras/sub``)."""
    for part in (*reversed(path.parents), path):
        try:
            if not stat.S_ISDIR(os.stat(part).st_mode):
                return part
        except OSError:
            break
    return path


def _clip(name: str, limit: int = 40) -> str:
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "…"


def temp_stem(name: str, folder: str | os.PathLike, overhead: int) -> str:
    """What a temporary file's name beside ``name`` keeps of it, when the rest of the temporary name
    takes ``overhead`` bytes at most: ``name`` itself where it fits, else its first characters, ``~`` and
    12 hexadecimal digits of its sha256, so that the temporary names of two long outputs stay apart and
    the stale-file cleanup (keras_io.files.stale_temp_files) finds those of its own output. The same for
    the same name and folder, whichever process asks."""
    room = max(name_max(folder) - overhead, 2 * (1 + DIGEST_CHARS))
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    keep, used, cut = room - 1 - DIGEST_CHARS, 0, []
    for ch in name:
        size = len(os.fsencode(ch))
        if used + size > keep:
            break
        cut.append(ch)
        used += size
    return "".join(cut) + DIGEST_MARK + hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]


TEMP_SUFFIX = ".tmp"
_MKSTEMP_RANDOM = 8  # the characters tempfile adds


def write_text_atomically(dest: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``dest`` through a hidden temporary file beside it (``.NAME.XXXXXXXX.tmp``)
    renamed over it: the previous file or the new one, never a part, and no temporary file left. A
    symbolic link ``dest`` stays one: its target is what is written. ``mode``: the permissions (default
    0644 less the umask). Any failure is a ModelFileError (exit 3) naming ``dest``."""
    dest = pathlib.Path(dest)
    target = pathlib.Path(os.path.realpath(dest)) if dest.is_symlink() else dest
    folder = check_output_folder(target)
    if target.is_dir():
        raise ModelFileError(f"{dest}: is a directory")
    stem = temp_stem(target.name, folder, 2 + _MKSTEMP_RANDOM + len(TEMP_SUFFIX))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise ModelFileError(f"{dest}: cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o644 & ~mask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_folder(folder)
    except OSError as exc:
        _unlink(tmp)
        raise ModelFileError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename into ``folder`` durable (its entry on disk), where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
