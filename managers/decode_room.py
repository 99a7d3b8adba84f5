"""A decode batch of the running requests: room for one more token each
(evicting cache leaves, then retracting requests when slots are short), and
the guesses of a draft source for those that may verify them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from managers.cache_manager import CacheManager
from managers.drafts import DraftProposer, draft_room
from managers.result_processing import RequestQueues
from managers.schedule_batch import Req, ScheduleBatch

logger = logging.getLogger(__name__)


class DecodeRoom:
    def __init__(self, kv: CacheManager, queues: RequestQueues, new_batch: Callable[[list[Req]], ScheduleBatch],
                 drafter: DraftProposer | None = None,
                 share: Callable[[list[list[int]] | None], list[list[int]]] | None = None) -> None:
        """`share`: under TP with a draft model, every rank takes rank 0's drafts
        (rank 0 passes its own, the others None)."""
        self.kv = kv
        self.queues = queues
        self.new_batch = new_batch
        self.drafter = drafter
        self.share = share
        self.num_retractions = 0

    @property
    def drafting(self) -> bool:
        return self.drafter is not None or self.share is not None

    def batch(self, decodes: list[Req]) -> ScheduleBatch:
        decodes = self._ensure_room(decodes)
        batch = self.new_batch(decodes)
        inputs = torch.tensor([r.last_token_id() for r in decodes], dtype=torch.int64)
        drafts = self._drafts(decodes)
        if drafts is not None and batch.prepare_for_decode(inputs, drafts):
            return batch
        if not batch.prepare_for_decode(inputs):  # without guesses, if they did not fit
            raise RuntimeError("decode could not allocate KV after retraction")  # a bug, not load
        return batch

    def _ensure_room(self, decodes: list[Req]) -> list[Req]:
        """Evict cache leaves, then retract requests, until every decode has a slot."""
        page = self.kv.page_size
        available = self.kv.allocator.available_size
        self.kv.make_room(page * len(decodes))
        # Fewest generated tokens first (least work lost), then the longest prompt.
        order = sorted(decodes, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        while available() < page * len(decodes) and len(decodes) > 1:
            victim = order.pop(0)
            decodes.remove(victim)
            self._retract(victim)
            self.kv.make_room(page * len(decodes))
        return decodes

    def _retract(self, req: Req) -> None:
        """Free a running request's KV and queue it again with its progress."""
        self.kv.free_own_kv(req)
        self.queues.running.remove(req)
        req.retractions += 1
        self.num_retractions += 1
        req.init_next_round_input()
        self.queues.waiting.insert(0, req)
        logger.info("retracted %s after %d tokens to free KV", req.rid, len(req.output_ids))

    def _drafts(self, decodes: list[Req]) -> list[list[int]] | None:
        if not self.drafting:
            return None
        drafts = None
        if self.drafter is not None:
            rooms = [draft_room(r) for r in decodes]
            propose_many = getattr(self.drafter, "propose_many", None)  # one batched draft pass
            if propose_many is not None:
                drafts = propose_many(decodes, rooms)
            else:
                drafts = [self.drafter.propose(r, room) if room else [] for r, room in zip(decodes, rooms)]
            drafts = [d[:room] for d, room in zip(drafts, rooms)]
        if self.share is not None:
            drafts = self.share(drafts)
        return drafts if any(drafts) else None
