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
