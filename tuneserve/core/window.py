"""Window: which key positions a query may attend to, and what that means in KV blocks.

One rule for every attention layer: causal, and for a sliding window of `size` tokens only the last
`size` positions (the query's own included) plus the first `sinks` positions (StreamingLLM attention
sinks, which hold much of the softmax mass and so are kept). size 0 is full attention; sinks then mean
nothing. The KV manager, the memory split and the attention metadata all ask this object, so the block
arithmetic cannot drift from the mask. Torch-free: kernels/attention.py turns these numbers into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Window:
    """A query's view of the keys: size 0 = full attention, else the last `size` positions + `sinks`."""

    size: int = 0
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.size < 0 or self.sinks < 0:
            raise ValueError(f"window size and sinks must be >= 0, got {self.size}, {self.sinks}")

    def sees(self, q: int, k: int) -> bool:
        """Whether a query at position q may attend to the key at position k (the rule masks implement)."""
        return k <= q and (not self.size or q - k < self.size or k < self.sinks)

    def sink_blocks(self, block_size: int) -> int:
        """Blocks at the start of a request that a windowed group never frees (0 for full attention)."""
        return _ceil_div(self.sinks, block_size) if self.size else 0

    def first_needed_block(self, pos: int, block_size: int) -> int:
        """First block that queries at positions >= pos can see, not counting the sink blocks."""
        return max(0, pos - self.size + 1) // block_size if self.size else 0

    def kept_blocks(self, pos: int, block_size: int) -> tuple[int, int]:
        """(s, f): queries at positions >= pos see blocks [0, s) (sinks) and [f, ...), nothing between.

        s <= f always: a sink block the window still covers counts as in the window."""
        first = self.first_needed_block(pos, block_size)
        return min(self.sink_blocks(block_size), first), first

    def needed_blocks(self, pos: int, num_blocks: int, block_size: int) -> list[int]:
        """Indices < num_blocks of the blocks that queries at positions >= pos can see."""
        sinks, first = self.kept_blocks(pos, block_size)
        return list(range(sinks)) + list(range(first, num_blocks))

    def step_blocks(self, num_step_tokens: int, block_size: int) -> int:
        """Most blocks a windowed request holds while one step computes num_step_tokens of it.

        While a chunk [C, C + L) is computed it holds blocks first_needed_block(C) .. (C + L - 1) // bs,
        which cover at most L + size - 1 positions, so ceil((L + size - 1) / bs) + 1 blocks (the + 1 for
        a span that starts mid-block), plus the sink blocks."""
        span = _ceil_div(num_step_tokens + self.size - 1, block_size) + 1
        return span + self.sink_blocks(block_size)

    def max_blocks(self, num_tokens: int, block_size: int, max_step_tokens: int) -> int:
        """Most blocks a request of num_tokens holds at once when a step computes <= max_step_tokens of it."""
        n = _ceil_div(num_tokens, block_size)
        if not self.size:
            return n
        return min(n, self.step_blocks(min(max_step_tokens, num_tokens), block_size))

    def blocks_per_seq(self, block_size: int) -> int:
        """Blocks one running request of a windowed group needs in the memory split: what it holds
        between steps (size - 1 positions back plus the next, and the sinks) and one more for the block
        its next token may open; equal to step_blocks with a block's worth of step tokens."""
        return self.step_blocks(block_size, block_size)
