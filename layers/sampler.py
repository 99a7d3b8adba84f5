"""Batched token sampling with per-request parameters.

Semantics (the tests check these exactly):

1. Penalties, on a float32 copy of the logits (the input is never modified):
   - repetition_penalty ``rp`` (HF/CTRL) for every token in ``seen_tokens``
     (prompt + generated): ``logit > 0 -> logit / rp``, else ``logit * rp``;
   - then ``logit -= frequency_penalty * count`` and
     ``logit -= presence_penalty * (count > 0)``, where ``count`` counts the token
     in the *generated* output only.
2. Greedy rows (temperature == 0 or top_k == 1) take ``argmax`` of the penalised
   logits.
3. Other rows: ``softmax(logits / temperature)`` in float32, then top_k, then top_p
   on the distribution top_k left (keep the smallest prefix of the sorted tokens
   whose cumulative probability >= top_p; the top token always stays), then min_p
   (drop tokens with ``prob < min_p * max_prob``). Each filter sees the renormalised
   result of the previous one, like HF's warper chain.
4. Sampling is an exponential race, ``argmax(probs / q)`` with ``q ~ Exp(1)``: one
   batched op, and it needs no renormalisation because the argmax is scale-free.
   A row with a seed draws its ``q`` from a generator seeded with
   ``(seed * 1_000_003 + output_len) & (2**63 - 1)``, so the same seed and logits
   give the same tokens whatever the batch composition or row position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

_SEED_MASK = (1 << 63) - 1
# Every per-row tensor of SamplingBatchInfo, for filter/merge.
_ROW_TENSORS = (
    "temperatures", "top_ps", "top_ks", "min_ps", "greedy_mask", "frequency_penalties",
    "presence_penalties", "repetition_penalties", "output_token_counts", "seen_tokens",
)  # fmt: skip


class SamplingParamsLike(Protocol):
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    seed: int | None


class _HostRow(NamedTuple):
    """Host copy of a row's scalars: filter/merge recompute flags without a device sync."""

    greedy: bool
    top_k: int  # already mapped to vocab_size when disabled
    top_p: float
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float


def _row_tensor(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)


