"""The sha256 of large inputs kept between runs (keras_io/digests.py): a model is hashed once, the
record made from a remembered digest is the same, and nothing changed since is ever taken for the
file it was."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from modelxform.keras_io import digests
from modelxform.keras_io.files import read_provenance, sha256_file, sha256_with_identity

keras = pytest.importorskip("keras")

RECIPE = 'recipe "half" version "1"\nselect where type=Dense\nscale kernel 0.5\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(digests.ENV_DIR, str(folder))
    monkeypatch.delenv(digests.ENV_OFF, raising=False)
    monkeypatch.setattr(digests, "MIN_BYTES", 1 << 20)  # (so that a model of a few MiB counts as large)
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)  # (the test's files are seconds old at most)
    return folder / "sha256"


@pytest.fixture
def big_model(tmp_path):
    """A Dense model of about 2 MiB of weights."""
    return _dense_model(tmp_path / "big.keras", seed=5)


@pytest.fixture
def hashes(monkeypatch):
    """The files the apply path's hashing thread read, by descriptor's path."""
    seen = []
    start = digests.FileDigest.start

    def counting(self):
        seen.append(os.readlink(f"/proc/self/fd/{self._fd}"))
        return start(self)
    monkeypatch.setattr(digests.FileDigest, "start", counting)
    return seen


def _apply(recipe, model, out):
    from modelxform.session import apply_file
    return apply_file(recipe, model, out, seed=1)


def test_a_large_input_is_hashed_once_and_the_output_is_the_same_byte_for_byte(cache, big_model, tmp_path, hashes):
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    _apply(recipe, big_model, tmp_path / "one.keras")
    assert hashes == [os.path.realpath(big_model)]
    entries = list(cache.iterdir())
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["sha256"] == sha256_file(big_model)
    _apply(recipe, big_model, tmp_path / "two.keras")
    assert hashes == [os.path.realpath(big_model)]  # not hashed again
    assert (tmp_path / "one.keras").read_bytes() == (tmp_path / "two.keras").read_bytes()
    assert read_provenance(tmp_path / "two.keras")["chain"][-1]["input_sha256"] == sha256_file(big_model)


def _dense_model(path, seed):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((700,)), keras.layers.Dense(700, name="wide"),
                              keras.layers.Dense(4, name="head")])
    model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()])
    model.save(path)
    return path


def test_a_file_rewritten_in_place_with_its_mtime_set_back_is_hashed_again(cache, big_model, tmp_path, hashes):
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    _apply(recipe, big_model, tmp_path / "one.keras")
    before = os.stat(big_model)
    other = _dense_model(tmp_path / "other.keras", seed=6).read_bytes()  # same layers, other weights
    assert len(other) == before.st_size
    with open(big_model, "r+b") as fh:  # the same file (inode), the same size, other bytes
        fh.write(other)
    os.utime(big_model, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the mtime it had
    assert os.stat(big_model).st_mtime_ns == before.st_mtime_ns and os.stat(big_model).st_ino == before.st_ino
    _apply(recipe, big_model, tmp_path / "two.keras")
    assert hashes == [os.path.realpath(big_model)] * 2  # hashed again: its ctime moved
    assert read_provenance(tmp_path / "two.keras")["chain"][-1]["input_sha256"] == sha256_file(big_model)
    assert read_provenance(tmp_path / "one.keras")["chain"][-1]["input_sha256"] != sha256_file(big_model)


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(cache, big_model, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 3600.0)  # (every file here changed within the hour)
    digest, identity = sha256_with_identity(big_model)
    assert digest == sha256_file(big_model) and identity is not None
    assert not cache.exists() or list(cache.iterdir()) == []


def test_the_batch_digest_of_an_input_comes_from_the_cache_once_remembered(cache, big_model, monkeypatch):
    import hashlib
    digest, _ = sha256_with_identity(big_model)
    made = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: made.append(a) or real(*a))
    again, identity = sha256_with_identity(big_model)
    assert again == digest and identity is not None
    assert made == []  # nothing hashed


def test_a_forged_or_damaged_entry_is_not_used(cache, big_model):
    sha256_with_identity(big_model)
    (entry,) = cache.iterdir()
    good = json.loads(entry.read_text())
    st = os.stat(big_model)
    assert digests.lookup(st) == good["sha256"]
    for text in ["{", json.dumps({"identity": good["identity"], "sha256": "0" * 63}),
                 json.dumps({"identity": good["identity"][:-1] + [good["identity"][-1] + 1], "sha256": "1" * 64}),
                 json.dumps({"sha256": "1" * 64}), json.dumps([1, 2])]:
        entry.write_text(text)
        assert digests.lookup(st) is None, text


def test_a_cache_folder_others_may_write_is_not_used(cache, big_model):
    sha256_with_identity(big_model)
    st = os.stat(big_model)
    assert digests.lookup(st) is not None
    cache.chmod(0o777)
    try:
        assert digests.lookup(st) is None
        for e in cache.iterdir():
            e.unlink()
        sha256_with_identity(big_model)
        assert list(cache.iterdir()) == []  # nothing written there either
    finally:
        cache.chmod(0o700)


def test_the_cache_can_be_turned_off(cache, big_model, monkeypatch):
    monkeypatch.setenv(digests.ENV_OFF, "0")
    sha256_with_identity(big_model)
    assert not cache.exists()


def test_verify_reads_every_byte_whatever_the_cache_says(cache, big_model, tmp_path):
    """An entry that names another digest for the original (forged: the folder is the user's own, so
    this is the user's doing) goes into the record; verify, which trusts no cache, says the original
    is not the recorded input."""
    from modelxform.session import verify_file
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    sha256_with_identity(big_model)
    (entry,) = cache.iterdir()
    forged = json.loads(entry.read_text())
    forged["sha256"] = "ab" * 32
    entry.write_text(json.dumps(forged))
    _apply(recipe, big_model, tmp_path / "out.keras")
    assert read_provenance(tmp_path / "out.keras")["chain"][-1]["input_sha256"] == "ab" * 32
    differences, _ = verify_file(tmp_path / "out.keras", big_model)
    assert differences == [f"{big_model} is not the file this model was made from: its sha256 is "
                           f"{sha256_file(big_model)}, the record says {'ab' * 32}"]


def test_at_most_max_entries_are_kept_the_newest(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 4)
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes([i]) * (1 << 20))
        files.append(path)
        sha256_with_identity(path)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) <= 4
    assert digests.lookup(os.stat(files[-1])) == sha256_file(files[-1])
    assert digests.lookup(os.stat(files[0])) is None


def test_concurrent_hashes_of_one_file_leave_one_good_entry(cache, big_model):
    results = []
    threads = [threading.Thread(target=lambda: results.append(sha256_with_identity(big_model)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {sha256_file(big_model)}
    assert [json.loads(e.read_text())["sha256"] for e in cache.iterdir()] == [sha256_file(big_model)]


# ---- apply begins hashing its input as it starts (digests.begin) ------------------------------------------

_EARLY = """\
import json, sys
from modelxform.keras_io import digests
seen, starts = {}, []
real_begin, real_start = digests.begin, digests.FileDigest.start

def begin(path):
    seen["imported"] = sorted(m for m in ("numpy", "lark", "h5py", "modelxform.session") if m in sys.modules)
    digest = real_begin(path)
    seen["began"] = digest is not None and not digest.known
    return digest

def start(self):
    starts.append(self.identity)
    return real_start(self)
digests.begin, digests.FileDigest.start = begin, start
from modelxform.cli import main
seen["status"] = main(sys.argv[1:])
seen["hashes"] = len(starts)
print(json.dumps(seen))
"""


@pytest.mark.parametrize("flag", ["-o", "--in-place"])
def test_apply_begins_hashing_its_input_before_it_imports_the_rest(big_model, tmp_path, flag):
    """The input's sha256, which the output's record holds, is begun before numpy, lark, h5py and the
    session are imported, and is the only hashing of the input: the archive uses it."""
    import subprocess
    import sys
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    sha = sha256_file(big_model)
    out = tmp_path / "out.keras"
    argv = ["apply", str(recipe), str(big_model)] + (["-o", str(out)] if flag == "-o" else ["--in-place"])
    env = dict(os.environ, MODELXFORM_DIGEST_CACHE="0", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", _EARLY, *argv], capture_output=True, text=True, env=env, timeout=300)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"imported": [], "began": True, "status": 0, "hashes": 1}, done.stderr[-2000:]
    written = out if flag == "-o" else big_model
    assert read_provenance(written)["chain"][-1]["input_sha256"] == sha


def test_a_digest_begun_before_the_file_was_replaced_is_not_used(cache, big_model, tmp_path, hashes):
    """A file replaced between the start of the hashing and the run's opening of it: the run hashes the
    file it opened, and the early hashing is stopped. Where the file is unchanged, the early digest is
    the one used (and the one files.known_sha256 gives). Nothing is begun for a missing file or a FIFO."""
    from modelxform.keras_io.files import known_sha256
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    early = digests.begin(big_model)
    assert early is not None and hashes == [os.path.realpath(big_model)]
    assert known_sha256(big_model, early) == sha256_file(big_model)
    os.mkfifo(tmp_path / "pipe.keras")  # (not opened: opening a FIFO to read waits for a writer)
    assert digests.begin(tmp_path / "missing.keras") is None and digests.begin(tmp_path / "pipe.keras") is None
    for e in cache.iterdir():
        e.unlink()  # (so that the next begin hashes again)
    early = digests.begin(big_model)
    os.replace(_dense_model(tmp_path / "other.keras", seed=6), big_model)
    from modelxform.session import apply_file
    apply_file(recipe, big_model, tmp_path / "out.keras", seed=1, input_digest=early)
    assert not early.is_alive()
    assert read_provenance(tmp_path / "out.keras")["chain"][-1]["input_sha256"] == sha256_file(big_model)
    assert hashes == [os.path.realpath(big_model)] * 3  # the first, the early one, the run's own
    assert known_sha256(big_model, early) is None


# -- a digest that hashes the bytes another reader read (FileDigest.share / offer / withdraw) --------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _reads(draw):
    """A file, the ranges a reader shares, the pieces it reads them in (each offered or not), where it
    stops (None: at the end), and whether the digest's thread began before the ranges were shared."""
    size = draw(st.integers(0, 3000))
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=10))))
    ranges = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    pieces = []
    for start, stop in ranges:
        at = start
        while at < stop:
            n = draw(st.integers(1, stop - at))
            pieces.append((at, at + n, draw(st.booleans()) or draw(st.booleans())))
            at += n
    stop_after = draw(st.none() | st.integers(0, len(pieces)))
    return size, ranges, pieces, stop_after, draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


