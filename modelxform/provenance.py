"""Provenance: how a model file was made, recorded inside it, and re-checked by ``verify``.

A record is a chain with one entry per recipe applied, oldest first. Each entry holds the recipe's text
with includes inlined (canonical form) and its sha256, the input file's sha256, the seed, the params,
the library versions and one line per statement of what it did. Applying a recipe to a model that
already has a record appends to its chain. ``modelxform verify`` re-derives a file from its record
(session.verify_file).
"""
from __future__ import annotations

import hashlib
import re
import json

from .errors import ModelFileError
from .keras_io.backend import library_versions

FORMAT = "modelxform-provenance/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def recipe_text(recipe) -> str:
    return recipe.program.inlined_text()


def recipe_sha256(recipe) -> str:
    return hashlib.sha256(recipe_text(recipe).encode("utf-8")).hexdigest()


def _jsonable(value):
    from . import ir
    if isinstance(value, ir.Percent):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def entry(recipe, report, input_sha256: str, versions: dict | None = None) -> dict:
    """One link of the chain: ``report`` is the run's Plan; ``versions`` defaults to the installed
    libraries' versions (keras_io.backend.library_versions)."""
    header = recipe.program.header()
    statements = []
    for s in report.statements:
        line = f"{s.statement}"
        details = s.record if s.record is not None else (s.changes or s.notes)
        if details:
            line += " :: " + "; ".join(details[:20]) + (f"; … ({len(details) - 20} more)" if len(details) > 20 else "")
        statements.append(line)
    out = {
        "recipe": {"name": header.name if header else None, "version": header.version if header else None,
                   "text": recipe_text(recipe), "sha256": recipe_sha256(recipe)},
        "input_sha256": input_sha256,
        "seed": report.seed,
        "params": {k: _jsonable(v) for k, v in sorted(report.params.items())},
        "versions": versions if versions is not None else library_versions(),
        "statements": statements,
    }
    if getattr(report, "weights_files", None):  # `load weights from`: what was read (verify checks it)
        out["load_weights"] = dict(sorted(report.weights_files.items()))
    return out


def extend(previous: dict | None, new_entry: dict) -> dict:
    """``previous`` (a record read by read_record, or None) with ``new_entry`` appended to its chain."""
    chain = previous["chain"] if previous else []
    if not isinstance(chain, list):  # read_record refuses such a record; never split a string
        raise ValueError("a provenance chain is a list")
    return {"format": FORMAT, "chain": list(chain) + [new_entry]}


# ---- reading a record that may come from someone else ----------------------------------------------

def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def validate(record, where) -> dict:
    """``record`` when it is a well-formed provenance record (the shape :func:`entry` and :func:`extend`
    write; docs/provenance.schema.json), else ModelFileError (exit 3) with one line naming the first field
    that is wrong. Unknown fields are allowed (a later version may add some)."""
    def bad(field: str, what: str):
        raise ModelFileError(f"{where}: malformed provenance record: {field} {what}")

    def want(value, field: str, types, what: str, optional: bool = False):
        if value is None and optional:
            return
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            bad(field, f"is {_kind(value)}, not {what}")

    def digest(value, field: str):
        want(value, field, (str,), "a sha256 (64 hex digits)")
        if not _SHA256.fullmatch(value):
            bad(field, "is not a sha256 (64 hex digits)")

    want(record, "the record", (dict,), "an object")
    if record.get("format") != FORMAT:
        shown = str(record.get("format"))[:60]
        bad("format", f"is {shown!r}; this version of modelxform reads {FORMAT!r}")
    chain = record.get("chain")
    want(chain, "chain", (list,), "a list of steps")
    for n, step in enumerate(chain):
        at = f"chain[{n}]"
        want(step, at, (dict,), "an object (one step)")
        recipe = step.get("recipe")
        want(recipe, f"{at}.recipe", (dict,), "an object")
        want(recipe.get("text"), f"{at}.recipe.text", (str,), "a string")
        digest(recipe.get("sha256"), f"{at}.recipe.sha256")
        for key in ("name", "version"):
            want(recipe.get(key), f"{at}.recipe.{key}", (str,), "a string", optional=True)
        digest(step.get("input_sha256"), f"{at}.input_sha256")
        seed = step.get("seed")
        want(seed, f"{at}.seed", (int,), "a whole number")
        if seed < 0:
            bad(f"{at}.seed", "is negative")
        params = step.get("params")
        want(params, f"{at}.params", (dict,), "an object")
        versions = step.get("versions")
        want(versions, f"{at}.versions", (dict,), "an object", optional=True)
        for lib, version in (versions or {}).items():
            want(version, f"{at}.versions.{lib}", (str,), "a string", optional=True)
        statements = step.get("statements")
        want(statements, f"{at}.statements", (list,), "a list of strings")
        for k, line in enumerate(statements):
            want(line, f"{at}.statements[{k}]", (str,), "a string")
        files = step.get("load_weights")
        want(files, f"{at}.load_weights", (dict,), "an object", optional=True)
        for path, sha in (files or {}).items():
            digest(sha, f"{at}.load_weights[{path[:60]!r}]")
    return record


