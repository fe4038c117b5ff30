"""The sha256 of large files modelxform has read, kept between runs, so that a model is hashed once and
not at every run that reads it.

Every output's provenance record holds its input's sha256, and ``batch`` compares it to tell which
outputs are up to date. Hashing is the one part of reading a model that cannot go faster than a core
hashes (about 1.4 GB/s here, with the CPU's SHA instructions): for a 2 GiB model, 1.5 s, three times
what a ``cp`` of the file takes, and more than all the rest of a weight-only edit. A model that is
edited again — a recipe tried twice, a zoo run again — has not changed, and need not be hashed again.

**What is trusted, and why.** An entry holds a file's identity — device, inode, size, and the mtime
and ctime in nanoseconds — and the sha256 its bytes had. It is used only for a file that has exactly
that identity now. Writing to a file sets its mtime and ctime to the current time; anyone can set the
mtime back (``touch -d``), but not the ctime, which only setting the system clock back changes. A
file replaced by another has another inode, or another ctime. This is how git's index and DVC decide
that a file is unchanged. Timestamps have a granularity, though (a few milliseconds on Linux, two
seconds on FAT), so a file written again in the same tick as it was last changed would keep its
identity: an entry is made only for a file whose mtime and ctime are older than ``RACY_SECONDS``
before its hashing began, and whose identity was the same before and after it was hashed.

Not trusted: ``verify`` reads every byte it checks, whatever is kept here. A cache folder that is not
the user's own or that others may write is not used (an entry there could name any digest). Files
under ``MIN_BYTES`` are hashed every time (it costs less than keeping their entries).

Where: ``$MODELXFORM_CACHE_DIR/sha256``, else ``$XDG_CACHE_HOME/modelxform/sha256``, else
``~/.cache/modelxform/sha256``; one small JSON file per file hashed, named by its device and inode,
at most ``MAX_ENTRIES`` (the oldest go first). ``MODELXFORM_DIGEST_CACHE=0`` turns it off.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import re
import stat
import tempfile
import threading
import time

RACY_SECONDS = 2.0  # a file changed less than this before its hashing began is not remembered
MIN_BYTES = 16 << 20  # smaller files are hashed every time
MAX_ENTRIES = 4096
ENV_OFF = "MODELXFORM_DIGEST_CACHE"
ENV_DIR = "MODELXFORM_CACHE_DIR"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def file_identity(st: os.stat_result) -> tuple:
    """What tells a file's content unchanged: the same file (device, inode) of the same size, neither
    written (mtime) nor changed in any way (ctime, which no one can set back) since."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _folder(create: bool) -> pathlib.Path | None:
    """The cache folder, if it is on and usable: the user's own, written by no one else."""
    if os.environ.get(ENV_OFF, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    base = os.environ.get(ENV_DIR) or ""
    if base:
        root = pathlib.Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or ""
        root = pathlib.Path(xdg) / "modelxform" if os.path.isabs(xdg) else \
            pathlib.Path.home() / ".cache" / "modelxform"
    folder = root / "sha256"
    try:
        if create:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
    except (OSError, RuntimeError):  # (RuntimeError: no home folder to be found)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return None
    return folder


def _entry_name(st: os.stat_result) -> str:
    return f"{st.st_dev:x}-{st.st_ino:x}.json"


def lookup(st: os.stat_result) -> str | None:
    """The sha256 remembered for the file whose status is ``st``, if it still has the identity it had
    when it was hashed; None otherwise."""
    if st.st_size < MIN_BYTES or not stat.S_ISREG(st.st_mode):
        return None
    folder = _folder(create=False)
    if folder is None:
        return None
    try:
        with open(folder / _entry_name(st), "rb") as fh:
            entry = json.loads(fh.read(4096))
        sha = entry["sha256"]
        same = entry["identity"] == list(file_identity(st))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha if same and isinstance(sha, str) and _HEX64.fullmatch(sha) else None


def remember(before: os.stat_result, after: os.stat_result, sha256: str, started_ns: int) -> None:
    """Keep ``sha256`` for the file hashed from ``started_ns`` (time.time_ns()) on, whose status was
    ``before`` when the hashing began and ``after`` when it ended: only if the two are the same file
    unchanged and it had last changed more than RACY_SECONDS before. Nothing fails if it cannot."""
    if file_identity(before) != file_identity(after) or after.st_size < MIN_BYTES or \
            not stat.S_ISREG(after.st_mode) or not _HEX64.fullmatch(sha256):
        return
    settled = started_ns - int(RACY_SECONDS * 1e9)
    if after.st_mtime_ns > settled or after.st_ctime_ns > settled:
        return
    folder = _folder(create=True)
    if folder is None:
        return
    entry = json.dumps({"identity": list(file_identity(after)), "sha256": sha256}).encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".entry-", dir=folder)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(entry)
        os.replace(tmp, folder / _entry_name(after))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return
    _prune(folder)