def _reads_by_the_digest():
    """An os.preadv that counts what the digest's thread reads itself, and the list of its counts."""
    real_preadv, read_here = os.preadv, []

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        if threading.current_thread().name == "modelxform-sha256":
            read_here.append(max(got, 0))
        return got
    return preadv, read_here


@settings(max_examples=80, deadline=None)
@given(case=_reads())
def test_a_digest_hashes_what_a_reader_offers_and_reads_the_rest_itself(case):
    """Whatever the reader offers, skips or leaves unread, and however far the digest's thread got
    before the ranges were shared: the digest is the file's sha256; bytes offered are hashed before
    the reader is told it may change them (here it scribbles over them at once); and a digest begun
    after sharing, every piece offered, reads only what lies outside the shared ranges."""
    import hashlib
    import tempfile
    size, ranges, pieces, stop_after, started_before, seed = case
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    real_preadv, real_chunk = os.preadv, digests._CHUNK
    preadv, read_here = _reads_by_the_digest()
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        os.preadv, digests._CHUNK = preadv, 7  # (small pieces: the thread is part-way when the reader comes)
        digests.MAP_WINDOWS = False  # (the reading path: no lease, no maps)
        try:
            digest = digests.FileDigest(os.open(fh.name, os.O_RDONLY), owned=True)
            if started_before:
                digest.start()
            shared = digest.share(ranges)
            if not started_before:
                digest.start()
            held = []  # (offer, buffer): each is waited for once the next piece is read, then scribbled over
            try:
                for i, (start, stop, offered) in enumerate(pieces):
                    if stop_after is not None and i == stop_after:
                        break
                    buffer = bytearray(data[start:stop])
                    held.append((digest.offer(start, buffer) if offered else None, buffer))
                    if len(held) > 1:
                        offer, previous = held.pop(0)
                        if offer is not None:
                            offer.wait()
                        previous[:] = bytes(len(previous))
                else:  # read to the end: the last piece is waited for too, as the changes do
                    for offer, _ in held:
                        if offer is not None:
                            offer.wait()
            finally:
                digest.withdraw()
            for _, buffer in held:
                buffer[:] = bytes(len(buffer))
            assert digest.result() == hashlib.sha256(data).hexdigest()
        finally:
            os.preadv, digests._CHUNK, digests.MAP_WINDOWS = real_preadv, real_chunk, True
    if not started_before:  # (begun before, the thread may have hashed the whole file already)
        assert shared == any(stop > start for start, stop in ranges)
    if not started_before and stop_after is None and all(offered for *_, offered in pieces):
        assert sum(read_here) == size - sum(stop - start for start, stop in ranges)


