"""Freeze every layer of ResNet50 except the conv5_* stage.

    python freeze_but_conv5.py resnet50.keras out.keras
"""
import sys

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    for layer in model.layers:
        layer.trainable = layer.name.startswith("conv5_")
    assert sum(layer.trainable for layer in model.layers) == 32
    model.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
