"""Model files that are damaged or not what their name says, found by an audit of hostile inputs: each
is one line naming the cause with its documented exit status, or, where Keras reads the file, the
result Keras's reading gives."""
from __future__ import annotations

import json
import struct
import zipfile

import h5py
import numpy as np
import pytest

from conftest import run_cli

HEADER = 'recipe "t" version "1.0.0"\n'


def only_error_line(err: str, message: str) -> None:
    assert err.strip().splitlines() == [message], err


def rewrite(src, dst, change_weights=None, flag_member=None):
    """A copy of the .keras archive ``src`` at ``dst``, with model.weights.h5 changed by
    ``change_weights(h5file)`` and/or the zip's "encrypted" flag set on the member ``flag_member``."""
    with zipfile.ZipFile(src) as zf:
        members = [(info, zf.read(info.filename)) for info in zf.infolist()]
    with zipfile.ZipFile(dst, "w") as zf:
        for info, data in members:
            if info.filename == "model.weights.h5" and change_weights is not None:
                tmp = dst.with_suffix(".h5tmp")
                tmp.write_bytes(data)
                with h5py.File(tmp, "r+") as f:
                    change_weights(f)
                data = tmp.read_bytes()
                tmp.unlink()
            zf.writestr(zipfile.ZipInfo(info.filename, info.date_time), data)
    if flag_member is not None:
        raw = bytearray(dst.read_bytes())
        for signature, name_at, flag_at, length_at in ((b"PK\x03\x04", 30, 6, 26), (b"PK\x01\x02", 46, 8, 28)):
            at = raw.find(signature)
            while at >= 0:
                length = struct.unpack_from("<H", raw, at + length_at)[0]
                if bytes(raw[at + name_at:at + name_at + length]) == flag_member.encode():
                    struct.pack_into("<H", raw, at + flag_at, 1)
                at = raw.find(signature, at + 4)
        dst.write_bytes(bytes(raw))
    return dst


def test_an_encrypted_member_is_one_line_not_a_traceback(tmp_path, model_file):
    model = model_file("cnn")
    bad = rewrite(model, tmp_path / "encrypted.keras", flag_member="config.json")
    recipe = tmp_path / "r.recipe"
    recipe.write_text(HEADER + "select where type=Dense; scale kernel 0.5\n")
    message = (f"error: {bad}: config.json is encrypted in the archive; Keras writes no encrypted members "
               "(a damaged or hostile archive)")
    for argv in (["inspect", bad], ["apply", recipe, bad, "-o", tmp_path / "out.keras"], ["diff", model, bad],
                 ["provenance", bad]):  # (a RuntimeError asking for a password; provenance: "no record", exit 2)
        r = run_cli(*argv)
        assert r.status == 3, argv
        only_error_line(r.err, message)
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("suffix,message", [
    (".keras", "not a .keras archive (a .keras file is a zip)"),
    (".h5", "not a readable HDF5 file (Unable to synchronously open file (file signature not found))"),
])
def test_provenance_and_verify_of_a_file_that_is_no_model_say_so(tmp_path, model_file, suffix, message):
    model = model_file("cnn")
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"hello\n" * 10)
    for argv in (["provenance", junk], ["provenance", junk, "--json"], ["verify", junk, "--input", model]):
        r = run_cli(*argv)  # (was: "has no modelxform provenance record", exit 2)
        assert (r.status, r.out) == (3, ""), argv
        only_error_line(r.err, f"error: {junk}: {message}")
    r = run_cli("provenance", model)  # a model without a record: exit 2, as documented
    assert r.status == 2
    only_error_line(r.err, f"error: {model}: has no modelxform provenance record")


