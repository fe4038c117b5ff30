"""LoRA rank 8 on the query and value projections of every MultiHeadAttention.

    python lora_attention.py transformer.keras out.keras
"""
import sys

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    for layer in model.layers:
        if isinstance(layer, keras.layers.MultiHeadAttention):
            layer.query_dense.enable_lora(8)
            layer.value_dense.enable_lora(8)
    model.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
