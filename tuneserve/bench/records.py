"""What every benchmark shares: percentiles, aligned text tables, JSON files and the JSONL results file.

This module imports no other bench module, so any of them can use it without an import circle.
A results file holds one JSON record per line, appended as each measurement finishes, so a sweep
that stops can resume and `tune`/`report` can reuse any point.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def fmt(v: Any) -> str:
    """A table cell: '-' for None, thousands separators, three significant digits below 1."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """An aligned plain-text table of the given columns."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str | Path | None, data: Any) -> None:
    """Write data as indented JSON to path (nothing when path is empty)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def point_key(model: str, workload: str, mode: str, rate: float | None, point: dict[str, Any],
              system: str = "tuneserve", **extra: Any) -> str:
    """The key that identifies one measurement in a results file (what a resumed sweep skips); `extra`
    (e.g. repeat, num_prompts, output_len) joins the key when given."""
    return json.dumps({"system": system, "model": model, "workload": workload, "mode": mode, "rate": rate,
                       "config": point, **extra}, sort_keys=True, default=str)


def load_records(path: str | Path) -> list[dict]:
    """Records of a results file (a missing file has none; a torn last line is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: str | Path, record: dict) -> None:
    """Append one record to a results file and flush it, so a crash loses at most the point in flight."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with torch on n intra-op threads (None: leave as is); yields the count in effect."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
