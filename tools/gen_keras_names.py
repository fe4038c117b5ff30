"""Regenerate modelxform/lang/keras_names.py from the installed Keras.

The compiler must not import Keras (check/fmt start in a fraction of a second), yet it has to know
which CamelCase words name Keras layer classes. This script snapshots that list; the test
tests/test_compiler.py fails when the installed Keras disagrees, telling you to rerun it.
"""
import inspect
import pathlib

import keras


def layer_names() -> dict[str, str]:
    names = {}
    for attr in dir(keras.layers):
        obj = getattr(keras.layers, attr)
        if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer):
            names[attr] = obj.__name__
    return dict(sorted(names.items()))


def initializer_names() -> list[str]:
    names = []
    for attr in dir(keras.initializers):
        obj = getattr(keras.initializers, attr)
        if attr.startswith("_") or attr in ("get", "serialize", "deserialize"):
            continue
        if inspect.isclass(obj) and issubclass(obj, keras.initializers.Initializer) or inspect.isfunction(obj):
            names.append(attr)
    return sorted(names)


def render(names: dict[str, str], inits: list[str]) -> str:
    lines = [
        '"""Keras layer class names, snapshotted by tools/gen_keras_names.py (do not edit by hand)."""',
        "",
        f"KERAS_VERSION = {keras.__version__!r}",
        "",
        "# public name in keras.layers -> the class's __name__ (aliases such as MaxPool2D map to MaxPooling2D)",
        "LAYER_CLASSES: dict[str, str] = {",
    ]
    lines += [f"    {k!r}: {v!r}," for k, v in names.items()]
    lines += ["}", "", "# names accepted by keras.initializers.get", "INITIALIZERS: tuple[str, ...] = ("]
    lines += [f"    {n!r}," for n in inits]
    lines += [")", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent.parent / "modelxform" / "lang" / "keras_names.py"
    out.write_text(render(layer_names(), initializer_names()))
    print(f"wrote {out}")
