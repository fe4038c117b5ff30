"""A built Keras model seen as its layers: the tree walk every part of modelxform shares.

A model is seen as a list of leaf layers in graph order, each named by its path: ``conv2d_1`` at the top
level, ``backbone/block1_conv1`` inside a nested model, ``mha/query`` inside a composite layer. Two
kinds of layer hold other layers: nested models (their layers are nodes of their graph) and composite
layers (a MultiHeadAttention holds the EinsumDense layers query, key, value and attention_output; a
keras_hub TransformerEncoder holds its attention and feed-forward layers). Both are expanded: the walk
lists the layers inside them, with a composite's own variables (if it has any besides its sublayers')
under its own path. Naming a nested model or a composite selects every layer in it. Sublayers without
variables (a MultiHeadAttention's softmax) are left out: their names carry Keras's process-wide
counters, and nothing can be done to them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ApplyError


@dataclass(eq=False)
class LayerInfo:
    path: str
    layer: object  # keras.layers.Layer
    ancestors: tuple = field(default=())  # nested models and composite layers around it, outermost first
    composite: bool = False  # a composite layer listed for its own variables (its sublayers are listed too)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def type_name(self) -> str:
        return type(self.layer).__name__

    @property
    def ancestor_types(self) -> tuple:
        return tuple(type(a).__name__ for a in self.ancestors)

    @property
    def weights(self) -> list:
        """The variables this entry stands for: all of a plain layer's; a composite's own only."""
        return own_variables(self.layer) if self.composite else list(self.layer.weights)

    @property
    def is_sublayer(self) -> bool:
        """Inside a composite layer: not a node of any model's graph."""
        return any(not is_model(a) for a in self.ancestors)

    def params(self) -> int:
        try:
            return int(sum(math.prod(v.shape) for v in self.weights))
        except (ValueError, TypeError):  # not built yet
            return 0


def is_model(layer) -> bool:
    import keras
    return isinstance(layer, keras.Model)


def is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def sublayers(layer) -> list:
    """The layers a layer tracks (a MultiHeadAttention's query, key, …), in the order it made them.
    Keras keeps them in the private list ``_layers`` (no public API lists them; tests/test_keras_io.py
    fails if that changes)."""
    return list(getattr(layer, "_layers", None) or [])


def own_variables(layer) -> list:
    """The variables a layer holds itself, not through its sublayers (Keras's private lists
    ``_trainable_variables`` and ``_non_trainable_variables``, in ``weights`` order)."""
    mine = {id(v) for v in list(getattr(layer, "_trainable_variables", [])) +
            list(getattr(layer, "_non_trainable_variables", []))}
    return [v for v in layer.weights if id(v) in mine]


def walk(model) -> list[LayerInfo]:
    """Leaf layers of ``model`` in graph order, nested models and composite layers expanded, each
    layer once (a layer used twice, as tied embeddings are, is listed where it first appears)."""
    out: list[LayerInfo] = []
    seen: set[int] = set()

    def visit(container, prefix: str, ancestors: tuple):
        for layer in container.layers:
            if id(layer) in seen or is_input_layer(layer):
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            if is_model(layer):
                visit(layer, path + "/", ancestors + (layer,))
            else:
                add(layer, path, ancestors)

    def add(layer, path: str, ancestors: tuple):
        inner = [sub for sub in sublayers(layer) if sub.weights and id(sub) not in seen]
        if not inner:
            out.append(LayerInfo(path, layer, ancestors))
            return
        if own_variables(layer):
            out.append(LayerInfo(path, layer, ancestors, composite=True))
        for sub in inner:
            seen.add(id(sub))
            add(sub, f"{path}/{sub.name}", ancestors + (layer,))
    visit(model, "", ())
    return out


def nested_models(model) -> dict[str, object]:
    """Path -> nested model, for every model used as a layer (at any depth)."""
    out = {}

    def visit(container, prefix):
        for layer in container.layers:
            if is_model(layer):
                path = f"{prefix}{layer.name}"
                out.setdefault(path, layer)
                visit(layer, path + "/")
    visit(model, "")
    return out


def model_kind(model) -> str:
    """``functional``, ``sequential``, ``functional subclass`` (a class built on Keras's Functional whose
    saved config holds its constructor arguments, not its layers: keras_hub's Backbone and Task models)
    or ``subclassed`` (a forward pass in Python code)."""
    import keras
    if isinstance(model, keras.Sequential):
        return "sequential"
    # keras.Model(inputs, outputs) returns an instance of the private class Functional.
    if type(model).__name__ == "Functional":
        return "functional"
    from keras.src.models.functional import Functional  # no public name for the class
    if isinstance(model, Functional):
        return "functional subclass"
    return "subclassed"


