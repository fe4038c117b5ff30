"""A stored member of a zip file read in place, as a file h5py can open: model.weights.h5 inside a
.keras archive is stored uncompressed, so its bytes are a range of the archive's own bytes. Shared by the
archive (keras_io/archive.py) and the loader (keras_io/files.py)."""
from __future__ import annotations

import io
import os
import struct
import zipfile


class Window(io.RawIOBase):
    """A read-only file over one byte range of another (the stored h5 member inside the zip), for h5py."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._start + self._pos)
        self._pos += got
        return got


def member_offset(fh, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the zip file (after its local header)."""
    fh.seek(info.header_offset)
    header = fh.read(zipfile.sizeFileHeader)
    fields = struct.unpack(zipfile.structFileHeader, header)
    if fields[zipfile._FH_SIGNATURE] != zipfile.stringFileHeader:
        raise ValueError("bad local header")
    return (info.header_offset + zipfile.sizeFileHeader + fields[zipfile._FH_FILENAME_LENGTH]
            + fields[zipfile._FH_EXTRA_FIELD_LENGTH])
