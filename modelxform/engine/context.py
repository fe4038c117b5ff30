"""The one run context: what a statement's pass sees of the model, the selection, the seed and the
parameters — the whole API a pass uses (passes import nothing from the engine or keras_io).

The model starts as its .keras archive when there is one (keras_io.archive.Archive: the config and the
arrays by their byte ranges, no TensorFlow) and becomes a built Keras model only when a statement needs
one:

- weight statements whose ``needs`` is ``"archive"`` change the archive's arrays;
- structural statements whose ``needs`` is ``"config"`` queue edits on a graph editor made from the
  archive's config; the first rebuild builds the edited model once and fills it from the archive;
- a statement that ``needs`` the ``"model"`` (reinit, remove, assert params, …) has the archive built as
  it stands, once (:meth:`Context.require_model`), and from then on the run is on the Keras model.

A model loaded with Keras (an .h5 file, custom layers, ``MODELXFORM_FASTPATH=0``) or given in memory
starts there. Either way the result is the same model: tests/test_archive_weights.py and
tests/test_archive_structure.py hold both to the
same reports and output bytes.
"""
from __future__ import annotations

import collections

from .. import ir
from ..errors import ApplyError
from ..keras_io.graph import GraphEditor
from ..keras_io.layers import model_kind, refuse_subclassed, walk
from ..keras_io.shapes import shape_text
from ..rng import derive_seed, generator
from . import selectors
from .plan import Params, StatementReport