def read_record(path) -> dict | None:
    """The provenance record of a model file, checked by :func:`validate`; None when it has none."""
    from .keras_io.files import read_provenance
    record = read_provenance(path)
    return None if record is None else validate(record, path)


def render(record: dict) -> list[str]:
    """A readable account of a record, one recipe after the other."""
    lines = []
    chain = record.get("chain", [])
    for n, step in enumerate(chain, start=1):
        recipe = step.get("recipe", {})
        title = recipe.get("name") or "(unnamed recipe)"
        version = f" version {recipe['version']}" if recipe.get("version") else ""
        lines.append(f"{n}. recipe {title}{version}  (sha256 {recipe.get('sha256', '?')[:16]}…)")
        lines.append(f"   input sha256 {step.get('input_sha256', '?')}")
        params = ", ".join(f"{k}={v}" for k, v in step.get("params", {}).items()) or "none"
        lines.append(f"   seed {step.get('seed')}, params {params}")
        lines.append("   made with " + versions_text(step.get("versions", {})))
        for statement in step.get("statements", []):
            lines.append(f"   - {statement}")
    return lines


def versions_text(versions: dict) -> str:
    """``modelxform 0.2.0, keras 3.15.1 on jax 0.10.2, numpy 2.4.6, python 3.11.7``: Keras's backend
    after Keras (a record made before the backend was recorded names tensorflow among the others)."""
    backend = versions.get("backend")
    parts = []
    first = ("modelxform", "keras", "numpy", "python")
    for lib, version in sorted(versions.items(), key=lambda kv: (first.index(kv[0]) if kv[0] in first else 9, kv[0])):
        if lib in ("backend", backend):
            continue
        parts.append(f"{lib} {version}")
        if lib == "keras" and backend:
            parts[-1] += f" on {backend} {versions.get(backend)}"
    return ", ".join(parts)


def backend_of(versions: dict) -> str:
    """The backend a record's versions name (``tensorflow`` for a record made before they did)."""
    return str(versions.get("backend") or ("tensorflow" if "tensorflow" in versions else "unknown"))


def same_but_backend(a: dict | None, b: dict | None) -> bool:
    """Whether two provenance records are the same but for the Keras backend (and its libraries'
    versions) each step was made with."""
    from .keras_io.backend import BACKEND_LIBRARIES

    def strip(record):
        record = json.loads(json.dumps(record))
        for step in record.get("chain", []) if isinstance(record, dict) else []:
            step["versions"] = {k: v for k, v in (step.get("versions") or {}).items() if k not in BACKEND_LIBRARIES}
        return record
    return a is not None and b is not None and strip(a) == strip(b)


def content_differences(a, b) -> list[str]:
    """What differs between two models in config, weights and trainable flags (verify's details: ``a`` the
    re-made model, ``b`` the one verified). A large variable is compared where it is, a block of rows at a
    time (keras_io.variables.read_variable_rows: from the file, for a model built from its archive)."""
    import keras

    from .keras_io.layers import walk
    out = []
    if keras.saving.serialize_keras_object(a) != keras.saving.serialize_keras_object(b):
        out.append("the model configs differ (layers, connections or settings)")
    wa = {i.path: i for i in walk(a)}
    wb = {i.path: i for i in walk(b)}
    for path in sorted(set(wa) | set(wb)):
        if path not in wa or path not in wb:
            out.append(f"layer {path} exists in only one of them")
            continue
        for va, vb in zip(wa[path].weights, wb[path].weights):
            if tuple(va.shape) != tuple(vb.shape):
                out.append(f"{path}: {va.name} has shape {tuple(vb.shape)}, re-made {tuple(va.shape)}")
                continue
            diff = _largest_difference(va, vb)
            if diff is not None:
                out.append(f"{path}: {va.name} differs (max abs difference {diff:.3g})")
        if bool(wa[path].layer.trainable) != bool(wb[path].layer.trainable):
            out.append(f"{path}: trainable is {wb[path].layer.trainable}, re-made {wa[path].layer.trainable}")
    return out


def _largest_difference(va, vb) -> float | None:
    """None when two variables of one shape hold the same bytes, else the largest absolute difference of
    their values (a large variable's a block of rows at a time: keras_io.variables.paired_blocks)."""
    import numpy as np

    from .keras_io.variables import as_bytes, paired_blocks, values_of
    largest = None
    for x, y in paired_blocks(values_of(va), values_of(vb)):
        if not np.array_equal(as_bytes(x), as_bytes(y)):
            d = float(np.max(np.abs(x.astype("float64") - y.astype("float64")))) if x.size else 0.0
            largest = d if largest is None else max(largest, d)
    return largest
