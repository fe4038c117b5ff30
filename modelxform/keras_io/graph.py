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
import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ApplyError
from ..rng import derive_seed
from .config import (ConfigLayer, NotInGraph, container_of, copied, entry_at, flat_order, histories, io_refs,
                     is_model_entry, layers_of, model_entries, tensor_refs, walk as walk_config)
from .backend import needs_tensorflow
from .initializers import initial_values
from .layers import LayerInfo, walk
from .memory import bytes_text as _bytes
from .memory import memory_limit
from .variables import LazyVariables, copy_variables, set_variables


def not_a_node(exc: NotInGraph) -> ApplyError:
    """Why a structural statement cannot act on a layer that is no node of a graph."""
    holder = exc.holder
    if holder is None:
        return ApplyError(f"no layer {exc.path!r} in the model's graph")
    cls = holder.get("class_name", "?")
    if holder.get("module", "").startswith("keras_hub") or isinstance(holder.get("config", {}).get("backbone"), dict) \
            or cls.endswith(("Backbone", "Classifier", "CausalLM")):
        return ApplyError(
            f"{exc.path} is inside {exc.holder_path} ({cls}), a model class whose saved config holds its "
            "constructor arguments, not its layers: its layers are not nodes of a graph modelxform can edit",
            hint=f"add `unwrap {exc.holder_path}` before it: that makes {exc.holder_path} a plain functional "
                 f"model of its layers (the {cls} class is dropped)")
    return ApplyError(
        f"{exc.path} is a sublayer of {exc.holder_path} ({cls}): it is built inside that layer, not a node of "
        "the model's graph, so structural statements cannot move, replace or tap it",
        hint=f"act on {exc.holder_path} itself; weight statements, freeze and unfreeze do reach its sublayers")


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
    unsafe: bool = False  # --unsafe: the rebuild may deserialize what safe mode refuses (a Lambda's code)
    config: dict = field(init=False)
    base_config: dict = field(init=False)
    fresh: dict = field(default_factory=dict)  # path -> parts that seed its new weights
    edits: list = field(default_factory=list)
    origin: dict = field(default_factory=dict)  # new path -> old path, for renamed layers
    reshape: dict = field(default_factory=dict)  # statement allowing weight shapes to change (set …)
    reshaped: dict = field(default_factory=dict)  # after build: path -> the statement that reshaped it
    # path -> fn(old layers by path) -> the layer's arrays in ``layer.weights`` order: weights a statement
    # computes from the model before the edits (fold batchnorm, prune channels) instead of copying them
    computed: dict = field(default_factory=dict)
    input_statement: object = None  # `set input shape …`, when one changed an input (for its error messages)
    nested_inputs: set = field(default_factory=set)  # nested models whose input shapes the rebuild must find

    def __post_init__(self):
        # Keras's in-memory config mixes tuples and lists (an inbound node's args are a tuple); its JSON
        # form, which is what a .keras file holds and loads from, has lists only and edits in place.
        if isinstance(self.model, dict):
            config = self.model
        else:
            import keras
            config = keras.saving.serialize_keras_object(self.model)
        self.base_config = json.loads(json.dumps(config, default=_json_default))
        self.config = copied(self.base_config)

    # -- views ---------------------------------------------------------------------------------
    def leaves(self) -> list[ConfigLayer]:
        return list(walk_config(self.config))

    def container_of(self, path: str) -> dict:
        """The model entry that holds the layer at ``path``."""
        try:
            return container_of(self.config, path)
        except NotInGraph as exc:
            raise not_a_node(exc) from None

    def entry(self, path: str) -> dict:
        try:
            return entry_at(self.config, path)
        except NotInGraph as exc:
            raise not_a_node(exc) from None

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
        self.computed.pop(path, None)
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
            for ref in io_refs(cfg.get(key)):
                if ref and ref[0] == old:
                    ref[0] = new

    def tap(self, paths: list[str], only: bool, span=None) -> None:
        if self.config["class_name"] == "Sequential":
            self.config = sequential_to_functional(self.config)
        cfg = self.config["config"]
        keyed = isinstance(cfg["output_layers"], dict)  # dict outputs stay a dict: a tap adds a key
        outputs = ({} if keyed else []) if only else (dict(cfg["output_layers"]) if keyed
                                                       else tensor_refs(cfg["output_layers"]))
        for path in paths:
            if "/" in path:
                refs = [self._expose(path, span)]
            else:
                entry = self.entry(path)
                nodes = entry.get("inbound_nodes") or []
                if not nodes:
                    raise ApplyError(f"tap {path}: the layer is not called in the model's graph", span=span)
                refs = [[entry["config"]["name"], index, 0] for index in range(len(nodes))]
            for n, ref in enumerate(refs):
                if keyed:
                    if ref not in list(outputs.values()):
                        key = path.replace("/", "_") + (f"_{n}" if n else "")
                        outputs[key if key not in outputs else f"{key}_tap"] = ref
                elif ref not in outputs:
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
        index = self._add_output(model_entry["config"], [name, 0, 0], name)
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
        position = self._add_output(parent["config"], [parts[-1], 0, index], f"{parts[-1]}_{index}")
        if "/" in parent_path:
            return self._expose_ref(parent_path, position, span)
        return [parent_path, 0, position]

    @staticmethod
    def _add_output(cfg: dict, ref: list, key: str) -> int:
        """Make ``ref`` one of a (nested) model's outputs, if it is not already, and return its index among
        the model's flat outputs (what a reference to it from the graph around it names)."""
        outputs = cfg["output_layers"]
        if isinstance(outputs, dict):
            if ref not in list(outputs.values()):
                outputs[key if key not in outputs else f"{key}_tap"] = ref
        else:
            outputs = tensor_refs(outputs)
            if ref not in outputs:
                outputs.append(ref)
            cfg["output_layers"] = outputs
        return flat_order(cfg["output_layers"]).index(ref)

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
        yield from io_refs(container["config"].get("output_layers"))

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
        for ref in io_refs(container["config"].get("output_layers")):
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

    # The outputs the last `insert … after` moved: (the model they are outputs of, "" for the top one; the
    # output's index, as `assert output N` counts; the layer it read; the layer it reads now)
    outputs_moved: tuple = ()

    def insert(self, serialized: dict, where: str, path: str, parts, span=None, explicit_name=False) -> str:
        self.outputs_moved = ()
        container, layers, index = self._layer_list(path)
        anchor = layers[index]
        name = self._new_name(container, serialized, explicit_name, span)
        serialized = copy.deepcopy(serialized)
        serialized["config"]["name"] = name
        owner = path.rpartition("/")[0]  # (the model the layer is in: "" for the top one)
        new_path = f"{owner}/{name}" if owner else name
        self.fresh[new_path] = parts
        if self._is_sequential(container):
            entry = self._new_entry(serialized, None)
            layers.insert(index + 1 if where == "after" else index, entry)
            if where == "after" and index == len(layers) - 2:  # (after the last layer: the new one is the output)
                self.outputs_moved = ((owner, 0, anchor["config"]["name"], name),)
            return new_path
        nodes = anchor.get("inbound_nodes") or []
        if where == "after":
            # A shared anchor (called n times) gets the new layer after every call, and the new layer is
            # itself shared: one entry called n times, its k-th call on the anchor's k-th output (Keras
            # creates a layer's nodes in the order its config lists them).
            anchor_name = anchor["config"]["name"]
            calls = max(1, len(nodes))
            entry = self._new_entry(serialized, [[[anchor_name, k, 0, {}]] for k in range(calls)])
            outputs = [list(ref[:3]) for ref in flat_order(container["config"].get("output_layers"))]
            for k in range(calls):
                self._retarget(container, [anchor_name, k, 0], [name, k, 0])
            now = [list(ref[:3]) for ref in flat_order(container["config"].get("output_layers"))]
            self.outputs_moved = tuple((owner, k, old[0], new[0]) for k, (old, new) in enumerate(zip(outputs, now))
                                       if old != new)
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
        self.computed.pop(path, None)
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
        if isinstance(cfg["input_layers"], dict):
            cfg["input_layers"] = {k: r for k, r in cfg["input_layers"].items() if r[0] in keep}
        else:
            cfg["input_layers"] = [r for r in tensor_refs(cfg["input_layers"]) if r[0] in keep]

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
        current = container["config"]["output_layers"]
        if isinstance(current, dict):
            container["config"]["output_layers"] = {k: ([name, 0, 0] if list(r) == target else r)
                                                     for k, r in current.items()}
        else:
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
        _strip_build_configs(self.config)

    def inputs(self) -> list[tuple[str, list]]:
        """(name, batch shape) of the model's inputs, in order (a Sequential model has one)."""
        cfg = self.config["config"]
        if self._is_sequential(self.config):
            layers = layers_of(self.config)
            if layers and layers[0].get("class_name") == "InputLayer":
                return [(layers[0]["config"]["name"], list(layers[0]["config"]["batch_shape"]))]
            shape = cfg.get("build_input_shape")
            return [(cfg["name"] + "_input", list(shape) if shape else None)]
        by_name = {e["config"]["name"]: e for e in layers_of(self.config)}
        out = []
        for name, _, _ in tensor_refs(cfg.get("input_layers")):
            entry = by_name.get(name)
            shape = entry["config"].get("batch_shape") if entry is not None else None
            out.append((name, list(shape) if shape is not None else None))
        return out

    def set_input_shape(self, index: int, shape: list, statement) -> None:
        """Give input ``index`` the batch shape ``shape``; every layer then builds from what it receives
        (weights whose shape depends on the input size are refused at the rebuild, naming the layer).
        Keras checks what a nested model receives against its declared input shape, so nested models
        are built first with open input shapes and then given the shapes they receive (_build)."""
        self.input_statement = statement
        if self._is_sequential(self.config):
            self._set_sequential_input(self.config, shape)
        else:
            target_name = self.inputs()[index][0]
            entry = next(e for e in layers_of(self.config) if e["config"]["name"] == target_name)
            entry["config"]["batch_shape"] = list(shape)
        for item in walk_config(self.config, models=True, leaves=False):
            self.nested_inputs.add(item.path)
            _open_inputs(item.entry)
        _strip_build_configs(self.config)
        self.config.pop("build_config", None)  # a Sequential model records its own input shape there too

    @staticmethod
    def _set_sequential_input(entry: dict, shape) -> None:
        layers = layers_of(entry)
        if layers and layers[0].get("class_name") == "InputLayer":
            layers[0]["config"]["batch_shape"] = list(shape)
        else:
            entry["config"]["build_input_shape"] = list(shape)

    def _close_inputs(self, config: dict, built, depth: int) -> None:
        """Give the nested models ``depth`` levels down whose inputs set_input_shape opened the shapes they
        receive in ``built`` (the model built from ``config``)."""
        from .layers import nested_models
        models = {"": built, **nested_models(built)}
        for path in sorted(p for p in self.nested_inputs if p.count("/") == depth):
            parent_path = "/".join(path.split("/")[:-1])
            parent, name = entry_at(config, parent_path) if parent_path else config, path.split("/")[-1]
            entry = next(e for e in layers_of(parent) if e["config"]["name"] == name)
            parent_model = models.get(parent_path)
            shapes = _received_shapes(parent, entry, parent_model)
            if shapes is None:
                continue
            if self._is_sequential(entry):
                if len(shapes) == 1:
                    self._set_sequential_input(entry, shapes[0])
                continue
            refs = tensor_refs(entry["config"].get("input_layers"))
            if len(refs) != len(shapes):
                continue
            by_name = {e["config"]["name"]: e for e in layers_of(entry)}
            for ref, received in zip(refs, shapes):
                inner = by_name.get(ref[0])
                if inner is not None and inner.get("class_name") == "InputLayer":
                    inner["config"]["batch_shape"] = list(received)

    # -- deployment transforms (keras_io/deploy.py) ---------------------------------------------
    def batchnorm_folds(self, infos: dict, wanted: set | None = None):
        """(folds, skips): the BatchNormalization layers that fold into the layer before them, and the
        others with the reason (``infos``: path -> LayerInfo of the model as it stands)."""
        from .deploy import batchnorm_folds
        return batchnorm_folds(self.config, infos, wanted)

    def fold_batchnorm(self, folds) -> None:
        from .deploy import fold_edit
        fold_edit(self, folds)

    def plan_channel_pruning(self, infos: dict, selected: list[str], percent: float):
        """What pruning ``percent`` % of the selected layers' output channels does (deploy.ChannelPlan);
        an ApplyError names a layer the pruned channels cannot pass through."""
        from .deploy import plan_channel_pruning
        from .shapes import ShapeFinder
        return plan_channel_pruning(self.config, infos, selected, percent, ShapeFinder(self.config))

    def prune_channels(self, plan) -> None:
        for edit in plan.edits:
            edit(self)
        _strip_build_configs(self.config)  # the shrunk layers build from what they now receive

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
        if path in self.computed:
            self.computed[new_path] = self.computed.pop(path)
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

    def _replay(self) -> "GraphEditor":
        """An editor on the original config with nothing queued, to apply the queued edits to again."""
        replay = GraphEditor.__new__(GraphEditor)
        replay.model, replay.seed, replay.unsafe = self.model, self.seed, self.unsafe
        replay.base_config = self.base_config
        replay.config = copied(self.base_config)
        replay.fresh, replay.edits, replay.origin, replay.reshape, replay.reshaped = {}, [], {}, {}, {}
        replay.computed, replay.input_statement, replay.nested_inputs = {}, None, set()
        replay.closed = False
        return replay

    def models_between(self, counts: list[int]) -> list:
        """The model as it stands after the first n queued edits, for each n of ``counts`` (ascending):
        what a report says each of several structural statements rebuilt together did. Built without
        values where Keras allows (LazyVariables: layers, shapes and variables' shapes only, a fraction
        of a rebuild), the ordinary way where it does not, as the rebuild itself is; None where that state
        does not build on its own. Python's random state is as it was afterwards: Keras draws from it for
        the default seed of every initializer and seed generator it makes, and these models are only
        looked at, so they must not change what a later build draws."""
        import random
        replay, done, models = self._replay(), 0, []
        state = random.getstate()
        try:
            for n in counts:
                try:
                    for edit in self.edits[done:n]:
                        edit.apply(replay)
                    model = replay._deserialized(replay.config)[0]
                except Exception:  # noqa: BLE001 - the caller says what it can without this state
                    model = None
                done = n
                models.append(model)
        finally:
            random.setstate(state)
        return models

    def _find_culprit(self, old_layers):
        """Replay the queued edits one at a time from the original config to find the first failure."""
        replay = self._replay()
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
        new_model, lazy = self._deserialized(config)
        if lazy is not None:
            check_memory(new_model)  # before a value is given to any variable: a refusal, not an OOM
        try:
            self.reshaped = transfer_weights(old_layers, new_model, fresh, self.seed, self.origin, self.reshape,
                                             self.computed, self.input_statement)
        finally:
            if lazy is not None:
                lazy.initialise_the_rest()
        return new_model

    def _deserialized(self, config: dict):
        """The model ``config`` describes, built with its variables left without values (and the
        LazyVariables that holds them), or, where that fails, the ordinary way (and None): Keras then
        says what is wrong, or a layer that needs TensorFlow is let import it."""
        import keras
        config = copied(config)
        _restore_single_refs(config, self.base_config)
        # nested models whose inputs set_input_shape opened learn their shapes one level at a time: a
        # model inside another receives what its parent, once closed, computes
        for depth in sorted({path.count("/") for path in self.nested_inputs}):
            try:
                with LazyVariables():  # (deserializing changes the config it reads: give it a copy)
                    opened = keras.saving.deserialize_keras_object(copied(config), safe_mode=not self.unsafe)
            except Exception:  # noqa: BLE001 - built below, which says what is wrong
                break
            self._close_inputs(config, opened, depth)
        # Building a functional model calls every layer on symbolic tensors, which checks every shape
        # and argument; no forward pass on real data is needed to know the graph holds.
        try:
            with LazyVariables() as lazy:
                # a copy: deserializing changes the config it reads, and a failure is built again below
                new_model = keras.saving.deserialize_keras_object(copied(config), safe_mode=not self.unsafe)
        except Exception:  # noqa: BLE001 - built the ordinary way below, which says what is wrong
            lazy = None
            try:
                new_model = keras.saving.deserialize_keras_object(copied(config), safe_mode=not self.unsafe)
            except Exception as exc:  # Keras reports shape and argument problems as many exception types
                if not needs_tensorflow(exc):
                    raise ApplyError(f"the edited model does not build: {_build_failure(exc)}") from exc
                # a layer that needs TensorFlow whatever the backend (StringLookup, …): let Keras import it
                new_model = keras.saving.deserialize_keras_object(config, safe_mode=not self.unsafe)
        return new_model, lazy


