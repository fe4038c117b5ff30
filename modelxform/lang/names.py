"""Keras class names as the language knows them, without importing Keras (keras_names.py holds the
snapshot)."""
from __future__ import annotations

import difflib
import re

from .keras_names import LAYER_CLASSES

# Names that select nested models by type: keras.Model subclasses, not in keras.layers.
MODEL_CLASSES = ("Functional", "Sequential", "Model")
CAMEL = re.compile(r"[A-Z][A-Za-z0-9]*\Z")


def is_layer_type(word: str) -> bool:
    """A CamelCase word that names a Keras layer class (or a model class) is a type."""
    return word in LAYER_CLASSES or word in MODEL_CLASSES


def canonical_type(word: str) -> str:
    """Aliases (MaxPool2D) map to the class name Keras reports (MaxPooling2D)."""
    return LAYER_CLASSES.get(word, word)


def suggest(word: str, candidates) -> str | None:
    """The candidate ``word`` is probably a typo or an abbreviation of: a close match, else the one
    candidate it starts (ignoring case; at least 4 letters), as `BatchNorm` for `BatchNormalization`."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    if matches:
        return matches[0]
    if len(word) >= 4:
        longer = [c for c in candidates if c.lower().startswith(word.lower()) and c != word]
        if len(longer) == 1:
            return longer[0]
    return None
