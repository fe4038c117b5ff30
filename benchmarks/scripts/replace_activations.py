"""Replace the named layers by fresh Activation("relu") layers of the same name (shape-preserving).

    python replace_activations.py resnet50.keras out.keras conv2_block1_1_relu [NAME …]
"""
import sys

import keras


def main(src, dst, names):
    model = keras.saving.load_model(src, compile=False)
    names = set(names)

    def swap(layer):
        if layer.name in names:
            return keras.layers.Activation("relu", name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=swap)
    for layer in model.layers:
        if layer.weights:
            new.get_layer(layer.name).set_weights(layer.get_weights())
    new.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
