"""N-gram (prompt lookup) drafting: propose the tokens that followed the latest earlier occurrence of
the request's last n tokens, searching its own prompt and output (n from prompt_lookup_max down to
prompt_lookup_min). Costs no model call; works when the output quotes or edits its input."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens continuing `tokens`, or [] when no n-gram of the tail recurs."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = arr[size - n:]
        # windows starting at 0 .. size - n - 1: every earlier occurrence (excluding the tail itself)
        windows = sliding_window_view(arr[:size - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence: its continuation is freshest
            return arr[start:start + k].tolist()
    return []
