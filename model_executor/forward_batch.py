"""`ForwardBatch`: one model step's inputs, as tensors only.

The scheduler turns its requests into this; the model runner, the model and
the attention backend read it. Nothing here knows about requests.

Token layout: the new tokens of all sequences, concatenated in batch order
(`input_ids`, `positions`, `out_cache_loc` are [num_tokens]). Sequence i has
`extend_prefix_lens[i]` tokens already in the KV cache and
`extend_seq_lens[i]` new ones; its total length is `seq_lens[i]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from layers.attention.base import AttentionBackend
    from layers.sampler import SamplingBatchInfo
    from sampling.plan import SamplingPlan
    from mem_cache.memory_pool import KVPool, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill, possibly on top of a cached prefix
    DECODE = auto()  # exactly one new token per sequence
    MIXED = auto()  # extends and decodes in one batch (decodes are 1-token extends)
    IDLE = auto()  # nothing to run on this rank (TP/DP padding)

    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [B] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [B] int64, lengths after this step
    extend_prefix_lens: torch.Tensor  # [B] int64
    extend_seq_lens: torch.Tensor  # [B] int64
    # Host copies: backends size their metadata from these without a device sync.
    req_pool_indices_cpu: list[int]
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    # How to sample: explicit inputs (offline callers), or the scheduler's
    # plan over the rows the worker keeps (sampling/); neither: greedy.
    sampling_info: SamplingBatchInfo | None = None
    sampling_plan: SamplingPlan | None = None
    # Per sequence, how many of its new tokens are drafted guesses to verify
    # (sampling/verify.py); None when no sequence has any.
    draft_lens_cpu: list[int] | None = None
    # Logits for every new token instead of only the last of each sequence
    # (prompt logprobs; parity tests).
    return_all_logits: bool = False
    # Speculative decoding with an EAGLE head: the target hands back its
    # final hidden state at every new token (`capture_hidden`), and the head
    # takes such states as input next to the tokens (`spec_hidden`).
    capture_hidden: bool = False
    spec_hidden: torch.Tensor | None = None  # [num_tokens, hidden]
    # Filled in by the model runner just before the forward.
    req_to_token_pool: ReqToTokenPool | None = None
    kv_pool: KVPool | None = None
    attn_backend: AttentionBackend | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        forward_mode: ForwardMode,
        input_ids: Sequence[int] | torch.Tensor,
        req_pool_indices: Sequence[int],
        prefix_lens: Sequence[int],
        extend_lens: Sequence[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str,
        sampling_info: SamplingBatchInfo | None = None,
        return_all_logits: bool = False,
        sampling_plan: SamplingPlan | None = None,
        draft_lens: Sequence[int] | None = None,
        capture_hidden: bool = False,
        spec_hidden: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """Derive positions and lengths from per-sequence prefix/extend lengths."""
        if forward_mode.is_decode() and any(n != 1 for n in extend_lens):
            raise ValueError("DECODE batches extend every sequence by exactly one token")
        prefix_lens = list(prefix_lens)
        extend_lens = list(extend_lens)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        positions = _positions(prefix_lens, extend_lens)
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(list(input_ids), dtype=torch.int64)
        if input_ids.shape[0] != positions.shape[0]:
            raise ValueError(
                f"{input_ids.shape[0]} input ids for {positions.shape[0]} new positions"
            )

        def to_device(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
            return ints_to_device(values, device)

        return cls(
            forward_mode=forward_mode,
            batch_size=len(seq_lens),
            input_ids=to_device(input_ids),
            positions=to_device(positions),
            out_cache_loc=to_device(out_cache_loc),
            req_pool_indices=to_device(list(req_pool_indices)),
            seq_lens=to_device(seq_lens),
            extend_prefix_lens=to_device(prefix_lens),
            extend_seq_lens=to_device(extend_lens),
            req_pool_indices_cpu=list(req_pool_indices),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=extend_lens,
            sampling_info=sampling_info,
            sampling_plan=sampling_plan,
            draft_lens_cpu=list(draft_lens) if draft_lens is not None and any(draft_lens) else None,
            return_all_logits=return_all_logits,
            capture_hidden=capture_hidden,
            spec_hidden=spec_hidden,
        )


def ints_to_device(values: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host integers as an int64 tensor on `device`, without waiting for the
    GPU: from pinned memory a non_blocking copy really is asynchronous, from
    pageable memory it would wait."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, torch.int64, non_blocking=True)


def _positions(prefix_lens: list[int], extend_lens: list[int]) -> torch.Tensor:
    """Positions of the new tokens: prefix_len[i] .. seq_len[i]-1 for each i,
    concatenated (vectorised: a decode batch of hundreds builds this each step)."""
    start = torch.tensor(prefix_lens, dtype=torch.int64)
    if all(n == 1 for n in extend_lens):  # a decode step: each new token sits at its prefix length
        return start
    extend = torch.tensor(extend_lens, dtype=torch.int64)
    first_token = torch.cumsum(extend, 0) - extend  # index of each sequence's first new token
    offset_in_seq = torch.arange(int(extend.sum())) - torch.repeat_interleave(first_token, extend)
    return torch.repeat_interleave(start, extend) + offset_in_seq
