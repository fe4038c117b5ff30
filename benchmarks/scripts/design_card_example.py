"""What a user writes for the design card's example (recipes/example.recipe) on the sample CNN:
one random Dense layer's weights × 0.8, MaxPooling2D -> AveragePooling2D, conv2d_1's output tapped.

    python design_card_example.py cnn.keras out.keras
"""
import random
import sys

import keras


def main(src, dst, seed=7):
    model = keras.saving.load_model(src, compile=False)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    chosen = random.Random(seed).choice(dense)
    chosen.set_weights([w * 0.8 for w in chosen.get_weights()])

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
    tapped = keras.Model(new.inputs, list(new.outputs) + [new.get_layer("conv2d_1").output], name=new.name)
    tapped.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
