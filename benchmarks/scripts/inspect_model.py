"""What a user writes to see a model's layers: load it, print its summary.

    python inspect_model.py model.keras
"""
import sys

import keras


def main(path):
    model = keras.saving.load_model(path, compile=False)
    model.summary()


if __name__ == "__main__":
    main(sys.argv[1])