def check_memory(model) -> None:
    """Refuse (ApplyError, exit 4) a rebuilt model whose variables could not fit in memory, before they
    are given values: `append Dense(units=100000000000)` would otherwise end in TensorFlow's
    ResourceExhaustedError after a long wait."""
    total, count = 0, 0
    for var in model.weights:
        size = math.prod(int(d) for d in var.shape)
        dtype = str(var.dtype)
        count += size
        total += size * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
    limit = memory_limit()
    if limit is not None and total > limit:
        raise ApplyError(f"the edited model would hold {count:,} parameters ({_bytes(total)}), more than this "
                         f"machine's memory ({_bytes(limit)})", hint="check the sizes in the statement")


def _open_inputs(model_entry: dict) -> None:
    """A nested model's declared input shapes with every dimension but the last unknown."""
    if model_entry.get("class_name") == "Sequential":
        layers = layers_of(model_entry)
        if layers and layers[0].get("class_name") == "InputLayer":
            shape = layers[0]["config"].get("batch_shape")
            if shape:
                layers[0]["config"]["batch_shape"] = [None] * (len(shape) - 1) + [shape[-1]]
        elif model_entry["config"].get("build_input_shape"):
            shape = model_entry["config"]["build_input_shape"]
            model_entry["config"]["build_input_shape"] = [None] * (len(shape) - 1) + [shape[-1]]
        return
    names = {r[0] for r in tensor_refs(model_entry["config"].get("input_layers"))}
    for entry in layers_of(model_entry):
        if entry["config"]["name"] in names and entry.get("class_name") == "InputLayer":
            shape = entry["config"].get("batch_shape")
            if shape:
                entry["config"]["batch_shape"] = [None] * (len(shape) - 1) + [shape[-1]]


