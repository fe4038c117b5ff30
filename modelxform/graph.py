"""The functional-graph rebuild used by every structural pass.

Structural statements do not touch a live model. They edit a copy of the model's serialized config
(the same JSON that a .keras file stores) and the model is rebuilt from it once per run of consecutive
structural statements. Weights then move across by layer path; layers a statement created get fresh
weights from their own configured initializers, seeded from the recipe's seed. Because the config is
Keras's own serialization, shared layers stay shared (one layer entry, several inbound nodes) and nested
models stay nested models.

This is also the one place that knows about Keras internals: the shape of the functional config
(``layers``/``inbound_nodes``/``keras_history``/``output_layers``) and the class name ``Functional``.
tests/test_graph.py fails loudly when a Keras release changes them.
"""
from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field

import numpy as np

from .errors import ApplyError
from .rng import derive_seed
from .selectors import LayerInfo, walk

MODEL_CLASS_NAMES = ("Functional", "Sequential")


def model_kind(model) -> str:
    """``functional``, ``sequential`` or ``subclassed``."""
    import keras
    if isinstance(model, keras.Sequential):
        return "sequential"
    # keras.Model(inputs, outputs) returns an instance of the private class Functional.
    if type(model).__name__ == "Functional":
        return "functional"
    return "subclassed"


def refuse_subclassed(model, what: str, span=None) -> None:
    if model_kind(model) == "subclassed":
        raise ApplyError(
            f"{what} needs a functional or Sequential model, but {type(model).__name__!r} is a "
            "subclassed model: its forward pass is Python code, not a graph modelxform can edit",
            span=span,
            hint="selection, weight statements, freeze and unfreeze work on it; for structural edits, "
                 "rebuild it as a functional model (keras.Model(inputs, outputs)) and save that")


@dataclass(eq=False)
class SpecLayer:
    """A leaf layer as the config describes it (before the model is rebuilt)."""

    path: str
    entry: dict
    ancestor_types: tuple = ()
    layer: object = None

    @property
    def name(self) -> str:
        return self.entry["config"]["name"]

    @property
    def type_name(self) -> str:
        return self.entry["class_name"]


def _layers_of(model_entry: dict) -> list[dict]:
    return model_entry["config"]["layers"]


def _is_model_entry(entry: dict) -> bool:
    cfg = entry.get("config")
    return isinstance(cfg, dict) and isinstance(cfg.get("layers"), list) and \
        entry.get("class_name") in MODEL_CLASS_NAMES


@dataclass
class Edit:
    statement: object
    apply: object  # callable(GraphEditor) -> None


