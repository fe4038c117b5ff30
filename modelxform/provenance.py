"""Provenance: how a model file was made, recorded inside it, and re-checked by ``verify``.

A record is a chain with one entry per recipe applied, oldest first. Each entry holds the recipe's text
with includes inlined (canonical form) and its sha256, the input file's sha256, the seed, the params,
the library versions and one line per statement of what it did. Applying a recipe to a model that
already has a record appends to its chain.
"""
from __future__ import annotations

import hashlib

FORMAT = "modelxform-provenance/1"


def recipe_text(recipe) -> str:
    return recipe.program.inlined_text()


def recipe_sha256(recipe) -> str:
    return hashlib.sha256(recipe_text(recipe).encode("utf-8")).hexdigest()


def library_versions() -> dict:
    import sys

    import keras
    import numpy
    import tensorflow

    from .version import __version__
    return {"modelxform": __version__, "keras": keras.__version__, "tensorflow": tensorflow.__version__,
            "numpy": numpy.__version__, "python": ".".join(map(str, sys.version_info[:3]))}


def _jsonable(value):
    from . import ir
    if isinstance(value, ir.Percent):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def entry(recipe, report, input_sha256: str, versions: dict | None = None) -> dict:
    """One link of the chain. ``versions`` defaults to library_versions(), which imports Keras; the
    fast path passes the same versions read from the installed distributions instead."""
    header = recipe.program.header()
    statements = []
    for s in report.statements:
        line = f"{s.statement}"
        details = s.changes or s.notes
        if details:
            line += " :: " + "; ".join(details[:20]) + (f"; … ({len(details) - 20} more)" if len(details) > 20 else "")
        statements.append(line)
    return {
        "recipe": {"name": header.name if header else None, "version": header.version if header else None,
                   "text": recipe_text(recipe), "sha256": recipe_sha256(recipe)},
        "input_sha256": input_sha256,
        "seed": report.seed,
        "params": {k: _jsonable(v) for k, v in sorted(report.params.items())},
        "versions": versions if versions is not None else library_versions(),
        "statements": statements,
    }


def extend(previous: dict | None, new_entry: dict) -> dict:
    chain = list(previous.get("chain", [])) if previous and previous.get("format") == FORMAT else []
    return {"format": FORMAT, "chain": chain + [new_entry]}


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
        versions = step.get("versions", {})
        lines.append("   made with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        for statement in step.get("statements", []):
            lines.append(f"   - {statement}")
    return lines


def verify(model_path, original_path, *, unsafe: bool = False, imports=()) -> tuple[list[str], list[str]]:
    """Re-run ``model_path``'s recorded chain from ``original_path``.

    Returns ``(differences, notes)``: no differences means the re-made file is identical (byte for
    byte for .keras; same config, weights and trainable flags for .h5, whose bytes HDF5 does not keep
    stable).
    """
    import os
    import pathlib
    import tempfile

    from .lang.compiler import compile_recipe
    from .errors import UsageError
    from .keras_io.files import load_model, model_format, read_provenance, save_model, sha256_file
    from .runner import run

    record = read_provenance(model_path)
    if not record or not record.get("chain"):
        raise UsageError(f"{model_path}: has no modelxform provenance record; nothing to verify")
    chain = record["chain"]
    differences, notes = [], []
    original_sha = sha256_file(original_path)
    if original_sha != chain[0].get("input_sha256"):
        differences.append(f"{original_path} is not the file this model was made from: its sha256 is "
                           f"{original_sha}, the record says {chain[0].get('input_sha256')}")
        return differences, notes
    here = library_versions()
    for n, step in enumerate(chain, start=1):
        for lib, version in step.get("versions", {}).items():
            if lib != "python" and here.get(lib) != version:
                differences.append(f"step {n} was made with {lib} {version}; this is {lib} {here.get(lib)}")
    suffix = pathlib.Path(model_path).suffix
    current, so_far = pathlib.Path(original_path), None
    with tempfile.TemporaryDirectory(prefix="modelxform-verify-") as tmp:
        for n, step in enumerate(chain, start=1):
            recipe_info = step["recipe"]
            recipe = compile_recipe(recipe_info["text"], f"<step {n}>")
            if recipe_sha256(recipe) != recipe_info.get("sha256"):
                differences.append(f"step {n}: the recorded recipe text does not match its recorded sha256")
            model = load_model(current, unsafe=unsafe, imports=imports)
            new_model, report = run(recipe, model, seed=step.get("seed"), params=step.get("params") or {},
                                    copy=False)
            current_sha = sha256_file(current)
            so_far = extend(so_far, entry(recipe, report, current_sha))
            redo = [s for s in so_far["chain"][-1]["statements"]]
            if redo != step.get("statements"):
                differences.append(f"step {n}: the statements now report differently than recorded")
            out = pathlib.Path(tmp) / f"step{n}{suffix if n == len(chain) else '.keras'}"
            save_model(new_model, out, provenance=so_far)
            if n < len(chain) and sha256_file(out) != chain[n].get("input_sha256"):
                notes.append(f"step {n + 1}'s recorded input is not byte-identical to the re-made step {n} output")
            current = out
        if model_format(model_path) == "keras":
            if sha256_file(current) != sha256_file(model_path):
                differences.extend(_content_differences(current, model_path, unsafe, imports)
                                   or ["the files differ in bytes (metadata or provenance), not in config or weights"])
        else:
            differences.extend(_content_differences(current, model_path, unsafe, imports))
    if differences:
        return differences, notes
    notes.append(f"re-made {os.path.basename(str(model_path))} from {original_path} in {len(chain)} step(s): identical")
    return differences, notes


def _content_differences(remade, model_path, unsafe, imports) -> list[str]:
    import numpy as np

    import keras

    from .keras_io.files import load_model
    from .keras_io.layers import walk
    a = load_model(remade, unsafe=unsafe, imports=imports)
    b = load_model(model_path, unsafe=unsafe, imports=imports)
    out = []
    if keras.saving.serialize_keras_object(a) != keras.saving.serialize_keras_object(b):
        out.append("the model configs differ (layers, connections or settings)")
    wa = {i.path: i.layer for i in walk(a)}
    wb = {i.path: i.layer for i in walk(b)}
    for path in sorted(set(wa) | set(wb)):
        if path not in wa or path not in wb:
            out.append(f"layer {path} exists in only one of them")
            continue
        for va, vb in zip(wa[path].weights, wb[path].weights):
            x, y = np.asarray(va.numpy()), np.asarray(vb.numpy())
            if x.shape != y.shape:
                out.append(f"{path}: {va.name} has shape {y.shape}, re-made {x.shape}")
            elif x.tobytes() != y.tobytes():
                diff = float(np.max(np.abs(x.astype("float64") - y.astype("float64"))))
                out.append(f"{path}: {va.name} differs (max abs difference {diff:.3g})")
        if bool(wa[path].trainable) != bool(wb[path].trainable):
            out.append(f"{path}: trainable is {wb[path].trainable}, re-made {wa[path].trainable}")
    return out
