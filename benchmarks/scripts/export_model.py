"""What a user writes to export a model for serving: load it, ``model.export`` it as a SavedModel.

    python export_model.py model.keras served/1
"""
import sys

import keras


def main(path, directory):
    model = keras.saving.load_model(path, compile=False)
    model.export(directory, format="tf_saved_model", verbose=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