def _received_shapes(parent: dict, entry: dict, parent_model) -> list | None:
    """The shapes of the tensors the layer ``entry`` of ``parent`` (a model entry) is called on, read off
    ``parent_model`` (parent built): the producers' outputs, through the public ``layer.output``."""
    if parent_model is None:
        return None
    name = entry["config"]["name"]
    if parent.get("class_name") == "Sequential":
        layers = [e for e in layers_of(parent)]
        position = next(i for i, e in enumerate(layers) if e["config"]["name"] == name)
        earlier = [e for e in layers[:position] if e.get("class_name") != "InputLayer"]
        try:
            if earlier:
                return [tuple(parent_model.get_layer(earlier[-1]["config"]["name"]).output.shape)]
            return [tuple(parent_model.inputs[0].shape)]
        except Exception:  # noqa: BLE001 - a shared or multi-output layer: no single answer
            return None
    nodes = entry.get("inbound_nodes") or []
    if len(nodes) != 1:
        return None
    shapes = []
    for hist in histories(nodes[0]):
        producer, node, tensor = hist[:3]
        if node != 0:
            return None
        try:
            output = parent_model.get_layer(producer).output
        except Exception:  # noqa: BLE001
            return None
        if isinstance(output, (list, tuple)):
            output = output[tensor]
        shapes.append(tuple(output.shape))
    return shapes


