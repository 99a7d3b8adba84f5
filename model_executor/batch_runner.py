"""Drive a ModelRunner over a fixed set of token sequences.

No scheduler, no admission policy: the caller says which sequences to extend
with which tokens. Used by `benchmark/bench_one_batch.py` and the parity
tests; the scheduler builds its own batches from the same primitives
(`ReqToTokenPool`, the allocator, `ForwardBatch.build`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from layers.logits_processor import LogitsProcessorOutput
from layers.sampler import SamplingBatchInfo
from mem_cache.allocator import last_slots_mid_page
from model_executor.forward_batch import ForwardBatch, ForwardMode
from model_executor.model_runner import ModelRunner


@dataclass
class _Sequence:
    row: int  # req_to_token row
    length: int = 0
    owned_slots: list[torch.Tensor] = field(default_factory=list)  # freed on release


class BatchRunner:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sequences: dict[int, _Sequence] = {}
        self._next_id = 0

    def add_sequence(self, share_prefix_of: int | None = None, prefix_len: int = 0) -> int:
        """A new empty sequence, optionally starting on another one's first
        `prefix_len` cached tokens (shared KV, not copied: what a radix-cache
        hit does). The shared length must be page aligned so that the new
        sequence never writes into a page it does not own."""
        rows = self.runner.req_to_token_pool.alloc(1)
        if rows is None:
            raise RuntimeError("no free request slot")
        seq = _Sequence(row=rows[0])
        if share_prefix_of is not None and prefix_len:
            page = self.runner.config.page_size
            if prefix_len % page:
                raise ValueError(f"shared prefix length {prefix_len} is not a multiple of page size {page}")
            src = self.sequences[share_prefix_of]
            table = self.runner.req_to_token_pool.req_to_token
            table[seq.row, :prefix_len] = table[src.row, :prefix_len]
            seq.length = prefix_len
        seq_id = self._next_id
        self._next_id += 1
        self.sequences[seq_id] = seq
        return seq_id

    def extend(
        self,
        seq_ids: Sequence[int],
        new_tokens: Sequence[Sequence[int]],
        sampling_info: SamplingBatchInfo | None = None,
        return_all_logits: bool = False,
        spec_hidden: torch.Tensor | None = None,
        draft_lens: Sequence[int] | None = None,
        capture_hidden: bool = False,
    ) -> tuple[LogitsProcessorOutput, ForwardBatch]:
        """Append `new_tokens[i]` to sequence `seq_ids[i]` and run the model.
        `draft_lens[i]`: how many of those are guesses to verify (the logits
        verification reads come back in `verify_logits`).

        A sequence that gets one token on top of a cached prefix is decoding;
        the batch runs as DECODE if all are, MIXED if some are, else EXTEND.
        """
        seqs = [self.sequences[i] for i in seq_ids]
        prefix_lens = [s.length for s in seqs]
        extend_lens = [len(t) for t in new_tokens]
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        table = self.runner.req_to_token_pool.req_to_token
        # Where a sequence's cached tokens end inside a page, the allocator
        # continues that page from its last slot.
        rows = [s.row for s in seqs]
        last_locs = last_slots_mid_page(table, rows, prefix_lens, self.runner.config.page_size)
        slots = self.runner.token_to_kv_pool_allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
        if slots is None:
            raise RuntimeError("out of KV cache slots")
        self.runner.req_to_token_pool.write_slots(rows, prefix_lens, extend_lens, slots)
        offset = 0
        for seq, n in zip(seqs, extend_lens):
            seq.owned_slots.append(slots[offset : offset + n])
            seq.length += n
            offset += n
        batch = ForwardBatch.build(
            _mode_for(prefix_lens, extend_lens),
            [t for tokens in new_tokens for t in tokens],
            [s.row for s in seqs],
            prefix_lens,
            extend_lens,
            slots,
            self.runner.device,
            sampling_info=sampling_info,
            return_all_logits=return_all_logits,
            spec_hidden=spec_hidden,
            draft_lens=draft_lens,
            capture_hidden=capture_hidden,
        )
        return self.runner.forward(batch), batch

    def truncate(self, seq_id: int, length: int) -> None:
        """Drop the sequence's tokens from `length` on, giving their KV slots
        back (a draft model's rejected guesses). Page size 1 only: a cut
        inside a page would leave it half owned."""
        if self.runner.config.page_size != 1:
            raise ValueError("truncate needs page size 1")
        seq = self.sequences[seq_id]
        if length >= seq.length:
            return
        table = self.runner.req_to_token_pool.req_to_token
        dropped = table[seq.row, length : seq.length].to(torch.int64)
        owned = torch.cat(seq.owned_slots) if seq.owned_slots else dropped[:0]
        if not torch.isin(dropped, owned).all():
            raise ValueError("cannot truncate into a shared prefix")
        self.runner.token_to_kv_pool_allocator.free(dropped.to(owned.device))
        kept = owned[~torch.isin(owned, dropped.to(owned.device))]
        seq.owned_slots = [kept] if kept.numel() else []
        seq.length = length

    def release(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id)
        if seq.owned_slots:
            self.runner.token_to_kv_pool_allocator.free(torch.cat(seq.owned_slots))
        self.runner.req_to_token_pool.free(seq.row)

    def release_all(self) -> None:
        for seq_id in list(self.sequences):
            self.release(seq_id)


def _mode_for(prefix_lens: list[int], extend_lens: list[int]) -> ForwardMode:
    decoding = [n == 1 and p > 0 for p, n in zip(prefix_lens, extend_lens)]
    if all(decoding):
        return ForwardMode.DECODE
    return ForwardMode.MIXED if any(decoding) else ForwardMode.EXTEND
