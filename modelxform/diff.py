"""What is in a model, and what differs between two: the facts behind ``inspect``, ``diff`` and the
HTML report.

``snapshot(model)`` reads a model once into plain data: every leaf layer (nested models expanded, as
``keras_io.layers.walk`` names them) with its type, config, weights, trainable flag and shapes, plus the
connectivity read from the functional config (which layer feeds which, how often a layer is called, the
nested models and the model's inputs and outputs). ``diff(a, b)`` compares two snapshots::

    from modelxform.diff import snapshot, diff
    d = diff(snapshot(keras.saving.load_model("a.keras")), snapshot(keras.saving.load_model("b.keras")))
    print("\\n".join(d.lines()))      # or d.to_dict(); d.same is True when nothing differs

Layers are matched by path. A layer whose path is in both with another type is *replaced*; a layer only
in A and one only in B with the same type, the same config apart from the name and bit-identical
weights are one layer *renamed* (for layers without weights, they must also be fed by the same layers);
the rest are *removed* and *added*.
"""
from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .keras_io.config import flat_histories, flat_order, histories, is_model_entry
from .keras_io.layers import is_model, walk
from .keras_io.variables import StoredValues, as_bytes, paired_blocks, values_of

MODEL_CLASSES = ("Functional", "Sequential", "Model")


# ---- snapshots -----------------------------------------------------------------------------------

@dataclass
class LayerFacts:
    path: str
    type: str
    config: dict  # the layer's config as JSON-like data, without name and trainable
    trainable: bool
    weights: list  # [(variable name, np.ndarray)]
    params: int
    trainable_params: int
    input_shape: str
    output_shape: str
    container: str = ""  # path of the nested model that holds it ("" for the top level)
    calls: int = 1  # how often the layer is called in the graph (> 1: shared)
    inbound: list = field(default_factory=list)  # node ids feeding it (layer paths or input names)
    policy: str = ""  # its own dtype policy (int8_from_float32, bfloat16, …; a map's entry for its path)
    lora: tuple | None = None  # (rank, alpha) of a LoRA layer

    @property
    def shared(self) -> bool:
        return self.calls > 1

    def signature(self) -> tuple:
        """What stays the same when only the name changes."""
        return (self.type, _canonical(self.config), self.policy, self.lora,
                tuple(_fingerprint(w) for _, w in self.weights))


@dataclass
class Snapshot:
    name: str
    kind: str  # functional, sequential or subclassed
    layers: dict  # path -> LayerFacts, in graph order
    inputs: list  # [{"name", "shape", "dtype"}]
    outputs: list  # [{"layer", "shape"}]; layer is the producing leaf path (None if unknown)
    submodels: list  # [{"path", "type", "layers", "params", "calls"}]
    params: int = 0
    connected: bool = True  # False: a subclassed model, whose wiring is Python code and unknown
    # composite layers (a MultiHeadAttention, a keras_hub TransformerEncoder): path -> {"type", "inbound"};
    # the graph calls them, and their sublayers are listed in layers
    composites: dict = field(default_factory=dict)

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(src, facts.path) for facts in self.layers.values() for src in facts.inbound] + \
            [(src, path) for path, c in self.composites.items() for src in c["inbound"]]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]


_NOT_CONFIG = ("name", "trainable", "dtype", "lora_rank", "lora_alpha", "quantization_config")


def _shape_text(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _tensor_shape(get) -> str:
    try:
        value = get()
    except Exception:  # a shared layer has several inputs/outputs; an unbuilt one has none
        return "?"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shape_text(tuple(t.shape)) for t in value) + "]"
    return _shape_text(tuple(value.shape))


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def _plain(config) -> dict:
    return json.loads(json.dumps(config, default=_jsonable, sort_keys=True))


def _canonical(config) -> str:
    return json.dumps(config, sort_keys=True)


