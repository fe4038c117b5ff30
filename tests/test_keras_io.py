"""keras_io is the only code that knows Keras's config format and reaches into Keras internals; these
tests fail loudly, naming what changed, when a Keras release changes either."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FACTORIES
from modelxform.keras_io import config as cfg
from modelxform.keras_io.layers import nested_models, walk

keras = pytest.importorskip("keras")


def serialized(model) -> dict:
    import json
    return json.loads(json.dumps(keras.saving.serialize_keras_object(model)))


@pytest.mark.parametrize("kind", ["cnn", "sequential", "nested", "shared", "multi_io"])
def test_the_walker_sees_what_keras_builds(kind):
    model = FACTORIES[kind]()
    config = serialized(model)
    leaves = [c.path for c in cfg.walk(config)]
    assert leaves == [i.path for i in walk(model)]
    models = [c.path for c in cfg.walk(config, models=True, leaves=False)]
    assert models == list(nested_models(model))
    for layer in cfg.walk(config, models=True):
        assert cfg.entry_at(config, layer.path) is layer.entry
        assert cfg.container_of(config, layer.path) is layer.container
        assert cfg.layers_of(layer.container)[layer.index] is layer.entry


@pytest.mark.parametrize("kind", ["cnn", "nested", "shared", "multi_io"])
def test_inbound_nodes_name_the_layers_that_feed_each_layer(kind):
    """keras_history in the inbound nodes: [layer, node, tensor] for every input a call reads."""
    model = FACTORIES[kind]()
    config = serialized(model)
    for entry in cfg.layers_of(config):
        if cfg.is_input(entry):
            continue
        layer = model.get_layer(cfg.name_of(entry))
        for node, node_config in zip([n for n in layer._inbound_nodes if n.operation is layer],
                                     entry["inbound_nodes"]):
            fed_by = [t._keras_history[0].name for t in node.input_tensors]
            assert [h[0] for h in cfg.histories(node_config)] == fed_by
            assert [t["config"]["shape"][1:] for t in cfg.tensors(node_config)] == \
                [list(t.shape)[1:] for t in node.input_tensors]
    outputs = [t._keras_history[0].name for t in model.outputs]
    assert [r[0] for r in cfg.tensor_refs(config["config"]["output_layers"])] == outputs
    inputs = [t._keras_history[0].name for t in model.inputs]
    assert [r[0] for r in cfg.tensor_refs(config["config"]["input_layers"])] == inputs


def test_tensor_refs_read_every_form_keras_writes():
    assert cfg.tensor_refs(["a", 0, 0]) == [["a", 0, 0]]
    assert cfg.tensor_refs([["a", 0, 0], ["b", 1, 0]]) == [["a", 0, 0], ["b", 1, 0]]
    assert cfg.tensor_refs({"x": ["a", 0, 0], "y": ["b", 0, 0]}) == [["a", 0, 0], ["b", 0, 0]]
    assert list(cfg.histories([["a", 0, 0, {}], ["b", 1, 0, {}]])) == [["a", 0, 0, {}], ["b", 1, 0, {}]]


def test_the_keras_internals_keras_io_uses_are_there():
    """Each private name keras_io uses (variables.py, files.py, layers.py), with where it is used."""
    from keras.src.backend.common import global_state, stateless_scope
    from keras.src.saving import saving_lib
    from keras.src.utils import module_utils
    missing = []
    for owner, names, user in [
        (module_utils.tensorflow, ["_available", "available"], "backend.tensorflow_probe"),
        (saving_lib, ["_serialize_model_as_json", "_save_state", "H5IOStore", "DiskIOStore"],
         "files._write_keras_archive"),
        (saving_lib.H5IOStore, ["_get_h5_file", "_create_h5_group", "__setitem__"], "files._write_keras_archive"),
        (global_state, ["get_global_attribute", "set_global_attribute"], "variables.LazyVariables"),
        (stateless_scope, ["StatelessScope"], "variables.LazyVariables"),
    ]:
        missing += [f"{getattr(owner, '__name__', owner)}.{n} ({user})" for n in names if not hasattr(owner, n)]
    assert missing == []


def test_lazy_variables_defer_and_fill():
    """Under LazyVariables a built layer's variables hold no value; copy_variables gives them theirs,
    a block of rows at a time for large arrays (on every backend: tests/test_backends.py runs this
    file under JAX)."""
    from modelxform.keras_io import variables
    with variables.LazyVariables() as lazy:
        layer = keras.layers.Dense(3, name="d")
        layer.build((None, 5))
    assert lazy.created and all(v._value is None for v in layer.weights)
    kernel = np.arange(15, dtype="float32").reshape(5, 3)
    variables.set_variables(layer.weights, [kernel, np.ones(3, "float32")])
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    lazy.initialise_the_rest()
    # a large array, in blocks (the thresholds lowered so that this one counts as large)
    big = keras.layers.Dense(4, name="big")
    big.build((None, 6))
    values = np.random.default_rng(0).standard_normal((6, 4)).astype("float32")
    old = variables.LARGE_ARRAY, variables.BLOCK_BYTES
    try:
        variables.LARGE_ARRAY, variables.BLOCK_BYTES = 8, 16
        variables.set_variables(big.weights, [values, np.zeros(4, "float32")])
        rows = variables.read_variable_rows(big.kernel, 2, 5)
    finally:
        variables.LARGE_ARRAY, variables.BLOCK_BYTES = old
    np.testing.assert_array_equal(big.kernel.numpy(), values)
    np.testing.assert_array_equal(rows, values[2:5])


def test_a_large_array_fills_a_deferred_variable_without_a_second_copy(monkeypatch):
    """Rows go a block at a time into the variable: on TensorFlow by scatter_update into its tensor; on
    JAX and torch into a host buffer that the backend then adopts as the variable's value (JAX's
    device_put of a 64-byte-aligned buffer on a CPU, torch.from_numpy) — the buffer is the variable's
    memory, not copied once more. Reading rows back gives them without a full copy either."""
    from modelxform.keras_io import variables
    monkeypatch.setattr(variables, "LARGE_ARRAY", 8)
    monkeypatch.setattr(variables, "BLOCK_BYTES", 40)
    buffers = []
    real = variables._aligned_empty
    monkeypatch.setattr(variables, "_aligned_empty", lambda *a: buffers.append(real(*a)) or buffers[-1])
    with variables.LazyVariables():
        layer = keras.layers.Dense(5, name="big")
        layer.build((None, 33))
    values = np.random.default_rng(1).standard_normal((33, 5)).astype("float32")
    blocks = []
    reads = variables.row_blocks((33, 5), 4)
    variables.copy_variables(layer.weights, [variables._Array(values), variables._Array(np.ones(5, "float32"))])
    assert keras.ops.is_tensor(layer.kernel.value) and not isinstance(layer.kernel.value, np.ndarray)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel.value), values)
    for start, stop in reads:
        blocks.append(variables.read_variable_rows(layer.kernel, start, stop))
    assert len(blocks) > 3
    np.testing.assert_array_equal(np.concatenate(blocks), values)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        assert buffers == []
    elif backend == "jax":
        (host,) = [b for b in buffers if b.shape == (33, 5)]
        assert host.ctypes.data % 64 == 0
        assert np.asarray(layer.kernel.value).ctypes.data == host.ctypes.data  # adopted, not copied
    elif backend == "torch":
        (host,) = [b for b in buffers if b.shape == (33, 5)]
        assert layer.kernel.value.data_ptr() == host.ctypes.data


def test_which_layer_feeds_which_is_read_where_check_moves_reads_it():
    """layers.check_moves reads a tensor's _keras_history and a layer's _outbound_nodes."""
    model = FACTORIES["cnn"]()
    dense_2 = model.get_layer("dense_2")
    assert dense_2.input._keras_history[0] is model.get_layer("dropout")
    assert [n.operation.name for n in model.get_layer("dense_1")._outbound_nodes] == ["dropout"]


# ---- streams.py: CRC-32 arithmetic and file-to-file copies (issue 19) ----------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 1 << 16))
def test_crc32_zeros_is_zlibs_crc_of_zero_bytes(crc, count):
    import zlib
    from modelxform.keras_io.streams import crc32_zeros
    assert crc32_zeros(crc, count) == zlib.crc32(bytes(count), crc)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.data())
def test_edited_crc_is_the_crc_of_the_edited_bytes(data, draw):
    """Ranges replaced in order (some in several pieces, some empty) give the CRC zlib computes over
    the whole edited data."""
    import zlib
    from modelxform.keras_io.streams import EditedCrc
    edited = bytearray(data)
    crc = EditedCrc(zlib.crc32(data), len(data))
    at = 0
    for _ in range(draw.draw(st.integers(0, 6))):
        start = draw.draw(st.integers(at, len(data)))
        stop = draw.draw(st.integers(start, len(data)))
        middle = draw.draw(st.integers(start, stop))
        for a, b in ((start, middle), (middle, stop)):
            new = draw.draw(st.binary(min_size=b - a, max_size=b - a))
            if draw.draw(st.booleans()):
                crc.replace(a, data[a:b], new)
            else:  # the old bytes first, the new ones later (the archive changes a block where it was read)
                crc.replace_old(a, data[a:b])
                crc.replace_new(a, new)
            edited[a:b] = new
        at = stop
    assert crc.value == zlib.crc32(bytes(edited))


def test_edited_crc_refuses_ranges_out_of_order():
    from modelxform.keras_io.streams import EditedCrc
    crc = EditedCrc(0, 10)
    crc.replace(4, b"ab", b"cd")
    with pytest.raises(ValueError, match="in order"):
        crc.replace(3, b"a", b"b")
    crc.replace_old(7, b"x")  # an old piece whose new bytes never came
    with pytest.raises(ValueError, match="differ in extent"):
        crc.value


def test_ahead_makes_the_items_in_a_thread_in_order_and_raises_the_iterators_error():
    import threading
    from modelxform.keras_io.streams import Ahead
    makers = []

    def items():
        for i in range(50):
            makers.append(threading.current_thread().name)
            yield i
        raise OSError("the disk went away")
    made = Ahead(items())
    got = []
    with made, pytest.raises(OSError, match="the disk went away"):
        for item in made:
            got.append(item)
    assert got == list(range(50))
    assert set(makers) == {"modelxform-ahead"}


def test_ahead_stops_making_when_the_loop_ends_early():
    """A loop that fails (or is interrupted) ends the thread before the block ends: the iterator makes at
    most the items the queue holds and the one under way, nothing after the block, and is closed."""
    import time
    from modelxform.keras_io.streams import Ahead
    made_count, closed = [0], []

    def items():
        try:
            for i in range(1000):
                made_count[0] += 1
                yield i
        finally:
            closed.append(True)
    made = Ahead(items())
    with pytest.raises(KeyboardInterrupt):
        with made:
            for item in made:
                if item == 3:
                    time.sleep(0.05)  # (the thread runs ahead until the queue is full)
                    raise KeyboardInterrupt
    after = made_count[0]
    assert 4 <= after <= 4 + Ahead.DEPTH + 1
    time.sleep(0.05)
    assert made_count[0] == after and closed == [True]


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_copies_between_offsets(tmp_path, monkeypatch, kernel):
    import os
    from modelxform.keras_io import streams
    monkeypatch.setattr(streams, "_kernel_copy", kernel and hasattr(os, "copy_file_range"))
    monkeypatch.setattr(streams, "_CHUNK", 1000)
    data = os.urandom(10_000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(b"x" * 50)
    with open(tmp_path / "a", "rb") as src, open(tmp_path / "b", "r+b") as dst:
        streams.copy_range(src.fileno(), 123, 7000, dst.fileno(), 20)
        with pytest.raises(streams.ModelFileError, match="unexpected end of file"):
            streams.copy_range(src.fileno(), 9000, 2000, dst.fileno(), 8000)
    out = (tmp_path / "b").read_bytes()
    assert out[:20] == b"x" * 20 and out[20:7020] == data[123:7123]


def test_large_writes_reach_the_kernel_in_pieces(tmp_path, monkeypatch):
    """write_all, write_pieces and FileWindow.write hand the kernel at most WRITE_PIECE bytes per call
    (large writes into the page cache are several times slower per byte on the benchmark machine), and
    every byte lands where it belongs, from memoryviews and numpy arrays alike."""
    import io
    import os
    import numpy as np
    from modelxform.keras_io import streams
    monkeypatch.setattr(streams, "WRITE_PIECE", 1000)
    sizes = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(streams.os, "pwrite", pwrite)
    values = np.arange(2_600, dtype=np.float32)  # 10,400 bytes
    data = values.tobytes()
    path = tmp_path / "f"
    path.write_bytes(b"H" * 7)
    with open(path, "r+b") as fh:
        streams.write_all(fh.fileno(), values, 7)
        assert sizes == [1000] * 10 + [400]
        window = streams.FileWindow(fh.fileno(), 7 + len(data))
        window.write(memoryview(data)[3:2503])
        assert sizes[11:] == [1000, 1000, 500]
    assert path.read_bytes() == b"H" * 7 + data + data[3:2503]

    class Recorder(io.BytesIO):
        def write(self, b):
            sizes.append(len(b))
            return super().write(b)
    out, sizes[:] = Recorder(), []
    streams.write_pieces(out, values)
    assert sizes == [1000] * 10 + [400] and out.getvalue() == data


@pytest.mark.parametrize("way", ["through the zip writer", "through a temporary file"])
def test_a_saved_model_is_the_same_whichever_way_its_weights_reach_the_zip(tmp_path, monkeypatch, way):
    """Keras's weights file is written in place inside the zip (its CRC read off the page cache); through
    the zip writer (where its CRC cannot be set), or first into a temporary file (where its size could
    change the member's header), the bytes are the same."""
    import zipfile
    from conftest import make_cnn
    from modelxform.keras_io import files
    model = make_cnn()
    files.save_model(model, tmp_path / "direct.keras", provenance={"k": 1})
    if way == "through the zip writer":
        monkeypatch.setattr(files, "member_writer_settable", lambda out: False)
    else:
        monkeypatch.setattr(files, "_weights_file_size_hint", lambda model: None)
    files.save_model(model, tmp_path / "other.keras", provenance={"k": 1})
    assert (tmp_path / "direct.keras").read_bytes() == (tmp_path / "other.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "direct.keras") as zf:
        assert zf.testzip() is None  # every member's CRC holds


def test_the_size_hint_decides_the_zip_header_as_the_exact_size_would():
    """Bounds that straddle zipfile's zip64 threshold give no hint; others give one on the same side."""
    import zipfile
    from modelxform.keras_io import files

    class Var:
        def __init__(self, shape):
            self.shape, self.dtype = shape, "float32"

    class Model:
        def __init__(self, *shapes):
            self.weights = [Var(s) for s in shapes]
    limit = zipfile.ZIP64_LIMIT
    small = files._weights_file_size_hint(Model((1000, 1000)))
    assert small is not None and small * 1.05 <= limit
    rows = int(limit / 1.05 / 4 / 1000)  # one array just under the threshold: the HDF5 structure may cross it
    assert files._weights_file_size_hint(Model((rows, 1000))) is None
    big = files._weights_file_size_hint(Model((rows + 20_000, 1000)))
    assert big is not None and big * 1.05 > limit


def test_a_file_window_behaves_as_a_new_file(tmp_path):
    """Writes land at the window's offset; its size is how far it was written or truncated; bytes
    written, cut off and then reached again by an extension read as zeros, as in a file."""
    import os
    from modelxform.keras_io.streams import FileWindow
    path = tmp_path / "f"
    path.write_bytes(b"H" * 10)
    with open(path, "r+b") as fh:
        w = FileWindow(fh.fileno(), 10)
        assert w.seek(0, 2) == 0 and w.read() == b""
        w.write(b"abcdef")
        w.seek(2)
        assert w.read(3) == b"cde" and w.tell() == 5
        w.truncate(3)
        assert w.seek(0, 2) == 3
        w.truncate(8)  # extended past what was cut off: zeros, then past anything written: zeros
        w.seek(0)
        assert w.read() == b"abc" + bytes(5)
        w.seek(20)
        w.write(b"z")
        assert w.size == 21
        w.seek(12)
        assert w.read(9) == bytes(8) + b"z"
    assert path.read_bytes()[:13] == b"H" * 10 + b"abc" and os.path.getsize(path) == 31


_IMPORT_STATE = """\
import json, sys
from modelxform.keras_io import backend, files
if sys.argv[1] == "own":
    backend.own_process()
files.import_keras()
during = {name: name in sys.modules for name in ("jax", "matplotlib")}
import jax, matplotlib  # afterwards, both import as usual
print(json.dumps({"during_import": during, "after": [jax.numpy.add(1, 2).item(), matplotlib.__name__]}))
"""


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("jax", "matplotlib"))
                    or keras.backend.backend() != "tensorflow",
                    reason="needs JAX and matplotlib installed beside TensorFlow, on TensorFlow")
