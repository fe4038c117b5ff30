"""Every Dense and EinsumDense layer (the attention projections inside MultiHeadAttention included)
quantized to int8 with Keras's own quantizer.

    python quantize_int8.py transformer.keras out.keras

(Keras 3.15 writes a MultiHeadAttention's quantized sublayers into a file its loader then refuses:
"Layer 'query' expected 2 variables, but received 0" — the script is the baseline a user would write,
not a working deployment; modelxform's output reloads.)
"""
import sys
import warnings

import keras


def main(src, dst):
    model = keras.saving.load_model(src, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers without a quantize method
        model.quantize("int8", filters=lambda layer: isinstance(layer, (keras.layers.Dense,
                                                                        keras.layers.EinsumDense)))
    model.save(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