def _strip_build_configs(model_entry: dict) -> None:
    """Forget every layer's recorded input shape: Keras builds a layer from it before calling it, and
    an edit that changes what layers receive must let each build from what it now receives."""
    for entry in layers_of(model_entry):
        entry.pop("build_config", None)
        if is_model_entry(entry):
            _strip_build_configs(entry)


def _restore_single_refs(config: dict, base: dict) -> None:
    """Edits keep inputs and outputs as lists of references; where the model had a single input or
    output (Keras writes [name, node, index] then, and the model takes and returns a bare tensor), and
    still has one, write it back that way so callers see the same structure as before."""
    base_forms = {}
    for path, entry in model_entries(base):
        cfg = entry["config"]
        for key in ("input_layers", "output_layers"):
            refs = cfg.get(key)
            base_forms[(path, key)] = isinstance(refs, list) and bool(refs) and isinstance(refs[0], str)
    for path, entry in model_entries(config):
        if entry.get("class_name") != "Functional":
            continue
        cfg = entry["config"]
        for key in ("input_layers", "output_layers"):
            refs = cfg.get(key)
            if isinstance(refs, list) and refs and not isinstance(refs[0], str) and len(refs) == 1 \
                    and base_forms.get((path, key), True):
                cfg[key] = list(refs[0])


