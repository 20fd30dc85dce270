"""The engine's one startup/diagnostic logger: `[tuneserve] ...` lines on stderr.

TUNESERVE_QUIET=1 silences them (and progress bars); tests and benchmarks' child processes set it.
"""

from __future__ import annotations

import os
import sys


def quiet() -> bool:
    """Whether the user asked for no startup lines and no progress bars."""
    return os.environ.get("TUNESERVE_QUIET") == "1"


def log(msg: str) -> None:
    if not quiet():
        print(f"[tuneserve] {msg}", file=sys.stderr, flush=True)
