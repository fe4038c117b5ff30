"""Regular expressions for ``name ~ "regex"`` that cannot hang a run.

Python's ``re`` backtracks, so a pattern such as ``(a+)+$`` takes exponential time on a name such as
``aaaaaaaaaaaaaaaaaaaaaaaaaaaa!``: a hostile (or unlucky) recipe could stall a run forever. Rather
than add a second regex engine (dependencies stay small), patterns are checked when the recipe is
compiled and again before they are matched, and the shapes that backtrack badly are refused with a
message that points into the pattern:

* **nested quantifiers**: a repeated part (``*``, ``+``, ``{m,n}`` with n > 1) that contains a
  quantifier matching a varying amount (``(a+)+``, ``(a*)*``, ``(a?a)+``, ``(a{1,3}){3}``); nesting
  is allowed when the inner count is exact (``(ab{2})+``);
* **ambiguous alternatives inside a repetition**: ``(a|a)*``, ``(a|ab)+``, ``(|a)*``: two branches
  that can start with the same character, or a branch that can match nothing;
* **chains of quantifiers that can trade characters**: more than ``MAX_CHAIN`` variable quantifiers
  with no character between them that cuts the earlier ones off (``.*.*.*x``, ``\\w*\\d*\\w*``,
  thirty ``a?`` in a row); ``.*conv.*`` and ``block\\d+_conv\\d+`` are fine;
* **backreferences and conditionals** (``(a)\\1``, ``(?P=x)``, ``(?(1)a|b)``), which no
  backtracking engine matches in bounded time;
* patterns longer than ``MAX_PATTERN_LENGTH`` characters.

The checks are conservative (a few harmless patterns such as ``(ab?)+`` are refused too). What they
let through matches in time polynomial of degree at most ``MAX_CHAIN + 1`` in the name's length, and
names longer than ``MAX_NAME_LENGTH`` are refused when matched (Keras names are a few dozen
characters long), so one match takes milliseconds.

    >>> check(r"^block\\d+_conv\\d+$").pattern
    '^block\\\\d+_conv\\\\d+$'
    >>> problem("(a+)+$").pos
    0
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field

MAX_PATTERN_LENGTH = 256
MAX_NAME_LENGTH = 256
MAX_CHAIN = 2
UNBOUNDED = -1  # the max of `*`, `+` and `{m,}`

# Characters that stand for the alphabet when deciding whether two parts of a pattern can match the
# same character: ASCII, plus one of each kind of non-ASCII character the classes \d, \w, \s and
# case folding treat specially.
_PROBES = tuple(chr(c) for c in range(128)) + (
    "\u00e9", "\u00df", "\u0130", "\u212a", "\u017f", "\u0660", "\u00a0", "\u2028", "\u4e2d",
    "\U0001f600", "\u00b2", "\u0391", "\u03b1")


class UnsafePattern(re.error):
    """A valid regular expression refused because matching it can take too long.

    A subclass of ``re.error`` so that callers that already report invalid patterns report these too;
    ``pos`` is the 0-based offset of the offending part in the pattern."""


# ---- a small parser of Python's regex syntax that keeps positions ----------------------------
# It only has to understand patterns that re.compile() accepted already.

@dataclass
class _Node:
    pos: int
    end: int


@dataclass
class _Atom(_Node):  # consumes exactly one character
    chars: frozenset = frozenset()


@dataclass
class _Zero(_Node):  # anchors, \b, lookarounds: consume nothing
    inner: object = None


@dataclass
class _Seq(_Node):
    items: list = field(default_factory=list)


@dataclass
class _Alt(_Node):
    branches: list = field(default_factory=list)


@dataclass
class _Repeat(_Node):
    body: object = None
    min: int = 0
    max: int = UNBOUNDED

    @property
    def variable(self) -> bool:
        return self.max != self.min

    @property
    def repeats(self) -> bool:
        return self.max == UNBOUNDED or self.max > 1


_FLAG_LETTERS = {"a": re.ASCII, "i": re.IGNORECASE, "L": re.LOCALE, "m": re.MULTILINE, "s": re.DOTALL,
                 "u": re.UNICODE, "x": re.VERBOSE}
_QUANT = re.compile(r"\{(\d*)(,?)(\d*)\}")


class _Parser:
    def __init__(self, pattern: str, flags: int):
        self.s = pattern
        self.i = 0
        self.flags = flags

    def fail(self, message: str, pos: int):
        raise UnsafePattern(message, self.s, pos)

    def parse(self):
        node = self.alternation()
        return node

    def skip_verbose(self):
        if not self.flags & re.VERBOSE:
            return
        s = self.s
        while self.i < len(s):
            if s[self.i] in " \t\n\r\f\v":
                self.i += 1
            elif s[self.i] == "#":
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            else:
                break

    def alternation(self):
        start = self.i
        branches = [self.sequence()]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            branches.append(self.sequence())
        if len(branches) == 1:
            return branches[0]
        return _Alt(start, self.i, branches)

    def sequence(self):
        start = self.i
        items = []
        while True:
            self.skip_verbose()
            if self.i >= len(self.s) or self.s[self.i] in "|)":
                break
            item = self.atom()
            if item is None:
                continue
            items.append(self.quantified(item))
        return _Seq(start, self.i, items)

    def quantified(self, item):
        self.skip_verbose()
        s = self.s
        if self.i >= len(s):
            return item
        ch = s[self.i]
        if ch in "*+?":
            lo, hi = {"*": (0, UNBOUNDED), "+": (1, UNBOUNDED), "?": (0, 1)}[ch]
            self.i += 1
        elif ch == "{" and (m := _QUANT.match(s, self.i)) and (m.group(1) or m.group(2)):
            lo = int(m.group(1) or 0)
            hi = (int(m.group(3)) if m.group(3) else UNBOUNDED) if m.group(2) else lo
            self.i = m.end()
        else:
            return item
        if self.i < len(s) and s[self.i] in "?+":  # lazy or possessive: the same search space
            self.i += 1
        return _Repeat(item.pos, self.i, item, lo, hi)

    def char_atom(self, start: int):
        self.i = max(self.i, start + 1)
        return _Atom(start, self.i, _chars(self.s[start:self.i], self.flags))

    def atom(self):
        s, start = self.s, self.i
        ch = s[start]
        if ch == "(":
            return self.group()
        if ch == "[":
            self.i = _class_end(s, start)
            return self.char_atom(start)
        if ch in "^$":
            self.i += 1
            return _Zero(start, self.i)
        if ch == "\\":
            return self.escape()
        self.i += 1
        return self.char_atom(start)

    def escape(self):
        s, start = self.s, self.i
        nxt = s[start + 1]
        if nxt in "AZbB":
            self.i = start + 2
            return _Zero(start, self.i)
        if nxt in "0123456789":
            m = re.compile(r"0[0-7]{0,2}|[0-7]{3}").match(s, start + 1)
            if m:  # an octal escape, one character
                self.i = m.end()
                return self.char_atom(start)
            ref = re.compile(r"\\[0-9]+").match(s, start).group()
            self.fail(f"backreferences such as `{ref}` are not allowed in name patterns: they can take "
                      "exponential time", start)
        if nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            self.i = start + 2 + width
        elif nxt == "N":
            self.i = s.index("}", start) + 1
        else:
            self.i = start + 2
        return self.char_atom(start)

    def group(self):
        s, start = self.s, self.i
        if not s.startswith("(?", start):
            self.i += 1
            return self.group_body(start, zero_width=False)
        rest = s[start + 2:]
        if rest.startswith("#"):  # comment
            self.i = s.index(")", start) + 1
            return None
        if rest.startswith("P="):
            end = s.index(")", start) + 1
            self.fail(f"backreferences such as `{s[start:end]}` are not allowed in name patterns: they can "
                      "take exponential time", start)
        if rest.startswith("("):
            self.fail("conditional groups `(?(…)…|…)` are not allowed in name patterns", start)
        if rest.startswith("P<"):
            self.i = s.index(">", start) + 1
            return self.group_body(start, zero_width=False)
        for prefix in ("=", "!", "<=", "<!"):
            if rest.startswith(prefix):
                self.i = start + 2 + len(prefix)
                return self.group_body(start, zero_width=True)
        if rest.startswith(":") or rest.startswith(">"):
            self.i = start + 3
            return self.group_body(start, zero_width=False)
        m = re.compile(r"([aiLmsux]*)(?:-([imsx]*))?([:)])").match(s, start + 2)
        on = sum(_FLAG_LETTERS[c] for c in m.group(1))
        off = sum(_FLAG_LETTERS[c] for c in (m.group(2) or ""))
        self.i = m.end()
        if m.group(3) == ")":  # global flags, already in self.flags via re.compile().flags
            return None
        saved = self.flags
        self.flags = (self.flags | on) & ~off
        try:
            return self.group_body(start, zero_width=False)
        finally:
            self.flags = saved

    def group_body(self, start: int, zero_width: bool):
        body = self.alternation()
        self.i += 1  # the closing ")"
        if zero_width:
            return _Zero(start, self.i, body)
        return _Seq(start, self.i, [body])  # spans the parentheses, so messages quote `(a+)+`


def _class_end(s: str, start: int) -> int:
    """The offset after the `]` that closes the character class opening at ``start``."""
    i = start + 1
    if i < len(s) and s[i] == "^":
        i += 1
    if i < len(s) and s[i] == "]":
        i += 1
    while i < len(s) and s[i] != "]":
        i += 2 if s[i] == "\\" else 1
    return i + 1


@functools.lru_cache(maxsize=4096)
def _chars(atom: str, flags: int) -> frozenset:
    """Which probe characters a one-character atom matches (all of them if in doubt)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rx = re.compile(atom, flags & ~re.VERBOSE)
    except re.error:
        return frozenset(_PROBES)
    return frozenset(c for c in _PROBES if rx.fullmatch(c))


# ---- analysis -----------------------------------------------------------------------------------

def _children(node):
    if isinstance(node, _Seq):
        return node.items
    if isinstance(node, _Alt):
        return node.branches
    if isinstance(node, _Repeat):
        return [node.body]
    if isinstance(node, _Zero) and node.inner is not None:
        return [node.inner]
    return []


def _walk(node):
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(_children(current)))


def _nullable(node) -> bool:
    if isinstance(node, _Atom):
        return False
    if isinstance(node, _Zero):
        return True
    if isinstance(node, _Seq):
        return all(_nullable(i) for i in node.items)
    if isinstance(node, _Alt):
        return any(_nullable(b) for b in node.branches)
    if isinstance(node, _Repeat):
        return node.min == 0 or _nullable(node.body)
    return True


def _first(node) -> frozenset:
    """Characters a match of ``node`` can start with."""
    if isinstance(node, _Atom):
        return node.chars
    if isinstance(node, _Seq):
        out = frozenset()
        for item in node.items:
            out |= _first(item)
            if not _nullable(item):
                break
        return out
    if isinstance(node, _Alt):
        return frozenset().union(*(_first(b) for b in node.branches))
    if isinstance(node, _Repeat):
        return _first(node.body) if node.max != 0 else frozenset()
    return frozenset()


