"""The recipe language: parser, compiler, YAML form and canonical formatting.

Imports no Keras, TensorFlow or h5py (``check``, ``fmt`` and ``--help`` start in a fraction of a
second), and nothing from the engine or keras_io: tests/test_layering.py holds it to that.
"""
