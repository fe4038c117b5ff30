"""The sha256 of large inputs kept between runs (keras_io/digests.py): a model is hashed once, the
record made from a remembered digest is the same, and nothing changed since is ever taken for the
file it was."""
from __future__ import annotations

import json
import os
import threading

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
