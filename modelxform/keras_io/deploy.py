"""Deployment graph transforms on a model config: folding BatchNormalization into the layer before it,
and structured channel pruning with the shrinking of every layer downstream.

Both read the graph from the graph editor's copy of the config (the format is walked through
config.py), decide what they can do before anything changes (so that a plan says it, and a refusal
names the layer), and queue one edit: config fields change and the affected layers get arrays
computed from the model before the edit (``GraphEditor.computed``) when the model is rebuilt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ApplyError
from .config import histories, is_input, is_model_entry, layers_of, tensor_refs, walk

CONVS = ("Conv1D", "Conv2D", "Conv3D")
DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
SEPARABLE = ("SeparableConv1D", "SeparableConv2D")
FOLD_INTO = CONVS + DEPTHWISE + SEPARABLE + ("Dense",)
LINEAR = (None, "linear")
CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


# ---- a container's graph ----------------------------------------------------------------------------

class Graph:
    """The layers of one model entry (functional or Sequential) with who reads whom: ``calls[name]`` is,
    per call of the layer, the ``(layer, node, tensor)`` references it reads; ``readers[(layer, node,
    tensor)]`` the layers reading that output; ``outputs`` the model's output references. A Sequential
    stack reads as a chain (its first layer reads the InputLayer entry when it has one)."""

    def __init__(self, container: dict, prefix: str = ""):
        self.container = container
        self.prefix = prefix
        self.entries = {e["config"]["name"]: e for e in layers_of(container)}
        self.order = [e["config"]["name"] for e in layers_of(container)]
        self.calls: dict[str, list[list[tuple]]] = {}
        self.sequential = container.get("class_name") == "Sequential"
        if self.sequential:
            previous = None
            for name in self.order:
                entry = self.entries[name]
                if is_input(entry):
                    self.calls[name] = []
                else:
                    self.calls[name] = [[(previous, 0, 0)]] if previous is not None else [[]]
                previous = name
            self.outputs = [(self.order[-1], 0, 0)] if self.order else []
        else:
            for name in self.order:
                entry = self.entries[name]
                self.calls[name] = [[(h[0], h[1], h[2]) for h in histories(node)]
                                    for node in entry.get("inbound_nodes") or []]
            self.outputs = [tuple(r[:3]) for r in tensor_refs(container["config"].get("output_layers"))]
        self.readers: dict[tuple, list[str]] = {}
        for name in self.order:
            for call in self.calls[name]:
                for ref in call:
                    self.readers.setdefault(ref, []).append(name)

    def path(self, name: str) -> str:
        return self.prefix + name

    def type_of(self, name: str) -> str:
        return self.entries[name]["class_name"]

    def config(self, name: str) -> dict:
        return self.entries[name]["config"]

    def topological(self) -> list[str]:
        """Layer names, every layer after the layers it reads."""
        pending = {n: {ref[0] for call in self.calls[n] for ref in call if ref[0] in self.entries}
                   for n in self.order}
        done: list[str] = []
        ready = [n for n in self.order if not pending[n]]
        placed = set()
        position = {n: i for i, n in enumerate(self.order)}
        while ready:
            ready.sort(key=position.get)
            name = ready.pop(0)
            if name in placed:
                continue
            placed.add(name)
            done.append(name)
            for other in self.order:
                if other not in placed and name in pending[other]:
                    pending[other].discard(name)
                    if not pending[other]:
                        ready.append(other)
        return done


def containers(config: dict):
    """(path prefix, model entry) of the top model and every nested model in it."""
    yield "", config
    for item in walk(config, models=True, leaves=False):
        yield item.path + "/", item.entry


def _weights(info) -> dict:
    """A layer's arrays by variable name (a Keras layer's or an archive stand-in's)."""
    return {v.name: np.asarray(v.numpy()) for v in info.layer.weights}


