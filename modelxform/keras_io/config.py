"""The Keras config format, read in one place.

A model's serialized config — what ``keras.saving.serialize_keras_object(model)`` returns and what a
.keras archive's config.json holds — is a tree. A *model entry* is ``{"class_name": "Functional" |
"Sequential", "config": {"name", "layers": [entries], "input_layers", "output_layers"}}``; each of its
layers is an entry ``{"class_name", "module", "registered_name", "config": {"name", …}, "inbound_nodes",
"build_config"}``, and an entry may be a model entry again (a nested model). A layer's *path* is the
names from the top model down, joined by ``/`` (``backbone/block/conv_a``), as layers.walk names the
layers of a built model.

Inbound nodes come in two forms: Keras 3 writes ``{"args": […], "kwargs": {…}}`` holding
``__keras_tensor__`` objects whose ``keras_history`` is ``[layer name, node index, tensor index]``; the
older list form ``[[name, node, tensor, kwargs], …]`` is still read by Keras. A model's ``input_layers``
and ``output_layers`` are one reference ``[name, node, index]``, a list of them, or a dict of them
(dict inputs).

Everything that reads a config — the graph editor, the archive, diff's wiring, the shape finder —
walks it with these functions, so the format is described once. tests/test_keras_io.py checks them
against configs Keras writes, and fails when a Keras release changes the format.
"""
from __future__ import annotations

from dataclasses import dataclass

MODEL_CLASS_NAMES = ("Functional", "Sequential")