def test_a_recipe_with_an_unused_parameter_verifies(tmp_path, model_file):
    model = model_file("cnn")
    recipe = tmp_path / "u.recipe"
    recipe.write_text(HEADER + "param unused = 1\nparam f = 0.5\nselect where type=Dense\nscale kernel $f\n")
    out = tmp_path / "out.keras"
    assert run_cli("apply", recipe, model, "-o", out, "--param", "f=0.25").status == 0
    r = run_cli("verify", out, "--input", model)  # (was exit 2: the record's `unused` given as --param)
    assert r.status == 0, r.err
    assert r.out.splitlines()[-1] == f"{out}: verified"
    r = run_cli("apply", recipe, model, "-o", tmp_path / "x.keras", "--param", "unused=2")
    assert r.status == 2  # giving it is still refused
    only_error_line(r.err, "error: parameter 'unused' (--param unused=…) is declared but never used by the recipe")


@pytest.mark.parametrize("stored", ["int32", "float64"])
def test_weights_stored_in_another_dtype_are_edited_as_keras_loads_them(tmp_path, model_file, stored):
    """The config makes dense_2's kernel float32; the file stores it as int32 (or float64), which Keras
    casts when it loads. A weight-only edit computed in the stored dtype wrote 0 for 1 × 0.5, as int32."""
    import keras

    model = model_file("cnn")

    def ones(f):
        del f["layers/dense_1/vars/0"]  # (the second Dense layer's group: dense_2's kernel)
        f.create_dataset("layers/dense_1/vars/0", data=np.ones((32, 16), stored))
    odd = rewrite(model, tmp_path / f"{stored}.keras", change_weights=ones)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(HEADER + "select where type=Dense; scale kernel 0.5\n")
    out = tmp_path / "out.keras"
    r = run_cli("apply", recipe, odd, "-o", out)
    assert r.status == 0, r.err
    before, after = keras.saving.load_model(odd), keras.saving.load_model(out)
    kernel = after.get_layer("dense_2").kernel
    assert kernel.dtype == "float32"
    assert np.array_equal(kernel.numpy(), np.full((32, 16), 0.5, np.float32))
    for name in ("dense_1", "dense_3"):  # the others as Keras computes them
        assert np.array_equal(after.get_layer(name).kernel.numpy(), before.get_layer(name).kernel.numpy() * 0.5)
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("config.json"))["config"]["layers"]  # a model Keras wrote


def test_a_kernel_stored_as_keras_stores_it_still_takes_the_archive_path(tmp_path, model_file):
    """The dtype check sends only a mismatch to Keras: the sample model is edited without it."""
    from modelxform.keras_io.archive import Archive, NotApplicable
    model = model_file("cnn")
    with Archive(model) as archive:
        assert [v.dtype for info in archive.layers for v in info.layer.weights] == ["float32"] * 10

    def ones(f):
        del f["layers/dense_1/vars/0"]
        f.create_dataset("layers/dense_1/vars/0", data=np.ones((32, 16), "int32"))
    with pytest.raises(NotApplicable, match="dense_2: kernel is stored as int32, the config makes it float32"):
        Archive(rewrite(model, tmp_path / "int32.keras", change_weights=ones))


def damaged_in_a_kernel(src, dst):
    """``src`` with one byte of dense_2's kernel flipped inside the stored weights member, the CRC-32
    the zip's headers record left as it was: a damaged file, which Keras refuses to load."""
    import io
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.weights.h5")
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    with h5py.File(io.BytesIO(bytes(data[start:start + info.file_size])), "r") as f:
        at = f["layers/dense_1/vars/0"].id.get_offset()
    data[start + at + 3] ^= 0x40  # (the high byte of kernel[0, 0])
    dst.write_bytes(bytes(data))
    with zipfile.ZipFile(dst) as zf:
        assert zf.testzip() == "model.weights.h5"
    return dst