def _params(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


# ---- fold batchnorm -------------------------------------------------------------------------------

@dataclass
class Fold:
    bn: str  # path of the BatchNormalization layer
    into: str  # path of the layer it folds into
    into_type: str
    bn_params: int
    bias_added: int  # parameters of a bias the layer gains (0 when it had one)


@dataclass
class Skip:
    bn: str
    reason: str


def batchnorm_folds(config: dict, infos: dict, wanted: set | None = None) -> tuple[list[Fold], list[Skip]]:
    """Which BatchNormalization layers can fold into the layer before them, and why the others cannot.
    ``infos``: path -> LayerInfo of the model as it stands (for the weights' shapes); ``wanted``: paths
    of selected layers (a BatchNormalization is considered when it or the layer before it is selected),
    or None for every BatchNormalization."""
    folds, skips = [], []
    for prefix, container in containers(config):
        graph = Graph(container, prefix)
        for name in graph.order:
            if graph.type_of(name) != "BatchNormalization":
                continue
            path = graph.path(name)
            calls = graph.calls[name]
            producer = calls[0][0][0] if len(calls) == 1 and len(calls[0]) == 1 else None
            if wanted is not None and path not in wanted and \
                    (producer is None or graph.path(producer) not in wanted):
                continue
            reason = _fold_problem(graph, name, producer, infos)
            if reason is not None:
                skips.append(Skip(path, reason))
                continue
            bn_info = infos[path]
            into_config = graph.config(producer)
            channels = int(bn_info.layer.weights[-1].shape[0])
            folds.append(Fold(path, graph.path(producer), graph.type_of(producer), bn_info.params(),
                              0 if into_config.get("use_bias") else channels))
    return folds, skips


def _fold_problem(graph: Graph, name: str, producer, infos: dict) -> str | None:
    """Why the BatchNormalization ``name`` cannot fold into the layer before it, or None."""
    calls = graph.calls[name]
    cfg = graph.config(name)
    if len(calls) != 1:
        return f"it is called {len(calls)} times (a shared layer)"
    if producer is None:
        return "it does not read exactly one tensor"
    if cfg.get("renorm"):
        return "it uses batch renormalization"
    if producer not in graph.entries:
        return "it follows the input of its model"
    entry = graph.entries[producer]
    kind = entry["class_name"]
    if is_input(entry):
        return f"it follows the model input {producer}"
    if is_model_entry(entry):
        return f"it follows the nested model {producer}"
    if kind not in FOLD_INTO:
        return f"it follows {producer} ({kind}), not a convolution or Dense layer"
    pcfg = entry["config"]
    if pcfg.get("activation") not in LINEAR:
        return f"it follows {producer}'s {pcfg['activation']} activation"
    if len(graph.calls[producer]) != 1:
        return f"{producer} is called {len(graph.calls[producer])} times (a shared layer)"
    if pcfg.get("lora_rank") or pcfg.get("quantization_config") is not None:
        return f"{producer} is quantized or has LoRA weights"
    others = [n for n in graph.readers.get((producer, 0, 0), []) if n != name]
    if others:
        return f"{producer}'s output also goes to {', '.join(others)}"
    if (producer, 0, 0) in graph.outputs:
        return f"{producer}'s output is also an output of the model"
    if graph.path(producer) not in infos or graph.path(name) not in infos:
        return "its weights are not known"
    channel_axis = 1 if pcfg.get("data_format") == "channels_first" else -1
    axis = cfg.get("axis")
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    rank = _rank(infos[graph.path(producer)], kind)
    if not isinstance(axis, int):
        return f"its axis {axis} is not one axis"
    if axis != channel_axis and not (rank is not None and axis % rank == channel_axis % rank):
        return f"its axis {axis} is not {producer}'s channel axis"
    return None


def _rank(info, kind: str) -> int | None:
    for suffix, rank in (("1D", 3), ("2D", 4), ("3D", 5)):
        if kind.endswith(suffix):
            return rank
    try:
        return len(info.layer.output.shape)
    except Exception:  # an archive stand-in or a layer called several times: no single answer
        return None


def fold_edit(editor, folds: list[Fold]) -> None:
    """Remove each folded BatchNormalization and give the layer before it the folded kernel and bias."""
    for fold in folds:
        old_into, old_bn = editor.origin.get(fold.into, fold.into), editor.origin.get(fold.bn, fold.bn)
        editor.remove(fold.bn)
        editor.entry(fold.into)["config"]["use_bias"] = True
        editor.computed[fold.into] = _folder(old_into, old_bn, fold.into_type)


def _folder(into_path: str, bn_path: str, kind: str):
    def compute(old: dict) -> list:
        into, bn = old[into_path], old[bn_path]
        w, b = _weights(into), _weights(bn)
        cfg_eps = getattr(bn.layer, "epsilon", None)
        if cfg_eps is None:
            cfg_eps = bn.layer.entry["config"]["epsilon"]  # an archive stand-in: its config
        mean = b["moving_mean"].astype(np.float64)
        var = b["moving_variance"].astype(np.float64)
        gamma = b["gamma"].astype(np.float64) if "gamma" in b else np.ones_like(mean)
        beta = b["beta"].astype(np.float64) if "beta" in b else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + float(cfg_eps))
        dtype = next(iter(w.values())).dtype
        bias = w["bias"].astype(np.float64) if "bias" in w else np.zeros_like(mean)
        new_bias = ((bias - mean) * scale + beta).astype(dtype)
        if kind in SEPARABLE:
            pointwise = (w["pointwise_kernel"].astype(np.float64) * scale).astype(dtype)
            return [w["depthwise_kernel"], pointwise, new_bias]
        kernel = w["kernel"].astype(np.float64)
        if kind in DEPTHWISE:
            kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
        else:
            kernel = kernel * scale
        return [kernel.astype(dtype), new_bias]
    return compute