def test_an_own_process_imports_keras_without_jax_or_matplotlib_and_a_library_user_keeps_its_import():
    """In modelxform's own processes (the command line, batch workers) Keras's and TensorFlow's import
    leaves out JAX (which tensorflow.lite imports, where installed, for a converter modelxform never
    calls: a fifth of the import) and matplotlib (keras.visualization's galleries); both still import
    afterwards. A program that calls the session API keeps the import as it is: what a plain
    ``import keras, tensorflow`` does there."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow")

    def state(*argv):
        out = subprocess.run([sys.executable, "-c", *argv], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    own = state(_IMPORT_STATE, "own")
    assert own == {"during_import": {"jax": False, "matplotlib": False}, "after": [3, "matplotlib"]}
    plain = state("import json, sys, keras, tensorflow; "
                  "print(json.dumps({m: m in sys.modules for m in ('jax', 'matplotlib')}))")
    assert state(_IMPORT_STATE, "library") == {"during_import": plain, "after": [3, "matplotlib"]}


def test_the_collector_is_paused_while_keras_imports_and_what_it_left_is_frozen():
    """Importing TensorFlow and Keras creates about half a million long-lived objects; with the cyclic
    collector running, its thresholds make it walk them again several times on the way (0.5-1 s of a
    2-3 s import). import_keras pauses it: no full collection during the import, and what the import
    left behind is frozen out of later walks; the collector runs again afterwards."""
    code = ("import gc, json\n"
            "from modelxform.keras_io import backend, files\n"
            "backend.own_process()\n"
            "files.import_keras()\n"
            "print(json.dumps({'full_collections': gc.get_stats()[2]['collections'],\n"
            "                  'frozen': gc.get_freeze_count(), 'enabled': gc.isenabled()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["full_collections"] == 0
    assert state["frozen"] > 100_000  # Keras, its backend and their modules' objects
    assert state["enabled"] is True


def test_collector_paused_then_frozen_restores_the_callers_collector_and_freezes_only_on_success():
    import gc
    from modelxform.keras_io.backend import collector_paused_then_frozen
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        frozen = gc.get_freeze_count()
        with collector_paused_then_frozen():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # tracked objects made in the block
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(kept)

        frozen = gc.get_freeze_count()
        with pytest.raises(ImportError):
            with collector_paused_then_frozen():
                raise ImportError("no such backend")
        assert gc.isenabled() and gc.get_freeze_count() == frozen

        gc.disable()  # a caller that turned it off keeps it off
        with collector_paused_then_frozen():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable() if was_enabled else gc.disable()


@pytest.mark.parametrize("kind", ["cnn", "nested", "bert"])
def test_the_saving_walk_works_out_the_attributes_to_skip_once_per_kind_with_the_same_bytes(kind, tmp_path,
                                                                                           monkeypatch):
    """Keras's saving walk asks saving_lib.get_attr_skipset at every layer, which keeps its answer under
    another key than it reads (keras 3.15.1): a throwaway Layer() per layer. In an own process
    (backend.saving_walk_cached) it is worked out once per kind of object, and the file is the same."""
    if kind == "bert":
        pytest.importorskip("keras_hub")
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    from conftest import FACTORIES
    from modelxform.keras_io import backend
    model = FACTORIES[kind]()
    layers = len(model._flatten_layers(include_self=False, recursive=True))
    keras_own = saving_lib.get_attr_skipset
    # what keras does: it writes its answer where it does not look for it (if this fails, Keras fixed
    # that: saving_walk_cached may go)
    kind_of_model = model._obj_type()
    keras_own(kind_of_model)
    assert global_state.get_global_attribute(f"saving_attr_skiplist_{kind_of_model}") is None
    assert global_state.get_global_attribute(f"saving_attr_skipset_{kind_of_model}") is not None

    asked = []

    def counted(obj_type):
        asked.append(obj_type)
        return keras_own(obj_type)

    monkeypatch.setattr(saving_lib, "get_attr_skipset", counted)
    model.save(tmp_path / "keras.keras")
    worked_out_by_keras = len(asked)
    assert worked_out_by_keras >= layers  # at every layer
    asked.clear()
    monkeypatch.setattr(backend, "_OWN_PROCESS", True)
    backend.saving_walk_cached()
    backend.saving_walk_cached()  # (once is enough; twice changes nothing)
    assert saving_lib.get_attr_skipset.__wrapped__ is counted
    model.save(tmp_path / "cached.keras")
    assert len(asked) <= 4 < worked_out_by_keras  # Operation, Layer, Functional, Sequential at most
    import zipfile
    with zipfile.ZipFile(tmp_path / "keras.keras") as a, zipfile.ZipFile(tmp_path / "cached.keras") as b:
        assert a.read("model.weights.h5") == b.read("model.weights.h5")
        assert a.read("config.json") == b.read("config.json")
    loaded = keras.saving.load_model(tmp_path / "cached.keras")  # the loading walk uses it too
    assert len(loaded.weights) == len(model.weights)
    for x, y in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- config.copied: the graph editor's deep copies of a model's config ----------------------------------

_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(_json_like)
def test_copied_is_what_deepcopy_gives(value):
    import copy
    copy_ = cfg.copied(value)
    assert copy_ == copy.deepcopy(value) and repr(copy_) == repr(value)  # (tuples stay tuples, -0.0 stays)
    assert _no_shared_containers(value, copy_)


def _no_shared_containers(a, b) -> bool:
    """No dict or list of the copy is one of the original's."""
    if isinstance(a, (dict, list)) and a is b:
        return False
    if isinstance(a, dict):
        return all(_no_shared_containers(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return all(_no_shared_containers(x, y) for x, y in zip(a, b))
    return True


def test_copied_keeps_an_object_used_twice_one_object_and_copies_what_pickle_cannot():
    shared = {"class_name": "DTypePolicy", "config": {"name": "float32"}}
    config = {"layers": [{"dtype": shared}, {"dtype": shared}]}
    copy_ = cfg.copied(config)
    assert copy_ == config and copy_["layers"][0]["dtype"] is copy_["layers"][1]["dtype"]
    assert copy_["layers"][0]["dtype"] is not shared
    function = lambda x: x  # noqa: E731 - a value pickle refuses: deep-copied instead
    with_function = {"activation": function, "units": [4]}
    copy_ = cfg.copied(with_function)
    assert copy_["activation"] is function and copy_["units"] == [4] and copy_["units"] is not with_function["units"]


def test_same_bytes_compares_sizes_then_every_block(tmp_path):
    from modelxform.keras_io.files import same_bytes
    data = bytes(range(256)) * 4 + b"tail"  # 1028 bytes: blocks of 100 leave a last one of 28
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data)
    b.write_bytes(data)
    assert same_bytes(a, b, block=100) and same_bytes(a, b)
    for at in (0, 99, 100, 500, len(data) - 1):  # a block's first and last byte, the last block's
        changed = bytearray(data)
        changed[at] ^= 1
        b.write_bytes(bytes(changed))
        assert not same_bytes(a, b, block=100), at
    b.write_bytes(data + b"x")
    assert not same_bytes(a, b, block=100)
    b.write_bytes(b"")
    a.write_bytes(b"")
    assert same_bytes(a, b)
