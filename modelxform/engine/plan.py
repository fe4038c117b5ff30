"""The Plan: what every statement of a recipe resolved to on a model and what it changes — the value
that ``plan``, ``apply``, ``plan --html`` and ``batch --dry-run`` all print or record.

A pass returns one StatementReport; array work it defers (``report.work``) runs only when the recipe is
applied, so a plan runs the very same passes. Parameters and the seed of one run are resolved here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import ir
from ..errors import ApplyError, UsageError


@dataclass
class StatementReport:
    statement: object
    layers: list = field(default_factory=list)  # paths the statement acted on
    changes: list = field(default_factory=list)  # one human-readable line per change
    notes: list = field(default_factory=list)  # things worth knowing that are not changes
    # errors.Diagnostic: what probably did not do what the author meant; printed as positioned warnings
    warnings: list = field(default_factory=list)
    work: list = field(default_factory=list, repr=False, compare=False)  # deferred array work, run by apply
    rebuilt: list = field(default_factory=list, repr=False)  # paths whose shapes the next rebuild reports
    unsaved: list = field(default_factory=list)  # what a written file could not keep: apply refuses
    # what the provenance record keeps instead of the changes and notes, where those depend on the
    # backend or the device (assert equivalent's largest difference); None: the changes or notes
    record: list | None = field(default=None, repr=False, compare=False)

    @property
    def location(self) -> str:
        span = getattr(self.statement, "span", None)
        return span.location() if span else ""

    def then(self, fn) -> None:
        """Defer ``fn()`` (array work) to when the recipe is applied; a plan skips it."""
        self.work.append(fn)

    def to_dict(self) -> dict:
        span = getattr(self.statement, "span", None)
        return {"statement": str(self.statement),
                "file": span.filename if span else None,
                "line": span.line if span else None, "column": span.column if span else None,
                "layers": list(self.layers), "changes": list(self.changes),
                "notes": list(self.notes) + [f"apply refuses this: {line}" for line in self.unsaved],
                "warnings": [w.message for w in self.warnings]}


@dataclass
class Plan:
    """Every statement's report, the seed and parameters of the run, and the model's size before and
    after as (layers, parameters)."""

    statements: list = field(default_factory=list)
    seed: int = 0
    params: dict = field(default_factory=dict)
    dry_run: bool = False
    before: tuple = (0, 0)
    after: tuple = (0, 0)
    weights_files: dict = field(default_factory=dict)  # `load weights from` path as written -> sha256 read

    def to_dict(self) -> dict:
        return {"seed": self.seed, "params": self.params, "dry_run": self.dry_run,
                "statements": [s.to_dict() for s in self.statements]}

    @property
    def warnings(self) -> list:
        """Every statement's warnings (errors.Diagnostic), in order."""
        return [w for s in self.statements for w in s.warnings]

    def lines(self) -> list[str]:
        out = []
        for s in self.statements:
            out.append(f"{s.location}  {s.statement}")
            for line in s.changes:
                out.append(f"    {line}")
            for line in s.notes:
                out.append(f"    ({line})")
            for line in s.unsaved:
                out.append(f"    (apply refuses this: {line})")
        return out


class Params:
    """Parameter values for one run: the recipe's defaults with command-line overrides."""

    def __init__(self, values: dict):
        self.values = values

    def value(self, v):
        if isinstance(v, ir.ParamRef):
            if v.name not in self.values:
                raise ApplyError(f"unknown parameter ${v.name}", span=v.span)
            return self.values[v.name]
        if isinstance(v, ir.Percent):
            return ir.Percent(self.value(v.value))
        if isinstance(v, tuple):
            return tuple(self.value(x) for x in v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        return v


def resolve_params(recipe, overrides: dict | None) -> dict:
    """The recipe's parameters with ``overrides`` (text from --param, or values) checked and applied."""
    from ..lang.compiler import parse_value
    declared = recipe.params
    values = dict(declared)
    used = used_params(recipe.program)
    for name, raw in (overrides or {}).items():
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise UsageError(f"unknown parameter {name!r} (--param {name}=…); the recipe declares: {known}")
        if name not in used:
            raise UsageError(f"parameter {name!r} (--param {name}=…) is declared but never used by the recipe")
        value = parse_value(raw) if isinstance(raw, str) else raw
        if isinstance(value, float) and not math.isfinite(value):  # (a value given in Python, or a batch file's)
            raise UsageError(f"parameter {name!r} must be a finite number, but --param gave {raw!r}")
        default = declared[name]
        if isinstance(default, bool) != isinstance(value, bool) or \
                (isinstance(default, (int, float)) and not isinstance(value, (int, float))) or \
                (isinstance(default, str) and not isinstance(value, str)):
            shown = repr(raw) if len(repr(raw)) <= 80 else f"{repr(raw)[:60]}… ({len(str(raw)):,} characters)"
            raise UsageError(f"parameter {name!r} is {type(default).__name__} in the recipe "
                             f"({ir.format_value(default)}), but --param gave {shown}")
        values[name] = value
    return values


def used_params(program: ir.Program) -> set[str]:
    used: set[str] = set()

    def visit(obj):
        if isinstance(obj, ir.ParamRef):
            used.add(obj.name)
        elif isinstance(obj, (tuple, list)):
            for x in obj:
                visit(x)
        elif isinstance(obj, ir.Program):
            return
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                if name != "span":
                    visit(getattr(obj, name))
    for stmt in program.flat():
        if stmt.keyword != "param":
            visit(stmt)
    return used


def effective_seed(recipe, seed: int | None, params: Params) -> int:
    """``--seed`` if given, else the recipe's ``seed`` statement, else 0."""
    if seed is not None:  # (a record with a negative seed would be refused when read: nothing may make one)
        import operator
        try:
            value = -1 if isinstance(seed, bool) else operator.index(seed)  # (numpy's integers too)
        except TypeError:
            value = -1
        if value < 0:
            raise UsageError(f"seed must be a whole number ≥ 0, not {seed!r}")
        return value
    declared = recipe.seed
    if declared is None:
        return 0
    value = params.value(declared)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"seed must be a whole number ≥ 0, not {ir.format_value(value)}")
    return value
