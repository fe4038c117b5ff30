"""Every statement kind of the recipe language, each declared once.

A kind is a frozen dataclass in one of the family modules below (see ir.Statement for what it
declares: keyword, grammar rules, YAML form, pass, what its pass needs of the model, report tag).
Everything that lists statements — the compiler's dispatch, the parser's "did you mean" hints, the
YAML reader's keys, the HTML report's tags, which statements run on a .keras archive without
TensorFlow — reads this registry instead of keeping a list of its own. tests/test_statements.py
fails when a grammar statement lacks a kind, or a kind lacks its YAML form, a doc paragraph or a
golden case.

This package imports only the IR (and Keras, inside its passes, when they run): the language front end
builds on it without importing the engine.
"""
from __future__ import annotations

from .checks import AssertCount, AssertEquivalent, AssertParams, AssertShape
from .deploy import FoldBatchNorm, PruneChannels, SetInputShape
from .finetune import Cast, Lora, MergeLora, Quantize
from .header import Include, Param, RecipeHeader, Requires, Seed
from .select import SelAll, Select, Selector, SelRefs, SelSample, SelWhere
from .structure import Append, Cut, Insert, Remove, Rename, Replace, SetConfig, Shuffle, Swap, Tap, Unwrap
from .weights import AddNoise, Clip, Fill, Freeze, LoadWeights, Prune, Reinit, Scale, Unfreeze

# in the order the docs and the parser's hints list them
KINDS: tuple = (RecipeHeader, Requires, Seed, Param, Include, Select, Scale, AddNoise, Reinit, Fill, Clip, Prune,
                Freeze, Unfreeze, Unwrap, Replace, Tap, Insert, Remove, Swap, Shuffle, Cut, Append, SetConfig, Rename,
                LoadWeights, FoldBatchNorm, SetInputShape, PruneChannels, Lora, MergeLora, Quantize, Cast,
                AssertEquivalent, AssertCount, AssertParams, AssertShape)

HEADER_TYPES: tuple = tuple(kind for kind in KINDS if kind.role == "header")

def index_by(kinds, keys) -> dict:
    """key -> kind for every key ``keys(kind)`` gives; two kinds claiming one key is an error (a grammar
    rule compiled twice would silently follow whichever came last)."""
    out: dict = {}
    for kind in kinds:
        for key in keys(kind):
            if key in out:
                raise RuntimeError(f"{key!r} is claimed by {out[key].__name__} and {kind.__name__}")
            out[key] = kind
    return out


BY_RULE: dict = index_by(KINDS, lambda kind: kind.rules)


def _yaml_readers(kinds) -> list:
    """One kind per (YAML key, reader): the assert kinds share the key `assert` and one reader
    (checks.Check.read_yaml tells them apart)."""
    readers: dict = {}
    for kind in kinds:
        readers.setdefault((kind.yaml_key, kind.read_yaml.__func__), kind)
    return list(readers.values())


BY_YAML_KEY: dict = index_by(_yaml_readers(KINDS), lambda kind: [kind.yaml_key])
BARE_YAML: dict = {kind.yaml_key: kind for kind in KINDS if kind.yaml_bare}


def keywords() -> tuple:
    """How statements start, as a user types them (for "did you mean" hints), each once."""
    return tuple(dict.fromkeys(kind.keyword for kind in KINDS))


def yaml_keys() -> list:
    return list(BY_YAML_KEY)


__all__ = ["KINDS", "HEADER_TYPES", "index_by", "BY_RULE", "BY_YAML_KEY", "BARE_YAML", "keywords", "yaml_keys",
           "RecipeHeader", "Requires", "Seed", "Param", "Include", "Select", "SelAll", "SelRefs", "SelWhere",
           "SelSample", "Selector", "Scale", "AddNoise", "Reinit", "Fill", "Clip", "Prune", "Freeze", "Unfreeze",
           "LoadWeights", "Replace", "Tap", "Insert", "Remove", "Swap", "Shuffle", "Cut", "Append", "SetConfig",
           "Rename", "Unwrap", "FoldBatchNorm", "SetInputShape", "PruneChannels", "Lora", "MergeLora", "Quantize",
           "Cast", "AssertEquivalent", "AssertCount", "AssertParams", "AssertShape"]