def snapshot(model, *, name: str | None = None, weights: bool = True) -> Snapshot:
    """Read ``model`` into a Snapshot (copies of its weights included unless ``weights`` is False, as
    ``inspect`` needs none; the model is not changed). A large variable's values are not copied but read
    where they are, a block of rows at a time, when compared (StoredValues): the model must stay open
    (session.model_to_look_at) while the snapshot is compared."""
    from .keras_io.finetune import lora_state, policy_name
    from .keras_io.layers import graph_config, model_kind, node_aliases
    kind = model_kind(model)
    infos = walk(model)
    composites = {}
    for info in infos:
        parts = info.path.split("/")
        for k, holder in enumerate(info.ancestors):
            if not is_model(holder):
                composites.setdefault("/".join(parts[:k + 1]), type(holder).__name__)
    conn = _Connectivity(node_aliases(model), {i.path for i in infos} | set(composites))
    connected = kind != "subclassed"
    if connected:
        try:
            conn.read(graph_config(model), "Sequential" if kind == "sequential" else "Functional")
        except Exception:  # an unusual config: show the layers without wiring rather than fail
            conn = _Connectivity()
            connected = False
    layers = {}
    for info in infos:
        layer = info.layer
        try:
            config = layer.get_config()
        except Exception:
            config = {}
        # the dtype policy, quantization and LoRA are compared as what they mean (policy, lora), not as
        # config text: a sublayer's policy lives in a map held by the layer around it
        config = {k: v for k, v in _plain(config).items() if k not in _NOT_CONFIG}
        own = info.weights
        names = [v.name for v in own]
        arrays = [values_of(v) for v in own] if weights else []
        layers[info.path] = LayerFacts(
            path=info.path, type=info.type_name, config=config, trainable=bool(layer.trainable),
            weights=list(zip(names, arrays)), params=info.params(),
            trainable_params=int(sum(int(np.prod(v.shape)) for v in own if v.trainable)) if layer.trainable else 0,
            input_shape=_tensor_shape(lambda: layer.input), output_shape=_tensor_shape(lambda: layer.output),
            container="/".join(info.path.split("/")[:-1]), calls=max(1, conn.calls.get(info.path, 1)),
            inbound=list(conn.inbound.get(info.path, [])), policy=policy_name(layer),
            lora=lora_state(layer))
    model_inputs = list(getattr(model, "inputs", None) or [])
    input_names = conn.input_names if len(conn.input_names) == len(model_inputs) else \
        [getattr(t, "name", None) or f"input_{i}" for i, t in enumerate(model_inputs)]
    inputs = [{"name": n, "shape": _shape_text(tuple(t.shape)), "dtype": str(getattr(t, "dtype", "?"))}
              for n, t in zip(input_names, model_inputs)]
    model_outputs = list(getattr(model, "outputs", None) or [])
    producers = conn.output_producers if len(conn.output_producers) == len(model_outputs) else \
        [None] * len(model_outputs)
    outputs = [{"layer": (p[0] if p and len(p) == 1 else None), "shape": _shape_text(tuple(t.shape))}
               for p, t in zip(producers, model_outputs)]
    submodels = []
    for path, (cls, sub) in _nested(model).items():
        inner = [p for p in layers if p.startswith(path + "/")]
        try:
            count = int(sub.count_params())
        except ValueError:
            count = 0
        submodels.append({"path": path, "type": cls, "layers": len(inner), "params": count,
                          "calls": max(1, conn.calls.get(path, 1))})
    try:
        total = int(model.count_params())
    except ValueError:
        total = sum(f.params for f in layers.values())
    return Snapshot(name=name or model.name, kind=kind, layers=layers, inputs=inputs, outputs=outputs,
                    submodels=submodels, params=total, connected=connected,
                    composites={p: {"type": t, "inbound": list(conn.inbound.get(p, []))} for p, t in composites.items()})


def _fingerprint(values) -> tuple:
    """What tells two arrays' contents the same: dtype, shape and the sha256 of their bytes."""
    import hashlib
    digest = values.digest() if isinstance(values, StoredValues) else hashlib.sha256(as_bytes(values)).hexdigest()
    return values.dtype.str, tuple(values.shape), digest


def _nested(model) -> dict:
    out = {}

    def visit(container, prefix):
        for layer in container.layers:
            if is_model(layer):
                path = f"{prefix}{layer.name}"
                if path not in out:
                    out[path] = (type(layer).__name__, layer)
                    visit(layer, path + "/")
    visit(model, "")
    return out