def _gated_digests(monkeypatch):
    """Digests whose thread begins hashing only once a reader shares its ranges (or after 30 s), each
    offer hashed slowly (so that the reader waits for it), and what their threads read themselves."""
    made = []
    real_run, real_share, real_next = digests.FileDigest.run, digests.FileDigest.share, digests.FileDigest._next
    preadv, read_here = _reads_by_the_digest()
    gate = threading.Event()

    def run(self):
        made.append(self)
        gate.wait(30)
        real_run(self)

    def share(self, ranges):
        shared = real_share(self, ranges)
        gate.set()
        return shared

    def next_(self):
        offer, limit = real_next(self)
        if offer is not None:
            self._lock.release()  # (as the hashing does, outside the lock)
            try:
                time.sleep(0.002)
            finally:
                self._lock.acquire()
        return offer, limit
    monkeypatch.setattr(digests.FileDigest, "run", run)
    monkeypatch.setattr(digests.FileDigest, "share", share)
    monkeypatch.setattr(digests.FileDigest, "_next", next_)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(digests, "MAP_WINDOWS", False)  # (the reading path, where no lease is granted)
    return made, read_here


@pytest.mark.parametrize("edit", ["scale kernel 0.5", "set kernel to ones\nadd noise normal(stddev=0.1) to kernel", "prune kernel 30%\nscale kernel 0.5"])
def test_a_weight_only_edit_hashes_its_input_from_the_blocks_it_reads(big_model, tmp_path, monkeypatch, edit):
    """The arrays a weight-only edit changes are read once: the input's digest hashes them from the
    blocks they were read into, before they change, and reads only the rest of the file. The record's
    digest is the file's; the output is the same, byte for byte, as when the digest reads the whole
    file itself; and no block changes while it is written (one buffer more takes turns)."""
    from modelxform.keras_io import archive as archive_module
    monkeypatch.setenv(digests.ENV_OFF, "0")
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 64 << 10)  # (many blocks, in turn in four buffers)
    recipe = tmp_path / "edit.recipe"  # (values changed as read; arrays assigned whole, then changed; ranked)
    recipe.write_text(f'recipe "edit" version "1"\nselect where type=Dense\n{edit}\n')
    with monkeypatch.context() as m:
        m.setattr(digests.FileDigest, "share", lambda self, ranges: False)
        _apply(recipe, big_model, tmp_path / "alone.keras")
    made, read_here = _gated_digests(monkeypatch)
    real_write, changed = archive_module.write_all, []

    def slow_write(fd, data, offset):  # (the blocks after it are read, hashed and changed meanwhile)
        before = bytes(data)
        time.sleep(0.002)
        if bytes(data) != before:
            changed.append(offset)
        real_write(fd, data, offset)
    monkeypatch.setattr(archive_module, "write_all", slow_write)
    _apply(recipe, big_model, tmp_path / "shared.keras")
    assert not changed, f"blocks changed while written at {changed[:5]}"
    assert len(made) == 1 and not made[0].is_alive()
    assert read_provenance(tmp_path / "shared.keras")["chain"][-1]["input_sha256"] == sha256_file(big_model)
    assert (tmp_path / "shared.keras").read_bytes() == (tmp_path / "alone.keras").read_bytes()
    kernels = (700 * 700 + 700 * 4) * 4  # the arrays scaled: read once, by the edit
    assert sum(read_here) == os.path.getsize(big_model) - kernels


