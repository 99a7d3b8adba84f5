"""A batch's sampler inputs, from its requests' parameters and histories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from layers.sampler import SamplingBatchInfo


class SamplingParamsLike(Protocol):
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    seed: int | None


def is_greedy(p: SamplingParamsLike) -> bool:
    return p.temperature == 0 or p.top_k == 1


def effective_top_k(p: SamplingParamsLike, vocab_size: int) -> int:
    return vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size)


def uses_counts(p: SamplingParamsLike) -> bool:
    """Needs the per-token counts of its history (any penalty)."""
    return p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1


@dataclass(frozen=True)
class SamplingFlags:
    """What a batch's rows use, decided on the host from their parameters so
    the sampler can skip whole stages without reading the device."""

    is_all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    frequency: bool
    presence: bool
    repetition: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParamsLike], vocab_size: int) -> SamplingFlags:
        sampled = [p for p in params if not is_greedy(p)]
        return cls(
            is_all_greedy=not sampled,
            need_top_k=any(effective_top_k(p, vocab_size) < vocab_size for p in sampled),
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
            frequency=any(p.frequency_penalty != 0 for p in params),
            presence=any(p.presence_penalty != 0 for p in params),
            repetition=any(p.repetition_penalty != 1 for p in params),
        )

    @property
    def penalised(self) -> bool:
        return self.frequency or self.presence or self.repetition


def column(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)


def token_counts(ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[len(ids), vocab_size] int32 count of each token in each row's ids."""
    counts = torch.zeros((len(ids), vocab_size), dtype=torch.int32, device=device)
    rows, cols = flat_index(ids)
    if cols.numel():
        counts.index_put_((rows.to(device), cols.to(device)), torch.ones(len(cols), dtype=torch.int32, device=device),
                          accumulate=True)
    return counts


def flat_index(ids: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """(row index, token id) of every token of `ids`, as host int64 tensors;
    row i is `rows[i]` when given."""
    rows = range(len(ids)) if rows is None else rows
    r = torch.tensor([row for row, seq in zip(rows, ids) for _ in seq], dtype=torch.int64)
    c = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64)
    return r, c


def build_sampling_info(
    params: Sequence[SamplingParamsLike],
    vocab_size: int,
    device: torch.device | str,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
) -> SamplingBatchInfo:
    """Sampler inputs for `params` (one per row) from scratch, penalty counts
    from the rows' prompts (repetition) and outputs (all penalties)."""
    device = torch.device(device)
    b = len(params)
    for name, ids in (("prompt_ids", prompt_ids), ("output_ids", output_ids)):
        if ids is not None and len(ids) != b:
            raise ValueError(f"{name} has {len(ids)} rows for {b} params")
    prompt_ids = prompt_ids or [()] * b
    output_ids = output_ids or [()] * b
    flags = SamplingFlags.of(params, vocab_size)
    f32 = torch.float32
    info = SamplingBatchInfo(
        temperatures=column([1.0 if is_greedy(p) else float(p.temperature) for p in params], f32, device),
        top_ps=column([float(p.top_p) for p in params], f32, device),
        top_ks=column([effective_top_k(p, vocab_size) for p in params], torch.int64, device),
        min_ps=column([float(p.min_p) for p in params], f32, device),
        greedy_mask=torch.tensor([is_greedy(p) for p in params], dtype=torch.bool, device=device),
        seeds=[p.seed for p in params],
        output_lens=[len(o) for o in output_ids],
        vocab_size=vocab_size,
        is_all_greedy=flags.is_all_greedy,
        need_top_k=flags.need_top_k,
        need_top_p=flags.need_top_p,
        need_min_p=flags.need_min_p,
    )
    if flags.frequency:
        info.frequency_penalties = column([float(p.frequency_penalty) for p in params], f32, device)
    if flags.presence:
        info.presence_penalties = column([float(p.presence_penalty) for p in params], f32, device)
    if flags.frequency or flags.presence:
        info.output_token_counts = token_counts(output_ids, vocab_size, device)
    if flags.repetition:
        info.repetition_penalties = column([float(p.repetition_penalty) for p in params], f32, device)
        both = [[*p, *o] for p, o in zip(prompt_ids, output_ids)]
        info.seen_tokens = token_counts(both, vocab_size, device) > 0
    return info


def record_tokens(info: SamplingBatchInfo, next_token_ids: Tensor) -> None:
    """Count one just-sampled token per row into `info` (offline callers that
    reuse one info across steps); no host/device sync."""
    ids = next_token_ids.view(-1, 1).to(torch.int64)
    if info.output_token_counts is not None:
        info.output_token_counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=info.output_token_counts.dtype))
    if info.seen_tokens is not None:
        info.seen_tokens.scatter_(1, ids, True)
    info.output_lens = [n + 1 for n in info.output_lens]
