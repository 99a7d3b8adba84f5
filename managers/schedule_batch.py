"""`Req` (one request's scheduling state) and `ScheduleBatch` (one iteration's
requests plus the KV bookkeeping that turns them into a `ForwardBatch`).

KV ownership: a request's row in `req_to_token` maps its positions to KV
slots. The first `len(prefix_indices)` of them are shared from the radix
cache (locked through `last_node`); the rest were allocated for this request
and are handed to the cache (or freed) when it finishes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from managers.io_struct import FinishReason
from managers.sampling_params import SamplingParams
from model_executor.forward_batch import ForwardBatch, ForwardMode
from sampling.logits_processors import LogitsProcessor
from sampling.plan import SamplingPlan

if TYPE_CHECKING:
    from managers.cache_manager import CacheManager

EMPTY_SLOTS = torch.empty(0, dtype=torch.int64)


def eos_token_ids_of(model_path: str, tokenizer: Any | None = None) -> frozenset[int]:
    """Every id that ends generation: generation_config.json's eos_token_id
    (an int or a list: chat models often list several) plus the tokenizer's."""
    ids: set[int] = set()
    path = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _decode_position(req: Req) -> int:
    """Position of a decoding request's new token. Every earlier position must
    have KV already: the allocator continues a mid-page sequence from the slot
    before this one, so a gap would hand it an unset (0) or stale slot."""
    position = req.seq_len - 1
    if req.kv_committed_len != position:
        raise RuntimeError(
            f"request {req.rid} decodes at position {position} but only its first "
            f"{req.kv_committed_len} positions have KV"
        )
    return position


@dataclass(eq=False)
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    # KV bookkeeping (see the module docstring).
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = EMPTY_SLOTS
    last_node: Any = None
    # Tokens whose KV is (being) computed: while waiting, the whole sequence
    # (prompt + output kept across a retraction); while admitted, possibly cut
    # to the end of the current chunk.
    fill_ids: list[int] = field(default_factory=list)
    extend_input_len: int = 0  # new tokens in this iteration's extend
    kv_committed_len: int = 0  # positions whose KV is in the pool
    is_chunked: bool = False  # mid chunked prefill
    pending_placeholder: int | None = None  # overlap: id standing for a token not yet read back
    # Outcome and accounting.
    finished_reason: FinishReason | None = None
    to_abort: bool = False
    cached_tokens: int = 0  # prompt tokens served from the radix cache (first admission)
    # Speculative decoding: steps that verified guesses, guesses accepted, and
    # the draft source's own state for this request (managers/drafts.py).
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0
    draft_state: Any = None
    retractions: int = 0
    reported_len: int = 0  # output ids already sent out
    hidden: bool = False  # internal (e.g. the prompt warm-up of an n > 1 request): never reported
    waits_for: Req | None = None  # not schedulable until this request finishes
    prefix_claim: tuple[int, ...] | None = None  # prefix this request computes for others
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # Built from the sampling params when queued (sampling/logits_processors.py).
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # Constrained decoding: the compiled grammar (a future) and when to give up on it.
    grammar: Any = None
    grammar_deadline: float = 0.0
    # Per output token: (logprob, token id), and its top alternatives.
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def seq_len(self) -> int:
        """Tokens in the sequence, counting one still being computed (overlap)."""
        pending = self.pending_placeholder is not None
        return len(self.origin_input_ids) + len(self.output_ids) + pending

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Sequence tokens [start, end) (prompt, then output) without joining the two lists."""
        prompt = len(self.origin_input_ids)
        head = self.origin_input_ids[start:min(end, prompt)] if start < prompt else []
        return head + self.output_ids[max(start - prompt, 0) : max(end - prompt, 0)]

    def last_token_id(self) -> int:
        """Input of this request's next decode step (a placeholder under overlap)."""
        if self.pending_placeholder is not None:
            return self.pending_placeholder
        return self.output_ids[-1]

    def finished(self) -> bool:
        return self.finished_reason is not None

    def init_next_round_input(self) -> None:
        """Tokens to compute KV for: the prompt plus any output kept across a retraction."""
        self.fill_ids = self.origin_input_ids + self.output_ids

    def check_finished(self, tokenizer: Any | None) -> None:
        """Stop conditions, after a new output token was appended."""
        if self.finished():
            return
        params = self.sampling_params
        if len(self.output_ids) >= params.max_new_tokens:
            self.finished_reason = FinishReason("length", params.max_new_tokens)
            return
        if len(self.output_ids) < params.min_new_tokens:
            return
        last = self.output_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            self.finished_reason = FinishReason("stop", last)
        elif params.stop_token_ids and last in params.stop_token_ids:
            self.finished_reason = FinishReason("stop", last)
        elif params.stop and tokenizer is not None:
            # Decode only the tail that could hold a stop string; a token is at
            # least one character, give or take split multi-byte characters.
            tail_tokens = max(len(s) for s in params.stop) + 4
            tail = tokenizer.decode(self.output_ids[-tail_tokens:])
            for stop in params.stop:
                if stop in tail:
                    self.finished_reason = FinishReason("stop", stop)
                    return


class ScheduleBatch:
    """Requests run together in one iteration, and their KV allocation."""

    def __init__(self, reqs: list[Req], kv: CacheManager, device: torch.device) -> None:
        self.reqs = reqs
        self.kv = kv
        self.device = device
        self.forward_mode = ForwardMode.EXTEND
        self.decoding: list[bool] = []  # per req: a 1-token decode inside a MIXED batch
        # Per req: this extend is a non-final chunk of its prompt (recorded here
        # because under overlap the request moves on before the result is read).
        self.partial_chunk: list[bool] = []
        self.out_cache_loc: torch.Tensor = EMPTY_SLOTS
        self.input_ids: list[int] | torch.Tensor = []
        self.prefix_lens: list[int] = []
        self.extend_lens: list[int] = []
        self.draft_lens: list[int] = []  # per req: guessed tokens after its last one (managers/drafts.py)

    # -- preparing an iteration ------------------------------------------------

    def prepare_for_extend(self, decode_reqs: list[Req] | None = None) -> bool:
        """Allocate KV for each request's `extend_input_len` new tokens, plus one
        for each of `decode_reqs` (running requests that join as 1-token extends:
        a MIXED batch). Returns False, allocating nothing, if slots are short."""
        decode_reqs = decode_reqs or []
        reqs = self.reqs + decode_reqs
        prefix_lens, extend_lens, input_ids = [], [], []
        for req in self.reqs:
            prefix_lens.append(req.kv_committed_len)
            extend_lens.append(req.extend_input_len)
            input_ids.extend(req.fill_ids[req.kv_committed_len : req.kv_committed_len + req.extend_input_len])
        for req in decode_reqs:
            prefix_lens.append(_decode_position(req))
            extend_lens.append(1)
            input_ids.append(req.last_token_id())
        if not self._allocate(reqs, prefix_lens, extend_lens):
            return False
        self.reqs = reqs
        self.decoding = [False] * (len(reqs) - len(decode_reqs)) + [True] * len(decode_reqs)
        self.partial_chunk = [r.is_chunked for r in self.reqs[: len(reqs) - len(decode_reqs)]]
        self.partial_chunk += [False] * len(decode_reqs)
        self.forward_mode = ForwardMode.MIXED if decode_reqs else ForwardMode.EXTEND
        self.input_ids, self.prefix_lens, self.extend_lens = input_ids, prefix_lens, extend_lens
        return True

    def prepare_for_decode(self, input_ids: list[int] | torch.Tensor, drafts: list[list[int]] | None = None) -> bool:
        """One new token per request; `input_ids` may hold overlap placeholders.
        With `drafts`, request i also feeds `drafts[i]` (guesses at its next
        tokens) to be verified: it then runs as an extend of 1 + len(drafts[i])."""
        prefix_lens = [_decode_position(req) for req in self.reqs]
        draft_lens = [len(d) for d in drafts] if drafts else [0] * len(self.reqs)
        extend_lens = [1 + d for d in draft_lens]
        if not self._allocate(self.reqs, prefix_lens, extend_lens):
            return False
        if any(draft_lens):
            ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
            input_ids = [t for last, guesses in zip(ids, drafts) for t in (last, *guesses)]
            self.forward_mode = ForwardMode.MIXED  # some sequences extend by more than one token
        else:
            self.forward_mode = ForwardMode.DECODE
        self.decoding = [True] * len(self.reqs)
        self.partial_chunk = [False] * len(self.reqs)
        self.input_ids, self.prefix_lens, self.extend_lens = input_ids, prefix_lens, extend_lens
        self.draft_lens = draft_lens
        return True

    def _allocate(self, reqs: list[Req], prefix_lens: list[int], extend_lens: list[int]) -> bool:
        slots = self.kv.extend(reqs, prefix_lens, extend_lens)
        if slots is None:
            return False
        self.out_cache_loc = slots
        return True

    def new_tokens_needed(self, decode_reqs: list[Req]) -> int:
        """Upper bound on slots `prepare_for_*` will take (page rounding included)."""
        page = self.kv.page_size
        return sum(-(-r.extend_input_len // page) * page for r in self.reqs) + page * len(decode_reqs)

    def top_logprobs_num(self) -> int:
        """What the worker must compute: -1 none, else the largest top-k asked."""
        asked = [r.top_logprobs_num for r in self.reqs if r.return_logprob]
        return max(asked) if asked else -1

    def forward_batch(self, sampling: SamplingPlan, capture_hidden: bool = False) -> ForwardBatch:
        return ForwardBatch.build(
            self.forward_mode,
            self.input_ids,
            [r.req_pool_idx for r in self.reqs],
            self.prefix_lens,
            self.extend_lens,
            self.out_cache_loc,
            self.device,
            sampling_plan=sampling,
            draft_lens=self.draft_lens or None,
            capture_hidden=capture_hidden,
        )
