"""BlockPool: KV blocks, their reference counts, the prefix-cache map and the LRU free queue.

A block holds `block_size` tokens' KV for every layer of one KV group. A full block that has been
computed is *cached*: it carries the chained hash of its tokens (and of every token before it), so a
later request with the same prefix can reuse it. When its last user frees it, a cached block stays in
the free queue with its hash; it is evicted (hash dropped) only when the pool hands it out again.
The free queue is LRU: blocks freed earlier are reused first.

Block 0 is the null block: never handed out, used as a placeholder in block tables (a sliding-window
layer's dropped blocks, padding).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

NULL_BLOCK_ID = 0


def hash_block_tokens(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Chained hash of one full block: sha256(parent hash || tokens), 16 bytes."""
    h = hashlib.sha256(parent_hash or b"\x00" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()[:16]


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()  # kept while cached, to re-check a hash hit

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else ""
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}{', ' + cached if cached else ''})"


class BlockPool:
    """Owns every block of one KV group. Invariant: a block is in the free queue iff ref_cnt == 0."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV group needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_cnt = 1  # pinned forever
        # LRU order: first = evicted first. Values unused; OrderedDict gives O(1) removal anywhere.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including free-and-cached ones)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests."""
        usable = self.num_blocks - 1
        return (usable - self.num_free_blocks) / usable

    def get_cached_block(self, block_hash: bytes, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block with this hash whose tokens are exactly `token_ids`, if any."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks from the front of the free queue, evicting their cached hashes."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (they leave the free queue if free); null
        placeholders are skipped."""
        for block in blocks:
            if block.block_id == NULL_BLOCK_ID:
                continue
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block, in the given order (pass a request's blocks tail-first
        so that its earlier blocks, which other prefixes share, are evicted last)."""
        for block in blocks:
            if block.block_id == NULL_BLOCK_ID:
                continue
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: bytes, token_ids: tuple[int, ...]) -> None:
        """Mark a full, computed block as reusable under `block_hash`."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return  # an identical block is already cached: keep that one
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()

    def check_invariants(self, refs: dict[int, int]) -> None:
        """Assert the pool's bookkeeping agrees with `refs` (block id -> tables holding it, null excluded):
        each held block's ref count equals its holders, a block is free iff unreferenced, the null block
        stays pinned, and the cached map and the blocks' hashes agree. O(free + held + cached)."""
        null = self.blocks[NULL_BLOCK_ID]
        assert null.ref_cnt == 1 and null.block_hash is None, f"null block lost its pin: {null}"
        assert NULL_BLOCK_ID not in self.free_queue and NULL_BLOCK_ID not in refs, "null block handed out"
        for bid in self.free_queue:
            block = self.blocks[bid]
            assert block.ref_cnt == 0, f"{block} is in the free queue with references"
            self._check_hash(block)
        for bid, n in refs.items():
            block = self.blocks[bid]
            assert block.ref_cnt == n, f"{block} is held by {n} block tables, ref count {block.ref_cnt}"
            self._check_hash(block)
        if len(self.free_queue) + len(refs) != self.num_blocks - 1:  # free and held must partition
            lost = [b for b in self.blocks[1:] if b.block_id not in self.free_queue and b.block_id not in refs]
            raise AssertionError(f"blocks neither free nor held by a table (leaked): {lost[:8]}")
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"cached map names {block} under another hash"

    def _check_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            assert self.cached.get(block.block_hash) is block, f"{block} has a hash the cached map lacks"

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when no block is in use). Returns whether it did."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks[1:]:
            self._evict(block)
        return True
