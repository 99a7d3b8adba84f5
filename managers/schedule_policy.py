"""Which waiting requests join the next prefill, and in what order.

Ordering (`--schedule-policy`):
- fcfs: arrival order;
- lpm: longest cached prefix first (fewest new tokens to compute, and
  requests that share a prefix run while it is cached); falls back to fcfs
  when the queue is long, since matching every request costs a tree walk each;
- dfs-weight: walk the radix tree depth first, heaviest subtree (most waiting
  requests) first, so requests sharing a prefix are admitted together.

Admission (`PrefillAdder`): a request joins while three budgets last:
- total KV tokens: free + evictable slots, minus a reserve for the running
  requests' future tokens (remaining max_new_tokens x `new_token_ratio`, an
  estimate: most requests stop early; retraction handles a wrong guess);
- input tokens (`max_prefill_tokens`) of this prefill;
- the chunk budget (`chunked_prefill_size`, less one token per running
  decode that rides along in the same MIXED batch): a prompt longer than
  what is left is cut, page aligned, and continues next iteration.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import Enum, auto

from managers.schedule_batch import Req

LPM_FALLBACK_QUEUE_LEN = 128
# Reserve at most this many future tokens per request: max_new_tokens can be
# huge while real outputs are short.
CLIP_MAX_NEW_TOKENS = 4096


class SchedulePolicy:
    def __init__(self, name: str, tree_cache) -> None:
        if name not in ("fcfs", "lpm", "dfs-weight"):
            raise ValueError(f"schedule policy must be one of fcfs, lpm, dfs-weight; got {name!r}")
        self.name = name
        self.tree_cache = tree_cache

    def order(self, waiting: list[Req]) -> list[Req]:
        if self.name == "fcfs" or (self.name == "lpm" and len(waiting) > LPM_FALLBACK_QUEUE_LEN):
            return list(waiting)
        matched = {id(r): self.tree_cache.match_prefix(r.fill_ids[:-1]) for r in waiting}
        if self.name == "lpm":
            # sorted() is stable: ties keep arrival order.
            return sorted(waiting, key=lambda r: -len(matched[id(r)].indices))
        return self._dfs_weight(waiting, {id(r): matched[id(r)].last_node for r in waiting})

    def _dfs_weight(self, waiting: list[Req], last_node: dict[int, object]) -> list[Req]:
        by_node: dict[int, list[Req]] = defaultdict(list)
        weight: dict[int, int] = defaultdict(int)
        children: dict[int, list] = defaultdict(list)
        for req in waiting:
            node = last_node[id(req)]
            by_node[id(node)].append(req)
            # Count the request on every node up to the root.
            while node is not None:
                if weight[id(node)] == 0 and node.parent is not None:
                    children[id(node.parent)].append(node)
                weight[id(node)] += 1
                node = node.parent
        root = self.tree_cache.root_node
        ordered: list[Req] = []
        stack = [root]
        while stack:
            node = stack.pop()
            ordered.extend(by_node.get(id(node), []))
            # Heaviest child last on the stack, so it is visited first.
            stack.extend(sorted(children.get(id(node), []), key=lambda c: weight[id(c)]))
        return ordered


class AddResult(Enum):
    CONTINUE = auto()
    NO_TOKEN = auto()  # out of KV budget: stop admitting
    OTHER = auto()  # out of input/chunk budget: stop admitting


@dataclass
class PrefillAdder:
    rem_total_tokens: int
    rem_input_tokens: int
    rem_chunk_tokens: int | None  # None: chunked prefill disabled
    page_size: int

    def __post_init__(self) -> None:
        self.can_run: list[Req] = []
        self.new_chunked_req: Req | None = None

    @staticmethod
    def reserve_for_running(running: list[Req], new_token_ratio: float) -> int:
        return sum(
            int(min(r.sampling_params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS) * new_token_ratio)
            for r in running
        )

    def add_one_req(self, req: Req, prefix_len: int) -> AddResult:
        """Admit `req`, whose first `prefix_len` fill tokens are cached (or
        already computed, for a chunked request coming back)."""
        new_tokens = len(req.fill_ids) - prefix_len
        future = min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        if new_tokens + future > self.rem_total_tokens:
            return AddResult.NO_TOKEN
        if new_tokens > self.rem_input_tokens and self.can_run:
            return AddResult.OTHER
        if self.rem_chunk_tokens is not None and new_tokens > self.rem_chunk_tokens:
            chunk = self.rem_chunk_tokens // self.page_size * self.page_size
            if chunk <= 0:
                return AddResult.OTHER
            req.extend_input_len = chunk
            req.is_chunked = True
            # fill_ids covers what will have KV after this chunk (the radix
            # cache reads it as "computed so far").
            req.fill_ids = req.fill_ids[: prefix_len + chunk]
            self.new_chunked_req = req
            self._take(req, chunk, 0)
            return AddResult.OTHER  # the chunk used the rest of the budget
        req.extend_input_len = new_tokens
        req.is_chunked = False
        self._take(req, new_tokens, future)
        return AddResult.CONTINUE

    def _take(self, req: Req, new_tokens: int, future: int) -> None:
        self.can_run.append(req)
        self.rem_total_tokens -= new_tokens + future
        self.rem_input_tokens -= new_tokens
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= new_tokens