def test_a_weight_only_edit_that_fails_part_way_leaves_the_digest_to_read_the_rest(big_model, tmp_path, monkeypatch):
    """A write that fails after a few blocks: the edit reports it and writes nothing, and the digest's
    thread does not wait for blocks that will not come: it reads them itself and ends."""
    from modelxform.errors import ModelxformError
    from modelxform.keras_io import archive as archive_module
    monkeypatch.setenv(digests.ENV_OFF, "0")
    monkeypatch.setattr(archive_module, "BLOCK_BYTES", 64 << 10)
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    made, _ = _gated_digests(monkeypatch)
    real_write, written = archive_module.write_all, []

    def failing_write(fd, data, offset):
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(offset)
        real_write(fd, data, offset)
    monkeypatch.setattr(archive_module, "write_all", failing_write)
    with pytest.raises((OSError, ModelxformError), match="No space left on device"):
        _apply(recipe, big_model, tmp_path / "out.keras")
    assert not (tmp_path / "out.keras").exists() and len(made) == 1
    made[0].join(30)
    assert not made[0].is_alive() and made[0].result() == sha256_file(big_model)


# -- a digest that hashes from memory maps under a read lease (digests._Lease) ----------------------

def _leases_here(tmp_path) -> bool:
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"x" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        lease = digests._Lease.take(fd)
        if lease is not None:
            lease.release()
        return lease is not None
    finally:
        os.close(fd)