def copied(config):
    """A deep copy of a config, as ``copy.deepcopy`` makes it (an object that appears twice in it is one
    object twice in the copy, too), about four times as fast: a structural edit copies the whole config
    of the model three or four times (MobileNetV2: 7.8 ms by deepcopy, 1.7 ms this way). The copy is
    made by pickle's C code, in memory, from the value at hand: nothing is read from a file. A value
    pickle cannot take is deep-copied."""
    import copy
    import pickle
    try:
        return pickle.loads(pickle.dumps(config, pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - a value of a kind pickle does not take: deepcopy copies it
        return copy.deepcopy(config)


def layers_of(model_entry: dict) -> list[dict]:
    """The layer entries of a model entry (its InputLayers included)."""
    return model_entry["config"]["layers"]


def is_model_entry(entry: dict) -> bool:
    """Whether an entry is a nested model whose layers the config lists."""
    cfg = entry.get("config")
    return isinstance(cfg, dict) and isinstance(cfg.get("layers"), list) and \
        entry.get("class_name") in MODEL_CLASS_NAMES


def is_input(entry: dict) -> bool:
    return entry.get("class_name") == "InputLayer"


def name_of(entry: dict) -> str:
    return entry["config"]["name"]


@dataclass(eq=False)
class ConfigLayer:
    """One entry of a config tree, with where it sits."""

    path: str
    entry: dict
    container: dict  # the model entry that lists it
    index: int  # its position in the container's layers
    ancestors: tuple = ()  # class names of the nested models around it, outermost first
    layer = None  # no Keras layer behind it (the selectors read .layer only of built layers)

    @property
    def ancestor_types(self) -> tuple:
        return self.ancestors

    @property
    def name(self) -> str:
        return name_of(self.entry)

    @property
    def class_name(self) -> str:
        return self.entry["class_name"]

    @property
    def type_name(self) -> str:
        return self.entry["class_name"]

    @property
    def is_model(self) -> bool:
        return is_model_entry(self.entry)


def walk(config: dict, *, models: bool = False, leaves: bool = True, inputs: bool = False):
    """The entries of a config tree in order, depth first, each path once: leaf layers (``leaves``),
    nested model entries before their layers (``models``), InputLayers (``inputs``)."""
    seen: set[str] = set()

    def visit(model_entry, prefix, ancestors):
        for index, entry in enumerate(layers_of(model_entry)):
            path = prefix + name_of(entry)
            if is_input(entry):
                if inputs and path not in seen:
                    seen.add(path)
                    yield ConfigLayer(path, entry, model_entry, index, ancestors)
                continue
            if path in seen:
                continue
            seen.add(path)
            if is_model_entry(entry):
                if models:
                    yield ConfigLayer(path, entry, model_entry, index, ancestors)
                yield from visit(entry, path + "/", ancestors + (entry["class_name"],))
            elif leaves:
                yield ConfigLayer(path, entry, model_entry, index, ancestors)
    yield from visit(config, "", ())


class NotInGraph(LookupError):
    """A path that is no node of the config's graphs: inside a layer whose config does not list its
    layers (a composite layer such as MultiHeadAttention, or a Functional subclass such as a keras_hub
    Backbone, whose config holds its constructor arguments), or not there at all."""

    def __init__(self, path: str, holder: dict | None = None, holder_path: str = ""):
        super().__init__(path)
        self.path, self.holder, self.holder_path = path, holder, holder_path


def container_of(config: dict, path: str) -> dict:
    """The model entry that lists the layer at ``path`` (NotInGraph when there is none)."""
    node, walked = config, []
    for part in path.split("/")[:-1]:
        entry = next((e for e in layers_of(node) if name_of(e) == part), None)
        walked.append(part)
        if entry is None:
            raise NotInGraph(path)
        if not is_model_entry(entry):
            raise NotInGraph(path, entry, "/".join(walked))
        node = entry
    return node


def entry_at(config: dict, path: str) -> dict:
    name = path.split("/")[-1]
    entry = next((e for e in layers_of(container_of(config, path)) if name_of(e) == name), None)
    if entry is None:
        raise NotInGraph(path)
    return entry


def histories(node):
    """The ``[layer, node, tensor]`` lists one inbound node reads, in either form; they are the lists in
    the config itself, so a caller may change them in place."""
    yield from _histories(node, sort_keys=False)


def flat_histories(node):
    """histories(node) in the order Keras flattens a call's arguments (a dict by sorted key), which is
    the order of the inputs of a nested model the node calls."""
    yield from _histories(node, sort_keys=True)


def _histories(node, sort_keys: bool):
    if isinstance(node, list):  # the list form: [[name, node, tensor, kwargs], …]
        for item in node:
            if isinstance(item, list) and item and isinstance(item[0], str):
                yield item
        return

    def visit(obj):
        if isinstance(obj, dict):
            hist = obj.get("config", {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" \
                else None
            if isinstance(hist, list):
                yield hist
                return
            for key in (sorted(obj) if sort_keys else obj):
                yield from visit(obj[key])
        elif isinstance(obj, (list, tuple)):  # (a model's in-memory config has tuples where JSON has lists)
            for value in obj:
                yield from visit(value)
    yield from visit(node.get("args", []))
    yield from visit(node.get("kwargs", {}))


def tensors(node) -> list[dict]:
    """The ``__keras_tensor__`` objects (with their shapes and dtypes) an inbound node passes, in order."""
    found = []

    def visit(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                found.append(obj)
                return
            for value in obj.values():
                visit(value)
        elif isinstance(obj, list):
            for value in obj:
                visit(value)
    visit(node.get("args", []) if isinstance(node, dict) else node)
    return found


def tensor_refs(refs) -> list[list]:
    """A model's ``input_layers`` or ``output_layers`` as a list of ``[name, node, index]`` (copies):
    Keras writes one reference as ``[name, node, index]``, several as a list, dict inputs as a dict."""
    if isinstance(refs, dict):
        return [list(r) for r in refs.values()]
    if refs and isinstance(refs[0], str):
        return [list(refs)]
    return [list(r) for r in refs or []]


def io_refs(refs) -> list[list]:
    """The ``[name, node, index]`` lists of a model's ``input_layers`` or ``output_layers`` themselves (not
    copies, so that a caller may change them in place), in any of Keras's forms."""
    if isinstance(refs, dict):
        return list(refs.values())
    if refs and isinstance(refs[0], str):
        return [refs]
    return list(refs or [])


def flat_order(refs) -> list[list]:
    """The references in the order the model's flat inputs or outputs have them: Keras flattens a dict
    by sorted key (a model called with a dict returns the same structure; its tensors are numbered in
    this order where another graph refers to them by index)."""
    if isinstance(refs, dict):
        return [refs[key] for key in sorted(refs)]
    return io_refs(refs)


def model_entries(config: dict, path: str = ""):
    """(path, model entry) of the top model and every nested model entry in it."""
    yield path, config
    for entry in config["config"].get("layers") or []:  # (none listed: a keras_hub Backbone's config)
        if is_model_entry(entry):
            yield from model_entries(entry, (path + "/" if path else "") + name_of(entry))
