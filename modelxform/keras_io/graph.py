"""The functional-graph rebuild used by every structural statement.

Structural statements do not touch a live model. They edit a copy of the model's serialized config
(the same JSON that a .keras file stores) and the model is rebuilt from it once per run of consecutive
structural statements. Weights then move across by layer path; layers a statement created get fresh
weights from their own configured initializers, seeded from the recipe's seed (initializers.py: the same
values on every backend). Because the config is
Keras's own serialization, shared layers stay shared (one layer entry, several inbound nodes) and nested
models stay nested models. The config format itself is read through config.py; variables are filled
through variables.py.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import ApplyError
from ..rng import derive_seed
from .config import (ConfigLayer, container_of, entry_at, histories, is_model_entry, layers_of, model_entries,
                     tensor_refs, walk as walk_config)
from .backend import needs_tensorflow
from .initializers import initial_values
from .layers import LayerInfo, walk
from .variables import LazyVariables, copy_variables, set_variables


@dataclass
class Edit:
    statement: object
    apply: object  # callable(GraphEditor) -> None


@dataclass
class GraphEditor:
    """Queued structural edits on a copy of a model's config. ``model`` is a Keras model, or the JSON
    config of one as a .keras archive holds it (the engine edits a model it never built)."""

    model: object
    seed: int
    config: dict = field(init=False)
    base_config: dict = field(init=False)
    fresh: dict = field(default_factory=dict)  # path -> parts that seed its new weights
    edits: list = field(default_factory=list)
    origin: dict = field(default_factory=dict)  # new path -> old path, for renamed layers
    reshape: dict = field(default_factory=dict)  # statement allowing weight shapes to change (set …)
    reshaped: dict = field(default_factory=dict)  # after build: path -> the statement that reshaped it

    def __post_init__(self):
        # Keras's in-memory config mixes tuples and lists (an inbound node's args are a tuple); its JSON
        # form, which is what a .keras file holds and loads from, has lists only and edits in place.
        if isinstance(self.model, dict):
            config = self.model
        else:
            import keras
            config = keras.saving.serialize_keras_object(self.model)
        self.base_config = json.loads(json.dumps(config, default=_json_default))
        self.config = copy.deepcopy(self.base_config)

    # -- views ---------------------------------------------------------------------------------
    def leaves(self) -> list[ConfigLayer]:
        return list(walk_config(self.config))

    def container_of(self, path: str) -> dict:
        """The model entry that holds the layer at ``path``."""
        return container_of(self.config, path)

    def entry(self, path: str) -> dict:
        return entry_at(self.config, path)

    # -- edits ---------------------------------------------------------------------------------
    closed: bool = False  # set once the runner has rebuilt from this editor

    def queue(self, statement, fn) -> None:
        if self.closed:
            raise RuntimeError("edit queued on an editor that was already rebuilt (a pass held it across a flush)")
        fn(self)
        self.edits.append(Edit(statement, fn))

    def entry_paths(self) -> list[str]:
        """Every layer path, nested models included (not their inputs)."""
        return [c.path for c in walk_config(self.config, models=True)]

    def top_entries(self) -> list[dict]:
        return [e for e in layers_of(self.config) if e.get("class_name") != "InputLayer"]

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
        for entry in layers_of(container):
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
        outputs = [] if only else tensor_refs(cfg["output_layers"])
        for path in paths:
            if "/" in path:
                refs = [self._expose(path, span)]
            else:
                entry = self.entry(path)
                nodes = entry.get("inbound_nodes") or []
                if not nodes:
                    raise ApplyError(f"tap {path}: the layer is not called in the model's graph", span=span)
                refs = [[entry["config"]["name"], index, 0] for index in range(len(nodes))]
            for ref in refs:
                if ref not in outputs:
                    outputs.append(ref)
        cfg["output_layers"] = outputs

    def _expose(self, path: str, span=None) -> list:
        """Make the layer at a nested ``path`` an extra output of every model around it, and return the
        reference to it in the outer model. Nested models stay nested (they gain an output); a nested
        Sequential becomes a functional model, since a Sequential has one output."""
        parts = path.split("/")
        name, inner_path = parts[-1], "/".join(parts[:-1])
        model_entry = self.entry(inner_path)
        if model_entry["class_name"] == "Sequential":
            converted = sequential_to_functional({"config": model_entry["config"]})
            for key in ("module", "class_name", "registered_name", "config"):
                model_entry[key] = converted[key]
        entry = next(e for e in layers_of(model_entry) if e["config"]["name"] == name)
        if len(entry.get("inbound_nodes") or []) != 1:
            raise ApplyError(f"tap {path}: the layer is called {len(entry.get('inbound_nodes') or [])} times "
                             "inside its model; tap a layer called once", span=span)
        cfg = model_entry["config"]
        outputs = tensor_refs(cfg["output_layers"])
        ref = [name, 0, 0]
        if ref not in outputs:
            outputs.append(ref)
        cfg["output_layers"] = outputs
        index = outputs.index(ref)
        if "/" in inner_path:
            return self._expose_ref(inner_path, index, span)
        return [parts[0], 0, index]

    def _expose_ref(self, model_path: str, index: int, span=None) -> list:
        """Expose output ``index`` of the nested model at ``model_path`` through its parent models."""
        parts = model_path.split("/")
        parent_path = "/".join(parts[:-1])
        parent = self.entry(parent_path)
        if parent["class_name"] == "Sequential":
            raise ApplyError(f"tap: {parent_path} is a Sequential holding a nested model; tap the nested model",
                             span=span)
        cfg = parent["config"]
        outputs = tensor_refs(cfg["output_layers"])
        ref = [parts[-1], 0, index]
        if ref not in outputs:
            outputs.append(ref)
        cfg["output_layers"] = outputs
        position = outputs.index(ref)
        if "/" in parent_path:
            return self._expose_ref(parent_path, position, span)
        return [parent_path, 0, position]

    # -- surgery -------------------------------------------------------------------------------
    @staticmethod
    def _is_sequential(container: dict) -> bool:
        return container.get("class_name") == "Sequential"

    def _layer_list(self, path: str) -> tuple[dict, list, int]:
        container = self.container_of(path)
        layers = layers_of(container)
        name = path.split("/")[-1]
        index = next(i for i, e in enumerate(layers) if e["config"]["name"] == name)
        return container, layers, index

    def _new_entry(self, serialized: dict, inbound) -> dict:
        entry = {k: copy.deepcopy(serialized.get(k)) for k in ("module", "class_name", "config", "registered_name")}
        entry["name"] = entry["config"]["name"]
        if inbound is not None:
            entry["inbound_nodes"] = inbound
        return entry

    def _fresh_name(self, container: dict, wanted: str) -> str:
        taken = {e["config"]["name"] for e in layers_of(container)}
        if wanted not in taken:
            return wanted
        n = 1
        while f"{wanted}_{n}" in taken:
            n += 1
        return f"{wanted}_{n}"

    def _history_refs(self, container: dict):
        """Every [layer, node, tensor] reference in the container: inbound nodes and outputs."""
        for entry in layers_of(container):
            for node in entry.get("inbound_nodes") or []:
                yield from histories(node)
        cfg = container["config"]
        outs = cfg.get("output_layers")
        if outs:
            if isinstance(outs[0], str):
                yield outs
            else:
                yield from outs

    def _retarget(self, container: dict, old: list, new: list, skip_entry: dict | None = None) -> int:
        count = 0
        for entry in layers_of(container):
            if entry is skip_entry:
                continue
            for node in entry.get("inbound_nodes") or []:
                for hist in histories(node):
                    if list(hist[:3]) == list(old):
                        hist[0], hist[1], hist[2] = new
                        count += 1
        cfg = container["config"]
        outs = cfg.get("output_layers")
        if outs:
            refs = [outs] if isinstance(outs[0], str) else outs
            for ref in refs:
                if list(ref[:3]) == list(old):
                    ref[0], ref[1], ref[2] = new
                    count += 1
        return count

    @staticmethod
    def _single_input(entry: dict, what: str, span=None) -> list[list]:
        """Per inbound node, the one tensor it reads; an error for merge layers."""
        inputs = []
        for node in entry.get("inbound_nodes") or []:
            hists = list(histories(node))
            if len(hists) != 1:
                raise ApplyError(f"{what}: layer {entry['config']['name']!r} takes {len(hists)} inputs (a merge "
                                 "layer); this needs a layer with exactly one input", span=span)
            inputs.append(list(hists[0][:3]))
        return inputs

    def _new_name(self, container: dict, serialized: dict, explicit: bool, span) -> str:
        wanted = serialized["config"]["name"]
        if explicit and any(e["config"]["name"] == wanted for e in layers_of(container)):
            raise ApplyError(f"name {wanted!r} is already used by another layer of that model", span=span)
        return self._fresh_name(container, wanted)

    def insert(self, serialized: dict, where: str, path: str, parts, span=None, explicit_name=False) -> str:
        container, layers, index = self._layer_list(path)
        anchor = layers[index]
        name = self._new_name(container, serialized, explicit_name, span)
        serialized = copy.deepcopy(serialized)
        serialized["config"]["name"] = name
        new_path = "/".join(path.split("/")[:-1] + [name])
        self.fresh[new_path] = parts
        if self._is_sequential(container):
            entry = self._new_entry(serialized, None)
            layers.insert(index + 1 if where == "after" else index, entry)
            return new_path
        nodes = anchor.get("inbound_nodes") or []
        if where == "after":
            if len(nodes) > 1:
                raise ApplyError(f"insert after {path}: the layer is called {len(nodes)} times (a shared layer); "
                                 "say which call by inserting before its consumers instead", span=span)
            entry = self._new_entry(serialized, [[[anchor["config"]["name"], 0, 0, {}]]])
            self._retarget(container, [anchor["config"]["name"], 0, 0], [name, 0, 0])
            layers.insert(index + 1, entry)
        else:
            if anchor.get("class_name") == "InputLayer":
                raise ApplyError(f"insert before {path}: nothing comes before an input", span=span)
            inputs = self._single_input(anchor, f"insert … before {path}", span)
            if len(inputs) != 1:
                raise ApplyError(f"insert before {path}: the layer is called {len(inputs)} times (a shared layer)",
                                 span=span)
            entry = self._new_entry(serialized, [[inputs[0] + [{}]]])
            for node in anchor["inbound_nodes"]:
                for hist in histories(node):
                    hist[0], hist[1], hist[2] = name, 0, 0
            layers.insert(index, entry)
        return new_path

    def remove(self, path: str, span=None) -> None:
        container, layers, index = self._layer_list(path)
        entry = layers[index]
        if self._is_sequential(container):
            del layers[index]
            return
        inputs = self._single_input(entry, f"remove {path}", span)
        name = entry["config"]["name"]
        for k, source in enumerate(inputs):
            self._retarget(container, [name, k, 0], source)
        del layers[index]
        if any(ref[0] == name for ref in self._history_refs(container)):
            raise ApplyError(f"remove {path}: other layers read more than its first output", span=span)

    def permute(self, paths: list[str], order: list[int], span=None) -> None:
        """Layer i of ``paths`` moves to the position of layer order[i]'s... see Shuffle: the layer at
        position paths[i] becomes the layer that was at paths[order[i]]."""
        containers = {id(self.container_of(p)) for p in paths}
        if len(containers) != 1:
            raise ApplyError("swap and shuffle move layers within one model; these are in different nested models",
                             span=span)
        container = self.container_of(paths[0])
        layers = layers_of(container)
        names = [p.split("/")[-1] for p in paths]
        indices = [next(i for i, e in enumerate(layers) if e["config"]["name"] == n) for n in names]
        payloads = [{k: copy.deepcopy(layers[i].get(k)) for k in ("module", "class_name", "config",
                                                                 "registered_name", "build_config")}
                    for i in indices]
        if not self._is_sequential(container):
            for i in indices:
                self._single_input(layers[i], "swap/shuffle", span)
                if len(layers[i].get("inbound_nodes") or []) != 1:
                    raise ApplyError(f"layer {layers[i]['config']['name']!r} is called several times (shared); "
                                     "it cannot change places", span=span)
            # a reference to position k must now name the layer that moves there
            rename = {names[k]: names[order[k]] for k in range(len(names))}
            for hist in list(self._history_refs(container)):
                if hist[0] in rename:
                    hist[0] = rename[hist[0]]
        for k, i in enumerate(indices):
            payload = payloads[order[k]]
            for key, value in payload.items():
                if value is None:
                    layers[i].pop(key, None)
                else:
                    layers[i][key] = value
            if "name" in layers[i]:
                layers[i]["name"] = layers[i]["config"]["name"]
            layers[i].pop("build_config", None)

    def cut(self, path: str, span=None) -> None:
        if "/" in path:
            raise ApplyError(f"cut after {path}: cut applies to the outer model's layers", span=span,
                             hint="cut after the nested model itself, or tap the inner layer")
        layers = layers_of(self.config)
        name = path
        if self._is_sequential(self.config):
            index = next(i for i, e in enumerate(layers) if e["config"]["name"] == name)
            del layers[index + 1:]
            return
        entry = next(e for e in layers if e["config"]["name"] == name)
        if len(entry.get("inbound_nodes") or []) > 1:
            raise ApplyError(f"cut after {path}: the layer is called several times; which output is meant?", span=span)
        cfg = self.config["config"]
        cfg["output_layers"] = [[name, 0, 0]]
        by_name = {e["config"]["name"]: e for e in layers}
        keep, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current in keep:
                continue
            keep.add(current)
            for node in by_name[current].get("inbound_nodes") or []:
                todo.extend(h[0] for h in histories(node))
        self.config["config"]["layers"] = [e for e in layers if e["config"]["name"] in keep]
        inputs = [r for r in tensor_refs(cfg["input_layers"]) if r[0] in keep]
        cfg["input_layers"] = inputs

    def append(self, serialized: dict, anchor: str | None, parts, span=None, explicit_name=False) -> str:
        container = self.config
        name = self._new_name(container, serialized, explicit_name, span)
        serialized = copy.deepcopy(serialized)
        serialized["config"]["name"] = name
        self.fresh[name] = parts
        layers = layers_of(container)
        if self._is_sequential(container):
            if anchor is not None and anchor != layers[-1]["config"]["name"]:
                raise ApplyError(f"append … after {anchor}: {anchor} is not the model's output", span=span)
            layers.append(self._new_entry(serialized, None))
            return name
        outputs = tensor_refs(container["config"]["output_layers"])
        if anchor is None:
            if len(outputs) != 1:
                names = ", ".join(r[0] for r in outputs)
                raise ApplyError(f"the model has {len(outputs)} outputs ({names}); say which: append … after NAME",
                                 span=span)
            target = outputs[0]
        else:
            matching = [r for r in outputs if r[0] == anchor]
            if not matching:
                raise ApplyError(f"append … after {anchor}: {anchor} is not an output of the model "
                                 f"(outputs: {', '.join(r[0] for r in outputs)})", span=span)
            target = matching[0]
        layers.append(self._new_entry(serialized, [[list(target[:3]) + [{}]]]))
        container["config"]["output_layers"] = [[name, 0, 0] if r == target else r for r in outputs]
        return name

    def set_field(self, path: str, key: str, value, statement, span=None) -> None:
        entry = self.entry(path)
        config = entry["config"]
        if key not in config:
            import difflib
            guess = difflib.get_close_matches(key, list(config), n=1)
            raise ApplyError(f"set {key}: {entry['class_name']} layer {path} has no setting {key!r}"
                             + (f" (did you mean {guess[0]!r}?)" if guess else ""), span=span,
                             hint="its settings: " + ", ".join(k for k in config if k != "name"))
        config[key] = value
        self.reshape[path] = statement
        # Keras rebuilds a layer from its recorded input shape before calling it; a field such as `units`
        # changes what the next layers receive, so let every layer build from what it now receives.
        def strip(model_entry):
            for e in layers_of(model_entry):
                e.pop("build_config", None)
                if is_model_entry(e):
                    strip(e)
        strip(self.config)

    def rename(self, path: str, new_name: str, span=None) -> str:
        container, layers, index = self._layer_list(path)
        entry = layers[index]
        old_name = entry["config"]["name"]
        if new_name == old_name:
            return path
        if any(e["config"]["name"] == new_name for e in layers):
            raise ApplyError(f"cannot rename {path} to {new_name!r}: another layer of that model has that name",
                             span=span)
        entry["config"]["name"] = new_name
        if "name" in entry:
            entry["name"] = new_name
        self._rename_references(path, old_name, new_name)
        new_path = "/".join(path.split("/")[:-1] + [new_name])
        self.origin[new_path] = self.origin.pop(path, path)
        if path in self.fresh:
            self.fresh[new_path] = self.fresh.pop(path)
        return new_path

    # -- rebuild -------------------------------------------------------------------------------
    def build(self, old_layers):
        """Rebuild the edited model and move weights across from ``old_layers`` (the LayerInfos of the
        model before the edits: layers.walk of a Keras model, or an archive's layers); on failure,
        blame one statement."""
        try:
            return self._build(self.config, old_layers, self.fresh)
        except ApplyError as exc:
            if len(self.edits) <= 1:
                self._blame(exc, self.edits[0].statement if self.edits else None)
            culprit = self._find_culprit(old_layers)
            self._blame(exc, culprit)

    def _find_culprit(self, old_layers):
        """Replay the queued edits one at a time from the original config to find the first failure."""
        replay = GraphEditor.__new__(GraphEditor)
        replay.model, replay.seed = self.model, self.seed
        replay.base_config = self.base_config
        replay.config = copy.deepcopy(self.base_config)
        replay.fresh, replay.edits, replay.origin, replay.reshape, replay.reshaped = {}, [], {}, {}, {}
        replay.closed = False
        for edit in self.edits:
            try:
                edit.apply(replay)
                replay._build(replay.config, old_layers, replay.fresh)
            except ApplyError:
                return edit.statement
        return self.edits[-1].statement

    @staticmethod
    def _blame(exc: ApplyError, statement) -> None:
        if statement is not None and exc.span is None:
            raise ApplyError(f"`{statement}`: {exc.message}", span=statement.span, hint=exc.hint) from exc
        raise exc

    def _build(self, config: dict, old_layers, fresh: dict):
        import keras
        config = copy.deepcopy(config)
        _restore_single_refs(config, self.base_config)
        # Building a functional model calls every layer on symbolic tensors, which checks every shape
        # and argument; no forward pass on real data is needed to know the graph holds.
        try:
            with LazyVariables() as lazy:
                new_model = keras.saving.deserialize_keras_object(copy.deepcopy(config), safe_mode=True)
        except Exception:  # noqa: BLE001 - built the ordinary way below, which says what is wrong
            lazy = None
            try:
                new_model = keras.saving.deserialize_keras_object(copy.deepcopy(config), safe_mode=True)
            except Exception as exc:  # Keras reports shape and argument problems as many exception types
                if not needs_tensorflow(exc):
                    raise ApplyError(f"the edited model does not build: {_first_line(exc)}") from exc
                # a layer that needs TensorFlow whatever the backend (StringLookup, …): let Keras import it
                new_model = keras.saving.deserialize_keras_object(config, safe_mode=True)
        try:
            self.reshaped = transfer_weights(old_layers, new_model, fresh, self.seed, self.origin, self.reshape)
        finally:
            if lazy is not None:
                lazy.initialise_the_rest()
        return new_model


def _restore_single_refs(config: dict, base: dict) -> None:
    """Edits keep inputs and outputs as lists of references; where the model had a single input or
    output (Keras writes [name, node, index] then, and the model takes and returns a bare tensor), and
    still has one, write it back that way so callers see the same structure as before."""
    base_forms = {}
    for path, entry in model_entries(base):
        cfg = entry["config"]
        for key in ("input_layers", "output_layers"):
            refs = cfg.get(key)
            base_forms[(path, key)] = bool(refs) and isinstance(refs[0], str)
    for path, entry in model_entries(config):
        if entry.get("class_name") != "Functional":
            continue
        cfg = entry["config"]
        for key in ("input_layers", "output_layers"):
            refs = cfg.get(key)
            if refs and not isinstance(refs[0], str) and len(refs) == 1 and base_forms.get((path, key), True):
                cfg[key] = list(refs[0])


def _json_default(obj):
    """What json cannot encode on its own in a Keras config: numpy scalars and arrays."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} in a model config")


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