@pytest.mark.parametrize("output", ["out.keras", "out.h5"])
def test_a_structural_edit_of_a_damaged_archive_writes_nothing(tmp_path, model_file, output):
    """The kept arrays are copied from where they lie in the input, not through zipfile: a flipped byte
    reached the output under a fresh, valid CRC-32 (and a kernel value of 1e38)."""
    damaged = damaged_in_a_kernel(model_file("cnn"), tmp_path / "damaged.keras")
    before = damaged.read_bytes()
    recipe = tmp_path / "s.recipe"
    recipe.write_text(HEADER + "insert Dropout(rate=0.1) before dense_2\n")
    r = run_cli("apply", recipe, damaged, "-o", tmp_path / output)
    assert r.status == 3
    with zipfile.ZipFile(damaged) as zf:
        recorded = zf.getinfo("model.weights.h5").CRC
    assert r.err.startswith(f"error: {damaged}: model.weights.h5 is damaged: its bytes' CRC-32 is ")
    assert r.err.strip().endswith(f"the archive records {recorded:08x} (Keras refuses to load it)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.keras", "damaged.keras", "s.recipe"]
    assert damaged.read_bytes() == before


def test_a_weight_only_edit_of_a_damaged_archive_keeps_the_damage_detectable(tmp_path, model_file):
    """On the archive, untouched bytes are copied and the output's CRC-32 is worked out from the
    input's (streams.EditedCrc): the output is as damaged as the input, and says so to any reader."""
    damaged = damaged_in_a_kernel(model_file("cnn"), tmp_path / "damaged.keras")
    recipe = tmp_path / "w.recipe"
    recipe.write_text(HEADER + "select dense_3; scale kernel 0.5\n")
    assert run_cli("apply", recipe, damaged, "-o", tmp_path / "out.keras").status == 0
    with zipfile.ZipFile(tmp_path / "out.keras") as zf:
        assert zf.testzip() == "model.weights.h5"


def test_verify_says_when_only_the_records_writing_differs(tmp_path, model_file):
    """A record written again with the same data (indented, here) is not a difference of backend, which
    is what verify said."""
    model = model_file("cnn")
    recipe = tmp_path / "r.recipe"
    recipe.write_text(HEADER + "select where type=Dense; scale kernel 0.5\n")
    out = tmp_path / "out.keras"
    assert run_cli("apply", recipe, model, "-o", out).status == 0
    rewritten = tmp_path / "rewritten.keras"
    with zipfile.ZipFile(out) as zf, zipfile.ZipFile(rewritten, "w") as dst:
        for info in zf.infolist():
            data = zf.read(info.filename)
            if info.filename == "modelxform.json":
                data = json.dumps(json.loads(data), indent=2).encode()
            dst.writestr(zipfile.ZipInfo(info.filename, info.date_time), data)
    r = run_cli("verify", rewritten, "--input", model)
    assert r.status == 0, r.err
    assert ("the re-made file differs only in how its provenance record is written (the same data: the record "
            "was written again by something else than modelxform)") in r.out.splitlines()
    assert "Keras backend" not in r.out


def test_a_config_that_makes_a_variable_larger_than_memory_is_refused_at_once(tmp_path, model_file):
    """Keras would create the variable before finding that the file holds another shape, and fail after
    17 s with TensorFlow's out-of-memory message."""
    import time
    model = model_file("cnn")
    with zipfile.ZipFile(model) as zf:
        members = [(info, zf.read(info.filename)) for info in zf.infolist()]
    huge = tmp_path / "huge.keras"
    with zipfile.ZipFile(huge, "w") as zf:
        for info, data in members:
            if info.filename == "config.json":
                config = json.loads(data)
                next(l for l in config["config"]["layers"] if l["config"]["name"] == "dense_2")["config"]["units"] = \
                    100_000_000_000
                data = json.dumps(config).encode()
            zf.writestr(zipfile.ZipInfo(info.filename, info.date_time), data)
    recipe = tmp_path / "r.recipe"
    recipe.write_text(HEADER + "select where type=Dense; scale kernel 0.5\n")
    for argv in (["apply", recipe, huge, "-o", tmp_path / "out.keras"], ["inspect", huge]):
        start = time.monotonic()
        r = run_cli(*argv)
        assert r.status == 3, argv
        assert r.err.startswith(f"error: {huge}: the config makes the kernel of layer 'dense_2' (32, 100000000000), "
                                "12.8 TB, more than this machine's memory (")
        assert r.err.strip().endswith("); the file holds (32, 16)")
        assert time.monotonic() - start < 5
    assert not (tmp_path / "out.keras").exists()