class _Connectivity:
    """Which leaf layer feeds which, read from a functional or Sequential config. Nested models are
    looked through: their input layers stand for whatever feeds the nested model, their outputs for
    the leaf layers that produce them, so the edges connect leaf layers (and top-level inputs) only."""

    def __init__(self, aliases: dict | None = None, known: set | None = None):
        self.inbound: dict[str, list[str]] = collections.defaultdict(list)
        # the paths of the layers (and composite layers) walk lists: any other entry of a graph is an
        # operation (keras_hub's `x[:, 0, :]` is a GetItem), which passes on what it reads
        self.known = known
        self.calls: collections.Counter = collections.Counter()
        self.input_names: list[str] = []
        self.output_producers: list[list[str]] = []
        # a layer used at two places of the graph (tied embeddings) is listed under the first: its other
        # path names the same layer
        self.aliases = aliases or {}

    def read(self, config: dict, class_name: str) -> None:
        self.output_producers = self._container(config, class_name, "", None)

    def _link(self, path: str, sources) -> None:
        path = self.aliases.get(path, path)
        for src in sources:
            src = self.aliases.get(src, src)
            if src not in self.inbound[path]:
                self.inbound[path].append(src)

    def _container(self, config: dict, class_name: str, prefix: str, feeds) -> list[list[str]]:
        if class_name == "Sequential" or "input_layers" not in config:
            return self._sequential(config, prefix, feeds)
        top = feeds is None
        input_refs = flat_order(config.get("input_layers", []))
        input_order = [r[0] for r in input_refs]
        producers: dict[str, list[list[str]]] = {}

        def lookup(ref) -> list[str]:
            outs = producers.get(ref[0])
            if outs is None:
                return []
            if len(outs) == 1:
                return outs[0]
            index = ref[2] if len(ref) > 2 and isinstance(ref[2], int) else 0
            if 0 <= index < len(outs):
                return outs[index]
            return sorted({p for o in outs for p in o})

        for entry in config.get("layers", []):
            name = entry.get("name") or entry["config"]["name"]
            cls = entry.get("class_name", "")
            if cls == "InputLayer":
                if top:
                    self.input_names.append(name)
                    producers[name] = [[name]]
                else:
                    i = input_order.index(name) if name in input_order else -1
                    producers[name] = [list(feeds[i])] if 0 <= i < len(feeds) else \
                        [sorted({p for f in feeds for p in f})]
                continue
            path = prefix + name
            nodes = entry.get("inbound_nodes", []) or []
            if is_model_entry(entry):
                merged: list[list[str]] = []
                for node in nodes:
                    self.calls[self.aliases.get(path, path)] += 1
                    outs = self._container(entry["config"], cls, path + "/", [lookup(r) for r in flat_histories(node)])
                    for k, out in enumerate(outs):
                        if k >= len(merged):
                            merged.append([])
                        merged[k].extend(p for p in out if p not in merged[k])
                producers[name] = merged or [[]]
            elif self.known is not None and self.aliases.get(path, path) not in self.known:
                producers[name] = [sorted({p for node in nodes for ref in histories(node) for p in lookup(ref)})]
            else:
                for node in nodes:
                    self.calls[self.aliases.get(path, path)] += 1
                    for ref in histories(node):
                        self._link(path, lookup(ref))
                producers[name] = [[self.aliases.get(path, path)]]
        return [lookup(r) for r in flat_order(config.get("output_layers", []))]

    def _sequential(self, config: dict, prefix: str, feeds) -> list[list[str]]:
        entries = config.get("layers", [])
        current: list[str] = []
        if feeds is None:
            first = entries[0] if entries else None
            name = (first["config"].get("name") if first and first.get("class_name") == "InputLayer" else None) \
                or "input"
            self.input_names.append(name)
            current = [name]
        else:
            current = sorted({p for f in feeds for p in f})
        for entry in entries:
            if entry.get("class_name") == "InputLayer":
                continue
            name = entry.get("name") or entry["config"]["name"]
            path = prefix + name
            self.calls[self.aliases.get(path, path)] += 1
            if is_model_entry(entry):
                outs = self._container(entry["config"], entry["class_name"], path + "/", [current])
                current = sorted({p for o in outs for p in o})
            else:
                self._link(path, current)
                current = [self.aliases.get(path, path)]
        return [current]


