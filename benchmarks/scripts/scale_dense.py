"""Every Dense layer's kernel × 0.8.

    python scale_dense.py vgg16.keras out.keras
"""
import sys

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.kernel.assign(layer.kernel * 0.8)
    model.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
