"""Every MaxPooling2D becomes an AveragePooling2D with the same settings; weights are kept.

    python replace_pooling.py vgg16.keras out.keras
"""
import sys

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)

    def swap(layer):
        if isinstance(layer, keras.layers.MaxPooling2D):
            cfg = layer.get_config()
            return keras.layers.AveragePooling2D(pool_size=cfg["pool_size"], strides=cfg["strides"],
                                                 padding=cfg["padding"], data_format=cfg["data_format"],
                                                 name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=swap)
    for layer in model.layers:
        if layer.weights:
            new.get_layer(layer.name).set_weights(layer.get_weights())
    new.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
