"""What the process holds: its peak resident memory (for the start-up line, benchmarks and records)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """The process's maximum resident set size so far (`getrusage`); it never decreases."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