class Context:
    """The run context handed to every pass (``stmt.run(ctx)``).

    Values: :meth:`value`, :meth:`number`, :attr:`params`, :attr:`seed`, :meth:`rng`, :meth:`rng_parts`.
    Layers: :meth:`layers`, :meth:`selected`, :meth:`resolve`, :meth:`matching`, :meth:`select`,
    :attr:`selection`, :meth:`forget`, :meth:`closest`. Structure: :meth:`editor`, :meth:`flush`,
    :meth:`layer_class`, :meth:`default_layer_name`, :meth:`built_layers`, :meth:`io_shapes`,
    :meth:`check_moves`, :attr:`obligations`, :meth:`keras`. Weights:
    :meth:`own_initializer`, :meth:`initial_values`, :meth:`is_subclassed`, :meth:`load_layers`. Checks:
    :meth:`param_count`, :meth:`output_shapes`, :meth:`probe_outputs`, :attr:`reference`,
    :meth:`default_tolerance`. A pass
    returns :meth:`report`, with array work deferred by ``report.then(fn)``.
    """

    def __init__(self, source, seed: int, params: Params, *, unsafe: bool = False, imports=(),
                 weights_file=None):
        from ..keras_io.archive import Archive
        self.seed = seed
        self.params = params
        self.unsafe = unsafe  # --unsafe: rebuilds and `load weights from` may load what safe mode refuses
        self.imports = tuple(imports)
        # `load weights from PATH`: weights_file(written path, resolved path) -> the file to read (verify
        # decides which recorded paths may be read); the sha256 of every file read, by written path
        self.weights_file = weights_file
        self.weights_sha256: dict[str, str] = {}
        self.selection: list[str] | None = None
        # layers whose weight shapes a `set` changed: the recipe must reinitialise them (path -> statement)
        self.obligations: dict[str, object] = {}
        self.reference = None  # (probe inputs, outputs) of the input model, for `assert equivalent`
        self.loaded: dict[str, list] = {}  # layers of the models read by `load weights from`
        self.pending: list[StatementReport] = []  # structural statements waiting for the rebuild
        self.pending_edits: list[int] = []  # the edits queued by the end of each of them (hold)
        self.archive = source if isinstance(source, Archive) else None
        self._model = None if self.archive is not None else source
        self._editor: GraphEditor | None = None
        self._occurrences: collections.Counter = collections.Counter()
        self._parts: dict[int, tuple] = {}

    # -- randomness ------------------------------------------------------------------------------
    def begin(self, stmt) -> None:
        """Called by the runner before each statement: its random streams are keyed by its text and
        how many identical statements came before it (docs/language.md#randomness)."""
        text = str(stmt)
        self._parts[id(stmt)] = (text, self._occurrences[text])
        self._occurrences[text] += 1

    def rng_parts(self, stmt) -> tuple:
        return self._parts[id(stmt)]

    def rng(self, stmt, *extra):
        return generator(self.seed, *self.rng_parts(stmt), *extra)

    def derive_seed(self, stmt, *extra) -> int:
        return derive_seed(self.seed, *self.rng_parts(stmt), *extra)

    # -- values ----------------------------------------------------------------------------------
    def value(self, v, stmt=None):
        return self.params.value(v)

    def number(self, v, stmt):
        value = self.params.value(v)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApplyError(f"`{stmt}`: expected a number, got {ir.format_value(value)}", span=stmt.span)
        return value

    @staticmethod
    def report(stmt, **fields) -> StatementReport:
        return StatementReport(stmt, **fields)

    # -- where the model is ------------------------------------------------------------------------
    @property
    def on_archive(self) -> bool:
        """Whether the layers are still those of the .keras archive (no statement needed Keras yet)."""
        return self._model is None and self._editor is None

    @property
    def built(self) -> bool:
        """Whether a Keras model was built (or loaded) for this run."""
        return self._model is not None

    def require_model(self) -> None:
        """Have a built Keras model from here on: the archive (with the arrays changed so far) is built
        once, as loading it would; pending structural edits stay pending."""
        if self._model is not None:
            return
        from ..keras_io.files import import_keras
        import_keras()
        base = GraphEditor(self.archive.current_config(), self.seed, self.unsafe)
        self._model = base.build(self.archive.layers)

    def prepare(self, stmt) -> None:
        """Before a statement's pass: rebuild pending edits unless it is structural too, and build the
        model if its pass needs one."""
        if not stmt.structural:
            self.flush()
        if stmt.needs == "model":
            self.require_model()

    @property
    def model(self):
        """The last built model (pending structural edits not applied)."""
        self.require_model()
        return self._model

    def current_model(self):
        """The model with every queued edit rebuilt."""
        self.flush()
        return self.model

    def summary(self) -> tuple[int, int]:
        """(layers, parameters) of the model as it stands."""
        if self.on_archive:
            return len(self.archive.layers), self.archive.param_count
        model = self.current_model()
        return len(walk(model)), int(model.count_params())

    # -- layers and the selection ----------------------------------------------------------------
    def layers(self):
        """The leaf layers in graph order (pending edits rebuilt first)."""
        if self.on_archive:
            return self.archive.layers
        return walk(self.current_model())

    def built_layers(self):
        """The layers of the last built model, without rebuilding pending edits (their shapes are right
        for every layer that the pending edits did not add)."""
        return walk(self.model)

    def selected(self, stmt):
        if self.selection is None:
            raise ApplyError(f"`{stmt}` acts on the selected layers, but nothing is selected",
                             span=stmt.span, hint="add `select …` before it")
        by_path = {info.path: info for info in self.layers()}
        found = [by_path[p] for p in self.selection if p in by_path]
        if not found:
            raise ApplyError(f"`{stmt}`: none of the selected layers is left in the model", span=stmt.span)
        return found

    def select(self, stmt) -> list:
        """Resolve a ``select`` statement's selector against the current layers."""
        return selectors.resolve_selector(stmt.selector, self.layers(), self.params, lambda: self.rng(stmt),
                                          stmt.span)

    def resolve(self, ref, layers=None) -> list:
        """The layers a reference names (among ``layers``, default the current ones); an error when none."""
        return selectors.resolve_ref(ref, self.layers() if layers is None else layers)

    def matching(self, pred, what: str | None = None, span=None) -> list:
        """The layers ``pred`` matches; with ``what``, an error (selectors.nothing_matches) where none."""
        layers = self.layers()
        found = [info for info in layers if selectors.matches(pred, info, self.params)]
        if not found and what is not None:
            raise selectors.nothing_matches(what, pred, layers, span)
        return found

    closest = staticmethod(selectors.closest)

    def forget(self, paths) -> None:
        """Layers a statement removed: out of the selection, and no longer owed a reinitialisation."""
        gone = set(paths)
        if self.selection is not None:
            self.selection = [p for p in self.selection if p not in gone]
        for path in gone:
            self.obligations.pop(path, None)

    # -- structure ---------------------------------------------------------------------------------
    def editor(self, stmt) -> GraphEditor:
        """The graph editor that queues this run of structural statements' edits."""
        if self._editor is None:
            if self._model is None:
                from ..keras_io.files import import_keras
                import_keras()  # (quietly, before anything else imports it)
                self._editor = GraphEditor(self.archive.current_config(), self.seed, self.unsafe)
            else:
                refuse_subclassed(self._model, f"`{stmt}`", stmt.span)
                self._editor = GraphEditor(self._model, self.seed, self.unsafe)
        return self._editor

    def hold(self, report: StatementReport) -> None:
        """A structural statement's report, kept until the rebuild says what the statement changed."""
        self.pending.append(report)
        self.pending_edits.append(len(self._editor.edits) if self._editor is not None else 0)

    def flush(self) -> None:
        """Rebuild the model from the queued structural edits, if any. A pass must not hold on to an
        editor across a call that flushes (selected(), layers(), current_model())."""
        if self._editor is None:
            return
        editor, pending, counts = self._editor, self.pending, self.pending_edits
        self._editor, self.pending, self.pending_edits = None, [], []
        editor.closed = True
        before, outputs_before, old_layers = self._before_rebuild()
        new_model = editor.build(old_layers)
        self.obligations.update(editor.reshaped)
        first, last = (before, outputs_before), (_layer_facts(new_model), _output_shapes(new_model))
        pairs = [(first, last)] * len(pending)  # (the model before each statement, and after it)
        together = ""
        if len(pending) > 1 and not _each_kept_what_it_was(pending, first[0], last[0]):
            # Consecutive structural statements are rebuilt together; what each one did is read off the
            # model as it stood after its own edits, built again without values (GraphEditor.models_between),
            # where a statement's figures need that state (_states_needed). Where such a state does not
            # build on its own, every statement is described by the state after all of them, and says so,
            # rather than attribute a later statement's effect to an earlier one.
            needed = _states_needed(pending, first[0])
            between = editor.models_between([counts[k - 1] for k in needed])
            if all(model is not None for model in between):
                states = [first] + [({}, None)] * (len(pending) - 1) + [last]  # (({}, None): not needed)
                for k, model in zip(needed, between):
                    states[k] = (_layer_facts(model), _output_shapes(model))
                pairs = list(zip(states, states[1:]))
            else:
                together = f" (after rebuilding {len(pending)} structural statements together)"
        for report, ((before, outputs_before), (after, outputs_after)) in zip(pending, pairs):
            for old_path, path in _rebuilt(report, before):
                if old_path in before and path in after:
                    report.changes.append(f"{path}: output {before[old_path][0]} -> {after[path][0]}, "
                                          f"params {before[old_path][1]:,} -> {after[path][1]:,}{together}")
                elif path in after:
                    report.changes.append(f"{path} (new): output {after[path][0]}, params {after[path][1]:,}"
                                          f"{together}")
            if report.statement.keyword == "tap":
                report.changes.append(f"model outputs: {', '.join(outputs_before)} -> "
                                      f"{', '.join(outputs_after)}{together}")
        self._model = new_model

    def _before_rebuild(self):
        """What a rebuild needs of the model before it: (layer facts by path, output shapes, the layers
        holding the weights to carry across) — read off the archive while there is no built model."""
        if self._model is not None:
            return _layer_facts(self._model), _output_shapes(self._model), walk(self._model)
        from ..keras_io.shapes import ArchiveFacts
        facts = ArchiveFacts(self.archive)
        return facts, ["?" if s is None else shape_text(s) for s in facts.shapes.model_outputs()], \
            self.archive.layers

    @staticmethod
    def keras():
        """The keras module, imported quietly (TensorFlow's start-up chatter kept off the terminal)."""
        from ..keras_io.files import import_keras
        return import_keras()

    @staticmethod
    def layer_class(name: str, span=None):
        """A Keras layer class by name (keras.layers, or a custom class registered by --import)."""
        from ..keras_io.files import import_keras
        from ..keras_io.layers import layer_class
        import_keras()  # (quietly: `insert` and `append` may be the first to need Keras)
        return layer_class(name, span)

    @staticmethod
    def default_layer_name(class_name: str) -> str:
        from ..keras_io.layers import snake_case
        return snake_case(class_name)

    @staticmethod
    def io_shapes(layer):
        """(input shape, output shape) of a built layer called once, or None."""
        from ..keras_io.layers import io_shapes
        return io_shapes(layer)

    def not_a_node(self, ref):
        """The error to raise when a structural statement names a layer that exists but is no node of a
        graph it can edit (a composite's sublayer, a layer inside a keras_hub Backbone), else None."""
        if self.archive is not None and self._model is None:
            return None
        from ..keras_io.layers import why_not_a_node
        for info in self.built_layers():
            if info.path == ref.text or info.path.startswith(ref.text + "/") or info.name == ref.text:
                why = why_not_a_node(info)
                if why is not None:
                    return ApplyError(why[0], span=ref.span, hint=why[1])
        return None

    def check_moves(self, paths: list[str], order: list[int], stmt) -> None:
        from ..keras_io.layers import check_moves
        check_moves({i.path: i.layer for i in self.layers()}, paths, order, stmt.span)

    def nested_models(self) -> list:
        """The nested models (their paths and classes) of the model as it stands."""
        from ..keras_io.layers import nested_models
        return [_Nested(path, type(m).__name__) for path, m in nested_models(self.current_model()).items()]

    def unwrap(self, path: str | None, stmt) -> tuple[str, str]:
        """Make the model (or the nested model at ``path``) a plain functional model of its layers, at
        once; returns (its class before, after)."""
        from ..keras_io.graph import unwrap
        model = self.current_model()
        try:
            new_model, before, after = unwrap(model, path, self.seed)
        except ApplyError as exc:
            if exc.span is not None:
                raise
            raise ApplyError(f"`{stmt}`: {exc.message}", span=stmt.span, hint=exc.hint) from exc
        self._model = new_model
        return before, after

    # -- weights -----------------------------------------------------------------------------------
    @staticmethod
    def own_initializer(layer, variable_name: str):
        """The initializer a layer's config names for one of its variables, or None."""
        from ..keras_io.graph import initializer_for
        return initializer_for(layer, variable_name)

    @staticmethod
    def initial_values(initializer, shape: tuple, dtype, seed: int | None):
        """``initializer``'s values for a variable, seeded with ``seed`` (None: the initializer's own),
        the same on every backend for Keras's own initializers (keras_io.initializers)."""
        from ..keras_io.initializers import initial_values
        return initial_values(initializer, shape, dtype, seed)

    def flag_targets(self, infos: list, flag: bool) -> list:
        """Where to set trainable flags for ``infos`` so that a saved file keeps them
        (keras_io.layers.flag_targets); on the archive, every layer's own flag."""
        if self.on_archive:
            from ..keras_io.layers import FlagTarget
            return [FlagTarget(i.path, i.layer, [i.path]) for i in infos]
        from ..keras_io.layers import flag_targets
        return flag_targets(self.model, infos, walk(self.model), flag)

    def is_subclassed(self) -> bool:
        return not self.on_archive and model_kind(self.model) == "subclassed"

    def load_layers(self, path: str, stmt) -> list:
        """The layers of another model file (``load weights from``), loaded once per run; its sha256 is
        kept for the provenance record (verify reads the file again only if it still matches)."""
        from ..errors import ModelxformError
        from ..keras_io.files import load_model, sha256_file
        if path not in self.loaded:
            try:
                chosen = self.weights_file(stmt.path, path) if self.weights_file is not None else path
                self.loaded[path] = walk(load_model(chosen, unsafe=self.unsafe, imports=self.imports))
                self.weights_sha256[stmt.path] = sha256_file(chosen)  # (a regular file: load_model checked)
            except ModelxformError as exc:
                raise type(exc)(f"load weights from {stmt.path!r}: {exc.message}", span=stmt.span) from None
            except OSError as exc:
                raise ApplyError(f"load weights from {stmt.path!r}: cannot read it: {exc.strerror or exc}",
                                 span=stmt.span) from None
        return self.loaded[path]

    # -- fine-tuning prep: LoRA, quantization, dtype policies (keras_io/finetune.py) ----------------
    def trainable_params(self) -> int:
        """How many parameters training would change (the model's trainable weights)."""
        import math
        return int(sum(math.prod(v.shape) for v in self.model.trainable_weights))

    def lora_state(self, info):
        """(rank, alpha) of a LoRA layer, else None (an archive's layers never have LoRA: it declines
        them)."""
        if self.on_archive:
            return None
        from ..keras_io.finetune import lora_state
        return lora_state(info.layer)

    @staticmethod
    def quantization_mode(info):
        """A quantized layer's mode (int8, int4, float8), else None: a Keras layer's, or what an archive's
        layer's config says (the archive declines quantized layers, so none has one)."""
        return getattr(info.layer, "quantization_mode", None)

    @staticmethod
    def policy_name(info) -> str:
        from ..keras_io.finetune import policy_name
        return policy_name(info.layer)

    @staticmethod
    def variable_bytes(info) -> int:
        from ..keras_io.finetune import variable_bytes
        return variable_bytes(info.layer)

    @staticmethod
    def lora_refusal(info):
        from ..keras_io.finetune import lora_refusal
        return lora_refusal(info)

    @staticmethod
    def enable_lora(info, rank: int, alpha):
        """Enable LoRA on the layer with both factors zero; returns the (A, B) variables."""
        from ..keras_io.finetune import enable_lora
        return enable_lora(info.layer, rank, alpha)

    @staticmethod
    def merge_lora(info) -> None:
        from ..keras_io.finetune import merge_lora
        merge_lora(info.layer)

    def quantize_refusal(self, info, mode: str):
        from ..keras_io.finetune import quantize_refusal
        return quantize_refusal(self.model, info, mode)

    def quantize(self, infos, mode: str, block_size) -> None:
        """Quantize the layers in place, each so that the saved config records its policy."""
        from ..keras_io.finetune import quantize, reset_functions
        for info in infos:
            quantize(self.model, info, mode, block_size)
        reset_functions(self.model)

    def cast_refusal(self, info, policy: str):
        from ..keras_io.finetune import cast_refusal
        return cast_refusal(self.model, info, policy)

    def cast(self, infos, policy: str, stmt) -> None:
        """Give the layers the dtype policy ``policy``: written into the model's config (where Keras saves
        each one's policy), the model rebuilt once from it, its arrays carried across (cast)."""
        from ..keras_io.finetune import apply_cast, cast_plan, has_lora, policy_name
        model = self.current_model()
        lora = has_lora(model)
        if lora:
            raise ApplyError(f"`{stmt}` rebuilds the model, and a rebuilt model loses the LoRA factors of "
                             f"{lora[0]}" + (f" and {len(lora) - 1} more" if len(lora) > 1 else ""),
                             span=stmt.span, hint="cast before `lora`, or `merge lora` first")
        editor = GraphEditor(model, self.seed)
        apply_cast(editor, cast_plan(model, infos, policy), policy, model)
        try:
            new_model = editor.build(walk(model))
        except ApplyError as exc:
            raise ApplyError(f"`{stmt}`: {exc.message}", span=stmt.span, hint=exc.hint) from exc
        by_path = {i.path: i.layer for i in walk(new_model)}
        wrong = [i.path for i in infos if policy_name(by_path[i.path]) != policy]
        if wrong:
            raise ApplyError(f"`{stmt}`: {wrong[0]} did not take the policy {policy} when rebuilt (the layer "
                             "around it does not pass its dtype policy on to it)", span=stmt.span)
        self._model = new_model

    # -- checks ------------------------------------------------------------------------------------
    def param_count(self) -> int:
        return int(self.current_model().count_params())

    def output_shapes(self) -> list[tuple]:
        return [tuple(None if d is None else int(d) for d in t.shape) for t in self.current_model().outputs or []]

    def probe_outputs(self, stmt=None):
        """(the model's input shapes, its outputs on the reference probes) in inference mode; the outputs
        are None when the model's inputs changed."""
        import numpy as np

        from ..keras_io.graph import call_model
        model = self.current_model()
        inputs, _ = self.reference
        shapes = [tuple(t.shape) for t in model.inputs]
        if len(shapes) != len(inputs) or any(a[1:] != tuple(np.shape(b))[1:] for a, b in zip(shapes, inputs)
                                             if None not in a[1:]):
            return shapes, None
        return shapes, self._probe(lambda: call_model(model, inputs), stmt)

    @staticmethod
    def default_tolerance() -> tuple[float, str]:
        """``assert equivalent``'s tolerance for this backend and device, and which it is."""
        from ..keras_io.backend import default_tolerance
        return default_tolerance()

    def take_reference(self, stmt=None) -> None:
        """Seeded random probe inputs and the input model's outputs on them, for `assert equivalent`."""
        from ..keras_io.graph import call_model, probe_inputs
        model = self.model
        inputs = self._probe(lambda: probe_inputs(model, generator(self.seed, "assert equivalent probe"), batch=4),
                             stmt)
        self.reference = inputs, self._probe(lambda: call_model(model, inputs), stmt)

    @staticmethod
    def _probe(fn, stmt):
        """Any failure to make probe inputs or run the model on them is one line (exit 4)."""
        try:
            return fn()
        except ApplyError:
            raise
        except Exception as exc:  # noqa: BLE001 - Keras raises many kinds here
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ApplyError(f"assert equivalent: cannot run the model on probe inputs: {text}",
                             span=getattr(stmt, "span", None), hint="the probes follow each input's dtype and structure; a model with inputs "
                                  "they cannot fill cannot be checked this way") from None