def transfer_weights(old_layers, new_model, fresh: dict, seed: int, origin: dict | None = None,
                     reshape: dict | None = None) -> dict:
    """Copy every kept layer's weights from ``old_layers`` (LayerInfos of the model before) into the
    rebuilt model (by path, following renames); initialise
    new layers from the seed. A layer whose weight shapes changed is an error, unless a statement in
    ``reshape`` (``set units = …``) allowed it: then it is initialised afresh and returned, so that the
    runner can insist the recipe reinitialises it."""
    old = {info.path: info for info in old_layers}
    origin = origin or {}
    reshaped = {}
    for info in walk(new_model):
        if info.path in fresh:
            init_fresh(info, fresh[info.path], seed)
            continue
        before = old.get(origin.get(info.path, info.path))
        if before is None:
            raise ApplyError(f"layer {info.path} appeared in the rebuilt model without a statement creating it")
        new_shapes = [tuple(v.shape) for v in info.layer.weights]
        old_shapes = [tuple(v.shape) for v in before.layer.weights]
        if new_shapes != old_shapes and reshape:
            statement = next(iter(reshape.values()))
            init_fresh(info, (str(statement), "reshaped"), seed)
            reshaped[info.path] = statement
            continue
        if new_shapes != old_shapes:
            detail = "; ".join(f"{v.name} {tuple(o)} -> {tuple(n)}" for v, o, n in
                               zip(info.layer.weights, old_shapes, new_shapes) if o != n) or \
                f"{len(old_shapes)} weight arrays -> {len(new_shapes)}"
            raise ApplyError(f"layer {info.path} would change shape ({detail}), so its weights cannot be kept",
                             hint="its input changed; replace or reinitialise it in the same recipe")
        if old_shapes:
            copy_variables(info.layer, before.layer.weights)
    return reshaped


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


def init_fresh(info: LayerInfo, parts, seed: int) -> None:
    """Initialise every variable of a layer a statement created, reproducibly from the seed, with the
    same values on every backend (initializers.initial_values)."""
    values = []
    for var in info.layer.weights:
        init = initializer_for(info.layer, var.name)
        if init is None:
            raise ApplyError(f"layer {info.path}: cannot initialise variable {var.name!r} reproducibly "
                             "(its config names no initializer for it)")
        var_seed = derive_seed(seed, *parts, info.path, var.name) % (2**31 - 1)
        values.append(initial_values(init, tuple(var.shape), var.dtype, var_seed))
    if values:
        set_variables(info.layer, values)


def probe_inputs(model, rng, batch: int = 1):
    """Seeded random inputs of the model's input shapes (None dimensions become ``batch`` or 32)."""
    arrays = []
    for tensor in model.inputs:
        shape = [batch] + [32 if d is None else int(d) for d in tuple(tensor.shape)[1:]]
        dtype = np.dtype(str(tensor.dtype)) if str(tensor.dtype) != "string" else np.float32
        arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays
