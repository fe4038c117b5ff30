"""How much memory this process may use, and sizes said in bytes (no Keras, no numpy: the archive uses it)."""
from __future__ import annotations

import os


def memory_limit() -> int | None:
    """The bytes of memory this process may use at most: physical memory, a cgroup (container) limit and
    RLIMIT_AS, whichever is smallest; None when none can be read."""
    import resource
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit():
                limits.append(int(text))
        except OSError:
            pass
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
            limits.append(soft)
    except (ValueError, OSError):
        pass
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else None


def bytes_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
