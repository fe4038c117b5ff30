"""A Dropout(rate=0.1) inserted before the layer named ``head`` of a functional model (the layers kept,
weights and all).

    python insert_dropout.py mlp.keras out.keras
"""
import sys

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    head = model.get_layer("head")
    x = keras.layers.Dropout(0.1)(head.input)
    new = keras.Model(model.inputs, head(x), name=model.name)
    new.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