def _json_default(obj):
    """What json cannot encode on its own in a Keras config: numpy scalars and arrays."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} in a model config")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _build_failure(exc: Exception) -> str:
    """What went wrong when Keras built an edited config, naming the layer whose call failed. Keras's
    own message often names only the class ("Exception encountered when calling Reshape.call()", the
    reason in bold on a later line); the layer is the one functional.process_node was calling, read
    off the traceback (Keras's private function; tests/test_deploy.py fails if that stops working)."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if reason.startswith("Exception encountered when calling") and len(lines) > 1:
        reason = lines[1]
    layer = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "process_node":
            candidate = tb.tb_frame.f_locals.get("layer")
            layer = candidate if hasattr(candidate, "name") else layer
        tb = tb.tb_next
    if layer is not None and getattr(layer, "name", None) and repr(layer.name) not in reason:
        return f"layer {layer.name} ({type(layer).__name__}): {reason}"
    return reason


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
                     reshape: dict | None = None, computed: dict | None = None, input_statement=None) -> dict:
    """Copy every kept layer's weights from ``old_layers`` (LayerInfos of the model before) into the
    rebuilt model (by path, following renames); initialise new layers from the seed; give the layers in
    ``computed`` (path -> fn(old layers by path) -> arrays) the arrays a statement computed for them.
    A layer whose weight shapes changed is an error, unless a statement in ``reshape`` (``set units =
    …``) allowed it: then it is initialised afresh and returned, so that the runner can insist the
    recipe reinitialises it. ``input_statement`` (``set input shape …``) words that error as a weight
    that depends on the input size."""
    old = {info.path: info for info in old_layers}
    origin = origin or {}
    computed = computed or {}
    reshaped = {}
    for info in walk(new_model):
        if info.path in fresh:
            init_fresh(info, fresh[info.path], seed)
            continue
        if info.path in computed:
            set_variables(info.weights, computed[info.path](old), info.path)
            continue
        before = old.get(origin.get(info.path, info.path))
        if before is None:
            raise ApplyError(f"layer {info.path} appeared in the rebuilt model without a statement creating it")
        new_shapes = [tuple(v.shape) for v in info.weights]
        old_shapes = [tuple(v.shape) for v in before.weights]
        if new_shapes != old_shapes and reshape:
            statement = next(iter(reshape.values()))
            init_fresh(info, (str(statement), "reshaped"), seed)
            reshaped[info.path] = statement
            continue
        if new_shapes != old_shapes and input_statement is not None and len(new_shapes) == len(old_shapes):
            detail = "; ".join(f"{v.name} {tuple(o)} would need {tuple(n)}" for v, o, n in
                               zip(info.layer.weights, old_shapes, new_shapes) if o != n)
            raise ApplyError(f"the weights of {info.path} ({type(info.layer).__name__}) depend on the input size: "
                             f"{detail}; nothing was written",
                             hint="keep the input size this layer was built for, or replace the layer in the same "
                                  "recipe")
        if new_shapes != old_shapes:
            detail = "; ".join(f"{v.name} {tuple(o)} -> {tuple(n)}" for v, o, n in
                               zip(info.weights, old_shapes, new_shapes) if o != n) or \
                f"{len(old_shapes)} weight arrays -> {len(new_shapes)}"
            raise ApplyError(f"layer {info.path} would change shape ({detail}), so its weights cannot be kept",
                             hint="its input changed; replace or reinitialise it in the same recipe")
        if old_shapes:
            copy_variables(info.weights, before.weights, info.path)
    return reshaped