class _Nested:
    def __init__(self, path: str, class_name: str):
        self.path, self.class_name = path, class_name


def _rebuilt(report, before):
    """(the layer it was, the layer it is) for each layer a structural statement rebuilt: the same path
    where ``before`` (the model before the statement) has it, else the layer the statement named."""
    for path in report.rebuilt:
        yield (path if path in before else report.layers[report.rebuilt.index(path)]), path


def _each_kept_what_it_was(pending, before, after) -> bool:
    """Whether the states before and after several structural statements tell what each of them did,
    without the states between: each but the last replaces layers that no other one touches, by layers
    that give out the same shape and hold as many parameters in the model after them all (a pooling
    swapped for another, an activation for another), and the last touches none of those layers. Every
    layer then had its first shape and parameters in every state before the last statement (its input is
    what it was, and either config gives the same from it), so each statement's own before is the state
    before them all, and its own after the state after them all (what the last one changed shows in the
    replaced layers' figures there, which are then checked against their first ones). Anything else (an
    insert or a tap before the last statement, a replace that changes a shape, two statements on one
    layer) needs the states between (GraphEditor.models_between)."""
    seen: set = set()
    for report in pending[:-1]:
        if report.statement.keyword != "replace" or len(report.layers) != len(report.rebuilt):
            return False
        for old, path in _rebuilt(report, before):
            if old in seen or path in seen or old not in before or path not in after or before[old] != after[path]:
                return False
            seen.update((old, path))
    last = pending[-1]
    return not seen & (set(last.layers) | set(last.rebuilt))