def _consumes(node) -> frozenset:
    """Every character any part of ``node`` can consume."""
    return frozenset().union(*(n.chars for n in _walk(node) if isinstance(n, _Atom)))


def _check_repeat(pattern: str, rep: _Repeat) -> None:
    text = pattern[rep.pos:rep.end]
    for inner in _walk(rep.body):
        if isinstance(inner, _Repeat) and inner.variable:
            inner_text = pattern[inner.pos:inner.end]
            raise UnsafePattern(
                f"nested quantifier: `{text}` repeats `{inner_text}`, itself a quantifier; this can take "
                f"exponential time on some names (write `{inner_text}` once, without the outer repetition)",
                pattern, rep.pos)
        if isinstance(inner, _Alt):
            seen = frozenset()
            for branch in inner.branches:
                first = _first(branch)
                if _nullable(branch) or first & seen:
                    raise UnsafePattern(
                        f"ambiguous repetition: in `{text}` two alternatives can match the same text"
                        + (" (one matches nothing)" if _nullable(branch) else "")
                        + "; this can take exponential time on some names", pattern, rep.pos)
                seen |= first


def _check_chains(pattern: str, root) -> None:
    """Refuse more than MAX_CHAIN variable quantifiers that can trade characters with one another.

    Walks the pattern in order keeping the quantifiers still "live" (each with the length of the
    chain it ends); a character every live quantifier cannot match cuts them off. Alternatives are
    walked one after another without cutting (conservative)."""
    live: list[tuple[frozenset, int]] = []

    def visit(node, mandatory: bool):
        nonlocal live
        if isinstance(node, _Atom):
            if mandatory:
                live = [(chars, n) for chars, n in live if chars & node.chars]
        elif isinstance(node, _Repeat):
            if node.variable:
                chars = _consumes(node.body)
                depth = 1 + max((n for c, n in live if c & chars), default=0)
                if depth > MAX_CHAIN:
                    raise UnsafePattern(
                        f"too many quantifiers in a row that can match the same characters (`{pattern[node.pos:node.end]}`"
                        f" is number {depth}; at most {MAX_CHAIN}); this can take a very long time on long names "
                        "(`name ~` finds the pattern anywhere in the name: a leading or trailing `.*` is not needed)",
                        pattern, node.pos)
                for child in _children(node):
                    visit(child, mandatory=False)
                live.append((chars, depth))
            else:
                for child in _children(node):
                    visit(child, mandatory and node.min > 0)
        elif isinstance(node, _Alt):
            for branch in node.branches:
                visit(branch, mandatory=False)
        elif isinstance(node, _Seq):
            for item in node.items:
                visit(item, mandatory)
        elif isinstance(node, _Zero) and node.inner is not None:
            visit(node.inner, mandatory=False)

    visit(root, mandatory=True)