def initializer_for(layer, variable_name: str):
    """The initializer a layer names for one of its variables, or None: its config's
    ``<variable>_initializer`` (``depthwise_initializer`` for ``depthwise_kernel``), else the layer's
    attribute of that name, else — for a layer with one variable — the one initializer its config names
    (keras_hub's PositionEmbedding calls it ``initializer``)."""
    import keras
    config = layer.get_config()
    keys = [f"{variable_name}_initializer"]
    if variable_name.endswith("_kernel"):
        keys.append(variable_name[: -len("_kernel")] + "_initializer")
    for key in keys:
        if config.get(key) is not None:
            return keras.initializers.get(config[key])
    for key in keys:
        value = getattr(layer, key, None)
        if isinstance(value, keras.initializers.Initializer):
            return value
    named = [k for k in config if (k == "initializer" or k.endswith("_initializer")) and config[k] is not None]
    if len(layer.weights) == 1 and len(named) == 1:
        return keras.initializers.get(config[named[0]])
    return None


def init_fresh(info: LayerInfo, parts, seed: int) -> None:
    """Initialise every variable of a layer a statement created, reproducibly from the seed, with the
    same values on every backend (initializers.initial_values)."""
    values = []
    for var in info.weights:
        init = initializer_for(info.layer, var.name)
        if init is None:
            raise ApplyError(f"layer {info.path}: cannot initialise variable {var.name!r} reproducibly "
                             "(its config names no initializer for it)")
        var_seed = derive_seed(seed, *parts, info.path, var.name) % (2**31 - 1)
        values.append(initial_values(init, tuple(var.shape), var.dtype, var_seed))
    if values:
        set_variables(info.weights, values, info.path)


