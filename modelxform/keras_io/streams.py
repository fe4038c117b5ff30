"""Moving bytes between files at the speed of a file copy, and keeping a zip member's CRC-32 right
without reading the bytes that did not change.

A weight-only edit of a .keras archive rewrites a few arrays of model.weights.h5 and keeps the rest; the
output's weights member is the input's with some byte ranges replaced. :func:`copy_range` moves the kept
ranges from file to file inside the kernel (``os.copy_file_range``: no trip through this process's
memory, and on filesystems that share extents no copy at all), and :class:`EditedCrc` gives the member's
CRC-32 from the input's (the zip's directory holds it) and the old and new bytes of the replaced ranges
only, by the linearity of CRCs: for messages a, b, c of one length, crc(a ^ b ^ c) = crc(a) ^ crc(b) ^
crc(c). With a the input, b its replaced bytes (zeros elsewhere) and c the new ones (zeros elsewhere),
a ^ b ^ c is the output; the zero runs of b and c cost a few multiplications modulo the CRC polynomial
(zlib's crc32_combine arithmetic), not a pass over the bytes.

An input whose weights member does not match its recorded CRC gives an output that does not match its
CRC either, where the bytes are the input's: the damage stays detectable, as with a byte-for-byte copy.
"""
from __future__ import annotations

import errno
import os
import threading

from ..errors import ModelFileError
from .zipmember import Window

try:  # zlib-ng's CRC-32 (SIMD, carry-less multiplication) is 3 to 4 times zlib's; same values
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a dependency, but the arithmetic holds without it
    from zlib import crc32

_CHUNK = 8 << 20
# The most bytes handed to the kernel in one write. On Linux 6.18 (this project's benchmark machine, a
# virtual machine), new bytes written into a file's page cache cost 3 to 6 times as much per byte in calls
# of 2 MiB or more (sometimes 1 MiB) as in calls of 512 KiB or less: the same 2 GiB copied through a
# 16 MiB buffer took 3.2-6.1 s written 16 MiB at a time, 1.0-1.1 s written 512 KiB at a time; nearly all
# of the difference is the copy into the page cache (perf: copy_folio_from_iter_atomic), which a large
# write gets as large folios, likely of memory the host had taken back. A call per 512 KiB costs
# microseconds per MiB where writes of any size are fast. (benchmarks/README.md has the figures.)
WRITE_PIECE = 1 << 19
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}
_kernel_copy = hasattr(os, "copy_file_range")  # until the kernel says it cannot


def copy_range(src_fd: int, src_offset: int, size: int, dst_fd: int, dst_offset: int) -> None:
    """Copy ``size`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset`` (neither file's
    position moves): in the kernel where it can, else through a buffer."""
    global _kernel_copy
    done = 0
    while done < size and _kernel_copy:
        try:
            got = os.copy_file_range(src_fd, dst_fd, size - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            _kernel_copy = False  # (another filesystem pair, an old kernel, a seccomp filter)
            break
        if got == 0:
            raise ModelFileError("unexpected end of file while copying the weights")
        done += got
    if done < size:
        buffer = bytearray(min(_CHUNK, size - done))
        while done < size:
            n = min(len(buffer), size - done)
            view = memoryview(buffer)[:n]
            read_exact(src_fd, view, src_offset + done)
            write_all(dst_fd, view, dst_offset + done)
            done += n


def preallocate(fd: int, offset: int, size: int) -> None:
    """Reserve the disk blocks of ``size`` bytes at ``offset`` before they are written, where the system
    can: ext4 then writes new bytes into a file 2 to 4 times faster than into blocks it allocates as it
    goes (measured in benchmarks/README.md). Nothing is lost where it cannot."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, offset, size)
        except OSError:
            pass


def read_exact(fd: int, buffer, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; the file ending first is an error."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ModelFileError("unexpected end of file while reading the weights")
        done += got


def crc_of_range(fd: int, offset: int, size: int, stopped=lambda: False) -> int:
    """The CRC-32 of ``size`` bytes of ``fd`` at ``offset`` (of fewer, once ``stopped()`` says so)."""
    crc, buffer = 0, bytearray(min(_CHUNK, max(size, 1)))
    done = 0
    while done < size and not stopped():
        view = memoryview(buffer)[:min(len(buffer), size - done)]
        read_exact(fd, view, offset + done)
        crc = crc32(view, crc)
        done += len(view)
    return crc


def write_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset``, in calls of at most WRITE_PIECE bytes (see there)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_PIECE], offset + done)


def write_pieces(out, data) -> None:
    """``out.write(data)`` (a writable file object, such as a zip member's writer), in calls of at most
    WRITE_PIECE bytes: the writers below hand each call's bytes to the kernel whole."""
    view = memoryview(data).cast("B")
    for at in range(0, len(view), WRITE_PIECE):
        out.write(view[at:at + WRITE_PIECE])


# ---- CRC-32 arithmetic (zlib's crc32_combine, in Python: 32-bit polynomials, reflected) ----------------

_POLY = 0xEDB88320
_MASK = 0xFFFFFFFF


def _multmodp(a: int, b: int) -> int:
    """a × b modulo the CRC-32 polynomial (reflected bit order, as zlib)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _powers()  # x^(2^k) modulo the polynomial, k = 0 … 31


def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial: appending n zero bytes multiplies the CRC register by it."""
    p, k = 1 << 31, 3  # x^0; 8n = n × 2^3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_zeros(crc: int, count: int) -> int:
    """``zlib.crc32(bytes(count), crc)``, without the bytes."""
    if count <= 0:
        return crc & _MASK
    return _multmodp(_x8nmodp(count), crc ^ _MASK) ^ _MASK


class EditedCrc:
    """The CRC-32 of ``size`` bytes whose CRC is ``original``, after replacing ranges of them: give
    :meth:`replace` every replaced range's old and new bytes, in increasing order of offset (a range may
    come in several pieces), then read :attr:`value`. The old and the new bytes of a piece may also
    come apart (:meth:`replace_old` as soon as they are read, :meth:`replace_new` once changed), so
    that a piece can change in the buffer it was read into."""

    def __init__(self, original: int, size: int):
        self._original, self._size = original & _MASK, size
        self._old = self._new = 0  # CRCs of the replaced bytes with zeros elsewhere, up to _at_old, _at_new
        self._at_old = self._at_new = 0

    def replace(self, offset: int, old, new) -> None:
        if len(old) != len(new):
            raise ValueError("old and new bytes of one length")
        self.replace_old(offset, old)
        self.replace_new(offset, new)

    def replace_old(self, offset: int, old) -> None:
        self._old, self._at_old = self._advance(self._old, self._at_old, offset, old)

    def replace_new(self, offset: int, new) -> None:
        self._new, self._at_new = self._advance(self._new, self._at_new, offset, new)

    def _advance(self, crc: int, at: int, offset: int, data) -> tuple[int, int]:
        if offset < at or offset + len(data) > self._size:
            raise ValueError("replaced ranges must come in order, within the data")
        return crc32(data, crc32_zeros(crc, offset - at)), offset + len(data)

    @property
    def value(self) -> int:
        if self._at_old != self._at_new:
            raise ValueError("the old and the new bytes of the replaced ranges differ in extent")
        rest = self._size - self._at_new
        return self._original ^ crc32_zeros(self._old, rest) ^ crc32_zeros(self._new, rest)


class Ahead:
    """The items of ``items`` (an iterator) made in a thread, up to DEPTH ahead of the loop that takes
    them: one core makes the next pieces of a file (reads them, changes them, works out a CRC) while
    another writes the last ones (os.preadv and os.pwrite, the CRC and NumPy's arithmetic on a block
    let go of the GIL). Use it as a context manager, and iterate it once inside the block.

    An exception the iterator raises comes out of the loop, as without the thread. A loop that ends
    early (an error of its own, Ctrl-C) has the thread stop once the item it is making is made, and the
    block waits for that before it ends: nothing of the iterator runs after it (a caller may close the
    files it reads). The iterator is then closed, in the caller's thread."""

    DEPTH = 1  # items made and waiting, besides the one taken and the one being made

    _ITEM, _END, _FAILED = range(3)

    def __init__(self, items):
        import queue
        self._items = items
        self._queue = queue.Queue(maxsize=self.DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._make, name="modelxform-ahead", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == self._ITEM:
                yield value
            elif kind == self._FAILED:
                raise value
            else:
                return

    def _make(self) -> None:
        try:
            items = iter(self._items)
            while not self._stop.is_set():  # (asked before each item is made, not after)
                try:
                    item = next(items)
                except StopIteration:
                    self._queue.put((self._END, None))
                    return
                self._queue.put((self._ITEM, item))
        except BaseException as exc:  # handed to the loop
            self._queue.put((self._FAILED, exc))

    def __exit__(self, *exc_info):
        import queue
        self._stop.set()
        while self._thread.is_alive():  # (taking what it made lets a put that waits for room return)
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
        return False


# An output member this large is written to disk while the rest of the output is made (Writeback); below
# it the final fsync is short, and a thread would cost more than it saves.
WRITEBACK_MIN_BYTES = 64 << 20


class Writeback:
    """Start writing a file's bytes to disk while the rest is still being made, so that the fsync
    before the output is renamed into place finds little left to write.

    Linux starts writing dirty pages back on its own only past a share of memory (10 % by default: about
    2 GiB here), so a model of that size is written to disk only by the final close and fsync, while the
    process waits: 0.6-0.7 s per 2 GiB on the development machine, time in which the cores had nothing to
    do. Here a thread calls fdatasync on the file (a duplicate of its descriptor) after every ``every``
    bytes written, one at a time, and once more when the bulk is written (``kick(after_running=True)``),
    while the process goes on making bytes, or waits for the input's digest. Durability still rests on the final
    fsync (files.write_atomically). An error of a background sync would be reported to it alone, not to
    that fsync: :meth:`finish` waits for the thread and raises it. For a member of ``size`` bytes under
    WRITEBACK_MIN_BYTES it does nothing."""

    def __init__(self, fd: int, size: int, every: int = 256 << 20):
        self._fd, self._every = fd, every
        self._on = size >= WRITEBACK_MIN_BYTES
        self._unsynced = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, nbytes: int) -> None:
        self._unsynced += nbytes
        if self._unsynced >= self._every:
            self.kick()

    def kick(self, after_running: bool = False) -> None:
        """A sync of what was written so far, in the background. If one is still running, this one is
        left to the next call, or with ``after_running`` (the last call, when the bulk is written)
        starts once it ends."""
        if not self._on:
            return
        if self._thread is not None and self._thread.is_alive():
            if not after_running:
                return
            self._thread.join()
        self._raise()
        self._unsynced = 0
        fd = os.dup(self._fd)
        self._thread = threading.Thread(target=self._sync, args=(fd,), name="modelxform-writeback", daemon=True)
        self._thread.start()

    def _sync(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as exc:
            self._error = exc
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Wait for the background sync; an error it met is raised here."""
        if self._thread is not None:
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class FileWindow(Window):
    """A file that is the region of another from ``start`` on: what is written into it (by h5py's file
    object driver) lands at ``start + offset`` of the other, so that a zip member can be written in
    place. It behaves as a new file would: its size is how far it was written or truncated, and what
    lies between is zeros (the region is expected to be fresh: preallocated, or past the other's end).
    The read-only window of zipmember.py, made writable and growing. ``writeback`` (a Writeback) is
    told of every write."""

    def __init__(self, fd: int, start: int, writeback: Writeback | None = None):
        super().__init__(fd, start, 0)
        self._written = 0  # how far bytes were ever written: beyond it, the region holds zeros
        self._writeback = writeback  # told of every write

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def writable(self):
        return True

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], self._start + self._pos + done)
            if got <= 0:  # past the other file's end: zeros, as in a file extended by truncate
                view[done:n] = bytes(n - done)
                break
            done += got
        self._pos += n
        return n

    def write(self, data):
        view = memoryview(data).cast("B")
        write_all(self._fd, view, self._start + self._pos)
        self._pos += len(view)
        self.size = max(self.size, self._pos)
        self._written = max(self._written, self._pos)
        if self._writeback is not None:
            self._writeback.wrote(len(view))
        return len(view)

    def truncate(self, size=None):
        size = self._pos if size is None else size
        if size > self.size and self.size < self._written:  # bytes written once, then cut off: zero them
            stop = min(size, self._written)
            zeros = bytes(min(_CHUNK, stop - self.size))
            for at in range(self.size, stop, len(zeros)):
                write_all(self._fd, zeros[:min(len(zeros), stop - at)], self._start + at)
        self.size = size
        return size

    def flush(self):
        pass