@dataclass
class GraphEditor:
    """Queued structural edits on a copy of a model's config."""

    model: object
    seed: int
    config: dict = field(init=False)
    base_config: dict = field(init=False)
    fresh: dict = field(default_factory=dict)  # path -> parts that seed its new weights
    edits: list = field(default_factory=list)

    def __post_init__(self):
        import keras
        # Keras's in-memory config mixes tuples and lists (an inbound node's args are a tuple); its JSON
        # form, which is what a .keras file holds and loads from, has lists only and edits in place.
        self.base_config = json.loads(json.dumps(keras.saving.serialize_keras_object(self.model),
                                                 default=_json_default))
        self.config = copy.deepcopy(self.base_config)

    # -- views ---------------------------------------------------------------------------------
    def leaves(self) -> list[SpecLayer]:
        out: list[SpecLayer] = []
        seen: set[str] = set()

        def visit(model_entry, prefix, ancestors):
            for entry in _layers_of(model_entry):
                if entry.get("class_name") == "InputLayer":
                    continue
                path = prefix + entry["config"]["name"]
                if path in seen:
                    continue
                seen.add(path)
                if _is_model_entry(entry):
                    visit(entry, path + "/", ancestors + (entry["class_name"],))
                else:
                    out.append(SpecLayer(path, entry, ancestors))
        visit(self.config, "", ())
        return out

    def container_of(self, path: str) -> dict:
        """The model entry that holds the layer at ``path``."""
        node = self.config
        for part in path.split("/")[:-1]:
            node = next(e for e in _layers_of(node) if e["config"]["name"] == part)
        return node

    def entry(self, path: str) -> dict:
        name = path.split("/")[-1]
        return next(e for e in _layers_of(self.container_of(path)) if e["config"]["name"] == name)

    # -- edits ---------------------------------------------------------------------------------
    closed: bool = False  # set once the runner has rebuilt from this editor

    def queue(self, statement, fn) -> None:
        if self.closed:
            raise RuntimeError("edit queued on an editor that was already rebuilt (a pass held it across a flush)")
        fn(self)
        self.edits.append(Edit(statement, fn))

    def top_entries(self) -> list[dict]:
        return [e for e in _layers_of(self.config) if e.get("class_name") != "InputLayer"]

    def replace(self, path: str, serialized: dict, fresh_parts) -> None:
        """Put a new layer (Keras's serialization of it) where the layer at ``path`` was."""
        entry = self.entry(path)
        old_name = entry["config"]["name"]
        for key in ("module", "class_name", "config", "registered_name"):
            entry[key] = copy.deepcopy(serialized.get(key))
        entry.pop("build_config", None)
        new_name = entry["config"]["name"]
        if "name" in entry:
            entry["name"] = new_name
        if new_name != old_name:
            self._rename_references(path, old_name, new_name)
        new_path = "/".join(path.split("/")[:-1] + [new_name])
        self.fresh[new_path] = fresh_parts

    def _rename_references(self, path: str, old: str, new: str) -> None:
        """Point every keras_history and input/output entry of the layer's container at its new name."""
        container = self.container_of(path)

        def fix(obj):
            if isinstance(obj, dict):
                hist = obj.get("keras_history")
                if isinstance(hist, list) and hist and hist[0] == old:
                    hist[0] = new
                for value in obj.values():
                    fix(value)
            elif isinstance(obj, list):
                for value in obj:
                    fix(value)
        for entry in _layers_of(container):
            fix(entry.get("inbound_nodes", []))
        cfg = container["config"]
        for key in ("input_layers", "output_layers"):
            refs = cfg.get(key) or []
            for ref in (refs if refs and isinstance(refs[0], list) else [refs]):
                if ref and ref[0] == old:
                    ref[0] = new

    def tap(self, paths: list[str], only: bool, span=None) -> None:
        if self.config["class_name"] == "Sequential":
            self.config = sequential_to_functional(self.config)
        cfg = self.config["config"]
        outputs = [] if only else _tensor_refs(cfg["output_layers"])
        for path in paths:
            if "/" in path:
                raise ApplyError(f"tap {path}: tapping a layer inside a nested model is not supported yet",
                                 span=span, hint="tap the nested model itself, or a layer of the outer model")
            entry = self.entry(path)
            nodes = entry.get("inbound_nodes") or []
            if not nodes:
                raise ApplyError(f"tap {path}: the layer is not called in the model's graph", span=span)
            for index in range(len(nodes)):
                ref = [entry["config"]["name"], index, 0]
                if ref not in outputs:
                    outputs.append(ref)
        cfg["output_layers"] = outputs

    # -- rebuild -------------------------------------------------------------------------------
    def build(self, old_model):
        """Rebuild the edited model and move weights across; on failure, blame one statement."""
        try:
            return self._build(self.config, old_model, self.fresh)
        except ApplyError as exc:
            if len(self.edits) <= 1:
                self._blame(exc, self.edits[0].statement if self.edits else None)
            culprit = self._find_culprit(old_model)
            self._blame(exc, culprit)

    def _find_culprit(self, old_model):
        """Replay the queued edits one at a time from the original config to find the first failure."""
        replay = GraphEditor.__new__(GraphEditor)
        replay.model, replay.seed = self.model, self.seed
        replay.base_config = self.base_config
        replay.config = copy.deepcopy(self.base_config)
        replay.fresh, replay.edits = {}, []
        for edit in self.edits:
            try:
                edit.apply(replay)
                self._build(replay.config, old_model, replay.fresh)
            except ApplyError:
                return edit.statement
        return self.edits[-1].statement

    @staticmethod
    def _blame(exc: ApplyError, statement) -> None:
        if statement is not None and exc.span is None:
            raise ApplyError(f"`{statement}`: {exc.message}", span=statement.span, hint=exc.hint) from exc
        raise exc

    def _build(self, config: dict, old_model, fresh: dict):
        import keras
        try:
            new_model = keras.saving.deserialize_keras_object(copy.deepcopy(config), safe_mode=True)
        except Exception as exc:  # Keras reports shape and argument problems as many exception types
            raise ApplyError(f"the edited model does not build: {_first_line(exc)}") from exc
        transfer_weights(old_model, new_model, fresh, self.seed)
        check_forward(new_model)
        return new_model


