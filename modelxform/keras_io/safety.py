"""What modelxform refuses to read from a model file, checked before Keras (or anything else) reads it.

A model file may come from someone else (a pull request checked in CI, a shared model zoo), so every way
a model is read — the TensorFlow-free archive (archive.py), loading with Keras (files.load_model), the
provenance record — goes through this module first:

- **Safe mode.** :func:`unsafe_content` finds, in a model's config, what Keras safe mode refuses to load
  (keras/src/saving/serialization_lib.py and the layers' ``from_config``): a serialized Python lambda
  anywhere (a ``Lambda`` layer's function, or one put in place of a Dense activation), a ``TFSMLayer``
  (it loads an external SavedModel), a ``TorchModuleWrapper`` holding a pickled module, a lookup layer
  that reads its vocabulary from a file outside the archive. Every path refuses such a file with the same
  message (:func:`refusal`) unless the user passes ``--unsafe``; Keras's own refusals, should one slip
  past this check, are reported with the same words (files._explain_load_error).
- **Bounded reads.** The JSON members of a .keras zip are read only after their declared sizes are
  checked against :data:`MEMBER_LIMITS` and their compression ratio against :data:`MAX_RATIO` (zipfile
  never reads past a member's declared size, so the declared size bounds the memory); JSON nested deeper
  than Python's parser can follow is refused with a message, not a RecursionError.

What a class or function from another module is (a custom layer registered by ``--import``, or nothing)
only Keras can tell: the archive declines such configs (``NotApplicable``) and Keras decides.
"""
from __future__ import annotations

import json
import zipfile

from ..errors import ModelFileError

CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
PROVENANCE_MEMBER = "modelxform.json"

# Declared sizes beyond these are refused before a byte is read. The largest configs Keras writes for
# real models (keras_hub backbones, ResNet152) are a few MB; a provenance record holds recipes of at most
# 1 MB each (lang.parser.MAX_RECIPE_BYTES).
MEMBER_LIMITS = {CONFIG_MEMBER: 32 << 20, METADATA_MEMBER: 1 << 20, PROVENANCE_MEMBER: 32 << 20}
# Deflate cannot compress better than about 1032:1, so a member declaring more is lying about its size
# (or is a bomb made with another method); checked for members above MIN_RATIO_CHECK bytes.
MAX_RATIO = 1100
MIN_RATIO_CHECK = 1 << 20
# An .h5 model's config and record are HDF5 attributes: the same caps, read off the attribute's storage size.
H5_ATTRIBUTE_LIMIT = 32 << 20

SAFE_MODE_ADVICE = "which Keras safe mode refuses to load; if you trust this file, rerun with --unsafe"
LOOKUP_LAYERS = frozenset({"StringLookup", "IntegerLookup", "TextVectorization"})


def refusal(path, what: str) -> str:
    """The one message for a model safe mode refuses, whichever way it was read."""
    return f"{path}: the model contains {what}, {SAFE_MODE_ADVICE}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def unsafe_content(config) -> str | None:
    """What in ``config`` (a model's config, as JSON data) Keras safe mode refuses, described for the
    user ("a Lambda layer ('double') whose function is Python code"), or None. Walks any JSON value
    without recursion, so a hostile config cannot exhaust the stack."""
    stack = [(config, None, None, None)]  # (value, enclosing layer name, its class, key)
    while stack:
        value, layer, layer_class, key = stack.pop()
        if isinstance(value, dict):
            cls = value.get("class_name")
            inner = value.get("config")
            if cls == "__lambda__":
                where = f" ('{_short(str(layer))}')" if layer is not None else ""
                if layer_class == "Lambda" and key in ("function", "output_shape", "mask"):
                    return f"a Lambda layer{where} whose {key} is Python code"
                place = f" (layer '{_short(str(layer))}', {_short(str(key))})" if layer is not None else ""
                return f"a serialized Python lambda{place}"
            if isinstance(cls, str) and isinstance(inner, dict):
                name = inner.get("name")
                if isinstance(name, str):
                    layer, layer_class = name, cls
                shown = f" ('{_short(name)}')" if isinstance(name, str) else ""
                if cls == "TFSMLayer":
                    return f"a TFSMLayer{shown}, which loads an external SavedModel"
                if cls == "TorchModuleWrapper" and "module" in inner:
                    return f"a TorchModuleWrapper{shown} holding a pickled torch module"
                if cls in LOOKUP_LAYERS and isinstance(inner.get("vocabulary"), str):
                    return (f"a {cls}{shown} that reads its vocabulary from a file outside the archive "
                            f"({_short(inner['vocabulary'])!r})")
            items = list(value.items())
            stack.extend((v, layer, layer_class, k) for k, v in reversed(items))
        elif isinstance(value, list):
            stack.extend((v, layer, layer_class, key) for v in reversed(value))
    return None


def check_safe(config, path, *, unsafe: bool) -> None:
    """Refuse (ModelFileError, exit 3) a config holding what safe mode refuses, unless ``unsafe``."""
    if unsafe:
        return
    what = unsafe_content(config)
    if what is not None:
        raise ModelFileError(refusal(path, what))


def parse_json(data: bytes, path, what: str):
    """JSON text from a model file, or a ModelFileError saying it is not readable JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ModelFileError(f"{path}: {what} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path}: {what} is not valid JSON ({_short(detail, 120)})") from None


def check_member(info: zipfile.ZipInfo, path) -> None:
    """Refuse a zip member whose declared size is over its limit, or whose compression ratio no honest
    compressor reaches, before it is read."""
    if info.flag_bits & 0x1:  # (zipfile would raise a RuntimeError asking for a password)
        raise ModelFileError(f"{path}: {info.filename} is encrypted in the archive; Keras writes no encrypted "
                             "members (a damaged or hostile archive)")
    limit = MEMBER_LIMITS.get(info.filename)
    if limit is not None and info.file_size > limit:
        raise ModelFileError(f"{path}: {info.filename} declares {info.file_size:,} bytes; "
                             f"modelxform reads at most {limit:,}")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MIN_RATIO_CHECK \
            and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise ModelFileError(f"{path}: {info.filename} declares {info.file_size:,} bytes compressed into "
                             f"{info.compress_size:,}, more than any compressor Keras uses can reach "
                             "(a damaged or hostile archive)")


def check_archive(zf: zipfile.ZipFile, path) -> None:
    """check_member for every member of an open .keras zip."""
    for info in zf.infolist():
        check_member(info, path)


def read_member(zf: zipfile.ZipFile, name: str, path) -> bytes:
    """A member's bytes, after check_member (zipfile reads at most the declared size)."""
    check_member(zf.getinfo(name), path)
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: cannot read {name} from the archive ({_short(str(exc), 120)})") from None


def read_json_member(zf: zipfile.ZipFile, name: str, path):
    return parse_json(read_member(zf, name, path), path, name)


def read_h5_attribute(h5, name: str, path, what: str):
    """An attribute of an open HDF5 file (str or bytes) after checking its stored size, or None."""
    if name not in h5.attrs:
        return None
    size = h5.attrs.get_id(name).get_storage_size()
    if size > H5_ATTRIBUTE_LIMIT:
        raise ModelFileError(f"{path}: {what} is {size:,} bytes; modelxform reads at most {H5_ATTRIBUTE_LIMIT:,}")
    value = h5.attrs[name]
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise ModelFileError(f"{path}: {what} is not text")
