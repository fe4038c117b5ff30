"""Weight-only recipes applied straight to a .keras archive, without TensorFlow.

A recipe whose statements only select layers, change arrays (``scale``, ``add noise``, ``clip``,
``prune``, ``set … to zeros/ones/constant(v)``), flip ``trainable`` or check the selection's size
needs none of Keras: the layers are described by the archive's config.json and their arrays sit,
uncompressed and contiguous, in its model.weights.h5. Loading the model (and importing TensorFlow, the
larger part of a short run) is skipped; only the touched arrays are read, and the archive is copied
once with those byte ranges replaced.

This is the second module (after model_io) that reads and writes model files, and it may only do so
when it can promise the engine's result: the same report, bit-identical arrays, the same config.json
and, because Keras writes HDF5 deterministically, the same output bytes (so ``modelxform verify``
accepts its outputs). Whenever that promise could break, :func:`try_apply` returns None and the caller
takes the normal path:

- statements other than the ones above, or an initializer other than zeros/ones/constant(number);
- an .h5 input or output, another Keras backend, --import modules, an archive not written by the
  installed Keras version (other members, compressed or sharded weights, optimizer state, assets);
- a layer class missing from :data:`VARIABLE_TABLE`, a quantized, LoRA or renorm layer, a dtype policy
  other than plain float ones, shared objects other than dtype policies, a frozen nested model, a
  subclassed model, arrays whose shapes do not fit the config (Keras would refuse to load them);
- any error while running the statements: the engine then reports it exactly as it always does.

Selection is not re-implemented: config.json's layers are wrapped in selectors.LayerInfo and resolved
by selectors.resolve_selector. scale, add noise, clip, prune and assert count are the registered passes
of passes/weights.py and passes/checks.py, run unchanged on stand-ins for Keras variables
(runner.Context supplies the seed, the parameters and the per-statement random generators). Two are
mirrored here because the engine's versions need Keras: ``set … to`` (which builds a
keras.initializers object) and freeze/unfreeze (whose subclassed-model note asks Keras what the model
is). The differential tests in tests/test_fastpath.py hold them to the engine's results.

Structural recipes use :class:`Archive` too (archive_run.py): the model is built once, from the edited
config, and filled from the archive, instead of being loaded first.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np

from . import statements as st
from .errors import ModelxformError
from .keras_io.archive import Archive, NotApplicable
from .keras_io.backend import keras_backend as _keras_backend
from .keras_io.backend import library_versions
from .passes import PASSES, StatementReport
from .passes import checks as _checks  # noqa: F401  (registers assert count)
from .passes import weights as _weights
from .runner import Context, Params, Report, _run_statements, effective_seed, resolve_params

log = logging.getLogger(__name__)

DISABLE_ENV = "MODELXFORM_FASTPATH"  # set to 0 to always take the Keras path (benchmarks, debugging)


_CONSTANT_FILLS = {"zeros": "zeros", "Zeros": "zeros", "ones": "ones", "Ones": "ones",
                   "constant": "constant", "Constant": "constant"}
_WEIGHT_STATEMENTS = (st.Scale, st.AddNoise, st.Clip, st.Prune, st.Freeze, st.Unfreeze, st.AssertCount)


@dataclasses.dataclass
class FastReport(Report):
    """A runner.Report with the model summary the CLI prints (layers and parameters; weight-only
    statements change neither)."""

    summary: tuple = (0, 0)


def applicable_statements(recipe) -> bool:
    """Whether every statement of ``recipe`` is one the fast path runs (before looking at a model)."""
    for stmt in recipe.program.flat():
        if isinstance(stmt, st.HEADER_TYPES + (st.Select,) + _WEIGHT_STATEMENTS):
            continue
        if isinstance(stmt, st.Fill) and stmt.initializer.name in _CONSTANT_FILLS:
            continue
        return False
    return True


def try_apply(recipe, model_path, output, seed, params, dry_run: bool) -> FastReport | None:
    """Apply a weight-only ``recipe`` to the .keras file ``model_path`` and write ``output`` (unless
    ``dry_run``), without TensorFlow; None when the recipe or the file needs the Keras path.

    >>> recipe = compile_recipe("select where type=Dense; scale kernel 0.8")  # doctest: +SKIP
    >>> try_apply(recipe, "cnn.keras", "out.keras", 7, {}, False).lines()      # doctest: +SKIP
    """
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return _declined(f"{DISABLE_ENV}=0")
    if not applicable_statements(recipe):
        return _declined("the recipe has statements other than weight-only ones")
    if pathlib.Path(model_path).suffix.lower() != ".keras":
        return _declined("the input is not a .keras file")
    if not dry_run and (output is None or pathlib.Path(output).suffix.lower() != ".keras"):
        return _declined("the output is not a .keras file")
    if _keras_backend() != "tensorflow":
        return _declined("Keras is set to another backend")
    from .keras_io.files import check_readable
    check_readable(pathlib.Path(model_path))  # model_io.load_model's first check, and its message
    try:
        archive = Archive(model_path)
    except Exception as exc:  # not a file this module can read: Keras reads it, or says what is wrong with it
        return _declined(f"{model_path}: {type(exc).__name__}: {exc}")
    with archive:
        if not dry_run:
            archive.hash_input()
        try:
            report = _run(recipe, archive, seed, params, dry_run)
        except (NotApplicable, ModelxformError, OSError) as exc:
            # the engine reports errors in its own words (an OSError: the spill file could not be written)
            return _declined(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a defect here must not cost the user a result: the engine is the reference
            log.debug("fast path failed, using Keras: %s: %s", type(exc).__name__, exc, exc_info=True)
            return None
        if not dry_run:
            from .keras_io.files import read_provenance
            from .provenance import entry, extend
            versions = library_versions()
            if versions is None:
                return _declined("keras or tensorflow is not an installed distribution")
            try:
                previous = read_provenance(model_path)
            except ModelxformError as exc:
                return _declined(f"{type(exc).__name__}: {exc}")
            archive.save(output, lambda input_sha256: extend(previous, entry(recipe, report, input_sha256, versions)))
    return report


def _declined(reason: str) -> None:
    log.debug("fast path not taken: %s", reason)
    return None


class _FastContext(Context):
    """runner.Context over the archive's layers; there is no model to rebuild."""

    def __init__(self, layers: list, seed: int, params: Params, dry_run: bool):
        super().__init__(None, seed, params, dry_run)
        self._layers = layers

    def layers(self):
        return self._layers

    def editor(self, stmt):
        raise NotApplicable(f"`{stmt}` is structural")

    def pass_for(self, stmt):
        return _pass_for(stmt)


