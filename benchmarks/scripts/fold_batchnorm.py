"""Fold every BatchNormalization that directly follows a Conv2D or Dense layer (linear activation, output
read by the BatchNormalization only) into that layer's kernel and bias, and remove it.

    python fold_batchnorm.py resnet50.keras out.keras

The Keras a user would write: edit the model's config (drop the BatchNormalization, point its readers at
the convolution, give the convolution a bias), rebuild it with Model.from_config, and give every layer
its weights: the folded ones computed with numpy, the others copied.
"""
import sys

import keras
import numpy as np


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    config = model.get_config()
    layers = {entry["name"]: entry for entry in config["layers"]}

    def inputs_of(entry):
        refs = []
        for node in entry["inbound_nodes"]:
            for arg in node["args"]:
                for t in arg if isinstance(arg, list) else [arg]:
                    if isinstance(t, dict) and t.get("class_name") == "__keras_tensor__":
                        refs.append(t["config"]["keras_history"][0])
        return refs

    readers = {}
    for entry in config["layers"]:
        for name in inputs_of(entry):
            readers.setdefault(name, []).append(entry["name"])
    folds = {}  # conv name -> bn name
    for entry in config["layers"]:
        if entry["class_name"] != "BatchNormalization":
            continue
        (src_name,) = inputs_of(entry)
        conv = layers[src_name]
        if conv["class_name"] in ("Conv2D", "Dense") and conv["config"]["activation"] == "linear" \
                and readers[src_name] == [entry["name"]]:
            folds[src_name] = entry["name"]
    removed = set(folds.values())
    for conv_name, bn_name in folds.items():
        layers[conv_name]["config"]["use_bias"] = True
    for entry in config["layers"]:  # readers of a removed BatchNormalization read the convolution
        for node in entry["inbound_nodes"]:
            for arg in node["args"]:
                for t in arg if isinstance(arg, list) else [arg]:
                    if isinstance(t, dict) and t.get("class_name") == "__keras_tensor__":
                        history = t["config"]["keras_history"]
                        if history[0] in removed:
                            history[0] = next(c for c, b in folds.items() if b == history[0])
    config["layers"] = [entry for entry in config["layers"] if entry["name"] not in removed]
    new = keras.Model.from_config(config)
    for layer in new.layers:
        if not layer.weights:
            continue
        old = model.get_layer(layer.name)
        if layer.name not in folds:
            layer.set_weights(old.get_weights())
            continue
        bn = model.get_layer(folds[layer.name])
        gamma, beta, mean, var = (w.astype(np.float64) for w in bn.get_weights())
        scale = gamma / np.sqrt(var + bn.epsilon)
        weights = old.get_weights()
        kernel = weights[0].astype(np.float64) * scale
        bias = weights[1].astype(np.float64) if len(weights) > 1 else np.zeros_like(mean)
        layer.set_weights([kernel.astype("float32"), ((bias - mean) * scale + beta).astype("float32")])
    new.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