@functools.lru_cache(maxsize=256)
def check(pattern: str) -> re.Pattern:
    """Compile ``pattern``; raise ``re.error`` if it is invalid and UnsafePattern (a subclass) if
    matching it could take exponential or high-polynomial time."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise UnsafePattern(f"pattern is {len(pattern)} characters long; name patterns may have at most "
                            f"{MAX_PATTERN_LENGTH}", pattern, MAX_PATTERN_LENGTH)
    with warnings.catch_warnings():  # FutureWarning about `[[`: not the user's concern here
        warnings.simplefilter("ignore")
        compiled = re.compile(pattern)
    root = _Parser(pattern, compiled.flags).parse()
    for node in _walk(root):
        if isinstance(node, _Repeat) and node.repeats:
            _check_repeat(pattern, node)
    _check_chains(pattern, root)
    return compiled


def problem(pattern: str) -> UnsafePattern | None:
    """The reason ``pattern`` is refused, or None (invalid patterns raise re.error)."""
    try:
        check(pattern)
    except UnsafePattern as exc:
        return exc
    return None


def search(pattern: str, name: str, span=None):
    """``re.search(pattern, name)`` for a predicate ``name ~ "pattern"``, refusing unsafe patterns and
    names too long to match safely with an ApplyError at ``span``."""
    from ..errors import ApplyError
    try:
        compiled = check(pattern)
    except re.error as exc:
        raise ApplyError(f"name ~ {pattern!r}: {exc}", span=span) from None
    if len(name) > MAX_NAME_LENGTH:
        raise ApplyError(f"layer name {name[:40]!r}… is {len(name)} characters long; `name ~` matches names of "
                         f"at most {MAX_NAME_LENGTH} characters", span=span,
                         hint="select it with name=\"…\" or a quoted glob instead")
    return compiled.search(name)


__all__ = ["check", "problem", "search", "UnsafePattern", "MAX_PATTERN_LENGTH", "MAX_NAME_LENGTH", "MAX_CHAIN"]
