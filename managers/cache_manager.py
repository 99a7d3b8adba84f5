"""One owner of a request's KV bookkeeping.

A request that runs holds three things: a row of `req_to_token` (its slot
table), the KV slots of the tokens it computed itself (from the allocator),
and a lock on the prefix it found in the prefix cache (so eviction leaves it
alone). Every transition of those goes through here:

- `start`: admission (a row, the cached prefix written into it, locked);
- `extend`: slots for a batch's new positions, written into the rows in
  one batched write (and mid-page prefixes read in one gather);
- `unstart`: admission undone (the batch could not get slots);
- `free_own_kv`: retraction, or an abort before the prompt had KV: the row
  and the request's own slots go back, the prefix lock is dropped;
- `release`: a finished request hands its sequence to the prefix cache (or
  frees it, without one), including overlap's spare slot;
- `cache_prefill`: a prompt is shared as soon as its prefill is done;
- `trim`: the KV of rejected draft tokens goes back at once;
- `make_room`: evict unlocked cache leaves until enough slots are free.

Both prefix caches (`RadixCache`, `NoSharingCache`) implement the same
`PrefixCache` protocol, so nothing here knows which one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from managers.schedule_batch import EMPTY_SLOTS
from mem_cache.allocator import last_slots_mid_page

if TYPE_CHECKING:
    from managers.schedule_batch import Req
    from mem_cache.allocator import TokenToKVPoolAllocator
    from mem_cache.memory_pool import ReqToTokenPool
    from mem_cache.radix_cache import MatchResult, TreeNode


@runtime_checkable
class PrefixCache(Protocol):
    """What the scheduler needs from a prefix cache (mem_cache/radix_cache.py)."""

    def match_prefix(self, key) -> MatchResult: ...
    def cache_finished_req(self, req) -> None: ...
    def cache_unfinished_req(self, req) -> None: ...
    def inc_lock_ref(self, node: TreeNode | None) -> None: ...
    def dec_lock_ref(self, node: TreeNode | None) -> None: ...
    def evict(self, num_tokens: int) -> int: ...
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def total_size(self) -> int: ...
    def record_hit(self, matched: int, total: int) -> None: ...
    def hit_rate(self) -> float: ...
    def reset(self) -> None: ...


class CacheManager:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator,
                 tree_cache: PrefixCache, page_size: int) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.tree_cache = tree_cache
        self.page_size = page_size
        # Told first whenever a request lets go of its KV (retraction, finish,
        # abort), e.g. so state kept per request row is dropped with the row.
        self.release_hooks: list[Callable[[Req], None]] = []

    # -- admission -----------------------------------------------------------------

    def match(self, req: Req) -> MatchResult:
        # At least one token must be computed to sample from.
        return self.tree_cache.match_prefix(req.fill_ids[:-1])

    def start(self, req: Req, match: MatchResult) -> None:
        """Give an admitted request its row and lock its cached prefix."""
        req.req_pool_idx = self.req_to_token_pool.alloc(1)[0]
        req.prefix_indices, req.last_node = match.indices, match.last_node
        self.tree_cache.inc_lock_ref(match.last_node)
        n = len(match.indices)
        if n:
            self.req_to_token_pool.req_to_token[req.req_pool_idx, :n] = match.indices.to(torch.int32)
        req.kv_committed_len = n
        if req.retractions == 0:
            req.cached_tokens = n

    def unstart(self, req: Req) -> None:
        """Undo `start` for a request whose batch got no slots (its own KV is none yet)."""
        self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node = None, None
        req.prefix_indices = EMPTY_SLOTS
        req.kv_committed_len = 0

    def extend(self, reqs: list[Req], prefix_lens: list[int], extend_lens: list[int]) -> torch.Tensor | None:
        """Slots for positions [prefix_len, prefix_len + extend_len) of each
        request, written into its row; None (nothing taken) when short."""
        if not reqs:
            return EMPTY_SLOTS
        table = self.req_to_token_pool.req_to_token
        rows = [r.req_pool_idx for r in reqs]
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        last_locs = last_slots_mid_page(table, rows, prefix_lens, self.page_size)
        slots = self.allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
        if slots is None:
            return None
        self.req_to_token_pool.write_slots(rows, prefix_lens, extend_lens, slots)
        for req, n in zip(reqs, seq_lens):
            req.kv_committed_len = n
        return slots

    def make_room(self, needed: int) -> None:
        """Evict unlocked cache leaves until `needed` slots are free (or nothing is left to evict)."""
        if self.allocator.available_size() < needed:
            self.tree_cache.evict(needed - self.allocator.available_size())

    # -- leaving -------------------------------------------------------------------

    def free_own_kv(self, req: Req) -> None:
        """Give back the row and the slots the request computed itself; its
        cached prefix stays in the cache, unlocked."""
        for hook in self.release_hooks:
            hook(req)
        shared = len(req.prefix_indices) // self.page_size * self.page_size
        own = self.req_to_token_pool.req_to_token[req.req_pool_idx, shared : req.kv_committed_len]
        if own.numel():
            self.allocator.free(own.to(torch.int64))
        self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node = None, None
        req.prefix_indices = EMPTY_SLOTS
        req.kv_committed_len = 0
        req.pending_placeholder = None

    def release(self, req: Req) -> None:
        """A finished (or aborted) request gives back its row and its KV: to
        the prefix cache when its whole sequence has KV, else to the pool."""
        for hook in self.release_hooks:
            hook(req)
        if req.req_pool_idx is None:
            return
        full = len(req.origin_input_ids) + len(req.output_ids)
        if req.kv_committed_len < full - 1:  # aborted before its prefill completed
            self.free_own_kv(req)
            return
        if req.kv_committed_len == full:
            # Overlap ran one spare step after the finish: its KV slot sits
            # past what the cache takes. Free it unless it shares a page with
            # the tail the cache frees anyway.
            if (full - 1) % self.page_size == 0:
                spare = self.req_to_token_pool.req_to_token[req.req_pool_idx, full - 1 : full]
                self.allocator.free(spare.to(torch.int64))
        self.tree_cache.cache_finished_req(req)
        req.req_pool_idx = None
        req.pending_placeholder = None

    def trim(self, req: Req, keep: int) -> None:
        """Keep KV for the first `keep` positions only (a step verified drafted
        tokens and rejected some). Whole pages past the kept ones go back to
        the pool; the kept last page stays, and the next allocation continues
        it from the same slots."""
        if keep >= req.kv_committed_len:
            return
        first_free = -(-keep // self.page_size) * self.page_size
        if first_free < req.kv_committed_len:
            rejected = self.req_to_token_pool.req_to_token[req.req_pool_idx, first_free : req.kv_committed_len]
            self.allocator.free(rejected.to(torch.int64))
        req.kv_committed_len = keep

    def cache_prefill(self, req: Req) -> None:
        """Share a request's computed prompt now, not when the request ends."""
        self.tree_cache.cache_unfinished_req(req)

    # -- invariants ----------------------------------------------------------------

    def leaks(self) -> list[str]:
        """What is still held when nothing should be (call when idle, after
        dropping the prefix cache): empty when every slot and row came back."""
        problems = []
        if self.allocator.available_size() != self.allocator.size:
            problems.append(f"{self.allocator.size - self.allocator.available_size()} KV slots not returned")
        if self.req_to_token_pool.available_size() != self.req_to_token_pool.size:
            problems.append(
                f"{self.req_to_token_pool.size - self.req_to_token_pool.available_size()} request rows not returned"
            )
        return problems
