"""Structural recipes run from the .keras archive: the input model is never built.

A hand-written Keras script for a structural edit loads the model (builds it and reads its weights),
clones it with the change (builds it again and copies the weights), and saves the clone. The engine
needs one build, not two: the structural statements edit the model's JSON config (graph.GraphEditor),
and the rebuild can take the kept layers' arrays straight from the input's model.weights.h5 instead of
from a loaded copy of the model. This module does that:

- the archive is opened as fastpath.Archive (config.json and the arrays' places in model.weights.h5,
  without TensorFlow); selections resolve against its layers with the engine's own selectors;
- weight-only statements before the first structural one run on the archive as on the fast path (their
  arrays are held as patches and read back by the rebuild);
- the structural statements that work on the config alone (replace, tap, insert, append, cut, set,
  rename) queue their edits on an editor made from config.json, and the first rebuild builds the edited
  model and fills it from the archive (graph.copy_variables reads the ArchiveVariables, large arrays a
  block of rows at a time);
- from then on the run is the ordinary one on a Keras model.

Whenever the archive cannot stand in for the model — a statement needs the built input model (remove,
swap and shuffle check shapes on it; assert params/shape/equivalent, reinit, load weights), or the file
is one fastpath.Archive declines — :func:`try_run` returns None and the caller loads the model and runs
the recipe the ordinary way, from the start. Both ways give the same model: tests/test_archive_run.py
holds them to identical output files.
"""
from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping

from . import statements as st
from .errors import ModelxformError
from .fastpath import DISABLE_ENV, _pass_for, applicable_statements
from .keras_io.archive import Archive, NotApplicable
from .keras_io.backend import keras_backend as _keras_backend
from .keras_io.graph import GraphEditor
from .keras_io.shapes import ShapeFinder
from .keras_io.files import check_readable, import_keras
from .passes import PASSES, load_all
from .runner import Context, Params, Report, _attach_sources, _run_statements, effective_seed, resolve_params

log = logging.getLogger(__name__)

# Structural statements whose passes read only the config (through the editor) and the selection's paths.
ON_ARCHIVE = (st.Replace, st.Tap, st.Insert, st.Append, st.Cut, st.SetConfig, st.Rename)


class ArchiveContext(Context):
    """runner.Context whose model, until the first rebuild, is the archive."""

    def __init__(self, archive: Archive, seed: int, params: Params, dry_run: bool):
        self.archive = archive
        self._model = None
        super().__init__(None, seed, params, dry_run)

    @property
    def model(self):
        if self._model is None:
            raise NotApplicable("a statement needs the input model built")
        return self._model

    @model.setter
    def model(self, value):
        self._model = value

    def _on_archive(self) -> bool:
        return self._model is None and self._editor is None

    def current_model(self):
        # selectors.resolve_selector takes the model but resolves against the layers given with it
        return None if self._on_archive() else super().current_model()

    def layers(self):
        return self.archive.layers if self._on_archive() else super().layers()

    def editor(self, stmt) -> GraphEditor:
        if self._on_archive():
            self._editor = GraphEditor(self.archive.current_config(), self.seed)
        return super().editor(stmt)

    def pass_for(self, stmt):
        if self._model is not None:
            return PASSES[type(stmt)]
        if stmt.structural:
            if not isinstance(stmt, ON_ARCHIVE):
                raise NotApplicable(f"`{stmt}` needs the input model built")
            return PASSES[type(stmt)]
        return _pass_for(stmt)  # weight statements on the archive's arrays, as on the fast path

    def before_rebuild(self):
        if self._model is not None:
            return super().before_rebuild()
        facts = _ArchiveFacts(self.archive)
        return facts, [_text(shape) for shape in facts.shapes.model_outputs()], self.archive.layers


class _ArchiveFacts(Mapping):
    """runner._layer_facts for the archive's layers: (output shape, params) by path, worked out only for
    the layers a report asks about (an output shape needs the layer's class)."""

    def __init__(self, archive: Archive):
        self._infos = {info.path: info for info in archive.layers}
        self.shapes = ShapeFinder(archive.current_config())

    def __getitem__(self, path):
        return _text(self.shapes.output(path)), self._infos[path].params()

    def __iter__(self):
        return iter(self._infos)

    def __len__(self):
        return len(self._infos)


def _text(shape) -> str:
    from .runner import _shape_text
    return "?" if shape is None else _shape_text(shape)


def try_run(recipe, model_path, seed, params, dry_run: bool):
    """Run a structural ``recipe`` on the .keras file ``model_path`` without building the input model.

    Returns ``(new model, report, (layers, params) before, input sha256)`` — the sha256 only when not
    ``dry_run`` — or None when the archive cannot stand in for the model (the caller then loads it and
    runs the recipe from the start; nothing has been written)."""
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return _declined(f"{DISABLE_ENV}=0")
    statements = recipe.program.flat()
    if applicable_statements(recipe):
        return _declined("a weight-only recipe (the fast path's)")
    if any(isinstance(s, (st.AssertEquivalent, st.LoadWeights)) for s in statements):
        return _declined("the recipe compares with or reads other models")
    if pathlib.Path(model_path).suffix.lower() != ".keras" or _keras_backend() != "tensorflow":
        return _declined("not a .keras input, or another Keras backend")
    check_readable(pathlib.Path(model_path))  # model_io.load_model's first check, and its message
    try:
        archive = Archive(model_path)
    except Exception as exc:  # noqa: BLE001 - Keras reads it, or says what is wrong with it
        return _declined(f"{model_path}: {type(exc).__name__}: {exc}")
    with archive:
        if not dry_run:
            archive.hash_input()  # in a thread, alongside the rebuild
        import_keras()  # (TensorFlow's start-up messages kept off the terminal)
        load_all()
        values = Params(resolve_params(recipe, params))
        seed_value = effective_seed(recipe, seed, values)
        ctx = ArchiveContext(archive, seed_value, values, dry_run)
        report = Report(seed=seed_value, params=dict(values.values), dry_run=dry_run)
        summary = (len(archive.layers), archive.param_count)
        try:
            _run_statements(recipe, ctx, report, values)
        except NotApplicable as exc:
            return _declined(str(exc))
        except ModelxformError as exc:
            if ctx._model is None:  # the engine reports it in its own words, with the model loaded
                return _declined(f"{type(exc).__name__}: {exc}")
            _attach_sources(exc, recipe)
            raise
        except Exception as exc:  # noqa: BLE001 - a defect here must not cost the user a result
            log.debug("archive run failed, loading the model: %s: %s", type(exc).__name__, exc, exc_info=True)
            return None
        if ctx._model is None:
            return _declined("no statement rebuilt the model")
        return ctx._model, report, summary, None if dry_run else archive.input_sha256()


def _declined(reason: str) -> None:
    log.debug("archive run not taken: %s", reason)
    return None
