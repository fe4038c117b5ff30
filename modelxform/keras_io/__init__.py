"""The only code that knows Keras file formats and private APIs.

- config.py: the one walker of the Keras config format (layers, nested models, inbound nodes);
- layers.py: a built model seen as its layers (paths, nested models, what kind of model);
- archive.py: a .keras archive read and written without Keras (the arrays by their byte ranges);
- files.py: loading with safe mode, atomic and reproducible saving, the provenance member;
- graph.py: structural edits on the config and the one rebuild;
- variables.py: filling a rebuilt model's variables (Keras internals and each backend's own way of
  writing a large array: TensorFlow, JAX, torch; each use tested);
- initializers.py: new and reinitialised weights computed with numpy, the same on every backend;
- backend.py: the Keras backend as Keras picks it, and the library versions, read without importing
  them; the one place that says which backend library may be imported when.
"""