# the length of an integer input's unknown dimensions (token sequences): within any position embedding
PROBE_SEQUENCE = 8


def probe_inputs(model, rng, batch: int = 1) -> list:
    """Seeded random inputs for each of the model's flat inputs (``model.inputs``), following what each
    input is: floats from a standard normal (unknown dimensions 32); integer ids within the range of the
    embedding that reads them (unknown dimensions 8); masks (an integer or boolean input named ``…mask``)
    all ones. :func:`call_model` passes them in the model's input structure (a dict, for keras_hub)."""
    bounds = id_ranges(model)
    arrays = []
    for tensor in model.inputs:
        dtype = str(tensor.dtype)
        name = str(getattr(tensor, "name", ""))
        if dtype == "bool" or ("int" in dtype and "mask" in name.lower()):
            shape = [batch] + [PROBE_SEQUENCE if d is None else int(d) for d in tuple(tensor.shape)[1:]]
            arrays.append(np.ones(shape, dtype=dtype))
        elif "int" in dtype:
            shape = [batch] + [PROBE_SEQUENCE if d is None else int(d) for d in tuple(tensor.shape)[1:]]
            arrays.append(rng.integers(0, bounds.get(id(tensor), 2), size=shape).astype(dtype))
        else:
            shape = [batch] + [32 if d is None else int(d) for d in tuple(tensor.shape)[1:]]
            arrays.append(rng.standard_normal(shape).astype(np.dtype(dtype) if dtype != "string" else np.float32))
    return arrays


