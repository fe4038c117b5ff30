"""The package version and a small version-specifier check (no third-party import at compile time)."""
from __future__ import annotations

import re

__version__ = "0.2.0"


class VersionSpecError(ValueError):
    pass


def _parts(version: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)*)\s*", version)
    if not m:
        raise VersionSpecError(f"{version!r} is not a version number such as 0.1 or 1.2.0")
    nums = [int(p) for p in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    return tuple(nums)


def satisfies(version: str, spec: str) -> bool:
    """``spec`` is a comma-separated list such as ``>=0.1, <2``; operators ==, !=, >=, <=, >, <, ~=."""
    have = _parts(version)
    clauses = [c.strip() for c in spec.split(",")]
    if not spec.strip() or any(not c for c in clauses):
        raise VersionSpecError(f"empty version requirement in {spec!r}")
    for clause in clauses:
        m = re.fullmatch(r"(==|!=|>=|<=|~=|>|<)\s*(.+)", clause)
        if not m:
            raise VersionSpecError(f"version requirement {clause!r} must start with ==, !=, >=, <=, >, < or ~=")
        op, want_text = m.groups()
        want = _parts(want_text)
        if op == "~=":
            if len(want) < 2 and "." not in want_text:
                raise VersionSpecError("~= needs at least two version parts, e.g. ~=0.1")
            prefix = tuple(int(p) for p in want_text.strip().split(".")[:-1])
            ok = have >= want and have[: len(prefix)] == prefix
        else:
            ok = {"==": have == want, "!=": have != want, ">=": have >= want, "<=": have <= want,
                  ">": have > want, "<": have < want}[op]
        if not ok:
            return False
    return True