@pytest.fixture
def leased_file(tmp_path, monkeypatch):
    """A file of 64 windows of 64 KiB, random bytes; skipped where the system grants no read lease."""
    if not _leases_here(tmp_path):
        pytest.skip("no read leases on this system (F_SETLEASE): digests read with preadv there")
    monkeypatch.setattr(digests, "_WINDOW", 64 << 10)
    path = tmp_path / "leased.bin"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 64 << 16, dtype=np.uint8).tobytes())
    return path


def _slow_windows(monkeypatch, pause: float, stall_at: int | None = None):
    """Each window of a leased digest hashed after ``pause`` seconds; the windows looked at so far.
    With ``stall_at``, the look at that window (counted from 1) waits, up to a minute, until somebody
    else wants the file (the lease no longer held), so that another process, however slowly it
    starts on a loaded machine, comes while the digest is at that window."""
    seen = []
    real_held = digests._Lease.held

    def held(self):
        seen.append(time.perf_counter())
        time.sleep(pause)
        if len(seen) == stall_at:
            deadline = time.monotonic() + 60
            while real_held(self) and time.monotonic() < deadline:
                time.sleep(0.005)
        return real_held(self)
    monkeypatch.setattr(digests._Lease, "held", held)
    return seen


def _hashing_part_way(path, monkeypatch):
    """A digest of ``path`` begun, which has hashed eight of its 64 windows and then waits, at the
    ninth, for another process to want the file; and its looks (_slow_windows)."""
    seen = _slow_windows(monkeypatch, 0.0, stall_at=9)
    digest = digests.FileDigest(os.open(path, os.O_RDONLY), owned=True)
    digest.start()
    while len(seen) < 9:
        time.sleep(0.005)
    return digest, seen