def refuse_subclassed(model, what: str, span=None) -> None:
    kind = model_kind(model)
    if kind == "functional subclass":
        name = type(model).__name__
        raise ApplyError(
            f"{what} needs the model's graph, but {name!r} saves its constructor arguments, not its layers: "
            "structural statements cannot be saved in it",
            span=span, hint=f"add `unwrap` before it: that makes the model a plain functional model of its "
                            f"layers (the {name} class is dropped; its layers stay)")
    if kind == "subclassed":
        raise ApplyError(
            f"{what} needs a functional or Sequential model, but {type(model).__name__!r} is a "
            "subclassed model: its forward pass is Python code, not a graph modelxform can edit",
            span=span,
            hint="selection, weight statements, freeze and unfreeze work on it; for structural edits, "
                 "rebuild it as a functional model (keras.Model(inputs, outputs)) and save that")


def snake_case(name: str) -> str:
    """Keras's default layer name for a class (Dense -> dense, GlobalAveragePooling2D ->
    global_average_pooling2d; keras.src.utils.naming.to_snake_case), which is also how
    model.weights.h5 names a layer's group."""
    import re
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def layer_class(name: str, span=None):
    """A Keras layer class by its name in keras.layers, or a custom class registered by --import."""
    import difflib

    import keras
    cls = getattr(keras.layers, name, None)
    if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
        return cls
    for key, obj in keras.saving.get_custom_objects().items():
        if (key == name or key.split(">")[-1] == name) and isinstance(obj, type) \
                and issubclass(obj, keras.layers.Layer):
            return obj
    known = sorted({n for n in dir(keras.layers) if n[:1].isupper()})
    guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    raise ApplyError(f"unknown layer type {name!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""),
                     span=span, hint="custom layers need --import MODULE for the module that registers them")


def io_shapes(layer):
    """(input shape, output shape) of a layer called once, or None."""
    try:
        return tuple(layer.input.shape), tuple(layer.output.shape)
    except Exception:  # shared, multi-input or not called: no single answer
        return None


def _rank_needed(layer, rank: int) -> str | None:
    """What a layer's ``input_spec`` (public Keras API) says about the rank of its input, when ``rank``
    does not satisfy it: "4-dimensional", "at least 3-dimensional", …; None when it does or says nothing."""
    spec = getattr(layer, "input_spec", None)
    if spec is None or isinstance(spec, (list, tuple)):  # nothing said, or several inputs
        return None
    ndim, low, high = (getattr(spec, a, None) for a in ("ndim", "min_ndim", "max_ndim"))
    if ndim is not None and rank != ndim:
        return f"{ndim}-dimensional"
    if low is not None and rank < low:
        return f"at least {low}-dimensional"
    if high is not None and rank > high:
        return f"at most {high}-dimensional"
    return None


def _shape(t) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in t)
    return f"({dims},)" if len(t) == 1 else f"({dims})"


def check_moves(layers_by_path: dict, paths: list[str], order: list[int], span=None) -> None:
    """Before layers change places (swap, shuffle): every moved layer, and every layer reading a moved
    position, must receive a shape it takes. Layers with weights take exactly their original input
    shape; layers without weights take anything Keras can compute an output shape for. Reads which
    layer feeds which through Keras's private ``_keras_history`` and ``_outbound_nodes`` (no public
    API says it; tests/test_surgery.py fails loudly if they change)."""
    layers = [layers_by_path[p] for p in paths]
    io = [io_shapes(layer) for layer in layers]
    if any(x is None for x in io):
        return  # shared or multi-input layers are refused by the editor with their own message
    produced: dict[int, tuple] = {}  # position -> new output shape
    position_of = {id(layer): k for k, layer in enumerate(layers)}

    def source_position(k):
        try:
            history = layers[k].input._keras_history  # which layer feeds position k
            return position_of.get(id(history[0]))
        except Exception:
            return None
    for k in range(len(paths)):  # paths are in graph order
        incoming = layers[order[k]]
        src = source_position(k)
        received = produced[src] if src is not None and src in produced else io[k][0]
        expected = io[order[k]][0]
        if incoming.weights and received[1:] != expected[1:]:
            raise ApplyError(f"{incoming.name} expects {_shape(expected)} but would receive {_shape(received)}",
                             span=span)
        if incoming.weights:
            produced[k] = io[order[k]][1]
        else:
            where = f"in {paths[k]}'s place" if order[k] != k else "in its place"
            rank = _rank_needed(incoming, len(received))
            if rank is not None:
                raise ApplyError(f"{incoming.name} ({type(incoming).__name__}) takes {rank} input, like the "
                                 f"{_shape(expected)} it was built for, but {where} it would receive "
                                 f"{_shape(received)}", span=span)
            try:
                produced[k] = tuple(incoming.compute_output_shape(received))
            except Exception as exc:  # Keras's reason, which may come from deep inside (numpy): a hint only
                raise ApplyError(f"{incoming.name} ({type(incoming).__name__}) cannot take {_shape(received)} "
                                 f"{where} (it was built for {_shape(expected)})", span=span,
                                 hint=f"Keras says: {str(exc).strip() or type(exc).__name__}") from None
    for k in range(len(paths)):
        if produced[k][1:] != io[k][1][1:]:
            consumers = [n.operation.name for n in getattr(layers[k], "_outbound_nodes", [])
                         if getattr(n, "operation", None) is not None and id(n.operation) not in position_of]
            who = consumers[0] if consumers else "the model's output"
            raise ApplyError(f"{who} expects {_shape(io[k][1])} but would receive {_shape(produced[k])}",
                             span=span)


