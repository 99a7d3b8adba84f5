"""Which waiting requests join the next prefill batch, and its KV.

Each iteration the scheduler asks `PrefillAdmission.admit` for a prefill: the
chunked request's next chunk first, then waiting requests in the policy's
order while the budgets last (schedule_policy.PrefillAdder), then KV for all
of them, dropping the last admitted until it fits. Riders (running decodes
joining as one-token extends, with --enable-mixed-chunk) take their slots
from the same budget.

Prefix claims: waiting requests whose next SHARED_PREFIX_CLAIM_TOKENS uncached
tokens equal those of a request being prefilled wait for it, then find the
prefix in the cache instead of computing it side by side (a burst with one
system prompt would otherwise compute it once per request).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from managers.cache_manager import CacheManager
from managers.schedule_batch import Req, ScheduleBatch
from managers.schedule_policy import AddResult, PrefillAdder, SchedulePolicy
from managers.scheduler_config import SchedulerConfig

SHARED_PREFIX_CLAIM_TOKENS = 32


@dataclass
class Admission:
    batch: ScheduleBatch
    admitted: list[Req]  # new and continuing requests in the batch (not the riders)
    chunked_req: Req | None  # the chunked request if it did not get in (it continues next time), else None


class PrefillAdmission:
    def __init__(self, config: SchedulerConfig, kv: CacheManager, policy: SchedulePolicy,
                 max_running_requests: int, new_batch: Callable[[list[Req]], ScheduleBatch]) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        self.max_running_requests = max_running_requests
        self.new_batch = new_batch
        self.prefix_claims: dict[tuple[int, ...], Req] = {}

    def admit(self, waiting: list[Req], chunked_req: Req | None, decodes: list[Req],
              riders: list[Req]) -> Admission | None:
        """A prefill batch, or None. `decodes` are the running requests (they
        keep their KV reserve and their running slots); `riders`, those of them
        that join this batch as 1-token extends. `chunked_req` (taken from the
        caller) continues first."""
        chunk_budget = None
        if self.config.chunked_prefill_size is not None:
            chunk_budget = self.config.chunked_prefill_size - len(riders)
            if chunk_budget <= 0:
                return None
        kv = self.kv
        reserve = PrefillAdder.reserve_for_running(decodes, self.config.new_token_ratio)
        adder = PrefillAdder(
            rem_total_tokens=kv.allocator.available_size() + kv.tree_cache.evictable_size() - reserve,
            rem_input_tokens=self.config.max_prefill_tokens,
            rem_chunk_tokens=chunk_budget,
            page_size=kv.page_size,
        )
        admitted: list[Req] = []
        continuing = chunked_req
        if continuing is not None:
            continuing.init_next_round_input()
            adder.add_one_req(continuing, continuing.kv_committed_len)
            if adder.can_run:
                admitted.append(continuing)
        slots_left = self.max_running_requests - len(decodes) - len(admitted)
        # New requests only after the chunked one is in, and while it left room.
        if (continuing is None or admitted) and adder.new_chunked_req is None:
            for req in self.policy.order([r for r in waiting if self._schedulable(r)]):
                if slots_left <= 0 or kv.req_to_token_pool.available_size() <= 0:
                    break
                match = kv.match(req)
                claim = self._claim(req, len(match.indices))
                if claim is not None and claim in self.prefix_claims:
                    continue  # another request is computing this prefix: wait and share it
                result = adder.add_one_req(req, len(match.indices))
                if adder.can_run and adder.can_run[-1] is req:
                    if claim is not None:
                        self.prefix_claims[claim] = req
                        req.prefix_claim = claim
                    kv.start(req, match)
                    admitted.append(req)
                    slots_left -= 1
                if result != AddResult.CONTINUE:
                    break
        batch = self._allocate(admitted, riders, continuing)
        if batch is None:
            return None  # nothing admitted; a chunked request stays the caller's
        for req in admitted:
            if req is not continuing and req.retractions == 0:
                # Counted once the batch has its KV: an undone admission is retried.
                kv.tree_cache.record_hit(req.cached_tokens, len(req.origin_input_ids))
        left_over = continuing if continuing is not None and continuing not in admitted else None
        return Admission(batch, admitted, left_over)

    def _allocate(self, admitted: list[Req], riders: list[Req], continuing: Req | None) -> ScheduleBatch | None:
        """Allocate KV for the admitted requests (plus the riders), dropping the
        last admitted until it fits; `admitted` keeps the ones that got in.

        Admission's budget is an estimate: it counts cached prefixes as
        evictable although admitting a request locks its prefix, and leaves out
        page rounding and the riders' new pages. Retrying a batch that does
        not fit as a whole, unchanged, step after step, never made progress
        when nothing was running to free KV."""
        while admitted:
            batch = self.new_batch(list(admitted))
            self.kv.make_room(batch.new_tokens_needed(riders))
            if batch.prepare_for_extend(riders):
                return batch
            last = admitted.pop()
            if last is not continuing:  # a continuing chunk keeps its KV and goes on next time
                self.unadmit(last)
        return None

    def unadmit(self, req: Req) -> None:
        """Undo admission (`CacheManager.start` and the adder's chunk cut) for a
        request whose batch could not get KV slots: it waits again as if never
        admitted.

        fill_ids must be the whole sequence again: the adder cut it to the first
        chunk, and a request readmitted with the cut list would take the chunk
        for its whole prompt, sample from the wrong position and then decode
        past positions that never got KV (their req_to_token entries are 0 or a
        previous row owner's slots; the allocator then fails on, or silently
        shares, the page it thinks the prompt ended in)."""
        self.drop_claim(req)
        self.kv.unstart(req)
        req.extend_input_len, req.is_chunked = 0, False
        req.init_next_round_input()

    # -- prefix claims -------------------------------------------------------------

    def _claim(self, req: Req, cached: int) -> tuple[int, ...] | None:
        """The first uncached tokens of `req`, if long enough to be worth sharing."""
        if self.config.disable_radix_cache:
            return None
        claim = tuple(req.fill_ids[cached : cached + SHARED_PREFIX_CLAIM_TOKENS])
        return claim if len(claim) == SHARED_PREFIX_CLAIM_TOKENS else None

    def drop_claim(self, req: Req) -> None:
        if req.prefix_claim is not None and self.prefix_claims.get(req.prefix_claim) is req:
            del self.prefix_claims[req.prefix_claim]
        req.prefix_claim = None

    @staticmethod
    def _schedulable(req: Req) -> bool:
        # Released, not just finished: its KV must be in the cache already.
        first = req.waits_for
        return first is None or (first.finished() and first.req_pool_idx is None)