def test_a_digest_under_a_read_lease_hashes_from_maps_and_reads_nothing(leased_file, monkeypatch):
    """Under a read lease the digest hashes the file from memory maps: the same sha256, nothing read
    with preadv, no offers taken (share says no), and the lease given back at the end (a writer can
    then open the file at once)."""
    import hashlib
    preadv, read_here = _reads_by_the_digest()
    monkeypatch.setattr(os, "preadv", preadv)
    digest = digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)
    assert digest._lease is not None and digest.share([(0, 100)]) is False
    digest.start()
    assert digest.result() == hashlib.sha256(leased_file.read_bytes()).hexdigest()
    assert sum(read_here) == 0  # (one read at the end finds the end of the file)
    fd = os.open(leased_file, os.O_RDONLY)
    try:  # (a read lease is granted again: this digest's was given back, and no writer is left)
        lease = digests._Lease.take(fd)
        assert lease is not None
        lease.release()
    finally:
        os.close(fd)


def test_a_writer_waits_for_one_window_then_the_digest_reads_the_rest(leased_file, monkeypatch):
    """A process that opens the file to write it while the digest hashes from maps: the digest gives
    the lease back at the next window (the writer waits a window, not the whole hash, nor the 45 s
    the kernel would allow), reads the rest with preadv, and its sha256 is still the file's."""
    import hashlib
    import subprocess
    import sys
    preadv, read_here = _reads_by_the_digest()
    monkeypatch.setattr(os, "preadv", preadv)
    digest, seen = _hashing_part_way(leased_file, monkeypatch)
    writer = subprocess.run([sys.executable, "-c", "import os, sys, time\nt = time.perf_counter()\n"
                             "os.close(os.open(sys.argv[1], os.O_WRONLY))\nprint(time.perf_counter() - t)",
                             str(leased_file)], capture_output=True, text=True, timeout=60)
    waited = float(writer.stdout)
    assert digest.result() == hashlib.sha256(leased_file.read_bytes()).hexdigest()
    assert len(seen) == 9  # (the ninth look found the lease being broken: eight windows from maps)
    assert sum(read_here) == leased_file.stat().st_size - 8 * digests._WINDOW
    assert waited < 1.0


def test_a_truncation_under_the_lease_waits_and_the_digest_does_not_crash(leased_file, monkeypatch):
    """A file truncated by another process while the digest hashes it from maps would kill a reader
    that touched a page past the new end (SIGBUS: this test's process). The truncation waits for the
    lease instead; the digest ends with what is left, and says it no longer holds for the file."""
    import subprocess
    import sys
    digest, _ = _hashing_part_way(leased_file, monkeypatch)
    subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 4096)", str(leased_file)],
                   check=True, timeout=60)
    assert len(digest.result()) == 64  # (the bytes it got to: not the file's, which changed)
    assert leased_file.stat().st_size == 4096 and not digest.holds(os.stat(leased_file))


def test_no_lease_is_taken_while_a_writer_has_the_file_open(leased_file, monkeypatch):
    """A file open for writing somewhere is read with preadv (the lease would be refused), and the
    digest is the same."""
    import hashlib
    preadv, read_here = _reads_by_the_digest()
    monkeypatch.setattr(os, "preadv", preadv)
    writer = os.open(leased_file, os.O_WRONLY)
    try:
        digest = digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)
        assert digest._lease is None
        digest.start()
        assert digest.result() == hashlib.sha256(leased_file.read_bytes()).hexdigest()
    finally:
        os.close(writer)
    assert sum(read_here) == leased_file.stat().st_size