def call_model(model, arrays: list):
    """``model`` on flat input arrays, packed into its input structure, in inference mode; the outputs as
    a flat list of numpy arrays."""
    import keras
    structure = getattr(model, "_inputs_struct", None)  # what the model was built with: a dict, a list …
    if isinstance(structure, dict):
        inputs = keras.tree.pack_sequence_as(structure, arrays)
    else:
        inputs = arrays if len(arrays) > 1 else arrays[0]
    outputs = model(inputs, training=False)
    return [np.asarray(o) for o in keras.tree.flatten(outputs)]


def id_ranges(model) -> dict:
    """id(input tensor) -> how many ids the embedding layers that read that integer input take (the
    smallest ``input_dim`` among them), looking into nested models."""
    from .layers import is_model
    out: dict = {}

    def visit(container, tensor, key):
        for layer in container.layers:
            for node in getattr(layer, "_inbound_nodes", []):
                if getattr(node, "operation", None) is not layer:
                    continue
                flat = list(getattr(node, "input_tensors", []))
                positions = [k for k, t in enumerate(flat) if t is tensor]
                if not positions:
                    continue
                if is_model(layer):
                    inner = list(layer.inputs)
                    for k in positions:
                        if k < len(inner):
                            visit(layer, inner[k], key)
                elif isinstance(getattr(layer, "input_dim", None), int):
                    out[key] = min(out.get(key, layer.input_dim), layer.input_dim)
    for tensor in model.inputs:
        visit(model, tensor, id(tensor))
    return out


def unwrap(model, path: str | None, seed: int):
    """``model`` with the Functional subclass at ``path`` (None: the model itself) made a plain
    functional model of its layers, rebuilt from its graph's config with the weights carried across.
    Returns (the new model, the class it was, the class it is now)."""
    import keras

    from .layers import model_kind, nested_models
    target = model if path is None else nested_models(model)[path]
    kind, cls = model_kind(target), type(target).__name__
    where = f" {path}" if path else ""
    if kind in ("functional", "sequential"):
        return model, cls, cls
    if kind == "subclassed":
        raise ApplyError(f"unwrap{where}: {cls} is a subclassed model: its forward pass is Python code, not a "
                         "graph of layers, so there is nothing to unwrap")
    if path is not None and model_kind(model) != "functional":
        raise ApplyError(f"unwrap{where}: the model around it is a {type(model).__name__}; unwrap it first "
                         "(`unwrap`, then `unwrap " + path + "`)")
    tied = _tied_across_levels(target)
    if tied:
        raise ApplyError(f"unwrap{where}: {tied[0]} is used inside {tied[1]} and again in the graph around it "
                         "(tied weights): a plain functional model cannot hold one layer at two levels",
                         hint="weight statements, freeze and unfreeze work on the model as it is")
    # Functional's own get_config (the subclass's is its constructor arguments) gives the graph.
    plain = keras.Model(target.input, target.output, name=target.name)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(plain), default=_json_default))
    if path is None:
        editor = GraphEditor(serialized, seed)
    else:
        editor = GraphEditor(model, seed)
        entry = editor.entry(path)
        for key in ("module", "class_name", "config", "registered_name"):
            entry[key] = copy.deepcopy(serialized.get(key))
        entry.pop("build_config", None)
        entry.pop("compile_config", None)
    new_model = editor.build(walk(model))
    return new_model, cls, type(new_model if path is None else nested_models(new_model)[path]).__name__


def _tied_across_levels(model) -> tuple | None:
    """(layer name, nested model name) of a layer that is a node of ``model``'s graph and also a layer
    inside one of its nested models (GPT-2's token embedding, used again for the logits), or None."""
    from .layers import is_model
    top = {id(layer): layer.name for layer in model.layers if not is_model(layer)}
    for layer in model.layers:
        if is_model(layer):
            for inner in walk(layer):
                if id(inner.layer) in top:
                    return top[id(inner.layer)], layer.name
    return None