def _states_needed(pending, first) -> list[int]:
    """Which states between statements rebuilt together a report needs (k: the model after the first k
    statements; ``first``: the layer facts before them all). A statement's figures are read off the
    states before and after it where it rebuilt layers or tapped outputs; none where it did neither (a
    cut, a remove). The state before it is not needed either where every layer it rebuilt is new there:
    a name the model before them all did not have, which no statement before it touched (an append, an
    insert: only its figures after are given)."""
    def figures(report) -> bool:
        return bool(report.rebuilt) or report.statement.keyword == "tap"

    touched: set = set()
    new_to: list[bool] = []
    for report in pending:
        named = set(report.rebuilt) | set(report.layers)
        new_to.append(report.statement.keyword != "tap" and not (named & touched)
                      and not any(path in first for path in named))
        touched |= named
    return [k for k in range(1, len(pending))
            if figures(pending[k - 1]) or (figures(pending[k]) and not new_to[k])]


def _layer_facts(model) -> dict:
    facts = {}
    for info in walk(model):
        try:
            shape = shape_text(tuple(info.layer.output.shape))
        except Exception:  # a shared layer has several outputs; an unbuilt one has none
            shape = "?"
        facts[info.path] = (shape, info.params())
    return facts


def _output_shapes(model) -> list[str]:
    try:
        return [shape_text(tuple(t.shape)) for t in model.outputs]
    except Exception:
        return ["?"]