@dataclass
class SamplingBatchInfo:
    temperatures: Tensor  # [B, 1] float32; 1.0 on greedy rows so division is safe
    top_ps: Tensor  # [B, 1] float32
    top_ks: Tensor  # [B, 1] int64; vocab_size when disabled
    min_ps: Tensor  # [B, 1] float32
    greedy_mask: Tensor  # [B] bool
    seeds: list[int | None]
    output_lens: list[int]  # tokens generated so far; part of the per-step seed
    vocab_size: int
    host_rows: list[_HostRow] = field(repr=False)
    # Flags and penalty state below are derived from host_rows by _refresh().
    is_all_greedy: bool = True
    need_top_p: bool = False
    need_top_k: bool = False
    need_min_p: bool = False
    # None when no row of the batch uses them (the common fast path).
    frequency_penalties: Tensor | None = None  # [B, 1] float32
    presence_penalties: Tensor | None = None  # [B, 1] float32
    repetition_penalties: Tensor | None = None  # [B, 1] float32
    output_token_counts: Tensor | None = None  # [B, V] int32, generated tokens only
    seen_tokens: Tensor | None = None  # [B, V] bool, prompt + generated tokens

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParamsLike],
        vocab_size: int,
        device: torch.device | str,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        output_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingBatchInfo:
        device = torch.device(device)
        for name, ids in (("prompt_ids", prompt_ids), ("output_ids", output_ids)):
            if ids is not None and len(ids) != len(params):
                raise ValueError(f"{name} has {len(ids)} rows for {len(params)} params")
        rows = [
            _HostRow(
                p.temperature == 0 or p.top_k == 1,
                vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size),
                *map(float, (p.top_p, p.min_p, p.frequency_penalty)),
                *map(float, (p.presence_penalty, p.repetition_penalty)),
            )
            for p in params
        ]
        f32 = torch.float32
        temps = [1.0 if r.greedy else float(p.temperature) for r, p in zip(rows, params)]
        info = cls(
            temperatures=_row_tensor(temps, f32, device),
            top_ps=_row_tensor([r.top_p for r in rows], f32, device),
            top_ks=_row_tensor([r.top_k for r in rows], torch.int64, device),
            min_ps=_row_tensor([r.min_p for r in rows], f32, device),
            greedy_mask=torch.tensor([r.greedy for r in rows], dtype=torch.bool, device=device),
            seeds=[p.seed for p in params],
            output_lens=[len(o) for o in output_ids] if output_ids else [0] * len(rows),
            vocab_size=vocab_size,
            host_rows=rows,
        )
        info._refresh(prompt_ids, output_ids)
        return info

    def __len__(self) -> int:
        return len(self.host_rows)

    def _refresh(
        self,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        output_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Recompute flags from host rows; create or drop penalty state to match."""
        rows, b, v = self.host_rows, len(self.host_rows), self.vocab_size
        device = self.temperatures.device
        sampled = [r for r in rows if not r.greedy]
        self.is_all_greedy = not sampled
        self.need_top_k = any(r.top_k < v for r in sampled)
        self.need_top_p = any(r.top_p < 1.0 for r in sampled)
        self.need_min_p = any(r.min_p > 0.0 for r in sampled)

        def per_row(current: Tensor | None, name: str, neutral: float) -> Tensor | None:
            values = [getattr(r, name) for r in rows]
            if all(x == neutral for x in values):
                return None
            if current is not None:  # filter/merge already kept it row-aligned
                return current
            return _row_tensor(values, torch.float32, device)

        self.frequency_penalties = per_row(self.frequency_penalties, "frequency_penalty", 0.0)
        self.presence_penalties = per_row(self.presence_penalties, "presence_penalty", 0.0)
        self.repetition_penalties = per_row(self.repetition_penalties, "repetition_penalty", 1.0)

        if self.frequency_penalties is None and self.presence_penalties is None:
            self.output_token_counts = None
        elif self.output_token_counts is None:
            self.output_token_counts = _scatter_ids(output_ids, b, v, torch.int32, device)
        if self.repetition_penalties is None:
            self.seen_tokens = None
        elif self.seen_tokens is None:
            both = [[*(prompt_ids or [()] * b)[i], *(output_ids or [()] * b)[i]] for i in range(b)]
            self.seen_tokens = _scatter_ids(both, b, v, torch.int32, device) > 0

    def update(self, next_token_ids: Tensor) -> None:
        """Record the tokens just sampled (one per row); no host/device sync."""
        ids = next_token_ids.view(-1, 1).to(torch.int64)
        if self.output_token_counts is not None:
            ones = torch.ones_like(ids, dtype=self.output_token_counts.dtype)
            self.output_token_counts.scatter_add_(1, ids, ones)
        if self.seen_tokens is not None:
            self.seen_tokens.scatter_(1, ids, True)
        self.output_lens = [n + 1 for n in self.output_lens]

    def filter(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order)."""
        index = torch.tensor(keep, dtype=torch.int64, device=self.temperatures.device)
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        self.seeds = [self.seeds[i] for i in keep]
        self.output_lens = [self.output_lens[i] for i in keep]
        self.host_rows = [self.host_rows[i] for i in keep]
        self._refresh()  # drops penalty state no remaining row uses

    def merge(self, other: SamplingBatchInfo) -> None:
        """Append ``other``'s rows after this batch's rows."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size mismatch: {self.vocab_size} vs {other.vocab_size}")
        b_self, b_other = len(self), len(other)
        for name in _ROW_TENSORS:
            a, c = getattr(self, name), getattr(other, name)
            if a is None and c is None:
                continue
            # A side without the state has only neutral rows (penalty 0 / rp 1), so
            # zero counts for them change nothing.
            if a is None:
                a = _neutral_like(name, c, b_self)
            if c is None:
                c = _neutral_like(name, a, b_other)
            setattr(self, name, torch.cat([a, c], dim=0))
        self.seeds = self.seeds + other.seeds
        self.output_lens = self.output_lens + other.output_lens
        self.host_rows = self.host_rows + other.host_rows
        self._refresh()


def _neutral_like(name: str, like: Tensor, rows: int) -> Tensor:
    fill = 1.0 if name == "repetition_penalties" else 0
    return torch.full((rows, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)


def _scatter_ids(
    ids: Sequence[Sequence[int]] | None, b: int, v: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """[b, v] per-row token counts of ``ids`` (zeros when ``ids`` is None)."""
    counts = torch.zeros((b, v), dtype=dtype, device=device)
    if ids and any(ids):
        r = torch.tensor([i for i, seq in enumerate(ids) for _ in seq], device=device)
        c = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64, device=device)
        counts.index_put_((r, c), torch.ones_like(c, dtype=dtype), accumulate=True)
    return counts


def apply_penalties(logits: Tensor, info: SamplingBatchInfo) -> Tensor:
    """Float32 penalised copy of ``logits``; the input is left untouched."""
    out = logits.to(torch.float32, copy=True)
    if info.repetition_penalties is not None and info.seen_tokens is not None:
        rp = info.repetition_penalties
        penalised = torch.where(out > 0, out / rp, out * rp)
        out = torch.where(info.seen_tokens, penalised, out)
    counts = info.output_token_counts
    if counts is not None:
        if info.frequency_penalties is not None:
            out -= info.frequency_penalties * counts
        if info.presence_penalties is not None:
            out -= info.presence_penalties * (counts > 0)
    return out


def _filter_probs(probs: Tensor, info: SamplingBatchInfo) -> Tensor:
    """Zero out tokens removed by top_k / top_p / min_p (not renormalised)."""
    if info.need_top_k or info.need_top_p:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
        keep = ranks < info.top_ks  # all-true on rows where top_k is disabled
        if info.need_top_p:
            kept = sorted_probs * keep
            cum = kept.cumsum(dim=-1)
            # Compare the mass before each token with top_p of the mass top_k left,
            # i.e. top_p on the renormalised top_k distribution.
            before = cum - kept
            drop = (before >= info.top_ps * cum[:, -1:]) & (info.top_ps < 1.0)
            # The top token always stays: a top_p that underflows float32
            # (1e-46) would otherwise drop every token.
            drop[:, 0] = False
            keep &= ~drop
        # Back to vocab order so seeded noise is indexed by token id, not by rank.
        mask = torch.zeros_like(keep).scatter_(1, sorted_idx, keep)
        probs = probs.masked_fill(~mask, 0.0)
    if info.need_min_p:
        # The top token survives every filter, so the max is unchanged by them.
        threshold = probs.amax(dim=-1, keepdim=True) * info.min_ps
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _exponential_noise(probs: Tensor, info: SamplingBatchInfo) -> Tensor:
    q = torch.empty_like(probs).exponential_()
    for row, seed in enumerate(info.seeds):
        if seed is None:
            continue
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((seed * 1_000_003 + info.output_lens[row]) & _SEED_MASK)
        q[row].exponential_(generator=gen)
    # exponential_ may return exactly 0; keep kept tokens finite and dropped ones at 0.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


class Sampler(torch.nn.Module):
    def forward(self, logits: Tensor, info: SamplingBatchInfo) -> Tensor:
        """``logits`` [B, vocab_size] (padding sliced off), any float dtype -> [B] int64."""
        has_penalties = (
            info.repetition_penalties is not None
            or info.frequency_penalties is not None
            or info.presence_penalties is not None
        )
        if info.is_all_greedy and not has_penalties:
            return logits.argmax(dim=-1)
        logits = apply_penalties(logits, info) if has_penalties else logits.float()
        greedy_ids = logits.argmax(dim=-1)
        if info.is_all_greedy:
            return greedy_ids
        probs = torch.softmax(logits / info.temperatures, dim=-1)
        probs = _filter_probs(probs, info)
        sampled_ids = (probs / _exponential_noise(probs, info)).argmax(dim=-1)
        return torch.where(info.greedy_mask, greedy_ids, sampled_ids)