@dataclass
class FlagTarget:
    """Where ``freeze``/``unfreeze`` sets a trainable flag for some selected layers, and whether a saved
    file keeps it: ``saved``; ``not restored`` (Keras writes the flag of a composite layer such as a
    TransformerEncoder, but its loader does not pass it on to the sublayers' variables); ``not saved``
    (a sublayer's flag, or a layer's inside a model class whose config holds constructor arguments;
    ``why`` says which)."""

    path: str  # "" for the model itself
    layer: object
    covers: list  # the selected paths it stands for
    status: str = "saved"
    why: str = ""


def flag_targets(model, infos: list, all_infos: list, flag: bool) -> list[FlagTarget]:
    """The flags to set so that ``infos`` (the selection) become trainable=``flag`` in a way Keras can
    save: a layer's own flag where its model lists it as a node; else the flag of the innermost model
    (or composite layer, whose flag Keras saves but does not restore onto its sublayers) that holds
    nothing but selected layers; else the layer's own flag, marked not saved."""
    kind = model_kind(model)
    selected = {i.path for i in infos}
    under: dict[str, set] = {"": {i.path for i in all_infos}}
    for i in all_infos:
        parts = i.path.split("/")
        for k in range(1, len(parts)):
            under.setdefault("/".join(parts[:k]), set()).add(i.path)
    plain = kind in ("functional", "sequential")
    targets: list[FlagTarget] = []
    taken: dict[str, FlagTarget] = {}
    for info in infos:
        if any(info.path in t.covers for t in targets):
            continue
        chain = _containers(info)
        target = None
        if kind == "subclassed" or (plain and _is_node(info, chain)):
            target = FlagTarget(info.path, info.layer, [info.path])
        else:
            for cpath, clayer in chain[1:] + [("", model)]:
                if not under.get(cpath, set()) <= selected:
                    continue
                status = _container_status(cpath, clayer, chain, kind)
                if status is not None:
                    target = taken.get(cpath) or FlagTarget(cpath, clayer, sorted(under[cpath]), status)
                    break
        outside = [(p, layer) for p, layer in chain[1:] + [("", model)]
                   if target is None or (len(p) < len(target.path) or (p == "" and target.path != ""))]
        frozen = [p or "the model" for p, layer in outside if not getattr(layer, "trainable", True)] if flag else []
        if frozen:
            targets.append(FlagTarget(info.path, info.layer, [info.path], "not saved",
                                      f"{info.path} is inside {frozen[-1]}, whose own flag is False: Keras keeps "
                                      f"every variable inside it frozen, so unfreezing {info.path} alone does "
                                      "nothing"))
            continue
        if target is None:
            holder = next((p for p, layer in chain[1:] if not is_model(layer)), None)
            why = (f"{info.path} is a sublayer of {holder}, and Keras saves no sublayer's trainable flag"
                   if holder else
                   f"{info.path} is inside {chain[-1][0] if chain[1:] else type(model).__name__}, whose saved "
                   "config holds its constructor arguments, not its layers' flags")
            why += ", so a written file would lose it"
            targets.append(FlagTarget(info.path, info.layer, [info.path], "not saved", why))
            continue
        if target.path not in taken:
            taken[target.path] = target
            targets.append(target)
    return targets


def _containers(info) -> list[tuple[str, object]]:
    """(path, layer) of the layer itself, then of the models and composite layers around it, innermost
    first."""
    parts = info.path.split("/")
    out = [(info.path, info.layer)]
    for k in range(len(info.ancestors) - 1, -1, -1):
        out.append(("/".join(parts[:k + 1]), info.ancestors[k]))
    return out