# ---- prune channels -------------------------------------------------------------------------------

PRUNABLE = CONVS + SEPARABLE + ("Dense",)
MERGES = ("Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average")
CHANNELWISE = frozenset({
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
    "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D"})


@dataclass(frozen=True)
class Seg:
    """Part of a tensor's channel axis: ``size`` channels of the prunable space ``space`` (each repeated
    ``repeat`` times, as a depthwise convolution with a depth multiplier does), or ``size`` fixed
    channels (``space`` None) from ``origin``."""

    space: int | None
    size: int | None
    repeat: int = 1
    origin: str = ""


@dataclass(frozen=True)
class Struct:
    """A tensor's channel axis as segments; ``tile``: how many times the whole repeats (after Flatten,
    once per spatial position)."""

    segs: tuple
    tile: int = 1

    @property
    def spaces(self) -> set:
        return {s.space for s in self.segs if s.space is not None}


@dataclass
class ChannelPlan:
    """What ``prune channels`` does in one model entry: the chosen producer layers and their kept channel
    count, the layers downstream that shrink, and the per-layer facts for the report."""

    groups: list = field(default_factory=list)  # [(root, [producer paths], channels, kept)]
    lines: list = field(default_factory=list)  # report lines, one per changed layer
    changed: list = field(default_factory=list)  # paths of the layers whose weights change
    params_before: int = 0
    params_after: int = 0
    edits: list = field(default_factory=list)  # fn(editor) -> None
    skipped: list = field(default_factory=list)  # selected layers that are not Conv/Dense