# ---- diffs ---------------------------------------------------------------------------------------

@dataclass
class WeightChange:
    layer: str
    name: str
    shape_a: tuple
    shape_b: tuple
    max_abs_diff: float | None  # None when the shapes or kinds differ
    relative_l2: float | None  # ||b - a|| / ||a||; inf when a is all zeros and b is not
    dtype_a: str = ""  # the dtypes, when they differ (a cast, a quantized kernel)
    dtype_b: str = ""
    status: str = "changed"  # or "added", "removed": a variable only one of the layers has

    def text(self) -> str:
        if self.status != "changed":
            shape = self.shape_b if self.status == "added" else self.shape_a
            dtype = self.dtype_b if self.status == "added" else self.dtype_a
            return f"{self.name} {_shape_text(shape)} {dtype}: {self.status}"
        kinds = f"{self.dtype_a} -> {self.dtype_b}" if self.dtype_a != self.dtype_b else ""
        if self.shape_a != self.shape_b:
            return f"{self.name}: shape {_shape_text(self.shape_a)} -> {_shape_text(self.shape_b)}" + \
                (f", {kinds}" if kinds else "")
        if self.max_abs_diff is None:
            return f"{self.name} {_shape_text(self.shape_a)}: {kinds}"
        if kinds:
            return (f"{self.name} {_shape_text(self.shape_a)}: {kinds}, max |diff| {self.max_abs_diff:.4g}, "
                    f"relative L2 {self.relative_l2:.4g}")
        if self.relative_l2 is not None and math.isinf(self.relative_l2):  # no size to be relative to
            return f"{self.name} {_shape_text(self.shape_a)}: max |diff| {self.max_abs_diff:.4g}, was all zeros"
        return (f"{self.name} {_shape_text(self.shape_a)}: max |diff| {self.max_abs_diff:.4g}, "
                f"relative L2 {self.relative_l2:.4g}")

    def to_dict(self) -> dict:
        rel = self.relative_l2
        return {"name": self.name, "shape": [list(self.shape_a), list(self.shape_b)],
                "max_abs_diff": self.max_abs_diff,
                "relative_l2": ("inf" if rel is not None and math.isinf(rel) else rel)} | \
            ({"dtype": [self.dtype_a, self.dtype_b]} if self.dtype_a != self.dtype_b else {}) | \
            ({"status": self.status} if self.status != "changed" else {})


@dataclass
class LayerChange:
    path: str
    type: str
    config: dict = field(default_factory=dict)  # field -> [old, new]
    weights: list = field(default_factory=list)  # [WeightChange]
    trainable: tuple | None = None  # (old, new)
    inbound: tuple | None = None  # (old sources, new sources), sources in B's names
    renamed_from: str | None = None
    policy: tuple | None = None  # (old, new) dtype policy names
    lora: tuple | None = None  # (old, new): (rank, alpha) or None

    def empty(self) -> bool:
        return not (self.config or self.weights or self.trainable or self.inbound or self.policy or self.lora)

    @property
    def quantized(self) -> bool:
        """Whether the change quantizes the layer (its new policy is a quantized one)."""
        return bool(self.policy) and "_from_" in self.policy[1] and "_from_" not in self.policy[0]

    def lines(self) -> list[str]:
        out = []
        if self.policy:
            out.append(f"dtype policy: {self.policy[0]} -> {self.policy[1]}")
        if self.lora:
            out.append(f"LoRA: {_lora_text(self.lora[0])} -> {_lora_text(self.lora[1])}")
        out += [w.text() for w in self.weights]
        out += [f"config {k}: {_short(a)} -> {_short(b)}" for k, (a, b) in self.config.items()]
        if self.trainable:
            out.append(f"trainable: {self.trainable[0]} -> {self.trainable[1]}")
        if self.inbound:
            out.append(f"inputs: {_list(self.inbound[0])} -> {_list(self.inbound[1])}")
        return out

    def to_dict(self) -> dict:
        return {"path": self.path, "type": self.type,
                "weights": [w.to_dict() for w in self.weights],
                "config": {k: list(v) for k, v in self.config.items()},
                "trainable": list(self.trainable) if self.trainable else None,
                "inputs": [list(self.inbound[0]), list(self.inbound[1])] if self.inbound else None} | \
            ({"policy": list(self.policy)} if self.policy else {}) | \
            ({"lora": [_lora_dict(x) for x in self.lora]} if self.lora else {})


