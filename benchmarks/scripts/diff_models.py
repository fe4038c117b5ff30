"""What a user writes to see which weights differ between two models: load both, compare every
variable (largest absolute difference, relative L2 change).

    python diff_models.py a.keras b.keras
"""
import sys

import keras
import numpy as np


def main(path_a, path_b):
    a = keras.saving.load_model(path_a, compile=False)
    b = keras.saving.load_model(path_b, compile=False)
    for va, vb in zip(a.weights, b.weights):
        x, y = np.asarray(va.numpy(), dtype=np.float64), np.asarray(vb.numpy(), dtype=np.float64)
        if x.shape != y.shape:
            print(f"{va.path}: shape {x.shape} -> {y.shape}")
        elif not np.array_equal(x, y):
            d = y - x
            print(f"{va.path}: max |diff| {np.abs(d).max():.4g}, relative L2 {np.linalg.norm(d) / np.linalg.norm(x):.4g}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