def _fill(ctx, stmt: st.Fill) -> StatementReport:
    """``set … to zeros/ones/constant(v)`` with the values keras.initializers would give: Constant is
    ``ops.cast(value, dtype) * ops.ones(shape, dtype)``, and TensorFlow first makes a Python float a
    float32 tensor (an int an int32 one), so a float64 array gets float32(v) widened."""
    call = stmt.initializer
    kind = _CONSTANT_FILLS[call.name]
    args = [ctx.value(v, stmt) for v in call.args]
    kwargs = {k: ctx.value(v, stmt) for k, v in call.kwargs}
    if kind == "constant":
        if len(args) + len(kwargs) > 1 or set(kwargs) - {"value"}:
            raise NotApplicable("Constant takes one value")
        value = args[0] if args else kwargs.get("value", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NotApplicable("a non-numeric constant")
        if isinstance(value, int) and not -2**31 <= value < 2**31:
            raise NotApplicable("an integer constant outside int32")
        if isinstance(value, float) and not abs(value) <= float(np.finfo(np.float32).max):
            raise NotApplicable("a constant outside float32")
        source = np.asarray(value, np.float32 if isinstance(value, float) else np.int32)
    elif args or kwargs:
        raise NotApplicable(f"{call.name} takes no arguments")
    else:
        source = np.asarray(0 if kind == "zeros" else 1, np.int8)

    def fn(info, var, a):
        if a.dtype.kind != "f":
            raise NotApplicable("filling a non-float variable")
        return np.full(a.shape, source.astype(a.dtype), dtype=a.dtype)
    return _weights._map_variables(ctx, stmt, stmt.target, fn, f"set to {stmt.initializer}")


def _set_trainable(ctx, stmt, flag: bool) -> StatementReport:
    """passes/weights.py's freeze/unfreeze, less its subclassed-model note (which asks Keras what the
    model is; a subclassed model never gets here)."""
    report = StatementReport(stmt)
    for info in ctx.selected(stmt):
        report.layers.append(info.path)
        if bool(info.layer.trainable) != flag:
            report.changes.append(f"{info.path}: trainable {info.layer.trainable} -> {flag}")
            info.layer.trainable = flag
    if not report.changes:
        report.notes.append(f"every selected layer was already {'trainable' if flag else 'frozen'}")
    return report


def _pass_for(stmt):
    if isinstance(stmt, st.Fill):
        return _fill
    if isinstance(stmt, (st.Freeze, st.Unfreeze)):
        return lambda ctx, s: _set_trainable(ctx, s, isinstance(s, st.Unfreeze))
    if isinstance(stmt, _WEIGHT_STATEMENTS):
        return PASSES[type(stmt)]
    raise NotApplicable(f"`{stmt}`")


def _run(recipe, archive: "Archive", seed, params, dry_run: bool) -> FastReport:
    """runner's statement loop over the archive's layers (_FastContext.pass_for picks the passes)."""
    values = Params(resolve_params(recipe, params))
    seed_value = effective_seed(recipe, seed, values)
    ctx = _FastContext(archive.layers, seed_value, values, dry_run)
    summary = (len(archive.layers), archive.param_count)
    report = FastReport(seed=seed_value, params=dict(values.values), dry_run=dry_run, summary=summary)
    _run_statements(recipe, ctx, report, values)
    return report