def _lora_text(state) -> str:
    return "none" if state is None else f"rank {state[0]}, alpha {state[1]:g}"


def _lora_dict(state):
    return None if state is None else {"rank": state[0], "alpha": state[1]}


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _list(items) -> str:
    return "[" + ", ".join(items) + "]"


@dataclass
class ModelDiff:
    a: Snapshot
    b: Snapshot
    added: list = field(default_factory=list)  # paths in B
    removed: list = field(default_factory=list)  # paths in A
    replaced: list = field(default_factory=list)  # [(path, type in A, type in B)]
    renamed: list = field(default_factory=list)  # [(path in A, path in B)]
    changed: list = field(default_factory=list)  # [LayerChange], keyed by the path in B
    inputs: tuple | None = None  # (A's inputs, B's inputs) when they differ
    outputs: tuple | None = None  # (A's outputs, B's outputs) when they differ

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.replaced or self.renamed or self.changed
                    or self.inputs or self.outputs)

    def change(self, path: str) -> LayerChange | None:
        for c in self.changed:
            if c.path == path:
                return c
        return None

    def weight_changes(self) -> list[WeightChange]:
        return [w for c in self.changed for w in c.weights]

    def counts(self) -> dict:
        return {"added": len(self.added), "removed": len(self.removed), "replaced": len(self.replaced),
                "renamed": len(self.renamed),
                "weights changed": sum(1 for c in self.changed if c.weights),
                "config changed": sum(1 for c in self.changed if c.config),
                "trainable changed": sum(1 for c in self.changed if c.trainable),
                "dtype policy changed": sum(1 for c in self.changed if c.policy),
                "LoRA changed": sum(1 for c in self.changed if c.lora),
                "rewired": sum(1 for c in self.changed if c.inbound)}

    def to_dict(self) -> dict:
        return {"same": self.same,
                "a": {"name": self.a.name, "layers": len(self.a.layers), "params": self.a.params},
                "b": {"name": self.b.name, "layers": len(self.b.layers), "params": self.b.params},
                "added": [{"path": p, "type": self.b.layers[p].type, "params": self.b.layers[p].params}
                          for p in self.added],
                "removed": [{"path": p, "type": self.a.layers[p].type, "params": self.a.layers[p].params}
                            for p in self.removed],
                "replaced": [{"path": p, "from": ta, "to": tb} for p, ta, tb in self.replaced],
                "renamed": [{"from": pa, "to": pb} for pa, pb in self.renamed],
                "changed": [c.to_dict() for c in self.changed],
                "inputs": [list(self.inputs[0]), list(self.inputs[1])] if self.inputs else None,
                "outputs": [list(self.outputs[0]), list(self.outputs[1])] if self.outputs else None,
                "counts": self.counts()}

    def lines(self) -> list[str]:
        out = []
        for p, ta, tb in self.replaced:
            out.append(f"replaced  {p}: {ta} -> {tb}")
        for pa, pb in self.renamed:
            out.append(f"renamed   {pa} -> {pb} ({self.b.layers[pb].type})")
        for p in self.removed:
            f = self.a.layers[p]
            out.append(f"removed   {p} ({f.type}, {f.params:,} params)")
        for p in self.added:
            f = self.b.layers[p]
            out.append(f"added     {p} ({f.type}, {f.params:,} params)")
        for c in self.changed:
            out.append(f"changed   {c.path} ({c.type})")
            out.extend(f"            {line}" for line in c.lines())
        if self.inputs:
            out.append(f"inputs:   {_io_text(self.inputs[0])} -> {_io_text(self.inputs[1])}")
        if self.outputs:
            out.append(f"outputs:  {_io_text(self.outputs[0])} -> {_io_text(self.outputs[1])}")
        return out

    def summary(self) -> str:
        if self.same:
            return "the models are the same (layers, config, weights, trainable flags, inputs and outputs)"
        parts = [f"{n} {what}" for what, n in self.counts().items() if n]
        if self.inputs:
            parts.append("inputs changed")
        if self.outputs:
            parts.append("outputs changed")
        return "differ: " + ", ".join(parts)


