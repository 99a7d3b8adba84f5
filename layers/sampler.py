"""Batched token sampling with per-request parameters.

Semantics (the tests check these exactly):

1. Penalties, on a float32 copy of the logits (the input is never modified):
   - repetition_penalty ``rp`` (HF/CTRL) for every token in ``seen_tokens``
     (prompt + generated): ``logit > 0 -> logit / rp``, else ``logit * rp``;
   - then ``logit -= frequency_penalty * count`` and
     ``logit -= presence_penalty * (count > 0)``, where ``count`` counts the token
     in the *generated* output only;
   - then the logits processors' output: ``logit += bias`` and banned tokens
     set to ``-inf`` (a row that bans every token keeps them all), and tokens
     a grammar's bitmask does not allow set to ``-inf``.
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

Only the kernels live here; which rows carry which parameters, penalty counts
and logits processors is `sampling/`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_SEED_MASK = (1 << 63) - 1


@dataclass
class SamplingBatchInfo:
    """One batch's sampling inputs, row-aligned with the logits. Built by
    `sampling/` (from the rows the scheduler keeps on the device, or from
    scratch for offline callers); read here only."""

    temperatures: Tensor  # [B, 1] float32; 1.0 on greedy rows so division is safe
    top_ps: Tensor  # [B, 1] float32
    top_ks: Tensor  # [B, 1] int64; vocab_size when disabled
    min_ps: Tensor  # [B, 1] float32
    greedy_mask: Tensor  # [B] bool
    seeds: list[int | None]
    output_lens: list[int]  # tokens generated so far; part of the per-step seed
    vocab_size: int
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
    # Logits processors' output (sampling/logits_processors.py), after penalties.
    logit_bias: Tensor | None = None  # [B, V] float32, added
    banned: Tensor | None = None  # [B, V] bool, these tokens cannot be sampled
    # Grammars' allowed tokens, 32 per int32 word (xgrammar's layout, bit set = allowed).
    allowed_bitmask: Tensor | None = None  # [B, ceil(V / 32)] int32

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def adjusts_logits(self) -> bool:
        """Anything to do before temperature (else greedy rows are a plain argmax)."""
        return not (
            self.repetition_penalties is None
            and self.frequency_penalties is None
            and self.presence_penalties is None
            and self.logit_bias is None
            and self.banned is None
            and self.allowed_bitmask is None
        )


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


def adjust_logits(logits: Tensor, info: SamplingBatchInfo) -> Tensor:
    """Penalties, then the logits processors' bias and bans (float32 copy)."""
    out = apply_penalties(logits, info)
    if info.logit_bias is not None:
        out += info.logit_bias
    if info.banned is not None:
        # A row with every token banned keeps them all: something must be sampled.
        banned = info.banned & ~info.banned.all(dim=-1, keepdim=True)
        out.masked_fill_(banned, float("-inf"))
    if info.allowed_bitmask is not None:
        apply_allowed_bitmask(out, info.allowed_bitmask)
    return out


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[B, words] int32 -> [B, vocab_size] bool (bit j of word w is token 32 w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_allowed_bitmask(logits: Tensor, bitmask: Tensor) -> None:
    """Set every token a row's bitmask does not allow to -inf, in place. (A
    flat ~2 ms for 32 x 32k on this CPU; xgrammar's own CPU kernel costs per
    banned token: 0.6 ms when most are allowed, 3.7 ms in JSON states that
    allow a few: benchmark/RESULTS.md.)"""
    logits.masked_fill_(~unpack_bitmask(bitmask.to(logits.device), logits.shape[-1]), float("-inf"))


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
        adjusts = info.adjusts_logits
        if info.is_all_greedy and not adjusts:
            return logits.argmax(dim=-1)
        logits = adjust_logits(logits, info) if adjusts else logits.float()
        greedy_ids = logits.argmax(dim=-1)
        if info.is_all_greedy:
            return greedy_ids
        probs = torch.softmax(logits / info.temperatures, dim=-1)
        probs = _filter_probs(probs, info)
        sampled_ids = (probs / _exponential_noise(probs, info)).argmax(dim=-1)
        return torch.where(info.greedy_mask, greedy_ids, sampled_ids)