def test_a_weight_only_edit_is_the_same_whether_its_digest_maps_or_reads(big_model, tmp_path, monkeypatch):
    """The output of a weight-only edit, byte for byte, and its record's input digest, are the same
    whether the digest hashes from maps under a lease or reads the file (and hashes offered blocks)."""
    if not _leases_here(tmp_path):
        pytest.skip("no read leases on this system (F_SETLEASE)")
    monkeypatch.setenv(digests.ENV_OFF, "0")
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    leases = []
    real_take = digests._Lease.take

    def take(fd):
        lease = real_take(fd)
        leases.append(lease)
        return lease
    monkeypatch.setattr(digests._Lease, "take", take)
    _apply(recipe, big_model, tmp_path / "mapped.keras")
    assert leases and all(lease is not None for lease in leases)
    monkeypatch.setattr(digests, "MAP_WINDOWS", False)
    _apply(recipe, big_model, tmp_path / "read.keras")
    assert (tmp_path / "mapped.keras").read_bytes() == (tmp_path / "read.keras").read_bytes()
    assert read_provenance(tmp_path / "mapped.keras")["chain"][-1]["input_sha256"] == sha256_file(big_model)


_SUSPENDED = r"""
import mmap, signal, sys, time
from modelxform.keras_io import digests

signal.signal(signal.SIGTSTP, signal.SIG_DFL)  # (as under a terminal, whatever the test runner left)

class SlowClose(mmap.mmap):  # (a window stays mapped 20 ms: a stop would land in one)
    def close(self):
        time.sleep(0.02)
        super().close()
mmap.mmap = SlowClose
digests._WINDOW = 64 << 10
digest = digests.begin(sys.argv[1])
print("lease" if digest._lease is not None else "no lease", flush=True)
print(digest.result(), flush=True)
"""


def test_ctrl_z_stops_the_process_with_no_window_mapped(leased_file):
    """Ctrl-Z (SIGTSTP) while a digest hashes from maps: the process stops only once its window is
    closed, so that nothing is mapped while it is stopped (a lease holds writers back for 45 s at
    most: a file truncated meanwhile would kill it when it went on); after SIGCONT it finishes."""
    import hashlib
    import signal
    import subprocess
    import sys
    # (a process group of its own under this one's session: a stop signal sent to an orphaned group,
    # as a process started by a test runner's worker may be in, is discarded by the kernel)
    proc = subprocess.Popen([sys.executable, "-c", _SUSPENDED, str(leased_file)], stdout=subprocess.PIPE, text=True,
                            process_group=0)
    try:
        assert proc.stdout.readline().strip() == "lease"
        time.sleep(0.3)  # (windows mapped, one after the other)
        proc.send_signal(signal.SIGTSTP)
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/stat").read().split(")")[-1].split()[0] != "T":
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.005)
        maps = open(f"/proc/{proc.pid}/maps").read()
        assert str(leased_file) not in maps
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == hashlib.sha256(leased_file.read_bytes()).hexdigest()



def test_nothing_is_mapped_where_ctrl_z_could_stop_a_map_open(leased_file):
    """Files are mapped only while modelxform's SIGTSTP handler is in place: a digest begun outside the
    main thread before it is (no handler can be installed there), or where the process handles SIGTSTP
    itself, takes no lease and maps nothing: it reads, to the same sha256."""
    import hashlib
    import signal
    expected = hashlib.sha256(leased_file.read_bytes()).hexdigest()
    previous = signal.signal(signal.SIGTSTP, signal.SIG_DFL)  # (as before any digest of this process)
    try:
        made = []
        worker = threading.Thread(target=lambda: made.append(
            digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)))
        worker.start()
        worker.join()
        assert made[0]._lease is None
        made[0].start()
        assert made[0].result() == expected
        signal.signal(signal.SIGTSTP, lambda *a: None)  # (the process's own handler)
        digest = digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)
        assert digest._lease is None
        digest.start()
        assert digest.result() == expected
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)  # (and in the main thread, with the default, it maps)
        digest = digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)
        assert digest._lease is not None and signal.getsignal(signal.SIGTSTP) is digests._on_suspend
        digest.start()
        assert digest.result() == expected
        signal.signal(signal.SIGTSTP, signal.SIG_IGN)  # (ignored: nothing can stop it, so it maps, any thread)
        made = []
        worker = threading.Thread(target=lambda: made.append(
            digests.FileDigest(os.open(leased_file, os.O_RDONLY), owned=True)))
        worker.start()
        worker.join()
        assert made[0]._lease is not None and signal.getsignal(signal.SIGTSTP) is signal.SIG_IGN
        made[0].start()
        assert made[0].result() == expected
    finally:
        signal.signal(signal.SIGTSTP, previous)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a system that sets CPU affinity, and two CPUs")
