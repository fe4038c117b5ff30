"""Output shapes of the layers of a model config, worked out without building the model."""
from __future__ import annotations

from collections.abc import Mapping

from .config import is_model_entry, layers_of, tensors, walk


class ArchiveFacts(Mapping):
    """(output shape, params) by path for an archive's layers, as a report describes a built model's,
    worked out only for the layers a report asks about (an output shape needs the layer's class)."""

    def __init__(self, archive):
        self._infos = {info.path: info for info in archive.layers}
        self.shapes = ShapeFinder(archive.current_config())

    def __getitem__(self, path):
        shape = self.shapes.output(path)
        return ("?" if shape is None else shape_text(shape)), self._infos[path].params()

    def __iter__(self):
        return iter(self._infos)

    def __len__(self):
        return len(self._infos)


def shape_text(shape) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


class ShapeFinder:
    """Output shapes of the layers in a model config, from each layer's class and the input shape the
    config records (``build_config``, the tensors of its inbound node, or in a Sequential stack the
    previous layer's output), as they would read off the built model. None where there is
    no single answer (a shared layer, a nested model's output) or the class cannot say unbuilt."""

    def __init__(self, config: dict):
        self._where: dict[str, tuple] = {}  # path -> (entry, its model entry, its index there)
        self._cache: dict[str, object] = {}

        for layer in walk(config, models=True, inputs=True):
            self._where[layer.path] = (layer.entry, layer.container, layer.index)
        self.top = config

    def output(self, path: str):
        if path not in self._cache:
            self._cache[path] = None  # (a cycle cannot occur in a valid config; this stops one anyway)
            self._cache[path] = self._output(path)
        return self._cache[path]

    def _output(self, path: str):
        entry, container, index = self._where[path]
        if entry["class_name"] == "InputLayer":
            shape = entry["config"].get("batch_shape")
            return tuple(shape) if shape else None
        if is_model_entry(entry) or len(entry.get("inbound_nodes") or [None]) != 1:
            return None
        input_shape = (entry.get("build_config") or {}).get("input_shape")
        if input_shape is None and entry.get("inbound_nodes"):
            shapes = [t["config"]["shape"] for t in tensors(entry["inbound_nodes"][0])]
            input_shape = shapes[0] if len(shapes) == 1 else shapes or None
        if input_shape is None and container["class_name"] == "Sequential":
            prefix = path[: len(path) - len(entry["config"]["name"])]
            earlier = layers_of(container)[:index]
            if earlier:
                input_shape = self.output(prefix + earlier[-1]["config"]["name"])
            else:
                input_shape = container["config"].get("build_input_shape")
        if input_shape is None:
            return None
        try:
            import keras
            # the class and its arguments only: build_config would build (and fill) its variables
            bare = {k: entry[k] for k in ("module", "class_name", "config", "registered_name") if k in entry}
            layer = keras.saving.deserialize_keras_object(bare, safe_mode=True)
            shape = layer.compute_output_shape(_shape_tuple(input_shape))
        except Exception:  # noqa: BLE001 - the report says "?" where the class cannot tell
            return None
        if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape):
            return shape
        return None

    def model_outputs(self) -> list:
        """The shapes of the top model's outputs (runner._output_shapes)."""
        config = self.top["config"]
        if self.top["class_name"] == "Sequential":
            layers = config["layers"]
            return [self.output(layers[-1]["config"]["name"]) if layers else None]
        refs = config.get("output_layers") or []
        if refs and isinstance(refs[0], str):
            refs = [refs]
        return [self.output(name) if name in self._where and node == 0 and index == 0 else None
                for name, node, index in refs]


def _shape_tuple(shape):
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        return [tuple(s) for s in shape]
    return tuple(shape)