def _is_node(info, chain) -> bool:
    """A node of plain functional/Sequential graphs at every level, with no sublayers of its own."""
    if any(not is_model(layer) or model_kind(layer) not in ("functional", "sequential") for _, layer in chain[1:]):
        return False
    return not any(sub.weights for sub in sublayers(info.layer))


def _container_status(path: str, layer, chain, kind: str) -> str | None:
    """Whether a container's own flag is saved (None: it is not)."""
    if path == "":
        return "saved" if kind != "subclassed" else None
    outer = [(p, l) for p, l in chain[1:] if len(p) < len(path)]
    if kind not in ("functional", "sequential") or \
            any(not is_model(l) or model_kind(l) not in ("functional", "sequential") for _, l in outer):
        return None
    return "saved" if is_model(layer) else "not restored"


def restore_trainable(model) -> None:
    """Set again, through Keras's setter, the trainable flag of every layer a loaded model's config
    marks as frozen: Keras's loader gives the flag to the layer but not to the sublayers a composite
    layer (a MultiHeadAttention, a keras_hub TransformerEncoder) builds, so their variables would stay
    trainable."""
    def freeze(layer):
        # the property's setter itself: with the TensorFlow backend, `layer.trainable = False` on a layer
        # whose flag is already False is skipped (KerasAutoTrackable.__setattr__ short-circuits a value
        # that `is` the current one), and nothing would reach the sublayers
        type(layer).trainable.fset(layer, False)

    def visit(container):
        for layer in container.layers:
            if not layer.trainable:
                freeze(layer)
            elif is_model(layer):
                visit(layer)
    if not model.trainable:
        freeze(model)
    else:
        visit(model)


def graph_config(model) -> dict:
    """The model's graph as a functional config, for reading its wiring: for a Functional subclass (a
    keras_hub Backbone or Task, whose get_config is its constructor arguments), Keras's Functional
    config of a plain functional model of its graph, and so for the Functional subclasses nested in it."""
    import keras

    def config_of(m) -> dict:
        if model_kind(m) == "functional subclass":  # (Functional.get_config of a subclass is its arguments)
            cfg = keras.Model(m.input, m.output, name=m.name).get_config()
        else:
            cfg = m.get_config()
        by_name = {layer.name: layer for layer in getattr(m, "layers", [])}
        for entry in cfg.get("layers", []):
            inner = by_name.get(entry.get("config", {}).get("name"))
            if inner is not None and is_model(inner) and model_kind(inner) == "functional subclass":
                entry["config"] = config_of(inner)
                entry["class_name"] = "Functional"
        return cfg
    return config_of(model)


def node_aliases(model) -> dict:
    """path -> the path walk lists a layer under, for a layer that is a node at two places (GPT-2's token
    embedding, inside the backbone and again for the logits)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}

    def visit(container, prefix):
        for layer in container.layers:
            path = prefix + layer.name
            if id(layer) in first:
                if first[id(layer)] != path:
                    aliases[path] = first[id(layer)]
                continue
            first[id(layer)] = path
            if is_model(layer):
                visit(layer, path + "/")
    visit(model, "")
    return aliases


def why_not_a_node(info) -> tuple[str, str] | None:
    """(message, hint) when a layer is no node of a graph a structural statement can edit: a sublayer of a
    composite layer, or a layer inside a model class whose config holds its constructor arguments."""
    parts = info.path.split("/")
    for k, holder in enumerate(info.ancestors):
        holder_path = "/".join(parts[:k + 1])
        cls = type(holder).__name__
        if not is_model(holder):
            return (f"{info.path} is a sublayer of {holder_path} ({cls}): it is built inside that layer, not a "
                    "node of the model's graph, so structural statements cannot move, replace or tap it",
                    f"act on {holder_path} itself; weight statements, freeze and unfreeze do reach its sublayers")
        if model_kind(holder) == "functional subclass":
            return (f"{info.path} is inside {holder_path} ({cls}), a model class whose saved config holds its "
                    "constructor arguments, not its layers: its layers are not nodes of a graph modelxform can edit",
                    f"add `unwrap {holder_path}` before it: that makes {holder_path} a plain functional model of "
                    f"its layers (the {cls} class is dropped)")
        if model_kind(holder) == "subclassed":
            return (f"{info.path} is inside {holder_path} ({cls}), a subclassed model: its forward pass is Python "
                    "code, not a graph modelxform can edit",
                    "weight statements, freeze and unfreeze reach its layers; for structural edits, rebuild it as a "
                    "functional model (keras.Model(inputs, outputs)) and save that")
    return None
