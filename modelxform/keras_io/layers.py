"""A built Keras model seen as its layers: the tree walk every part of modelxform shares.

A model is seen as a list of leaf layers in graph order, each named by its path: ``conv2d_1`` at the top
level, ``backbone/block1_conv1`` inside a nested model. Naming a nested model selects every layer in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ApplyError


@dataclass(eq=False)
class LayerInfo:
    path: str
    layer: object  # keras.layers.Layer
    ancestors: tuple = field(default=())  # nested models that contain it, outermost first

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def type_name(self) -> str:
        return type(self.layer).__name__

    @property
    def ancestor_types(self) -> tuple:
        return tuple(type(a).__name__ for a in self.ancestors)

    def params(self) -> int:
        try:
            return int(self.layer.count_params())
        except ValueError:  # not built yet
            return 0


def is_model(layer) -> bool:
    import keras
    return isinstance(layer, keras.Model)


def is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def walk(model) -> list[LayerInfo]:
    """Leaf layers of ``model`` in graph order, nested models expanded, each layer once."""
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
                out.append(LayerInfo(path, layer, ancestors))
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