def test_a_running_digest_and_the_edit_keep_to_different_cpus_on_two(tmp_path, monkeypatch):
    """FileDigest.apart: where the process may run on exactly two CPUs, the digest's thread keeps to one
    and the calling thread, with the threads it starts in the block, to the other; both get their CPUs
    back after. On any other number of CPUs, and for a digest that is not running, nothing changes."""
    monkeypatch.setattr(digests, "MAP_WINDOWS", False)  # (read in pieces: slow enough to be caught running)
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes())
    whole = set(os.sched_getaffinity(0))
    two = set(sorted(whole)[:2])
    os.sched_setaffinity(0, two)  # (threads started from here on inherit it)
    try:
        slow = digests.os.preadv

        def preadv(fd, buffers, offset):  # a digest that takes a while (four pieces: 0.2 s)
            time.sleep(0.05)
            return slow(fd, buffers, offset)
        monkeypatch.setattr(digests.os, "preadv", preadv)
        digest = digests.FileDigest(os.open(path, os.O_RDONLY), owned=True)
        digest.start()
        seen = {}
        with digest.apart():
            started = threading.Thread(target=lambda: seen.setdefault("started", set(os.sched_getaffinity(0))))
            started.start()
            started.join()
            seen["digest"] = set(os.sched_getaffinity(digest.native_id))
            seen["caller"] = set(os.sched_getaffinity(0))
        assert seen["digest"] == {max(two)} and seen["caller"] == seen["started"] == two - {max(two)}
        assert set(os.sched_getaffinity(digest.native_id)) == two and set(os.sched_getaffinity(0)) == two
        assert digest.result() == sha256_file(path)
        with digest.apart():  # (done: nothing to keep apart)
            assert set(os.sched_getaffinity(0)) == two
        if len(whole) > 2:  # more than two CPUs: nothing changes
            os.sched_setaffinity(0, whole)
            other = digests.FileDigest(os.open(path, os.O_RDONLY), owned=True)
            other.start()
            with other.apart():
                assert set(os.sched_getaffinity(0)) == whole
                assert set(os.sched_getaffinity(other.native_id)) == whole
            other.result()
    finally:
        os.sched_setaffinity(0, whole)


def test_verify_hashes_the_original_beside_the_first_step_and_leaves_the_cache_alone(cache, big_model, tmp_path):
    """verify hashes the original in a thread beside the re-making of the first step: every byte read,
    no entry of the digest cache used or written; an original the recipes cannot even be applied to is
    still reported as not the recorded input (one difference), not as the recipe's error."""
    from modelxform.session import verify_file
    recipe = tmp_path / "half.recipe"
    recipe.write_text(RECIPE)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(digests.ENV_OFF, "0")  # (apply here keeps no entry either: the cache stays empty)
    try:
        _apply(recipe, big_model, tmp_path / "out.keras")
    finally:
        monkeypatch.undo()
    assert not cache.exists() or list(cache.iterdir()) == []
    differences, notes = verify_file(tmp_path / "out.keras", big_model)
    assert differences == [] and notes[-1].endswith("identical")
    assert not cache.exists() or list(cache.iterdir()) == []  # (verify wrote none)

    other = tmp_path / "other.keras"  # another architecture: no layer is a Dense
    keras.Sequential([keras.Input((700,)), keras.layers.Reshape((700, 1), name="r")]).save(other)
    strict = tmp_path / "strict.recipe"
    strict.write_text('recipe "strict" version "1"\nselect where type=Dense\nassert count == 2\nscale kernel 0.5\n')
    _apply(strict, big_model, tmp_path / "strict.keras")
    differences, notes = verify_file(tmp_path / "strict.keras", other)
    assert differences == [f"{other} is not the file this model was made from: its sha256 is "
                           f"{sha256_file(other)}, the record says {sha256_file(big_model)}"]
