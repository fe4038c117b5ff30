"""Seeded randomness that does not drift.

Each random choice gets its own generator, derived from the seed, the statement's canonical text, how
many identical statements came before it, and (for per-layer draws) the layer's path and variable name.
Adding or removing an unrelated statement elsewhere in a recipe therefore leaves every other
statement's outcome unchanged. Nothing here touches a global random state.
"""
from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit integer from the seed and any parts, stable across processes and machines."""
    h = hashlib.sha256(str(int(seed)).encode())
    for part in parts:
        h.update(b"\x1f")
        h.update(str(part).encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little")


def generator(seed: int, *parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *parts)))
