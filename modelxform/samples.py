"""Small sample models built locally (no downloads): the demo's CNN and the test suite's factories.

    python -m modelxform.samples cnn cnn.keras
"""
from __future__ import annotations

import sys


def cnn(seed: int = 0):
    """The design card's CNN: conv2d_1, a MaxPooling2D, conv2d_2, flatten and three Dense layers; the
    same weights on every Keras backend."""
    from .keras_io.files import import_keras
    keras = import_keras()
    init = lambda n: keras.initializers.GlorotUniform(seed=seed + n)  # noqa: E731
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2d_1", kernel_initializer=init(1),
                            bias_initializer=keras.initializers.RandomNormal(seed=seed + 11))(inputs)
    x = keras.layers.MaxPooling2D(pool_size=2, name="max_pooling2d")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2d_2", kernel_initializer=init(2),
                            bias_initializer=keras.initializers.RandomNormal(seed=seed + 12))(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense_1", kernel_initializer=init(3),
                           bias_initializer=keras.initializers.RandomNormal(seed=seed + 13))(x)
    x = keras.layers.Dropout(0.25, name="dropout")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense_2", kernel_initializer=init(4),
                           bias_initializer=keras.initializers.RandomNormal(seed=seed + 14))(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="dense_3", kernel_initializer=init(5),
                                 bias_initializer=keras.initializers.RandomNormal(seed=seed + 15))(x)
    model = keras.Model(inputs, outputs, name="cnn")
    # The values those seeded initializers give under Keras's numpy backend, whatever the backend here
    # (Keras's own draws differ from backend to backend): the same sample CNN everywhere.
    from .keras_io.graph import initializer_for
    from .keras_io.initializers import initial_values
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([initial_values(initializer_for(layer, v.name), tuple(v.shape), v.dtype, None)
                               for v in layer.weights])
    return model


SAMPLES = {"cnn": cnn}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m modelxform.samples {{{','.join(SAMPLES)}}} OUT.keras"
    if argv in (["-h"], ["--help"]):
        print(f"{usage}\n\nBuild a small sample model locally (no downloads) and save it to OUT.keras "
              "(.h5 for the HDF5 format).\n  cnn  " + (cnn.__doc__ or "").split(";")[0].strip())
        return 0
    if len(argv) != 2 or argv[0] not in SAMPLES:
        print(usage, file=sys.stderr)
        return 2
    from .errors import ModelxformError
    from .keras_io.files import save_model
    try:
        save_model(SAMPLES[argv[0]](), argv[1])
    except ModelxformError as exc:
        print(exc.render(), file=sys.stderr)
        return int(exc.exit_code)
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
