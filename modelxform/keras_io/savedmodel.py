"""A model written as a TensorFlow SavedModel: what ``model.export(path, format="tf_saved_model")`` writes,
with every variable stored once.

With the TensorFlow backend, Keras 3 (3.12 to 3.15 at least; keras-team/keras#23553) stores every weight
twice in the SavedModel's checkpoint: once under ``variables/N`` (the collections ``ExportArchive.track``
fills, which hold Keras's variable wrappers) and once under ``_all_variables/N`` (the ``tf.Variable``
objects the traced endpoint captured). TensorFlow's checkpoint keeps one copy of an object tracked twice,
but these are two objects over one buffer, so both are written, and both are restored as separate
variables by every process that loads the export: twice the files on disk, twice the variables' memory
in TensorFlow Serving. Here the tracked collections hold the ``tf.Variable`` each wrapper holds, the same
objects the endpoint captured: one copy of each, and the collections (``variables``,
``trainable_variables``, ``non_trainable_variables`` of the loaded object) are what they were. The
endpoint is the one ``model.export`` makes (``serve``, also the ``serving_default`` signature), with the
same input signature. Other backends store each variable once already (JAX converts them into new
``tf.Variable`` objects that the endpoint captures); they go through ``model.export`` unchanged.
"""
from __future__ import annotations

ENDPOINT = "serve"  # the name model.export gives its endpoint (keras.src.export.saved_model)


def write_saved_model(model, path: str) -> None:
    """Write ``model`` as a SavedModel folder at ``path`` (which must not exist), each variable once."""
    import keras
    from .variables import materialise
    for variable in model.variables:  # (a rebuilt model's large arrays, still in the input file: read now,
        materialise(variable)         # not inside the trace)
    pieces = _export_pieces(keras)
    if pieces is None:  # (another backend, which stores each once already; or an older Keras 3)
        model.export(path, format="tf_saved_model", verbose=False)
        return
    import tensorflow as tf
    archive, get_input_signature = pieces
    archive.track_and_add_endpoint(ENDPOINT, model, get_input_signature(model))
    tracked = archive._tf_trackable  # (the AutoTrackable that write_out saves)
    for name in ("variables", "trainable_variables", "non_trainable_variables"):
        setattr(tracked, name, [_tf_variable(v, keras, tf) for v in getattr(tracked, name)])
    archive.write_out(path, verbose=False)


def _export_pieces(keras):
    """(an ExportArchive, Keras's get_input_signature) where the backend is TensorFlow and this Keras has
    what write_saved_model uses; else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    try:
        from keras.src.export.export_utils import get_input_signature
        archive = keras.export.ExportArchive()
    except (ImportError, AttributeError):
        return None
    if not (hasattr(archive, "track_and_add_endpoint") and hasattr(archive, "_tf_trackable")):
        return None
    return archive, get_input_signature


def _tf_variable(variable, keras, tf):
    """The tf.Variable a Keras variable of the TensorFlow backend holds (what a traced function
    captures), or ``variable`` itself."""
    value = getattr(variable, "_value", None) if isinstance(variable, keras.Variable) else None
    return value if isinstance(value, tf.Variable) else variable
