"""KVManager: which KV blocks each request holds, prefix-cache lookups, and block allocation.

Layers are split into KV groups (`KVGroupSpec`): layers of one group share block tables. A full-attention
group keeps every block of a request; a sliding-window group frees the blocks that fell out of its
window (their table entries become the null block), so a long request's KV stays bounded there.

Prefix hits with mixed groups: a hit of h blocks lets the request resume at position P = h * block_size.
A full group needs every block before P; a windowed group only the blocks its queries at P and later can
see (the last `window - 1` positions before P, plus sink blocks); the rest of its table is the null block.
Windowed groups free old blocks (still cached until evicted), so the longest hit is found per group.
No torch here: the runner owns the tensors, this class owns the bookkeeping.
"""

from __future__ import annotations

from tuneserve.core.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock, hash_block_tokens
from tuneserve.core.kv_layout import KVGroupSpec
from tuneserve.core.request import Request


class KVManager:
    """Allocates and frees KV blocks per request across KV groups; serves prefix-cache hits."""

    def __init__(
        self,
        groups: list[KVGroupSpec],
        num_blocks: list[int],
        block_size: int,
        enable_caching: bool = True,
        max_step_tokens: int | None = None,
    ) -> None:
        assert len(groups) == len(num_blocks) and groups, "one block count per KV group"
        self.groups = groups
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_step_tokens = max_step_tokens  # most tokens of one request per step; None: unbounded
        self.pools = [BlockPool(n, enable_caching) for n in num_blocks]
        self.req_blocks: list[dict[str, list[KVBlock]]] = [{} for _ in groups]
        self.num_cached_blocks: list[dict[str, int]] = [{} for _ in groups]
        self._holders: dict[str, Request] = {}  # requests with block tables, for check_invariants
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ----- capacity -------------------------------------------------------------------------
    def max_blocks_for(self, group: int, num_tokens: int) -> int:
        """Most blocks a request of num_tokens ever holds at once in a group."""
        step = self.max_step_tokens or num_tokens
        return self.groups[group].max_blocks_per_request(num_tokens, self.block_size, step)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a request of num_tokens fits in the cache when it runs alone."""
        return all(self.max_blocks_for(g, num_tokens) <= p.num_blocks - 1 for g, p in enumerate(self.pools))

    @property
    def usage(self) -> float:
        """Fraction of KV blocks in use (the most used group)."""
        return max(p.usage for p in self.pools)

    def num_free_blocks(self, group: int = 0) -> int:
        return self.pools[group].num_free_blocks

    @property
    def num_blocks_in_use(self) -> int:
        """Blocks held by requests, over all groups (0 when no request is live: the leak check)."""
        return sum(p.num_blocks - 1 - p.num_free_blocks for p in self.pools)

    @property
    def num_block_refs(self) -> int:
        """References held on blocks, over all groups, not counting the null block's pin."""
        return sum(b.ref_cnt for p in self.pools for b in p.blocks[1:])

    @property
    def num_tracked_requests(self) -> int:
        """Requests with a block table in some group."""
        return len({rid for d in self.req_blocks for rid in d})

    # ----- prefix cache ---------------------------------------------------------------------
    def update_block_hashes(self, req: Request) -> None:
        """Extend req.block_hashes over every full block of known tokens."""
        bs, toks, hashes = self.block_size, req.all_token_ids, req.block_hashes
        while (len(hashes) + 1) * bs <= len(toks):
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, toks[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, req: Request) -> tuple[list[list[KVBlock]], int]:
        """Longest usable cached prefix of req's full blocks, per group, and its length in tokens.

        Every group's list has one entry per hit block; a windowed group has the null block where its
        queries from the hit position on cannot look. The last token is never a hit: it must run to give
        the logits of the next token.
        """
        if not self.enable_caching or req.params.prompt_logprobs is not None:
            return [[] for _ in self.groups], 0
        self.update_block_hashes(req)
        limit = (req.num_tokens - 1) // self.block_size
        found: list[list[KVBlock | None]] = [[] for _ in self.groups]
        # full groups first: the first block they miss bounds the hit for every group
        for g in sorted(range(len(self.groups)), key=lambda g: self.groups[g].window > 0):
            windowed = self.groups[g].window > 0
            for i in range(limit):
                found[g].append(self._lookup(g, req, i))
                if found[g][-1] is None and not windowed:
                    limit = i  # a full group needs an unbroken run from the start
                    break
        hit = next(h for h in range(limit, -1, -1) if all(
            all(found[g][i] is not None for i in self._needed(spec, h))
            for g, spec in enumerate(self.groups) if spec.window))
        per_group: list[list[KVBlock]] = []
        for g, spec in enumerate(self.groups):
            if not spec.window:
                per_group.append(found[g][:hit])  # type: ignore[arg-type]
                continue
            row = [self.pools[g].blocks[NULL_BLOCK_ID]] * hit
            for i in self._needed(spec, hit):
                row[i] = found[g][i]  # type: ignore[assignment]
            per_group.append(row)
        return per_group, hit * self.block_size

    def _lookup(self, group: int, req: Request, i: int) -> KVBlock | None:
        bs = self.block_size
        toks = tuple(req.all_token_ids[i * bs:(i + 1) * bs])
        return self.pools[group].get_cached_block(req.block_hashes[i], toks)

    def _needed(self, spec: KVGroupSpec, hit: int) -> list[int]:
        """Block indices < hit that a windowed group must have to resume at position hit * block_size."""
        return spec.attn_window.needed_blocks(hit * self.block_size, hit, self.block_size)

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Count one admitted request's lookup (queried and hit tokens)."""
        if self.enable_caching:
            self.prefix_queries += num_queried
            self.prefix_hits += num_hit

    # ----- allocation -----------------------------------------------------------------------
    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        computed_blocks: list[list[KVBlock]] | None = None,
    ) -> bool:
        """Give req the blocks to hold num_computed_tokens (+ prefix hits) + num_new_tokens.

        Returns False and changes nothing when a group lacks free blocks.
        """
        computed_blocks = computed_blocks or [[] for _ in self.groups]
        num_hit_tokens = len(computed_blocks[0]) * self.block_size
        total = req.num_computed_tokens + num_hit_tokens + num_new_tokens
        need = []
        for g, pool in enumerate(self.pools):
            held = self.req_blocks[g].get(req.request_id, [])
            hits = computed_blocks[g]
            n_new = max(0, -(-total // self.block_size) - len(held) - len(hits))
            # hit blocks sitting in the free queue stop being free once touched
            n_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
            if n_new + n_evictable_hits > pool.num_free_blocks:
                return False
            need.append(n_new)
        for g, pool in enumerate(self.pools):
            blocks = self.req_blocks[g].setdefault(req.request_id, [])
            if computed_blocks[g]:
                pool.touch(computed_blocks[g])
                blocks.extend(computed_blocks[g])
                self.num_cached_blocks[g][req.request_id] = len(blocks)
            blocks.extend(pool.get_new_blocks(need[g]))
        self._holders[req.request_id] = req
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register req's full, computed blocks in the prefix cache (after the step that wrote them)."""
        if not self.enable_caching:
            return
        self.update_block_hashes(req)
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for g, pool in enumerate(self.pools):
            blocks = self.req_blocks[g].get(req.request_id)
            if blocks is None:
                continue
            start = self.num_cached_blocks[g].get(req.request_id, 0)
            for i in range(start, num_full):
                if blocks[i].block_id != NULL_BLOCK_ID:
                    toks = tuple(req.all_token_ids[i * self.block_size:(i + 1) * self.block_size])
                    pool.cache_block(blocks[i], req.block_hashes[i], toks)
            self.num_cached_blocks[g][req.request_id] = max(start, num_full)

    def remove_skipped_blocks(self, req: Request) -> None:
        """Free blocks of windowed groups that no future query of req can attend to."""
        for g, spec in enumerate(self.groups):
            if not spec.window:
                continue
            blocks = self.req_blocks[g].get(req.request_id, [])
            # the next query sits at position num_computed_tokens; later ones see no further back
            sinks, first = spec.attn_window.kept_blocks(req.num_computed_tokens, self.block_size)
            dropped = []
            for i in range(sinks, min(first, len(blocks))):
                if blocks[i].block_id != NULL_BLOCK_ID:
                    dropped.append(blocks[i])
                    blocks[i] = self.pools[g].blocks[NULL_BLOCK_ID]
            self.pools[g].free_blocks(reversed(dropped))  # type: ignore[arg-type]

    def free(self, req: Request) -> None:
        """Release every block req holds (tail first, so shared prefixes are evicted last)."""
        self._holders.pop(req.request_id, None)
        for g, pool in enumerate(self.pools):
            blocks = self.req_blocks[g].pop(req.request_id, [])
            self.num_cached_blocks[g].pop(req.request_id, None)
            pool.free_blocks(list(reversed(blocks)))

    def block_ids(self, req: Request) -> tuple[list[int], ...]:
        """req's block table per group."""
        return tuple([b.block_id for b in d.get(req.request_id, [])] for d in self.req_blocks)

    def num_held_blocks(self, req: Request, group: int = 0) -> int:
        """Blocks req holds in a group, excluding null placeholders."""
        return sum(b.block_id != NULL_BLOCK_ID for b in self.req_blocks[group].get(req.request_id, []))

    def reset_prefix_cache(self) -> bool:
        return all(p.reset_prefix_cache() for p in self.pools)

    # ----- invariants -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError naming the block or request whose bookkeeping is inconsistent.

        Per group: every block's ref count equals the number of block tables holding it, a block is free
        iff its ref count is 0, the null block stays pinned (BlockPool.check_invariants). Per request: its
        table covers its computed tokens; a full group's table has no null entry; a windowed group's has
        the null block exactly where no query from num_computed_tokens on can look (after the sinks,
        before the first needed block) and stays within max_blocks_for; a cached block in a table carries
        the request's hash for that position. Cheap (linear in blocks), meant to run after every step.
        """
        ids = set(self._holders)
        for g, pool in enumerate(self.pools):
            assert set(self.req_blocks[g]) == ids, f"group {g} tables {sorted(self.req_blocks[g])} != {sorted(ids)}"
            assert set(self.num_cached_blocks[g]) <= ids, f"group {g} counts cached blocks of gone requests"
            refs: dict[int, int] = {}
            for rid, blocks in self.req_blocks[g].items():
                self._check_table(g, self._holders[rid], blocks)
                for b in blocks:
                    if b.block_id != NULL_BLOCK_ID:
                        refs[b.block_id] = refs.get(b.block_id, 0) + 1
            pool.check_invariants(refs)

    def _check_table(self, g: int, req: Request, blocks: list[KVBlock]) -> None:
        rid, bs, nc = req.request_id, self.block_size, req.num_computed_tokens
        where = f"request {rid!r} group {g}"
        assert len(blocks) * bs >= nc, f"{where}: {len(blocks)} blocks for {nc} computed tokens"
        assert self.num_cached_blocks[g].get(rid, 0) <= len(blocks), f"{where}: more cached blocks than held"
        held = [b.block_id for b in blocks if b.block_id != NULL_BLOCK_ID]
        assert len(set(held)) == len(held), f"{where}: a block appears twice in {held}"
        sinks, first = self.groups[g].attn_window.kept_blocks(nc, bs)
        for i, b in enumerate(blocks):
            dropped = sinks <= i < first
            assert (b.block_id == NULL_BLOCK_ID) == dropped, \
                f"{where}: block {i} is {b} with {nc} computed tokens (null expected iff {sinks} <= i < {first})"
            if b.block_hash is not None:
                assert i < len(req.block_hashes) and req.block_hashes[i] == b.block_hash, \
                    f"{where}: {b} at block {i} is cached under another prefix's hash"
        bound = self.max_blocks_for(g, len(blocks) * bs)
        assert len(held) <= bound, f"{where}: holds {len(held)} blocks, more than the bound {bound}"