def _prune(folder: pathlib.Path) -> None:
    """Keep at most MAX_ENTRIES entries: past that, the older half goes (by when it was written)."""
    try:
        entries = [e for e in os.scandir(folder) if e.name.endswith(".json")]
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[:len(entries) - MAX_ENTRIES // 2]:
            os.unlink(e.path)
    except OSError:
        pass


class FileDigest(threading.Thread):
    """sha256 of a whole file, in a thread (hashlib and os.preadv release the GIL), by descriptor: the
    file hashed is the one open, whatever its name comes to mean. ``identity``: the file's identity
    when the digest was begun. ``owned``: the descriptor is this digest's, closed when it is done.

    **From memory maps** where a read lease on the file is granted (:class:`_Lease`): nothing is copied,
    and no offers are taken. Otherwise the thread reads the file, and can take bytes another reader read:

    **Bytes another reader has read** (:meth:`share`, :meth:`offer`, :meth:`withdraw`). A weight-only
    edit reads the arrays it changes anyway, most of a large model; reading them again to hash them
    cost as much as hashing them (page-cache reads at 1.7 GB/s here, sha256 at 1.4). So that reader
    says up front which ranges it will read, in order (``share``); the thread hashes the rest of the
    file itself and those ranges from the reader's buffers as they are offered (``offer``), and the
    reader waits (the offer's ``wait``) before it changes bytes it offered. What was hashed before the
    ranges were shared is not offered again, and a range left out of the offers is read here. The
    reader withdraws (``withdraw``) when it stops, done or not: the thread then reads what was not
    offered. The digest is the same either way: the bytes of the file, in order."""

    def __init__(self, fd: int, known: str | None = None, *, owned: bool = False, keep: bool = True):
        super().__init__(name="modelxform-sha256", daemon=True)
        self._fd, self._owned, self._keep = fd, owned, keep
        # (hashed from memory maps under a read lease where one is granted: no offers are taken then)
        self._lease = _Lease.take(fd) if known is None else None
        self._status = os.fstat(fd)
        self.identity = file_identity(self._status)
        self._stopped = False
        self._hexdigest = known  # (known already: the thread is not started)
        self._error = None
        # Shared with a reader, under _lock: how far the file is hashed, the ranges the reader will
        # offer, its offers not hashed yet (in file order), and whether the thread has ended.
        self._lock = threading.Condition()
        self._at = 0
        self._promised: collections.deque = collections.deque()
        self._offers: collections.deque = collections.deque()
        self._hashing: _Offer | None = None  # the offer being hashed this moment (outside the lock)
        self._over = False
        if known is not None and owned:
            os.close(fd)

    def run(self) -> None:
        import hashlib
        try:
            started, before = time.time_ns(), self._status
            digest = hashlib.sha256()
            if self._lease is not None:  # (what a lease broken part-way leaves is read below)
                at = self._lease.hash_windows(digest, before.st_size, lambda: self._stopped)
                with self._lock:
                    self._at = at
            buffer = None
            while True:
                with self._lock:
                    offer, limit = self._next()
                if self._stopped:
                    break
                if offer is not None:  # bytes a reader read: hashed from its buffer
                    digest.update(offer.view[self._at - offer.start:])
                    with self._lock:
                        self._at = offer.end
                        self._offers.popleft()
                        self._hashing = None
                        offer.done = True
                        self._lock.notify_all()
                    continue
                at = self._at  # (only this thread moves it)
                if buffer is None:
                    buffer = bytearray(max(1, min(_CHUNK, before.st_size - at)))
                n = len(buffer) if limit is None else min(len(buffer), limit - at)
                got = os.preadv(self._fd, [memoryview(buffer)[:n]], at)
                if got <= 0:
                    break
                digest.update(memoryview(buffer)[:got])
                with self._lock:
                    self._at = at + got
            self._hexdigest = digest.hexdigest()
            if not self._stopped and self._keep:  # the whole file: kept for the next run that reads it
                remember(before, os.fstat(self._fd), self._hexdigest, started)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc
        finally:
            with self._lock:
                self._over = True
                for offer in self._offers:
                    offer.done = True
                self._offers.clear()
                self._promised.clear()
                self._hashing = None
                self._lock.notify_all()
            if self._lease is not None:
                self._lease.release()
            if self._owned:
                os.close(self._fd)

    def _next(self):
        """(Under _lock.) What to hash next: ``(offer, None)``, an offer that holds the next bytes; or
        ``(None, limit)``, read from the file up to ``limit`` (None: its end). Waits while the next
        bytes are in a shared range and not offered yet."""
        while not self._stopped:
            at = self._at
            while self._promised and self._promised[0][1] <= at:
                self._promised.popleft()
            while self._offers and self._offers[0].end <= at:  # (hashed already: the reader need not wait)
                self._offers.popleft().done = True
                self._lock.notify_all()
            if self._offers and self._offers[0].start <= at:
                self._hashing = self._offers[0]
                return self._hashing, None
            if self._promised and self._promised[0][0] <= at:
                if self._offers:  # a gap in what is offered: read here
                    return None, self._offers[0].start
                self._lock.wait()
                continue
            return None, self._promised[0][0] if self._promised else None
        return None, None

    @contextlib.contextmanager
    def apart(self):
        """While the block runs, this digest's thread and the calling thread (with the threads it starts
        meanwhile) keep to different CPUs, where the process may run on exactly two (Linux); else
        nothing changes. Both get back the CPUs they had when the block ends. Measured on the benchmark
        machine's two cores, a weight-only edit's first run on 2 GiB, where the edit's threads and the
        hash compete for the cores and the hash is the longer: 1.78 -> 1.73 s and 1.79 -> 1.68 s
        (medians of two sets of eight alternating rounds), the scheduler no longer moving the edit's
        threads onto the hash's core. Not where the machine has more cores (not measured; the scheduler has
        room there), nor around work that starts TensorFlow's thread pools (they would keep the mask)."""
        cpus = _two_cpus()
        tid = self.native_id
        if cpus is None or tid is None or not self.is_alive():
            yield
            return
        mine, others = {max(cpus)}, cpus - {max(cpus)}
        try:
            os.sched_setaffinity(tid, mine)
        except OSError:  # (the thread has ended meanwhile)
            yield
            return
        try:
            try:
                os.sched_setaffinity(0, others)
            except OSError:
                pass
            yield
        finally:
            for thread in (0, tid):
                try:
                    os.sched_setaffinity(thread, cpus)
                except OSError:  # (the digest's thread has ended: nothing to give back)
                    pass

    def share(self, ranges) -> bool:
        """The ranges ``(start, stop)`` of the file, in order, that another reader will read and offer
        rather than this thread read them again (before the thread starts, or while it runs). Whether
        they are shared: not if the digest is known or done."""
        with self._lock:
            if self._over or self._stopped or self._hexdigest is not None or self._lease is not None:
                return False
            self._promised.extend((start, stop) for start, stop in ranges if stop > start)
            self._lock.notify_all()
            return bool(self._promised)

    def offer(self, start: int, view) -> "_Offer | None":
        """The bytes ``view`` read from ``start`` of the file, to be hashed from there: the caller
        calls the answer's ``wait()`` before it changes them. None if they are not needed (hashed
        already, or nothing is shared)."""
        offer = _Offer(self._lock, start, memoryview(view).cast("B"))
        with self._lock:
            if self._over or not self._promised or offer.end <= self._at:
                return None
            self._offers.append(offer)
            self._lock.notify_all()
        return offer

    def withdraw(self) -> None:
        """The reader offers no more: what is not hashed yet is read from the file. An offer being
        hashed is waited for (its bytes may change once the reader has gone)."""
        with self._lock:
            self._promised.clear()
            for offer in self._offers:
                if offer is not self._hashing:
                    offer.done = True
            self._offers = collections.deque(o for o in self._offers if o is self._hashing)
            self._lock.notify_all()
            while self._hashing is not None:
                self._lock.wait()

    def holds(self, st: os.stat_result) -> bool:
        """Whether this is the digest of the file whose status is ``st`` (the same file, unchanged since
        the digest was begun); if not, the hashing is stopped: no one will ask for it."""
        if file_identity(st) == self.identity:
            return True
        self.stop()
        return False

    @property
    def known(self) -> bool:
        """Whether the digest was known when it was begun (from the cache): no thread hashes."""
        return self._hexdigest is not None and self.ident is None

    def result(self) -> str:
        self.withdraw()  # (a reader that shared ranges is done with them by now)
        if self.is_alive() or self._hexdigest is None:
            self.join()
        if self._error is not None:
            raise self._error
        return self._hexdigest

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self.ident is not None:
            self.join()


class _Offer:
    """Bytes a reader read, offered to a FileDigest (FileDigest.offer)."""

    def __init__(self, lock: threading.Condition, start: int, view: memoryview):
        self._lock, self.start, self.view = lock, start, view
        self.end = start + len(view)
        self.done = False

    def wait(self) -> None:
        """Until the digest is done with the bytes: they may change then."""
        with self._lock:
            while not self.done:
                self._lock.wait()


class _Lease:
    """A read lease on the file a digest hashes (Linux ``F_SETLEASE``), under which it hashes the file
    from memory maps, a window at a time, rather than copy it into a buffer: reading 2 GiB from the page
    cache cost about as much CPU here as hashing it. A file mapped and then truncated by another
    process would kill the reader (SIGBUS): the lease is what makes the maps safe. While it is held, a
    process that opens the file to write it or truncates it waits (up to ``/proc/sys/fs/lease-break-time``,
    45 s by default); the kernel then marks the lease as being broken and signals the holder. The
    digest looks before each window, and as soon as the lease is being broken it closes its maps, gives
    the lease back (the other process goes on) and reads the rest of the file with ``preadv``, which
    reports a file cut short as an error rather than a crash. No lease is taken where the system has
    none, where the file is open for writing (anywhere), or where it is not the user's own: the digest
    then reads, and may hash the blocks a reader offers (FileDigest.share). The signal is SIGURG, whose
    default is to be ignored (SIGIO's is to end the process)."""

    def __init__(self, fd: int):
        self._fd, self._held = fd, True

    @classmethod
    def take(cls, fd: int) -> "_Lease | None":
        """A read lease on ``fd``'s file, or None (read it then): none either where Ctrl-Z could stop
        the process with a window mapped (stop_maps_on_suspend, asked once the lease is granted, so
        that no handler is installed where nothing will be mapped)."""
        if not MAP_WINDOWS:
            return None
        try:
            import fcntl
            import signal
            setlease, setsig = fcntl.F_SETLEASE, fcntl.F_SETSIG  # (Linux only)
            urgent = signal.SIGURG
        except (ImportError, AttributeError):
            return None
        try:
            fcntl.fcntl(fd, setsig, urgent)
            fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
        except OSError:  # (no leases here, a writer has the file open, not the user's file)
            return None
        lease = cls(fd)
        if not stop_maps_on_suspend():
            lease.release()
            return None
        return lease

    def held(self) -> bool:
        """Whether the lease is still ours and nobody waits for it."""
        import fcntl
        if not self._held:
            return False
        try:
            return fcntl.fcntl(self._fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        except OSError:
            return False

    def hash_windows(self, digest, size: int, stopped) -> int:
        """Hash the file into ``digest`` from its start, a map of _WINDOW bytes at a time, while the
        lease holds; gives the lease back and returns how far it got (``size`` when it got to the end).
        No window is mapped while the process stops for Ctrl-Z (stop_maps_on_suspend)."""
        import mmap
        global _maps_open
        at = 0
        try:
            while at < size and not stopped():
                with _MAPS:
                    _MAPS.wait_for(lambda: not _suspending)
                    if not self.held():
                        break
                    _maps_open += 1
                try:
                    n = min(_WINDOW, size - at)
                    try:
                        window = mmap.mmap(self._fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=at)
                    except (OSError, ValueError):  # (read instead)
                        break
                    try:
                        with memoryview(window) as view:
                            digest.update(view)
                    finally:
                        window.close()
                    at += n
                finally:
                    with _MAPS:
                        _maps_open -= 1
                        _MAPS.notify_all()
        finally:
            self.release()
        return at

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                import fcntl
                fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass


def _two_cpus():
    """The two CPUs the calling thread may run on, or None where it may run on another number of them
    (or the system cannot say or set it)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        cpus = set(os.sched_getaffinity(0))
    except OSError:
        return None
    return cpus if len(cpus) == 2 else None


# Whether digests hash from memory maps under a read lease where they can (_Lease); the tests of the
# reading path turn it off.
MAP_WINDOWS = True
# The windows mapped this moment, and whether the process is about to stop (Ctrl-Z): none is mapped then.
_MAPS = threading.Condition()
_maps_open = 0
_suspending = False


def stop_maps_on_suspend() -> bool:
    """Have Ctrl-Z (SIGTSTP) stop the process only once no digest has a window mapped, and keep new
    windows from being mapped until it goes on; whether that is so (files are mapped only then). A
    lease holds a writer back for 45 s at most (lease-break-time): a process stopped longer with a
    window mapped, its file truncated meanwhile, would die of SIGBUS when it went on. The handler is
    installed from the main thread, where SIGTSTP is not handled already, and stays; elsewhere nothing
    is changed and nothing is mapped (SIGSTOP, which no process can catch, stays the gap
    docs/robustness.md names)."""
    global _on_suspend
    import signal
    if not hasattr(signal, "SIGTSTP"):
        return False
    current = signal.getsignal(signal.SIGTSTP)
    if current is signal.SIG_IGN:  # (Ctrl-Z cannot stop the process at all)
        return True
    if _on_suspend is not None and current is _on_suspend:
        return True
    if threading.current_thread() is not threading.main_thread() or current not in (signal.SIG_DFL, None):
        return False

    def on_suspend(signum, frame):
        global _suspending
        with _MAPS:
            _suspending = True
            _MAPS.wait_for(lambda: _maps_open == 0, timeout=2.0)  # (a window: milliseconds)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # (stopped here, until SIGCONT)
        finally:
            signal.signal(signal.SIGTSTP, on_suspend)
            with _MAPS:
                _suspending = False
                _MAPS.notify_all()
    signal.signal(signal.SIGTSTP, on_suspend)
    _on_suspend = on_suspend
    return True


_on_suspend = None  # the SIGTSTP handler stop_maps_on_suspend installed, once it has


# A map's size (a multiple of mmap.ALLOCATIONGRANULARITY): the pages mapped count in the process's
# resident memory while they are, so a map covers one window and is closed before the next.
_WINDOW = 16 << 20

# Read and hashed at a time. Alone, hashing is no faster in larger pieces (1.2 GiB/s here from 1 MiB
# on); but the thread takes the GIL back after each read and each update, and while the main thread
# runs Python (apply's imports, Keras importing and building a model) each of those waits for the switch
# interval (5 ms). Beside a thread running Python, 1 MiB pieces were hashed at 0.1 GiB/s, 4 MiB at 0.28
# and 16 MiB at 0.57: a structural edit of a 2 GiB model waited 1.6 s for its input's digest at the end.
_CHUNK = 16 << 20


def begin(path, *, cached: bool = True) -> FileDigest | None:
    """The sha256 of the regular file at ``path``, begun now in a thread (or known from the cache), for
    a command that will need it later: ``apply`` begins its input's before it imports the rest of
    modelxform and reads the recipe, so that the hashing of a large model (the floor of its first
    weight-only edit) starts a quarter of a second sooner. Whoever opens the file later uses it only
    if the file still has the identity it had here (Archive.hash_input, files.known_sha256). None
    where the file cannot be opened (the command says why when it opens it itself). ``cached=False``
    (verify, which trusts no cache): every byte is read, and the cache is left alone."""
    try:  # (a FIFO or a device named as the model is not opened; one swapped in meanwhile does not block)
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        digest = FileDigest(fd, lookup(st) if cached else None, owned=True, keep=cached)
    except OSError:
        os.close(fd)
        return None
    if not digest.known:
        digest.start()
    return digest
