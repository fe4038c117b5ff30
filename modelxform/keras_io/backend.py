"""Which Keras backend and library versions this process would use, read without importing them."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

def keras_backend() -> str:
    """The backend Keras would pick (KERAS_BACKEND, else keras.json, else tensorflow), without
    importing it."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    for folder in (home, os.path.join(tempfile.gettempdir(), ".keras")):
        try:
            with open(os.path.join(folder, "keras.json")) as fh:
                return str(json.load(fh).get("backend", "tensorflow"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return "unknown"
    return "tensorflow"


def library_versions() -> dict | None:
    """provenance.library_versions() from the installed distributions' metadata (importing keras and
    tensorflow to ask them is what this module avoids); None when a distribution is not found."""
    import sys
    from importlib import metadata

    from ..version import __version__
    try:
        keras_version = metadata.version("keras")
        tf_version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return None
    return {"modelxform": __version__, "keras": keras_version, "tensorflow": tf_version,
            "numpy": np.__version__, "python": ".".join(map(str, sys.version_info[:3]))}
