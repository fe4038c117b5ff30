"""`modelxform diff` (modelxform/diff.py) and the extended `inspect`, on real Keras models.

Each diff test makes B from A in one known way (by hand through Keras, or with `apply`), then checks
that exactly that difference is reported, with numbers computed here independently of modelxform.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import FACTORIES, make_cnn, make_nested, make_shared, run_cli

keras = pytest.importorskip("keras")

from modelxform import diff as diff_module  # noqa: E402
from modelxform.diff import compare_weights, diff, snapshot  # noqa: E402
from modelxform.keras_io.files import load_model, save_model  # noqa: E402


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("diff") / "cnn.keras"
    save_model(make_cnn(), path)
    return path


def applied(tmp_path, cnn_path, text, name="b.keras"):
    recipe = write(tmp_path / "r.recipe", text)
    out = tmp_path / name
    r = run_cli("apply", recipe, cnn_path, "-o", out, "--seed", "1")
    assert r.status == 0, r.err
    return out


def diff_json(a, b):
    r = run_cli("diff", a, b, "--json")
    assert r.err == "", r.err
    return r.status, json.loads(r.out)


def assert_only(data, **expected):
    """Every list of the diff is empty except those named, which must equal the given values."""
    for key in ("added", "removed", "replaced", "renamed", "changed"):
        assert data[key] == expected.get(key, []), (key, data[key])
    for key in ("inputs", "outputs"):
        assert data[key] == expected.get(key), (key, data[key])


# ---- same ------------------------------------------------------------------------------------------

def test_bit_identical_copy_is_the_same(tmp_path, cnn_path):
    copy = tmp_path / "copy.keras"
    shutil.copyfile(cnn_path, copy)
    r = run_cli("diff", cnn_path, copy)
    assert r.status == 0, r.out + r.err
    assert "the models are the same" in r.out
    status, data = diff_json(cnn_path, copy)
    assert status == 0 and data["same"] is True
    assert_only(data)


def test_resaved_model_is_the_same(tmp_path, cnn_path):
    # another file (other bytes: h5 instead of keras) holding the same model
    other = tmp_path / "again.h5"
    save_model(load_model(cnn_path), other)
    status, data = diff_json(cnn_path, other)
    assert status == 0 and data["same"], data


# ---- weights ---------------------------------------------------------------------------------------

def test_one_scaled_kernel_is_exactly_what_is_reported(tmp_path, cnn_path):
    model = load_model(cnn_path)
    layer = model.get_layer("dense_2")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * np.float32(1.7), bias])
    b = tmp_path / "scaled.keras"
    save_model(model, b)

    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert [c["path"] for c in data["changed"]] == ["dense_2"]
    change = data["changed"][0]
    assert change["config"] == {} and change["trainable"] is None and change["inputs"] is None
    assert [w["name"] for w in change["weights"]] == ["kernel"]
    # the numbers, computed here from the two files as Keras loads them
    ka = keras.saving.load_model(cnn_path).get_layer("dense_2").get_weights()[0].astype(np.float64)
    kb = keras.saving.load_model(b).get_layer("dense_2").get_weights()[0].astype(np.float64)
    w = change["weights"][0]
    assert w["shape"] == [list(ka.shape), list(kb.shape)] == [[32, 16], [32, 16]]
    assert w["max_abs_diff"] == pytest.approx(float(np.abs(kb - ka).max()), rel=1e-12)
    assert w["relative_l2"] == pytest.approx(float(np.sqrt(((kb - ka) ** 2).sum() / (ka ** 2).sum())), rel=1e-9)
    assert w["relative_l2"] == pytest.approx(0.7, rel=1e-5)  # scaling by 1.7 moves it by 70%
    assert_only(data, changed=data["changed"])
    assert data["counts"]["weights changed"] == 1

    text = run_cli("diff", cnn_path, b)
    assert text.status == 1
    assert "changed   dense_2 (Dense)" in text.out
    assert f"kernel (32, 16): max |diff| {w['max_abs_diff']:.4g}, relative L2 0.7" in text.out
    assert "bias" not in text.out
    assert "differ: 1 weights changed" in text.out


def test_a_bias_that_was_zero_says_so(tmp_path, cnn_path):
    zeroed = applied(tmp_path, cnn_path, "select dense_1\nset bias to zeros\n", name="zeroed.keras")
    r = run_cli("diff", zeroed, cnn_path)
    assert r.status == 1, r.err
    bias = keras.saving.load_model(cnn_path).get_layer("dense_1").get_weights()[1]
    assert f"bias (32,): max |diff| {float(np.abs(bias).max()):.4g}, was all zeros" in r.out
    assert "inf" not in r.out
    # the other way round the change is relative to the bias that was not zero
    back = run_cli("diff", cnn_path, zeroed)
    assert "bias (32,): max |diff|" in back.out and "relative L2 1" in back.out


def test_compare_weights_numbers():
    a = np.array([[1.0, -2.0], [0.0, 4.0]], dtype=np.float32)
    b = np.array([[1.0, -2.5], [0.0, 4.0]], dtype=np.float32)
    (w,) = compare_weights("x", [("kernel", a)], [("kernel", b)])
    assert w.max_abs_diff == 0.5
    assert w.relative_l2 == pytest.approx(0.5 / np.sqrt(1 + 4 + 16))
    assert compare_weights("x", [("kernel", a)], [("kernel", a.copy())]) == []
    (z,) = compare_weights("x", [("bias", np.zeros(3, np.float32))], [("bias", np.ones(3, np.float32))])
    assert z.max_abs_diff == 1.0 and z.relative_l2 == float("inf")
    assert z.text() == "bias (3,): max |diff| 1, was all zeros"  # not "relative L2 inf"
    assert z.to_dict()["relative_l2"] == "inf"
    (s,) = compare_weights("x", [("kernel", a)], [("kernel", np.zeros((3, 2), np.float32))])
    assert (s.shape_a, s.shape_b, s.max_abs_diff) == ((2, 2), (3, 2), None)
    assert "shape (2, 2) -> (3, 2)" in s.text()


# ---- structure ---------------------------------------------------------------------------------------

def test_replaced_pool_type(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, "replace MaxPooling2D with AveragePooling2D\n")
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert_only(data, replaced=[{"path": "max_pooling2d", "from": "MaxPooling2D", "to": "AveragePooling2D"}])
    r = run_cli("diff", cnn_path, b)
    assert "replaced  max_pooling2d: MaxPooling2D -> AveragePooling2D" in r.out


def test_frozen_layer(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, "select dense_1\nfreeze\n")
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert_only(data, changed=[{"path": "dense_1", "type": "Dense", "weights": [], "config": {},
                                "trainable": [True, False], "inputs": None}])
    assert data["counts"]["trainable changed"] == 1


def test_tap_changes_the_outputs_only(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, "tap conv2d_1\n")
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert_only(data, outputs=[[{"layer": "dense_3", "shape": "(None, 10)"}],
                               [{"layer": "dense_3", "shape": "(None, 10)"},
                                {"layer": "conv2d_1", "shape": "(None, 26, 26, 8)"}]])
    r = run_cli("diff", cnn_path, b)
    assert "outputs:  [dense_3 (None, 10)] -> [dense_3 (None, 10), conv2d_1 (None, 26, 26, 8)]" in r.out


def test_rename_is_one_renamed_layer_not_a_removal(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, 'select dense_2\nrename to "fc"\n')
    status, data = diff_json(cnn_path, b)
    assert status == 1
    # dense_3 now reads "fc": not a rewiring, since fc is dense_2 renamed
    assert_only(data, renamed=[{"from": "dense_2", "to": "fc"}])
    r = run_cli("diff", cnn_path, b)
    assert "renamed   dense_2 -> fc (Dense)" in r.out


def test_renamed_and_changed_weights_is_removed_and_added(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, 'select dense_2\nrename to "fc"\nscale weights 2\n')
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert [x["path"] for x in data["removed"]] == ["dense_2"]
    assert [x["path"] for x in data["added"]] == ["fc"]
    assert data["renamed"] == []
    # its consumer is fed by another layer now
    assert [c["path"] for c in data["changed"]] == ["dense_3"]
    assert data["changed"][0]["inputs"] == [["dense_2"], ["fc"]]


def test_removed_layer_and_rewired_consumer(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, "remove dropout\n")
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert data["removed"] == [{"path": "dropout", "type": "Dropout", "params": 0}]
    assert data["added"] == [] and data["replaced"] == [] and data["renamed"] == []
    assert [(c["path"], c["inputs"]) for c in data["changed"]] == [("dense_2", [["dropout"], ["dense_1"]])]


def test_added_layer(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, 'insert Dense(units=32, name="extra") after dense_1\n')
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert data["added"] == [{"path": "extra", "type": "Dense", "params": 32 * 32 + 32}]
    assert data["removed"] == []
    assert [(c["path"], c["inputs"]) for c in data["changed"]] == [("dropout", [["dense_1"], ["extra"]])]


def test_config_field_changed(tmp_path, cnn_path):
    b = applied(tmp_path, cnn_path, "select dropout\nset rate = 0.5\n")
    status, data = diff_json(cnn_path, b)
    assert status == 1
    assert_only(data, changed=[{"path": "dropout", "type": "Dropout", "weights": [],
                                "config": {"rate": [0.25, 0.5]}, "trainable": None, "inputs": None}])
    assert "config rate: 0.25 -> 0.5" in run_cli("diff", cnn_path, b).out


def test_inputs_changed(tmp_path):
    def model(shape):
        inp = keras.Input(shape, name="x")
        return keras.Model(inp, keras.layers.Flatten(name="flat")(inp), name="m")
    a, b = snapshot(model((4, 4))), snapshot(model((4, 5)))
    d = diff(a, b)
    assert not d.same
    assert d.inputs == ([{"name": "x", "shape": "(None, 4, 4)", "dtype": "float32"}],
                        [{"name": "x", "shape": "(None, 4, 5)", "dtype": "float32"}])


def test_nested_paths(tmp_path):
    a = make_nested()
    b = make_nested()
    layer = b.get_layer("backbone").get_layer("block").get_layer("conv_a")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias + np.float32(0.25)])
    b.get_layer("backbone").get_layer("conv1").trainable = False
    d = diff(snapshot(a), snapshot(b))
    assert [c.path for c in d.changed] == ["backbone/conv1", "backbone/block/conv_a"]
    conv1, conv_a = d.changed
    assert conv1.trainable == (True, False) and conv1.weights == []
    assert [w.name for w in conv_a.weights] == ["bias"]
    assert conv_a.weights[0].max_abs_diff == pytest.approx(0.25)
    assert conv_a.weights[0].relative_l2 == pytest.approx(0.25 * 2 / np.linalg.norm(bias), rel=1e-5)


# ---- unreadable files ---------------------------------------------------------------------------------

def test_missing_file_is_status_3(tmp_path, cnn_path):
    for a, b in [(tmp_path / "nope.keras", cnn_path), (cnn_path, tmp_path / "nope.keras")]:
        r = run_cli("diff", a, b)
        assert r.status == 3, r.err
        assert "nope.keras: no such file" in r.err
        assert r.out == "" and "Traceback" not in r.err


def test_garbage_file_is_status_3(tmp_path, cnn_path):
    bad = write(tmp_path / "bad.keras", "this is not a zip")
    r = run_cli("diff", cnn_path, bad)
    assert r.status == 3
    assert "bad.keras: not a .keras archive" in r.err


def test_help_names_the_exit_codes():
    from modelxform.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["diff"]
    text = sub.format_help()
    for line in ("0  the models are the same", "1  they differ", "3  a model file could not be read"):
        assert line in text


# ---- connectivity and inspect ----------------------------------------------------------------------

def test_snapshot_wiring_of_the_test_models():
    s = snapshot(make_shared())
    assert s.layers["shared"].calls == 2 and s.layers["shared"].inbound == ["a", "b"]
    assert s.layers["add"].inbound == ["shared"] and s.layers["add"].calls == 1
    assert s.input_names == ["a", "b"] and [o["layer"] for o in s.outputs] == ["out"]
    n = snapshot(make_nested())
    assert n.layers["backbone/conv1"].inbound == ["image"]  # through the nested model's input
    assert n.layers["backbone/block/conv_a"].inbound == ["backbone/conv1"]  # into a nested Sequential
    assert n.layers["gap"].inbound == ["backbone/pool"]  # out of the nested model
    assert [(m["path"], m["type"], m["layers"]) for m in n.submodels] == [
        ("backbone", "Functional", 4), ("backbone/block", "Sequential", 2)]
    m = snapshot(FACTORIES["multi_io"]())
    assert m.layers["concat"].inbound == ["da", "x2"]
    assert [o["layer"] for o in m.outputs] == ["out1", "out2"]


def test_shared_nested_model_marks_its_layers_shared():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="d")], name="tower")
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    out = keras.layers.Add(name="sum")([inner(a), inner(b)])
    s = snapshot(keras.Model([a, b], out))
    assert s.layers["tower/d"].calls == 2
    assert sorted(s.layers["tower/d"].inbound) == ["a", "b"]
    assert s.layers["sum"].inbound == ["tower/d"]
    assert s.submodels[0]["calls"] == 2


@pytest.fixture(scope="module")
def nested_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "nested.keras"
    save_model(make_nested(), path)
    return path


@pytest.fixture(scope="module")
def shared_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "shared.keras"
    save_model(make_shared(), path)
    return path


def test_inspect_shows_io_nesting_and_totals(nested_path):
    r = run_cli("inspect", nested_path)
    assert r.status == 0, r.err
    out = r.out
    assert "  input  0: image (None, 8, 8, 3) float32" in out
    assert "  output 0: head (None, 3)" in out
    assert "nested models:" in out
    assert "└─ backbone (Functional), 4 layers, 276 params" in out
    assert "   └─ block (Sequential), 2 layers, 164 params" in out
    rows = {line.split()[0]: line.split() for line in out.split("params by layer type")[1].splitlines()
            if line.split() and line.split()[0] in ("Conv2D", "BatchNormalization", "Dense")}
    # Conv2D: 3*3*3*4+4 + 3*3*4*4+4; BatchNormalization: 4 gamma/beta trainable, 8 moving stats
    assert rows["Conv2D"][1:] == ["2", "260", "260"]
    assert rows["BatchNormalization"][1:] == ["1", "16", "8"]
    assert rows["Dense"][1:] == ["1", "15", "15"]


def test_inspect_marks_shared_layers(shared_path):
    r = run_cli("inspect", shared_path)
    assert r.status == 0, r.err
    row = next(line for line in r.out.splitlines() if line.split() and line.split()[0] == "shared")
    assert row.split()[-1] == "×2"
    add_row = next(line for line in r.out.splitlines() if line.split() and line.split()[0] == "add")
    assert "×" not in add_row
    assert "shared (called more than once): shared ×2" in r.out
    assert "input  1: b (None, 5) float32" in r.out


def test_inspect_json_extras(shared_path, nested_path):
    data = json.loads(run_cli("inspect", shared_path, "--json").out)
    assert data["shared"] == [{"path": "shared", "calls": 2}]
    assert data["inputs"] == [{"name": "a", "shape": "(None, 5)", "dtype": "float32"},
                              {"name": "b", "shape": "(None, 5)", "dtype": "float32"}]
    assert data["outputs"] == [{"layer": "out", "shape": "(None, 2)"}]
    assert data["by_type"] == [{"type": "Dense", "layers": 2, "params": 42, "trainable_params": 42},
                               {"type": "Add", "layers": 1, "params": 0, "trainable_params": 0}]
    nested = json.loads(run_cli("inspect", nested_path, "--json", "--where", "type=Conv2D").out)
    assert [s["path"] for s in nested["submodels"]] == ["backbone", "backbone/block"]
    assert nested["by_type"] == [{"type": "Conv2D", "layers": 2, "params": 260, "trainable_params": 260}]
    assert nested["total_params"] == 291


def test_renamed_layers_without_weights_need_the_same_inputs(tmp_path, cnn_path):
    # a chain renamed with a prefix: each weightless layer is matched through its renamed input
    b = applied(tmp_path, cnn_path, 'select all\nrename prefix "ft_"\n')
    status, data = diff_json(cnn_path, b)
    assert status == 1
    names = ["conv2d_1", "max_pooling2d", "conv2d_2", "flatten", "dense_1", "dropout", "dense_2", "dense_3"]
    assert_only(data, renamed=[{"from": n, "to": "ft_" + n} for n in names],
                outputs=None)
    # a Dropout removed in one place and an identical one added elsewhere is not a rename
    c = applied(tmp_path, cnn_path, 'remove dropout\ninsert Dropout(rate=0.25, name="drop") after conv2d_2\n',
                name="c.keras")
    status, data = diff_json(cnn_path, c)
    assert data["renamed"] == []
    assert [x["path"] for x in data["removed"]] == ["dropout"] and [x["path"] for x in data["added"]] == ["drop"]


class _InFile(diff_module.StoredValues):
    """StoredValues over a numpy array (as the values of a large variable left in a file)."""

    def __init__(self, array):
        self.var, self.source, self._digest = None, None, None
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def rows(self, start, stop):
        return self.array[start:stop]


@pytest.mark.parametrize("case", ["noise", "same", "nan in both", "nan in one", "inf", "all zeros before",
                                  "int8", "cast"])
def test_arrays_compared_by_blocks_measure_what_whole_arrays_do(case, monkeypatch):
    """compare_weights on arrays left where they are (StoredValues, read a block of rows at a time) gives
    what it gives on whole arrays: the same changes, the same largest difference (NaN where a NaN is on
    one side only; none where both have one), the relative L2 to the last bits."""
    from modelxform.keras_io import variables
    monkeypatch.setattr(variables, "BLOCK_BYTES", 64)  # blocks of 2 rows
    rng = np.random.default_rng(5)
    a = rng.normal(size=(9, 8)).astype(np.float32)
    b = a + rng.normal(scale=0.01, size=a.shape).astype(np.float32)
    if case == "same":
        b = a.copy()
    elif case == "nan in both":
        a[3, 2] = b[3, 2] = np.nan
    elif case == "nan in one":
        b[7, 1] = np.nan
    elif case == "inf":
        a[0, 0] = b[0, 0] = np.inf
        b[5, 5] += 1
    elif case == "all zeros before":
        a = np.zeros_like(a)
    elif case == "int8":
        a, b = (a * 10).astype(np.int8), (b * 10 + 1).astype(np.int8)
    elif case == "cast":
        b = b.astype(np.float16)
    whole = diff_module.compare_weights("layer", [("kernel", a)], [("kernel", b)])
    blocks = diff_module.compare_weights("layer", [("kernel", _InFile(a))], [("kernel", _InFile(b))])
    assert len(whole) == len(blocks) == (0 if case == "same" else 1)
    for w, k in zip(whole, blocks):
        assert (k.name, k.shape_a, k.shape_b, k.dtype_a, k.dtype_b, k.status) == \
            (w.name, w.shape_a, w.shape_b, w.dtype_a, w.dtype_b, w.status)
        for got, expected in ((k.max_abs_diff, w.max_abs_diff), (k.relative_l2, w.relative_l2)):
            if expected is None or np.isnan(expected) or np.isinf(expected):
                assert got is expected or (np.isnan(got) and np.isnan(expected)) or got == expected, (got, expected)
            else:
                assert got == pytest.approx(expected, rel=1e-12)
