"""Write a large .keras model without holding its weights in memory (issue 19's fixtures).

    python benchmarks/large_fixture.py OUT.keras --gib 2

The model is a functional MLP: an input of WIDTH features, Dense(WIDTH, relu) layers, a Dropout-free path
to a small Dense head named ``head``. Keras describes it (its config.json is serialised from the model
built in a stateless scope, where no variable gets a value); the arrays are written straight into
model.weights.h5 with h5py, a block at a time, in the layout Keras's H5IOStore gives them (``layers/dense_N/
vars/0`` …). So a 6 GB fixture needs a few hundred MB of memory, where ``model.save`` would need the model.

The values are seeded normal(0, 0.01) floats, so the same command writes the same file.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import zipfile

WIDTH = 8192
BLOCK_ROWS = 512  # rows of a kernel written at a time: 512 × 8192 float32 = 16 MiB
HEAD_UNITS = 16


def layer_count(gib: float) -> int:
    """Hidden layers of WIDTH × WIDTH for about ``gib`` GiB of weights."""
    per_layer = (WIDTH * WIDTH + WIDTH) * 4
    return max(1, round(gib * 2**30 / per_layer))


def build_description(hidden: int):
    """(config.json text, metadata.json text) of the MLP, from Keras, without giving any variable a value."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from keras.src.backend.common.stateless_scope import StatelessScope
    from keras.src.saving import saving_lib

    with StatelessScope(initialize_variables=False):
        inputs = keras.Input((WIDTH,), name="features")
        h = inputs
        for _ in range(hidden):
            h = keras.layers.Dense(WIDTH, activation="relu")(h)
        outputs = keras.layers.Dense(HEAD_UNITS, name="head")(h)
        model = keras.Model(inputs, outputs, name="large_mlp")
        config_json, metadata_json = saving_lib._serialize_model_as_json(model)
        layers = [(layer.name, [tuple(v.shape) for v in layer.weights]) for layer in model.layers]
    return config_json, metadata_json, layers


def write_weights(path: pathlib.Path, layers, seed: int = 0) -> None:
    """model.weights.h5 as Keras lays it out: layers/<snake_case class>[_N]/vars/<i>, with ``name`` attributes."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        group = h5.create_group("layers")
        dense_seen = 0
        for name, shapes in layers:
            if not shapes:
                key = "input_layer"
            else:
                key = "dense" if dense_seen == 0 else f"dense_{dense_seen}"
                dense_seen += 1
            vars_group = group.create_group(key).create_group("vars")
            vars_group.attrs["name"] = name
            for i, shape in enumerate(shapes):
                ds = vars_group.create_dataset(str(i), shape=shape, dtype="float32")
                rows = shape[0]
                for start in range(0, rows, BLOCK_ROWS):
                    stop = min(rows, start + BLOCK_ROWS)
                    block = rng.standard_normal((stop - start,) + shape[1:], dtype=np.float32)
                    block *= np.float32(0.01)
                    ds[start:stop] = block
        h5.create_group("vars").attrs["name"] = "large_mlp"


def write_fixture(out: pathlib.Path, gib: float, seed: int = 0) -> dict:
    hidden = layer_count(gib)
    config_json, metadata_json, layers = build_description(hidden)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fixture-") as tmp:
        weights = pathlib.Path(tmp) / "model.weights.h5"
        write_weights(weights, layers, seed)
        partial = pathlib.Path(tmp) / out.name
        with zipfile.ZipFile(partial, "w") as zf:
            zf.writestr("metadata.json", metadata_json)
            zf.writestr("config.json", config_json)
            zf.write(weights, "model.weights.h5", compress_type=zipfile.ZIP_STORED)
        os.replace(partial, out)
    params = sum((WIDTH * WIDTH + WIDTH) for _ in range(hidden)) + WIDTH * HEAD_UNITS + HEAD_UNITS
    return {"hidden_layers": hidden, "params": params, "bytes": out.stat().st_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--gib", type=float, required=True, help="about this many GiB of weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = write_fixture(args.out, args.gib, args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