class _Spaces:
    """Union-find over channel spaces, with why a space cannot be pruned (first reason kept)."""

    def __init__(self):
        self.parent: list[int] = []
        self.producer: list[str | None] = []  # the layer name that makes each space
        self.size: list[int] = []
        self.pinned: dict[int, str] = {}

    def new(self, producer: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.producer.append(producer)
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.pinned and ra not in self.pinned:
            self.pinned[ra] = self.pinned[rb]

    def pin(self, s: int, reason: str) -> None:
        self.pinned.setdefault(self.find(s), reason)

    def why(self, s: int) -> str | None:
        return self.pinned.get(self.find(s))


def plan_channel_pruning(config: dict, infos: dict, selected: list[str], percent: float, shapes) -> ChannelPlan:
    """The pruning of ``percent`` % of the output channels of the selected Conv/Dense layers (paths), with
    every layer downstream shrunk to match and residual merge groups pruned jointly. ``infos``: path ->
    LayerInfo (weights); ``shapes``: a shapes.ShapeFinder of ``config``. Raises ApplyError naming the
    layer a pruned channel cannot pass through."""
    plan = ChannelPlan()
    chosen_by_prefix: dict[str, list[str]] = {}
    for path in selected:
        info = infos.get(path)
        if info is None or info.type_name not in PRUNABLE:
            plan.skipped.append(path)
            continue
        prefix = path[: len(path) - len(path.split("/")[-1])]
        chosen_by_prefix.setdefault(prefix, []).append(path.split("/")[-1])
    if not chosen_by_prefix:
        return plan
    for prefix, container in containers(config):
        if prefix in chosen_by_prefix:
            _plan_container(plan, Graph(container, prefix), infos, chosen_by_prefix[prefix], percent, shapes)
    return plan


def _plan_container(plan: ChannelPlan, graph: Graph, infos: dict, names: list[str], percent: float, shapes):
    spaces = _Spaces()
    structs: dict[tuple, Struct] = {}
    made: dict[str, int] = {}  # producer name -> its space
    inputs_of: dict[str, Struct] = {}  # layer name -> the structure of what it reads (single-call layers)
    where = "the model" if not graph.prefix else f"the nested model {graph.prefix[:-1]}"

    def shape(name):
        return shapes.output(graph.path(name)) if name in graph.entries else None

    def fixed(name, size=None) -> Struct:
        if size is None:
            out = shape(name)
            size = out[-1] if out else None
        return Struct((Seg(None, size, 1, name),))

    def struct_of(ref) -> Struct:
        if ref in structs:
            return structs[ref]
        return fixed(ref[0]) if ref[0] in graph.entries else Struct((Seg(None, None, 1, ref[0]),))

    def pin_all(struct_list, reason):
        for st in struct_list:
            for s in st.spaces:
                spaces.pin(s, reason)

    def channels_first(cfg) -> bool:
        return cfg.get("data_format") == "channels_first"

    for name in graph.topological():
        entry = graph.entries[name]
        kind = entry["class_name"]
        cfg = entry["config"]
        calls = graph.calls[name]
        if is_input(entry):
            shape_ = cfg.get("batch_shape")
            structs[(name, 0, 0)] = Struct((Seg(None, shape_[-1] if shape_ else None, 1, f"the input {name}"),))
            continue
        if len(calls) != 1:
            for k, call in enumerate(calls):
                pin_all([struct_of(r) for r in call], f"{name} is called {len(calls)} times (a shared layer)")
                structs[(name, k, 0)] = fixed(name)
            continue
        ins = [struct_of(r) for r in calls[0]]
        carries = any(st.spaces for st in ins)
        if len(ins) == 1:
            inputs_of[name] = ins[0]
        out = None
        if is_model_entry(entry):
            pin_all(ins, f"it would flow into the nested model {name}")
        elif kind in PRUNABLE:
            src = ins[0] if len(ins) == 1 else None
            if carries:
                if src is None:
                    pin_all(ins, f"{name} reads several tensors")
                elif kind != "Dense" and src.tile != 1:
                    pin_all(ins, f"{name} ({kind}) reads a flattened tensor")
                elif cfg.get("groups", 1) != 1:
                    pin_all(ins, f"{name} ({kind}) is a grouped convolution")
                elif channels_first(cfg):
                    pin_all(ins, f"{name} ({kind}) is channels_first")
            size = cfg.get("filters", cfg.get("units"))
            space = spaces.new(name, int(size))
            made[name] = space
            if cfg.get("activation") in CHANNEL_MIXING_ACTIVATIONS:
                spaces.pin(space, f"{name}'s {cfg['activation']} activation mixes its channels")
            elif kind != "Dense" and (cfg.get("groups", 1) != 1 or channels_first(cfg)):
                spaces.pin(space, f"{name} ({kind}) is a grouped or channels_first convolution")
            elif cfg.get("lora_rank") or cfg.get("quantization_config") is not None:
                spaces.pin(space, f"{name} is quantized or has LoRA weights")
            out = Struct((Seg(space, int(size)),))
        elif kind == "BatchNormalization":
            src = ins[0]
            axis = cfg.get("axis")
            axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
            if carries and axis != -1:
                rank = len(shape(name) or ()) or None
                if rank is None or not isinstance(axis, int) or axis % rank != rank - 1:
                    pin_all(ins, f"{name} (BatchNormalization) normalizes axis {axis}, not the channels")
            out = src
        elif kind in DEPTHWISE:
            src = ins[0]
            m = int(cfg.get("depth_multiplier", 1))
            if carries and (src.tile != 1 or channels_first(cfg)):
                pin_all(ins, f"{name} ({kind}) reads a flattened or channels_first tensor")
            out = Struct(tuple(Seg(s.space, s.size, s.repeat * m, s.origin) for s in src.segs), src.tile)
        elif kind in CHANNELWISE:
            src = ins[0]
            if carries and channels_first(cfg):
                pin_all(ins, f"{name} ({kind}) is channels_first")
            if carries and kind == "Activation" and cfg.get("activation") in CHANNEL_MIXING_ACTIVATIONS:
                pin_all(ins, f"{name}'s {cfg['activation']} mixes the channels")
            out = src
        elif kind == "Flatten":
            src = ins[0]
            in_shape = shape(calls[0][0][0]) if calls[0] else None
            if carries and (channels_first(cfg) or src.tile != 1 or in_shape is None
                            or any(d is None for d in in_shape[1:-1])):
                pin_all(ins, f"{name} (Flatten) has no fixed spatial size to flatten")
                out = fixed(name)
            else:
                positions = math.prod(in_shape[1:-1]) if in_shape else 1
                out = Struct(src.segs, src.tile * positions)
        elif kind in MERGES or (kind == "Concatenate" and not _channel_concat(cfg, shape(name))):
            out = _join(spaces, ins, name, kind)
        elif kind == "Concatenate":
            if any(st.tile != 1 for st in ins):
                pin_all(ins, f"{name} (Concatenate) joins flattened tensors")
                out = fixed(name)
            else:
                out = Struct(tuple(s for st in ins for s in st.segs))
        elif kind == "Reshape" and carries:
            in_shape = shape(calls[0][0][0])
            target = cfg.get("target_shape")
            if in_shape is None or not target or ins[0].tile != 1 or in_shape[-1] != target[-1] or \
                    None in in_shape[1:-1] or math.prod(in_shape[1:-1]) != math.prod(target[:-1]):
                pin_all(ins, f"{name} (Reshape) does not keep the channel axis")
                out = fixed(name)
            else:
                out = ins[0]
        elif kind in ("Rescaling",) and carries and isinstance(cfg.get("scale"), (list, tuple)):
            pin_all(ins, f"{name} (Rescaling) scales each channel differently")
        elif kind == "Rescaling":
            out = ins[0]
        if out is None:
            if carries:
                pin_all(ins, f"{name} ({kind}) cannot be shrunk to match")
            out = fixed(name)
        structs[(name, 0, 0)] = out
    for ref in graph.outputs:
        pin_all([struct_of(ref)], f"{ref[0]}'s output is an output of {where}")

    # the groups the selection chooses
    roots: dict[int, list[str]] = {}
    for name in names:
        if name not in made:
            raise ApplyError(f"prune channels: cannot prune {graph.path(name)}: it is called "
                             f"{len(graph.calls[name])} times (a shared layer)")
        root = spaces.find(made[name])
        reason = spaces.why(root)
        if reason is not None:
            raise ApplyError(f"prune channels: cannot prune {graph.path(name)}: {reason}")
        roots.setdefault(root, []).append(name)
    members = {root: [n for n, s in made.items() if spaces.find(s) == root] for root in roots}
    kept_count = {}
    for root, group in members.items():
        sizes = {spaces.size[made[n]] for n in group}
        if len(sizes) != 1:
            raise ApplyError(f"prune channels: {', '.join(graph.path(n) for n in group)} meet at a merge "
                             f"with different channel counts")
        size = sizes.pop()
        drop = int(math.floor(size * percent / 100.0))
        kept_count[root] = size - drop
        plan.groups.append((root, [graph.path(n) for n in group], size, size - drop))

    # masks: computed when the model is rebuilt, from the arrays of the model before the edit
    cache: dict[int, np.ndarray] = {}
    paths_by_name = {n: graph.path(n) for n in graph.order}

    def keep(root: int, old: dict) -> np.ndarray:
        if root not in cache:
            total = None
            for n in members[root]:
                w = _weights(old[paths_by_name[n]])
                kernel = w["pointwise_kernel"] if "pointwise_kernel" in w else w["kernel"]
                norms = np.abs(kernel.astype(np.float64)).reshape(-1, kernel.shape[-1]).sum(axis=0)
                total = norms if total is None else total + norms
            size = total.shape[0]
            drop = size - kept_count[root]
            mask = np.ones(size, bool)
            mask[np.argsort(total, kind="stable")[:drop]] = False
            cache[root] = mask
        return cache[root]

    def mask_of(struct: Struct, old: dict):
        parts = []
        for s in struct.segs:
            root = spaces.find(s.space) if s.space is not None else None
            if root in kept_count:
                parts.append(np.repeat(keep(root, old), s.repeat))
            else:
                parts.append(np.ones((s.size or 0) * s.repeat, bool))
        return np.tile(np.concatenate(parts) if parts else np.ones(0, bool), struct.tile)

    def count_of(struct: Struct) -> tuple[int, int]:
        """(channels before, after) along a structure."""
        before = after = 0
        for s in struct.segs:
            n = (s.size or 0) * s.repeat
            root = spaces.find(s.space) if s.space is not None else None
            before += n
            after += kept_count[root] * s.repeat if root in kept_count else n
        return before * struct.tile, after * struct.tile

    def touches(struct: Struct | None) -> bool:
        return struct is not None and any(spaces.find(s) in kept_count for s in struct.spaces)

    for name in graph.order:
        entry = graph.entries[name]
        kind = entry["class_name"]
        src = inputs_of.get(name)
        out_struct = structs.get((name, 0, 0))
        own = name in made and spaces.find(made[name]) in kept_count
        reads = touches(src)
        if not (own or reads or (kind == "Reshape" and touches(out_struct))):
            continue
        path = graph.path(name)
        info = infos.get(path)
        if kind == "Reshape":
            old_c, new_c = count_of(out_struct)
            plan.edits.append(_set_target_channels(path, new_c))
            plan.lines.append(f"{path}: target_shape channels {old_c} -> {new_c}")
            continue
        if info is None or not info.layer.weights:
            continue
        old_shapes = [tuple(int(d) for d in v.shape) for v in info.layer.weights]
        new_shapes, compute = _shrink(kind, [v.name for v in info.layer.weights], old_shapes,
                                      src if reads else None, (spaces.find(made[name]), kept_count) if own else None,
                                      mask_of, keep, count_of, entry["config"])
        plan.changed.append(path)
        plan.params_before += _params(old_shapes)
        plan.params_after += _params(new_shapes)
        what = []
        if own:
            root = spaces.find(made[name])
            what.append(f"channels {spaces.size[made[name]]} -> {kept_count[root]}")
            plan.edits.append(_set_width(path, kind, kept_count[root]))
        elif kind == "BatchNormalization" or kind in DEPTHWISE:
            before, after = count_of(out_struct)
            what.append(f"channels {before} -> {after}")
        if reads and kind not in ("BatchNormalization",) + DEPTHWISE:
            before, after = count_of(src)
            what.append(f"input channels {before} -> {after}")
        what.append(f"params {_params(old_shapes):,} -> {_params(new_shapes):,}")
        plan.lines.append(f"{path}: " + ", ".join(what))
        plan.edits.append(_give_arrays(path, compute))


def _channel_concat(cfg: dict, out_shape) -> bool:
    axis = cfg.get("axis", -1)
    if axis == -1:
        return True
    return out_shape is not None and isinstance(axis, int) and axis % len(out_shape) == len(out_shape) - 1


def _join(spaces: _Spaces, ins: list, name: str, kind: str):
    """The structure after an element-wise merge: every input's channels meet one to one, so their
    spaces are pruned jointly; a prunable space meeting fixed channels cannot be pruned."""
    first = ins[0]
    layout = lambda st: ([(s.size, s.repeat) for s in st.segs], st.tile)  # noqa: E731
    if any(layout(st) != layout(first) for st in ins[1:]):
        for st in ins:
            for s in st.spaces:
                spaces.pin(s, f"{name} ({kind}) joins tensors whose channels are laid out differently")
        return Struct((Seg(None, None, 1, name),))
    for k, seg in enumerate(first.segs):
        column = [st.segs[k] for st in ins]
        fixed = [s for s in column if s.space is None]
        prunable = [s for s in column if s.space is not None]
        for s in prunable[1:]:
            spaces.union(prunable[0].space, s.space)
        if fixed and prunable:
            spaces.pin(prunable[0].space, f"{name} ({kind}) joins it with {fixed[0].origin}, which is not pruned")
    return first


def _shrink(kind, names, shapes, src, own, mask_of, keep, count_of, cfg):
    """(new weight shapes, fn(old layers) -> arrays) for a layer whose input (``src``, a Struct) or own
    output channels (``own``: (root, kept counts)) shrink."""
    def idx(mask):
        return np.flatnonzero(mask)

    new = [list(s) for s in shapes]
    pos = {n: i for i, n in enumerate(names)}
    in_before, in_after = count_of(src) if src is not None else (None, None)
    if own is not None:
        root, kept_count = own
        out_after = kept_count[root]
    if kind == "BatchNormalization":
        for s in new:
            s[0] = in_after
    elif kind in DEPTHWISE:
        m = shapes[pos["kernel"]][-1]
        new[pos["kernel"]][-2] = in_after
        if "bias" in pos:
            new[pos["bias"]][0] = in_after * m
    elif kind in SEPARABLE:
        m = shapes[pos["depthwise_kernel"]][-1]
        if src is not None:
            new[pos["depthwise_kernel"]][-2] = in_after
            new[pos["pointwise_kernel"]][-2] = in_after * m
        if own is not None:
            new[pos["pointwise_kernel"]][-1] = out_after
            if "bias" in pos:
                new[pos["bias"]][0] = out_after
    else:  # Conv, Dense
        if src is not None:
            new[pos["kernel"]][-2] = in_after
        if own is not None:
            new[pos["kernel"]][-1] = out_after
            if "bias" in pos:
                new[pos["bias"]][0] = out_after
    new = [tuple(s) for s in new]

    def compute(old: dict, path: str):
        w = _weights(old[path])
        in_idx = idx(mask_of(src, old)) if src is not None else None
        out_idx = idx(keep(own[0], old)) if own is not None else None
        arrays = dict(w)
        if kind == "BatchNormalization":
            arrays = {n: a[in_idx] for n, a in w.items()}
        elif kind in DEPTHWISE:
            m = w["kernel"].shape[-1]
            arrays["kernel"] = w["kernel"][..., in_idx, :]
            if "bias" in w:
                arrays["bias"] = w["bias"].reshape(-1, m)[in_idx].reshape(-1)
        elif kind in SEPARABLE:
            m = w["depthwise_kernel"].shape[-1]
            dk, pk = w["depthwise_kernel"], w["pointwise_kernel"]
            if in_idx is not None:
                dk = dk[..., in_idx, :]
                pk = pk.reshape(pk.shape[:-2] + (-1, m, pk.shape[-1]))[..., in_idx, :, :]
                pk = pk.reshape(pk.shape[:-3] + (-1, pk.shape[-1]))
            if out_idx is not None:
                pk = pk[..., out_idx]
                if "bias" in w:
                    arrays["bias"] = w["bias"][out_idx]
            arrays["depthwise_kernel"], arrays["pointwise_kernel"] = dk, pk
        else:
            k = w["kernel"]
            if in_idx is not None:
                k = k[..., in_idx, :]
            if out_idx is not None:
                k = k[..., out_idx]
                if "bias" in w:
                    arrays["bias"] = w["bias"][out_idx]
            arrays["kernel"] = k
        return [np.ascontiguousarray(arrays[n]) for n in names]
    return new, compute


def _set_width(path: str, kind: str, kept: int):
    def edit(editor):
        editor.entry(path)["config"]["units" if kind == "Dense" else "filters"] = kept
    return edit


def _set_target_channels(path: str, channels: int):
    def edit(editor):
        cfg = editor.entry(path)["config"]
        cfg["target_shape"] = list(cfg["target_shape"][:-1]) + [channels]
    return edit


def _give_arrays(path: str, compute):
    def edit(editor):
        old_path = editor.origin.get(path, path)
        editor.computed[path] = lambda old: compute(old, old_path)
    return edit
