"""How much memory this process holds and may still take, for sizing batches to the machine.

A 128 px embedded model needs a few MB per batch item; OWLv2 B/16 at 960 px (3601 tokens, plain
attention) needs gigabytes. `batch_cap` turns a measured per-item cost into the largest batch
that fits, so default settings serve both without being killed for memory (service/engine.py).
Linux only (/proc, cgroups); elsewhere the cap is the configured maximum.
"""

from __future__ import annotations

import os
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CGROUP = Path("/sys/fs/cgroup")


def rss_bytes() -> int | None:
    """Resident set size of this process, bytes (None where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or v1's limit - usage; None if unlimited."""
    pairs = [(CGROUP / "memory.max", CGROUP / "memory.current"),
             (CGROUP / "memory" / "memory.limit_in_bytes", CGROUP / "memory" / "memory.usage_in_bytes")]
    for limit_file, usage_file in pairs:
        try:
            limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int | None:
    """Memory this process may still take: the tighter of its cgroup's headroom and the host's MemAvailable."""
    values = [v for v in (_cgroup_headroom(), _mem_available()) if v is not None]
    return min(values) if values else None


def batch_cap(per_item_bytes: float, available: int | None, fraction: float, warmed: int, upper: int) -> int:
    """The largest batch size <= `upper` whose extra items fit in `fraction` of `available` memory.

    `warmed` items already ran (their memory is held), so the cap is never below it; each further
    item is assumed to cost `per_item_bytes`.
    """
    if available is None or per_item_bytes <= 0:
        return upper
    extra = int(fraction * available // per_item_bytes)
    return max(1, min(upper, warmed + extra))
