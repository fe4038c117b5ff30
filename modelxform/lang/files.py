"""Reading a text file that may come from someone else: bounded, regular files only, checked first.

A recipe (or an included file, or a ZOO.yaml) is read only when it is a regular file no larger than the
limit; a FIFO is never opened (it would block), a device never read (``/dev/zero`` never ends), and the
size is checked on the open file too, since ``/proc`` files report 0 bytes and a file may grow between
the check and the read. Callers turn :class:`ReadRefused` into their own error with their own words.
"""
from __future__ import annotations

import os
import stat


class ReadRefused(Exception):
    """Why a file was not read, without its path: "no such file", "is a FIFO (named pipe)", …;
    ``kind`` is one of missing, denied, directory, special, too-large, io."""

    def __init__(self, reason: str, kind: str, size: int | None = None):
        super().__init__(reason)
        self.reason, self.kind, self.size = reason, kind, size


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages: "a directory", "a FIFO (named pipe)", …"""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_mode(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ReadRefused("is a directory", "directory")
    if not stat.S_ISREG(mode):
        raise ReadRefused(f"is {file_kind(mode)}", "special")


def check_file(path, limit: int) -> os.stat_result:
    """The file's stat when it is a regular file of at most ``limit`` bytes, else ReadRefused; reads nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ReadRefused("no such file", "missing") from None
    except PermissionError:
        raise ReadRefused("permission denied", "denied") from None
    except OSError as exc:
        raise ReadRefused(f"cannot read: {exc.strerror or exc}", "io") from None
    _refuse_mode(st.st_mode)
    if st.st_size > limit:
        raise ReadRefused(f"is larger than {limit} bytes", "too-large", st.st_size)
    return st


def read_bounded(path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before and while reading)."""
    check_file(path, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ReadRefused("no such file", "missing") from None
    except PermissionError:
        raise ReadRefused("permission denied", "denied") from None
    except OSError as exc:
        raise ReadRefused(f"cannot read: {exc.strerror or exc}", "io") from None
    try:
        _refuse_mode(os.fstat(fd).st_mode)  # the file opened is the file checked
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise ReadRefused(f"is larger than {limit} bytes", "too-large")
        return b"".join(chunks)
    except OSError as exc:
        raise ReadRefused(f"cannot read: {exc.strerror or exc}", "io") from None
    finally:
        os.close(fd)
