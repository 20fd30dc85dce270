"""EngineStats: the engine's counters and gauges, read by /metrics and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    num_steps: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts at position 0, 1, ...
    errors: dict[str, int] = field(default_factory=dict)  # engine errors by kind (engine/isolation.py)
    num_blocks_in_use: int = 0  # leak checks: 0 once every request has ended
    num_block_refs: int = 0
    num_live_requests: int = 0
    step_seconds: float = 0.0  # in the core step (execute + update)
    structured_mask_seconds: float = 0.0  # of which filling and applying grammar masks
    all_reduce_seconds: float = 0.0  # tensor parallel: the driver's time in all-reduces (waits included)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