def _io_text(items) -> str:
    return "[" + ", ".join(f"{i.get('name') or i.get('layer') or '?'} {i['shape']}" for i in items) + "]"


def compare_weights(path: str, a: list, b: list) -> list[WeightChange]:
    """The weights of one layer that differ: matched by name where each name is one variable's in both
    lists (a quantized or LoRA layer gains and loses variables), else by position (named after B's)."""
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    if len(set(names_a)) == len(names_a) and len(set(names_b)) == len(names_b):
        by_a = dict(a)
        pairs = [(n, by_a.get(n), w) for n, w in b] + [(n, w, None) for n, w in a if n not in dict(b)]
    else:
        pairs = [(b[k][0] if k < len(b) else a[k][0], a[k][1] if k < len(a) else None,
                  b[k][1] if k < len(b) else None) for k in range(max(len(a), len(b)))]
    out = []
    for name, x, y in pairs:
        if x is None or y is None:
            out.append(WeightChange(path, name, tuple(x.shape) if x is not None else (),
                                    tuple(y.shape) if y is not None else (), None, None,
                                    _dtype(x), _dtype(y), "added" if x is None else "removed"))
            continue
        kinds = (_dtype(x), _dtype(y)) if _dtype(x) != _dtype(y) else ("", "")
        if x.shape != y.shape:
            out.append(WeightChange(path, name, tuple(x.shape), tuple(y.shape), None, None, *kinds))
            continue
        measured = _measure(x, y)
        if measured is None:
            continue
        max_abs, norm_a, norm_d = measured
        if max_abs is None:  # int8 values against floats: no difference to measure
            out.append(WeightChange(path, name, tuple(x.shape), tuple(y.shape), None, None, *kinds))
            continue
        rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
        out.append(WeightChange(path, name, tuple(x.shape), tuple(y.shape), max_abs, rel, *kinds))
    return out


def _measure(x, y):
    """compare_weights's measures for two arrays of one shape (paired_blocks: whole, or a block of rows
    at a time where one is StoredValues): None when their bytes are the same (and so their dtypes),
    (None, None, None) when they differ but are not both floats (int8 values against floats: no
    difference to measure), else (max |y - x|, ||x||, ||y - x||) in float64. By blocks the norms are
    summed block by block, so they may differ from a whole-array norm in the last bits. A block whose
    bytes are the same adds only to ||x||; a NaN in both arrays at one place is no difference."""
    if isinstance(x, StoredValues) and x.same_array(y):
        return None
    same = x.dtype == y.dtype
    floats = _is_float(x) and _is_float(y)
    max_abs, sum_a, sum_d = 0.0, 0.0, 0.0
    for bx, by in paired_blocks(x, y):
        block_same = same and np.array_equal(as_bytes(bx), as_bytes(by))
        same = block_same
        if not floats:
            if not same:
                return None, None, None
            continue
        xd = bx.astype(np.float64).ravel()
        norm2 = float(np.dot(xd, xd))
        if not math.isfinite(norm2):  # (a NaN or an infinity: counted as nan_to_num counts them)
            finite = np.nan_to_num(xd)
            norm2 = float(np.dot(finite, finite))
        sum_a += norm2
        if block_same or not xd.size:
            continue
        yd = by.astype(np.float64).ravel()
        delta = yd - xd
        largest = float(np.max(np.abs(delta)))
        if math.isnan(largest):
            delta[np.isnan(xd) & np.isnan(yd)] = 0.0
            largest = float(np.max(np.abs(delta)))
        max_abs = largest if math.isnan(largest) or largest > max_abs else max_abs
        sum_d += float(np.dot(delta, delta))
    if same:
        return None
    return max_abs, math.sqrt(sum_a), math.sqrt(sum_d)


def _dtype(array) -> str:
    return "" if array is None else str(array.dtype)


def _is_float(array) -> bool:
    return str(array.dtype) in ("bfloat16", "float16", "float32", "float64")