def _json_default(obj):
    """What json cannot encode on its own in a Keras config: numpy scalars and arrays."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} in a model config")


def _tensor_refs(refs) -> list:
    """Keras writes a single input/output as ``[name, node, index]`` and several as a list of those."""
    if refs and isinstance(refs[0], str):
        return [list(refs)]
    return [list(r) for r in refs]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sequential_to_functional(config: dict) -> dict:
    """A Sequential model's serialized config as the equivalent functional config."""
    seq = config["config"]
    layers = [copy.deepcopy(e) for e in seq["layers"]]
    if not layers or layers[0].get("class_name") != "InputLayer":
        shape = seq.get("build_input_shape")
        if shape is None:
            raise ApplyError("this Sequential model has no known input shape; it cannot be turned into a graph")
        layers.insert(0, {"module": "keras.layers", "class_name": "InputLayer",
                          "config": {"batch_shape": list(shape), "dtype": "float32",
                                     "name": f"{seq['name']}_input"}, "registered_name": None})
    prev = None
    for entry in layers:
        entry["name"] = entry["config"]["name"]
        if prev is None:
            entry["inbound_nodes"] = []
        else:
            # The list form [[name, node, tensor, kwargs]] of an inbound node needs no tensor shapes;
            # Keras still reads it (functional.deserialize_node, "legacy case").
            entry["inbound_nodes"] = [[[prev, 0, 0, {}]]]
        prev = entry["config"]["name"]
    return {"module": "keras.src.models.functional", "class_name": "Functional", "registered_name": "Functional",
            "config": {"name": seq["name"], "trainable": seq.get("trainable", True), "layers": layers,
                       "input_layers": [[layers[0]["config"]["name"], 0, 0]],
                       "output_layers": [[prev, 0, 0]]}}


def transfer_weights(old_model, new_model, fresh: dict, seed: int) -> None:
    old = {info.path: info for info in walk(old_model)}
    for info in walk(new_model):
        if info.path in fresh:
            init_fresh(info, fresh[info.path], seed)
            continue
        before = old.get(info.path)
        if before is None:
            raise ApplyError(f"layer {info.path} appeared in the rebuilt model without a statement creating it")
        new_shapes = [tuple(v.shape) for v in info.layer.weights]
        old_shapes = [tuple(v.shape) for v in before.layer.weights]
        if new_shapes != old_shapes:
            detail = "; ".join(f"{v.name} {tuple(o)} -> {tuple(n)}" for v, o, n in
                               zip(info.layer.weights, old_shapes, new_shapes) if o != n) or \
                f"{len(old_shapes)} weight arrays -> {len(new_shapes)}"
            raise ApplyError(f"layer {info.path} would change shape ({detail}), so its weights cannot be kept",
                             hint="its input changed; replace or reinitialise it in the same recipe")
        if old_shapes:
            info.layer.set_weights(before.layer.get_weights())


def initializer_for(layer, variable_name: str):
    """The initializer a layer's config names for one of its variables, or None."""
    import keras
    config = layer.get_config()
    keys = [f"{variable_name}_initializer"]
    if variable_name.endswith("_kernel"):
        keys.append(variable_name[: -len("_kernel")] + "_initializer")
    for key in keys:
        if config.get(key) is not None:
            return keras.initializers.get(config[key])
    return None


def seeded(initializer, seed_value: int):
    """A copy of ``initializer`` with its seed set (initializers without a seed are returned as is)."""
    params = inspect.signature(type(initializer).__init__).parameters
    if "seed" not in params:
        return initializer
    cfg = initializer.get_config()
    cfg["seed"] = seed_value
    return type(initializer).from_config(cfg)


def init_fresh(info: LayerInfo, parts, seed: int) -> None:
    """Initialise every variable of a layer a statement created, reproducibly from the seed."""
    values = []
    for var in info.layer.weights:
        init = initializer_for(info.layer, var.name)
        if init is None:
            raise ApplyError(f"layer {info.path}: cannot initialise variable {var.name!r} reproducibly "
                             "(its config names no initializer for it)")
        init = seeded(init, derive_seed(seed, *parts, info.path, var.name) % (2**31 - 1))
        values.append(np.asarray(init(tuple(var.shape), dtype=var.dtype)))
    if values:
        info.layer.set_weights(values)


def probe_inputs(model, batch: int = 1, fill=0.0, rng=None):
    """Inputs of the model's input shapes (None dimensions become ``batch`` or 32)."""
    arrays = []
    for tensor in model.inputs:
        shape = [batch] + [32 if d is None else int(d) for d in tuple(tensor.shape)[1:]]
        dtype = np.dtype(str(tensor.dtype)) if str(tensor.dtype) != "string" else np.float32
        if rng is None:
            arrays.append(np.full(shape, fill, dtype=dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def check_forward(model) -> None:
    """The model must run a forward pass on zeros of its input shape."""
    try:
        inputs = probe_inputs(model)
        model(inputs if len(inputs) > 1 else inputs[0], training=False)
    except Exception as exc:
        raise ApplyError(f"the edited model does not run a forward pass: {_first_line(exc)}") from exc
