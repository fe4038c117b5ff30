"""The public API below the command line: plan and apply recipes to model files, verify outputs.

    >>> import modelxform
    >>> result = modelxform.apply_file("prep.recipe", "cnn.keras", "out.keras", seed=7)  # doctest: +SKIP
    >>> print("\\n".join(result.plan.lines()))                                        # doctest: +SKIP
    >>> plan = modelxform.plan_file("prep.recipe", "cnn.keras", seed=7)                 # doctest: +SKIP

These choose where the model comes from (its .keras archive, read without TensorFlow, or the model
loaded with Keras), run the recipe (engine.runner), record provenance and save atomically. The command
line and batch runs call only these; a recipe can also be applied to a model in memory
(:meth:`Recipe.apply`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from dataclasses import dataclass

from .errors import ApplyError, ModelFileError, UsageError
from .lang import compiler
from .statements.weights import SUBCLASSED_TRAINABLE_NOTE

log = logging.getLogger(__name__)

DISABLE_ENV = "MODELXFORM_FASTPATH"  # set to 0 to always load the model with Keras (benchmarks, debugging)


class Recipe(compiler.Recipe):
    """A compiled recipe (program, source, warnings) that can plan and apply itself on a Keras model."""

    def plan(self, model, seed: int | None = None, params: dict | None = None):
        """Resolve every statement against ``model`` without changing it; returns the Plan."""
        from .engine.runner import run
        from .keras_io.files import working_copy
        return run(self, working_copy(model), seed=seed, params=params, apply=False)[1]

    def apply(self, model, seed: int | None = None, params: dict | None = None):
        """Apply the recipe to a copy of ``model``: returns ``(new_model, plan)``.

        >>> new_model, plan = compile_recipe("select all; freeze").apply(model)  # doctest: +SKIP
        """
        from .engine.runner import run
        from .keras_io.files import working_copy
        ctx, plan = run(self, working_copy(model), seed=seed, params=params)
        return ctx.current_model(), plan


def compile_recipe(text: str, filename: str | os.PathLike | None = None, *, include_root=None,
                   allow_include: bool = True) -> Recipe:
    """Compile recipe text (includes resolve relative to ``filename``, else the working folder; with
    ``include_root`` or $MODELXFORM_INCLUDE_ROOT only inside that folder; ``allow_include=False``
    refuses them).

    >>> compile_recipe('select all; freeze').program.statements[1]
    Freeze()
    """
    return compiler.compile_recipe(text, filename, recipe_class=Recipe, include_root=include_root,
                                   allow_include=allow_include)


def load_recipe(path: str | os.PathLike, *, include_root=None) -> Recipe:
    """Read and compile a recipe file (``.recipe`` or ``.yaml``). With ``include_root`` (or
    $MODELXFORM_INCLUDE_ROOT) it may include only files inside that folder."""
    return compiler.load_recipe(path, recipe_class=Recipe, include_root=include_root)


def _as_recipe(recipe) -> compiler.Recipe:
    return recipe if isinstance(recipe, compiler.Recipe) else load_recipe(recipe)


@dataclass
class ApplyResult:
    """What :func:`apply_file` did: the plan (with the model's size before and after), the file written
    (None for a dry run) and the provenance record it carries. ``source`` says where the model came
    from ("archive": the .keras file read without Keras; "keras": loaded with Keras) and ``built``
    whether a Keras model was built for the run (never for weight-only recipes on an archive)."""

    plan: object
    model: str
    output: str | None
    provenance: dict | None = None
    source: str = "keras"
    built: bool = True

    @property
    def sha256(self) -> str | None:
        """The sha256 of the written file (None for a dry run or a SavedModel folder)."""
        if self.output is None or os.path.isdir(self.output):
            return None
        from .keras_io.files import sha256_file
        return sha256_file(self.output)


def open_model(path, *, unsafe: bool = False, imports=(), archive: bool = True, opened=None):
    """The model to run on: its .keras archive when the engine can read it without Keras (see
    keras_io.archive), else the model loaded with Keras (safe mode unless ``unsafe``). ``opened``: the
    archive of this file as another process opened it (a batch job's payload), used where it still holds
    the file it read (Archive.reopened)."""
    from .keras_io.files import load_model
    if archive:
        if opened is not None and opened.reopened:
            if os.fspath(opened.path) == os.fspath(path) and _archive_may_stand_in(path, imports):
                return opened
            opened.close()
        source = open_archive(path, unsafe=unsafe, imports=imports)
        if source is not None:
            return source
    return load_model(path, unsafe=unsafe, imports=imports)


def _archive_may_stand_in(path, imports) -> bool:
    return not imports and os.environ.get(DISABLE_ENV, "1").strip() != "0" \
        and pathlib.Path(path).suffix.lower() == ".keras"


def open_archive(path, *, unsafe: bool = False, imports=()):
    """The .keras archive of the file ``path`` opened for the engine, without Keras (keras_io.archive),
    or None where it cannot stand in for the model (Keras then loads it). A ModelFileError for what no
    path may read (unreadable, too large, refused by safe mode)."""
    from .keras_io.files import check_readable
    if not _archive_may_stand_in(path, imports):
        return None
    check_readable(pathlib.Path(path))  # load_model's first check, and its message
    from .keras_io.archive import Archive
    try:
        return Archive(path, unsafe=unsafe)
    except ModelFileError:  # what no path may read (too large, refused by safe mode)
        raise
    except Exception as exc:  # noqa: BLE001 - Keras reads it, or says what is wrong with it
        log.debug("the archive cannot stand in for the model: %s: %s", type(exc).__name__, exc)
        return None


@contextlib.contextmanager
def model_to_look_at(path, *, unsafe: bool = False, imports=()):
    """The Keras model of the file ``path``, to look at — its layers, shapes, flags and variables — rather
    than to compute with (``inspect``, ``diff``, ``plan --html``, ``verify``'s details; ``export``, which
    reads every array when it writes the SavedModel): built from the
    .keras archive where the engine reads it, as apply builds one, its large variables made without their
    values, which stay in the file and are read where needed while the block runs (a 2 GiB model: 0.6 GiB
    instead of 3.7 GiB, and a fifth of the time); else, or where that build fails, loaded with Keras.
    Either way with the trainable flags the file holds, the sublayers of a frozen composite layer included
    (keras_io.layers.restore_trainable, as load_model)."""
    from .keras_io.archive import Archive
    from .keras_io.files import load_model as load
    from .keras_io.layers import restore_trainable
    source = open_model(path, unsafe=unsafe, imports=imports)
    if isinstance(source, Archive):
        with source:
            model = _built_from(source, unsafe)
            if model is not None:
                restore_trainable(model)
                try:
                    yield model
                finally:
                    source.forget_lazy_variables()  # (the values left unread stay so: closing need not fill them)
                return
        source = load(path, unsafe=unsafe, imports=imports)
    restore_trainable(source)
    yield source


def _built_from(archive, unsafe: bool):
    """The model an archive holds, built as apply builds it, or None where the build fails (the caller
    then loads the file with Keras, whose own error, if any, is the one to show)."""
    from .keras_io.files import import_keras
    from .keras_io.graph import GraphEditor
    import_keras()
    try:
        return GraphEditor(archive.current_config(), 0, unsafe).build(archive.layers)
    except Exception as exc:  # noqa: BLE001 - Keras loads it, or says what is wrong with it
        log.debug("the archive's model could not be built: %s: %s", type(exc).__name__, exc)
        return None


def _closing(source):
    from .keras_io.archive import Archive
    return source if isinstance(source, Archive) else contextlib.nullcontext(source)


def apply_file(recipe, model, output=None, *, seed: int | None = None, params: dict | None = None,
               unsafe: bool = False, imports=(), format: str | None = None, in_place: bool = False,
               dry_run: bool = False, input_digest=None, opened=None) -> ApplyResult:
    """Apply ``recipe`` (a Recipe or a recipe file) to the model file ``model`` and write ``output``
    (.keras or .h5 by its extension; ``format="savedmodel"``: a SavedModel folder) atomically, with the
    input's provenance record extended. The input is never modified (``in_place`` allows ``output`` to
    be ``model``). ``params`` maps names to values or to their text as ``--param`` gives it.
    ``input_digest``: the input's sha256 as ``keras_io.files.sha256_with_identity`` gave it earlier in
    this run (a batch run hashes its inputs first), or a ``keras_io.digests.FileDigest`` hashing it
    since earlier (``apply`` begins one as it starts), used instead of reading the file again when the
    file has not changed since (same file, size, mtime and ctime). ``opened``: the input's archive as
    another process opened it (batch; see open_model).

    >>> apply_file("prep.recipe", "cnn.keras", "out.keras", seed=7).plan.after   # doctest: +SKIP
    (8, 63930)
    """
    from .keras_io.files import model_format
    from .keras_io.outputs import check_output_folder, refuse_overwriting_inputs
    recipe = _as_recipe(recipe)
    output = os.fspath(output) if output is not None else (os.fspath(model) if in_place else None)
    if output is None and not dry_run:
        raise UsageError("apply needs an output file (or in_place, or dry_run)")
    savedmodel = format == "savedmodel"
    if output is not None:
        if not savedmodel:
            fmt = model_format(output)
            if format is not None and format != fmt:
                given = f"--in-place on {output}" if in_place else f"-o {output}"
                raise UsageError(f"--format {format} does not match {given} (a .{fmt} file name)")
        if not in_place:
            refuse_overwriting_inputs("-o", output, [(model, "the input model")], remedy="use --in-place")
        if savedmodel:  # (a folder: its missing parents are made, as export makes them)
            from .export import check_export_destination
            check_export_destination(output, inputs=[model])
        else:
            check_output_folder(output)
    if savedmodel and not dry_run:  # (after the checks of OUT, which need no TensorFlow)
        from .keras_io.backend import require_tensorflow
        require_tensorflow("--format savedmodel")
    source = open_model(model, unsafe=unsafe, imports=imports, opened=opened)
    with _closing(source):
        return _apply(recipe, source, os.fspath(model), None if dry_run else output, seed, params, savedmodel,
                      previous=None, read_previous=True, unsafe=unsafe, imports=imports, input_digest=input_digest)


def _given(recipe, recorded: dict) -> dict:
    """The parameters a recorded run was given, from the record's (which holds every declared one's value):
    a parameter the recipe declares but never uses cannot be given (resolve_params), and was not."""
    from .engine.plan import used_params
    used = used_params(recipe.program)
    return {name: value for name, value in recorded.items() if name in used}


def _apply(recipe, source, model_path: str, output, seed, params, savedmodel: bool, *, previous,
           read_previous: bool, unsafe: bool = False, imports=(), weights_file=None,
           input_digest=None) -> ApplyResult:
    """Run ``recipe`` on ``source`` and, unless ``output`` is None, save the result with ``previous``
    (or the input's own record) extended by this run's provenance entry."""
    from .keras_io.archive import Archive
    archive = source if isinstance(source, Archive) else None
    if archive is not None and output is not None:
        archive.hash_input(input_digest)  # in a thread, alongside the work (unless known)
        if recipe.program.needs_keras or savedmodel:  # (the kept arrays will be copied as they lie: checked
            archive.begin_integrity_check()           # alongside the rebuild, before the save: check_intact)
    try:
        return _run_and_save(recipe, source, archive, model_path, output, seed, params, savedmodel,
                             previous=previous, read_previous=read_previous, unsafe=unsafe, imports=imports,
                             weights_file=weights_file, input_digest=input_digest)
    finally:
        if archive is not None:
            archive.forget_lazy_variables()  # the model built here is not used after this run


def _run_and_save(recipe, source, archive, model_path, output, seed, params, savedmodel, *, previous,
                  read_previous, unsafe, imports, weights_file, input_digest=None) -> ApplyResult:
    from .engine.runner import attach_sources, run
    from .keras_io.files import known_sha256, save_model, sha256_remembered
    from .keras_io.backend import library_versions
    from .provenance import entry, extend, read_record
    ctx, plan = run(recipe, source, seed=seed, params=params, apply=output is not None, unsafe=unsafe,
                    imports=imports, weights_file=weights_file)
    result = ApplyResult(plan, model_path, output, source="archive" if archive is not None else "keras",
                         built=ctx.built)
    if output is None:
        return result
    unsaved = [s for s in plan.statements if s.unsaved]
    if unsaved:
        exc = ApplyError(f"`{unsaved[0].statement}`: {unsaved[0].unsaved[0]}; nothing was written",
                         span=unsaved[0].statement.span,
                         hint="freeze or unfreeze a whole model or composite layer, or `unwrap` the model first "
                              "so that its layers are nodes of a graph whose flags Keras saves")
        attach_sources(exc, recipe)
        raise exc
    lost = [s for s in plan.statements if SUBCLASSED_TRAINABLE_NOTE in s.notes]
    if lost:
        exc = ApplyError(f"`{lost[0].statement}` changed trainable flags inside a subclassed model, and Keras "
                         "does not save those: the written file would silently lose them; nothing was written",
                         span=lost[0].statement.span,
                         hint="set `trainable` in the model's own code, or rebuild it as a functional model")
        attach_sources(exc, recipe)
        raise exc
    if read_previous:
        previous = read_record(model_path)
    versions = library_versions()

    def record(input_sha256: str) -> dict:
        result.provenance = extend(previous, entry(recipe, plan, input_sha256, versions))
        return result.provenance

    from .keras_io.files import model_format
    if archive is not None and ctx.on_archive and not savedmodel and model_format(output) == "keras":
        archive.save(output, record)  # the arrays changed in place, the rest copied: no Keras
        return result
    if archive is not None:  # (the kept arrays go to the output as they lie in the input: damaged, no)
        archive.check_intact()
    input_sha256 = archive.input_sha256() if archive is not None else \
        known_sha256(model_path, input_digest) or sha256_remembered(model_path)
    result.built = True
    if savedmodel:
        from .export import export_savedmodel
        export_savedmodel(ctx.current_model(), output, provenance=record(input_sha256), inputs=[model_path])
    else:
        save_model(ctx.current_model(), output, provenance=record(input_sha256))
    return result


def plan_file(recipe, model, *, seed: int | None = None, params: dict | None = None, unsafe: bool = False,
              imports=(), html=None):
    """What every statement of ``recipe`` resolves to on the model file ``model`` and would change;
    writes no model. With ``html``, also writes the visual report (the model is then loaded with Keras,
    to draw it before and after). Returns the Plan.

    >>> print("\\n".join(plan_file("prep.recipe", "cnn.keras", seed=7).lines()))  # doctest: +SKIP
    """
    recipe = _as_recipe(recipe)
    if html is None:
        source = open_model(model, unsafe=unsafe, imports=imports)
        with _closing(source):
            return _apply(recipe, source, os.fspath(model), None, seed, params, False, previous=None,
                          read_previous=False, unsafe=unsafe, imports=imports).plan
    from .diff import diff, snapshot
    from .engine.runner import run
    from .report_html import require_dot, statements_from_report, write_report
    require_dot()  # before the slow part
    with model_to_look_at(model, unsafe=unsafe, imports=imports) as loaded:  # (large values left in the file)
        before = snapshot(loaded, name=str(model))
        ctx, plan = run(recipe, loaded, seed=seed, params=params, apply=False, unsafe=unsafe, imports=imports)
        after = snapshot(ctx.current_model(), name=f"{model} after {recipe.source.name}")
        report = diff(before, after)
    title = f"plan: {pathlib.Path(str(recipe.source.name)).name} on {pathlib.Path(model).name}"
    subtitle = f"seed {plan.seed}" + (", params " + ", ".join(f"{k}={v}" for k, v in plan.params.items())
                                      if plan.params else "") + " — a plan: no arrays were changed"
    write_report(html, report, title=title, subtitle=subtitle, statements=statements_from_report(plan))
    plan.before, plan.after = (len(before.layers), before.params), (len(after.layers), after.params)
    return plan


def load_model(path, *, unsafe: bool = False, imports=()):
    """Load a model file (.keras or .h5) with Keras, safe mode on unless ``unsafe``, and put back what
    Keras's loader leaves out:

    - the trainable flag of a frozen composite layer (a MultiHeadAttention, a keras_hub
      TransformerEncoder) is saved, but Keras does not pass it on to the variables of the layers it
      builds, so they would train;
    - the LoRA factors a file written by modelxform keeps (``lora``): Keras's loader zeroes both
      factors (a model trained from it gets no gradient for them), gives Dense and Embedding layers
      alpha = rank, and drops LoRA from sublayers and keras_hub Backbone layers; they are restored as
      the file holds them;
    - a quantized layer built with a DTypePolicyMap (in a keras_hub Backbone, in a composite layer)
      gets its own entry of the map as its policy, so that the model can be saved again (Keras 3.15
      fails to, with "Invalid dtype: object").

    >>> model = modelxform.load_model("prepared.keras")   # doctest: +SKIP
    >>> model.fit(...)                                     # doctest: +SKIP
    """
    from .keras_io.files import load_model as load
    from .keras_io.layers import restore_trainable
    model = load(path, unsafe=unsafe, imports=imports)
    restore_trainable(model)
    return model


def _same_but_backend(a, b) -> bool:
    """Whether two .keras files hold the same bytes in every member but the provenance record, and
    records that differ only in the backend each step was made on."""
    from .keras_io.files import PROVENANCE_MEMBER, member_digests, read_provenance
    from .provenance import same_but_backend
    da, db = member_digests(a), member_digests(b)
    if da is None or db is None:
        return False
    da.pop(PROVENANCE_MEMBER, None)
    db.pop(PROVENANCE_MEMBER, None)
    return da == db and same_but_backend(read_provenance(a), read_provenance(b))


def verify_file(model, original, *, unsafe: bool = False, imports=(),
                weights: dict | None = None, include_root=None) -> tuple[list[str], list[str]]:
    """Re-run the chain of recipes recorded in ``model``'s provenance from ``original`` and compare.
    Returns ``(differences, notes)``: no differences means the re-made file is identical (byte for byte
    for .keras; same config, weights and trainable flags for .h5, whose bytes HDF5 does not keep
    stable) and so is every field of its record.

    The record comes with the file, so it is read as someone else's: it must be well formed
    (provenance.validate), a recorded recipe may not ``include`` anything (a record holds recipes with
    their includes inlined), and a ``load weights from PATH`` of a recorded recipe reads PATH only when
    the user names it in ``weights`` ({PATH: file to read}) or its sha256 is the one recorded. With
    ``include_root`` (or $MODELXFORM_INCLUDE_ROOT) a recorded PATH outside that folder (taken from the
    working folder, as it is re-made) is not read even then, unless the user names it in ``weights``.

    >>> differences, notes = verify_file("out.keras", "cnn.keras")   # doctest: +SKIP
    """
    weights = dict(weights or {})
    # A clear error for a bad ORIGINAL first. Opened as apply opens a model (open_model): a .keras file
    # the archive engine reads is re-made as apply made it, a variable at a time, rather than loaded
    # whole with Keras — on a 6 GB model that was a 20 GB peak.
    source = open_model(original, unsafe=unsafe, imports=imports)
    with _closing(source):
        return _verify(model, original, source, unsafe=unsafe, imports=imports, weights=weights,
                       include_root=include_root)


def _verify(model, original, source, *, unsafe: bool, imports, weights: dict,
            include_root=None) -> tuple[list[str], list[str]]:
    """verify_file's work, with ``source`` the original opened (and closed by the caller)."""
    import tempfile

    from .keras_io import digests
    from .keras_io.backend import BACKEND_LIBRARIES, library_versions
    from .keras_io.files import model_format, same_bytes, sha256_with_identity
    from .provenance import backend_of, read_record, recipe_sha256

    record = read_record(model)
    if not record or not record.get("chain"):
        raise UsageError(f"{model}: has no modelxform provenance record; nothing to verify")
    chain = record["chain"]
    from .lang.compiler import include_root_from
    confine = include_root_from(include_root)
    recipes = [_recorded_recipe(model, n, step, weights, confine) for n, step in enumerate(chain, start=1)]
    differences, notes = [], []

    def not_the_original(sha: str) -> list[str]:
        return [f"{original} is not the file this model was made from: its sha256 is {sha}, the record "
                f"says {chain[0]['input_sha256']}"]
    # Every byte of the original read (no digest cache: verify trusts none), in a thread beside the first
    # step, which is handed the digest (as apply is its input's: the file is not read twice), and checked
    # once the step is done: a 2 GiB model's hashing no longer comes before its re-making.
    digest = digests.begin(original, cached=False)

    def wrong_original() -> bool:  # (the original's digest, taken beside the first step, is not the recorded)
        return isinstance(digest, digests.FileDigest) and digest.result() != chain[0]["input_sha256"]
    if digest is None:
        digest = sha256_with_identity(original, cached=False)
        if digest[0] != chain[0]["input_sha256"]:
            return not_the_original(digest[0]), notes
    here = library_versions() or {}
    for n, step in enumerate(chain, start=1):
        versions = step.get("versions", {})
        for lib, version in versions.items():
            # the backend does not change a byte of the model: re-making on another one is a note
            if lib != "python" and lib not in BACKEND_LIBRARIES and here.get(lib) != version:
                differences.append(f"step {n} was made with {lib} {version}; this is {lib} {here.get(lib)}")
        made_on, now_on = backend_of(versions), here.get("backend")
        if (made_on, versions.get(made_on)) != (now_on, here.get(now_on)):
            notes.append(f"step {n} was made on {made_on} {versions.get(made_on)}; re-made on {now_on} "
                         f"{here.get(now_on)} (the outputs do not depend on Keras's backend)")
    suffix = pathlib.Path(model).suffix.lower()
    current, so_far = pathlib.Path(original), None
    with tempfile.TemporaryDirectory(prefix="modelxform-verify-") as tmp:
        for n, (step, recipe) in enumerate(zip(chain, recipes), start=1):
            if recipe_sha256(recipe) != step["recipe"]["sha256"]:
                differences.append(f"step {n}: the recorded recipe text does not match its recorded sha256")
            out = pathlib.Path(tmp) / f"step{n}{suffix if n == len(chain) else '.keras'}"
            opened = source if n == 1 else open_model(current, unsafe=unsafe, imports=imports)
            try:
                with _closing(opened) if n > 1 else contextlib.nullcontext():
                    result = _apply(recipe, opened, str(current), str(out), step["seed"],
                                    _given(recipe, step["params"]), False, previous=so_far, read_previous=False,
                                    unsafe=unsafe, imports=imports, weights_file=_weights_chooser(n, step, weights),
                                    input_digest=digest)
            except Exception:  # (another file than the original may well not take the recipe, nor Keras build it)
                if wrong_original():
                    return not_the_original(digest.result()), []
                raise
            if wrong_original():
                return not_the_original(digest.result()), []
            so_far = result.provenance
            if so_far["chain"][-1]["statements"] != step["statements"]:
                differences.append(f"step {n}: the statements now report differently than recorded")
            differences.extend(_record_differences(n, step, so_far["chain"][-1]))
            if n < len(chain):
                digest = sha256_with_identity(out, cached=False)
                if digest[0] != chain[n].get("input_sha256"):
                    notes.append(f"step {n + 1}'s recorded input is not byte-identical to the re-made step {n} output"
                                 + (" (they differ in the backend the provenance records)"
                                    if backend_of(step.get("versions", {})) != here.get("backend") else ""))
            current = out
        extra = sorted(set(record) - {"format", "chain"})
        if extra:
            differences.append(f"the record holds fields modelxform does not write: {', '.join(extra)[:200]}")
        if model_format(model) == "keras":
            if not same_bytes(current, model):
                if _same_but_backend(current, model):
                    from .keras_io.files import read_provenance
                    notes.append("the re-made file differs only in how its provenance record is written (the same "
                                 "data: the record was written again by something else than modelxform)"
                                 if read_provenance(current) == read_provenance(model) else
                                 "the re-made file differs only in the Keras backend its provenance records")
                else:
                    differences.extend(_content_differences(current, model, unsafe, imports)
                                       or ([] if differences else
                                           ["the files differ in bytes (metadata), not in config, weights or record"]))
        else:
            differences.extend(_content_differences(current, model, unsafe, imports))
    if differences:
        return differences, notes
    notes.append(f"re-made {os.path.basename(str(model))} from {original} in {len(chain)} step(s): identical")
    return differences, notes


def _content_differences(remade, model, unsafe: bool, imports) -> list[str]:
    """What differs between the re-made file and the one verified, each model built as apply builds it
    (model_to_look_at: the values of large variables stay in the files and are compared a block at a time)."""
    from .provenance import content_differences
    with model_to_look_at(remade, unsafe=unsafe, imports=imports) as a, \
            model_to_look_at(model, unsafe=unsafe, imports=imports) as b:
        return content_differences(a, b)


def _recorded_recipe(model, n: int, step: dict, weights: dict, confine=None):
    """Step ``n``'s recorded recipe, compiled without includes, its `load weights from` files checked
    (``confine``: the include root, outside which a recorded path is read only when the user names it)."""
    from .errors import RecipeError
    from .lang.compiler import statement_file
    try:
        recipe = compile_recipe(step["recipe"]["text"], f"<step {n}>", allow_include=False)
    except RecipeError as exc:
        first = exc.diagnostics[0]
        if first.message.startswith("`include "):
            raise ModelFileError(f"{model}: step {n}'s recorded recipe holds {first.message[:-len(' is not allowed here')]}"
                                 ", which a record never does (includes are inlined when a recipe is recorded): "
                                 "the record was altered; nothing was read or run") from None
        where = f"{first.span.line}:{first.span.column}: " if first.span else ""
        raise ModelFileError(f"{model}: step {n}'s recorded recipe does not compile: {where}{first.message[:200]}") \
            from None
    recorded = step.get("load_weights") or {}
    for stmt in recipe.program.flat():
        if stmt.keyword == "load" and stmt.path not in weights and stmt.path not in recorded:
            raise UsageError(f"{model}: step {n} loads weights from {stmt.path!r}, and the record holds no sha256 of "
                             f"that file, so verify does not read it; if you trust it, pass "
                             f"--load-weights {stmt.path}=FILE")
        if stmt.keyword == "load" and stmt.path not in weights and confine is not None \
                and not statement_file(stmt).is_relative_to(confine):
            raise UsageError(f"{model}: step {n} loads weights from {stmt.path!r}, which is outside the include "
                             f"root {confine}, so verify does not read it; if you trust it, pass "
                             f"--load-weights {stmt.path}=FILE")
    return recipe


def _weights_chooser(n: int, step: dict, weights: dict):
    """Context.load_layers's ``weights_file`` for step ``n``: the file the user named for a recorded
    `load weights from` path, else the recorded path when its sha256 is the recorded one."""
    from .keras_io.files import check_readable, sha256_file
    recorded = step.get("load_weights") or {}

    def choose(written: str, resolved: str) -> str:
        if written in weights:
            return weights[written]
        check_readable(pathlib.Path(resolved))  # a regular file: hashing a FIFO would block
        if sha256_file(resolved) != recorded.get(written):
            raise ModelFileError(f"{resolved} is not the file step {n} read (its sha256 is not the recorded one), "
                                 f"so verify does not load it; if you trust it, pass --load-weights {written}={resolved}")
        return resolved
    return choose


def _short_value(value) -> str:
    import json
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:80] + "…"


def _record_differences(n: int, recorded: dict, remade: dict) -> list[str]:
    """Every field of a recorded step that re-making it does not give (the library versions and the
    input of a later step are reported apart)."""
    out = []
    fields = [("recipe name", lambda s: s["recipe"].get("name")), ("recipe version", lambda s: s["recipe"].get("version")),
              ("recipe text", lambda s: s["recipe"]["text"]), ("seed", lambda s: s["seed"]), ("params", lambda s: s["params"]),
              ("load_weights", lambda s: s.get("load_weights") or {})]
    for name, get in fields:
        if get(recorded) != get(remade):
            out.append(f"step {n}: the record says {name} {_short_value(get(recorded))}, re-making it gives "
                       f"{_short_value(get(remade))}")
    extra = sorted(set(recorded) - set(remade) - {"versions"}) + \
        sorted(set(recorded["recipe"]) - set(remade["recipe"]))
    if extra:
        out.append(f"step {n}: the record holds fields modelxform does not write: {', '.join(extra)[:200]}")
    return out