def diff(a: Snapshot, b: Snapshot) -> ModelDiff:
    """Compare two snapshots layer by layer (see the module docstring)."""
    result = ModelDiff(a, b)
    only_a = [p for p in a.layers if p not in b.layers]
    only_b = [p for p in b.layers if p not in a.layers]
    # renames: same type, config apart from the name and weights, in graph order
    waiting: dict[tuple, list[str]] = collections.defaultdict(list)
    for p in only_b:
        waiting[b.layers[p].signature()].append(p)
    rename = {}
    for p in only_a:  # in graph order, so that the layers feeding p are already matched
        candidates = waiting.get(a.layers[p].signature())
        if not candidates:
            continue
        if a.layers[p].weights:
            rename[p] = candidates.pop(0)
            continue
        # without weights, equal configs say little (two Dropout(0.5) are alike): also ask for the same inputs
        sources = [rename.get(s, s) for s in a.layers[p].inbound]
        match = next((c for c in candidates if b.layers[c].inbound == sources), None)
        if match is not None:
            candidates.remove(match)
            rename[p] = match
    result.renamed = [(pa, pb) for pa, pb in rename.items()]
    result.removed = [p for p in only_a if p not in rename]
    matched_b = set(rename.values())
    result.added = [p for p in only_b if p not in matched_b]

    def in_b_names(sources):
        return [rename.get(s, s) for s in sources]

    pairs = [(p, p) for p in b.layers if p in a.layers] + [(pa, pb) for pa, pb in rename.items()]
    order = {p: i for i, p in enumerate(b.layers)}
    pairs.sort(key=lambda pair: order[pair[1]])
    for pa, pb in pairs:
        fa, fb = a.layers[pa], b.layers[pb]
        if fa.type != fb.type:
            result.replaced.append((pb, fa.type, fb.type))
            continue
        change = LayerChange(pb, fb.type, renamed_from=pa if pa != pb else None)
        change.weights = compare_weights(pb, fa.weights, fb.weights)
        keys = sorted(set(fa.config) | set(fb.config))
        change.config = {k: (fa.config.get(k), fb.config.get(k)) for k in keys
                         if _canonical(fa.config.get(k)) != _canonical(fb.config.get(k))}
        if fa.trainable != fb.trainable:
            change.trainable = (fa.trainable, fb.trainable)
        if fa.policy != fb.policy:
            change.policy = (fa.policy, fb.policy)
        if fa.lora != fb.lora:
            change.lora = (fa.lora, fb.lora)
        if a.connected and b.connected:
            before = in_b_names(fa.inbound)
            if before != fb.inbound:
                change.inbound = (before, list(fb.inbound))
        if not change.empty():
            result.changed.append(change)
    ins_a = [dict(i) for i in a.inputs]
    ins_b = [dict(i) for i in b.inputs]
    if ins_a != ins_b:
        result.inputs = (ins_a, ins_b)
    outs_a = [dict(o, layer=rename.get(o["layer"], o["layer"])) for o in a.outputs]
    outs_b = [dict(o) for o in b.outputs]
    if outs_a != outs_b:
        result.outputs = ([dict(o) for o in a.outputs], outs_b)
    return result


def diff_files(path_a, path_b, *, unsafe: bool = False, imports=()) -> ModelDiff:
    """Load two model files (safe mode unless ``unsafe``) and diff them."""
    from .keras_io.files import load_model
    model_a = load_model(path_a, unsafe=unsafe, imports=imports)
    model_b = load_model(path_b, unsafe=unsafe, imports=imports)
    return diff(snapshot(model_a, name=str(path_a)), snapshot(model_b, name=str(path_b)))


def by_type(snap: Snapshot) -> list[dict]:
    """Layer count and parameter totals per layer type, largest first."""
    table: dict[str, dict] = {}
    for f in snap.layers.values():
        row = table.setdefault(f.type, {"type": f.type, "layers": 0, "params": 0, "trainable_params": 0})
        row["layers"] += 1
        row["params"] += f.params
        row["trainable_params"] += f.trainable_params
    return sorted(table.values(), key=lambda r: (-r["params"], -r["layers"], r["type"]))


__all__ = ["LayerFacts", "Snapshot", "snapshot", "WeightChange", "LayerChange", "ModelDiff", "diff",
           "diff_files", "compare_weights", "by_type"]
