"""From final hidden states to the logits the sampler needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from layers.embedding import ParallelLMHead

if TYPE_CHECKING:
    from model_executor.forward_batch import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [B, vocab] float32, last new token of each sequence
    all_logits: torch.Tensor | None = None  # [num_tokens, vocab] when the batch asks for it
    # Rows with drafted tokens: logits at their last input token and every
    # draft but the last, rows in batch order (sampling/verify.py).
    verify_logits: torch.Tensor | None = None  # [sum(draft_lens), vocab]
    # The model's final hidden state at every new token, when the batch
    # captures it (ForwardBatch.capture_hidden: an EAGLE head's input).
    hidden_states: torch.Tensor | None = None  # [num_tokens, hidden]


def draft_positions(extend_lens: list[int], draft_lens: list[int]) -> tuple[list[int], list[int]]:
    """Indices (into the batch's new tokens) whose logits verification needs,
    split into (each row's last position, every drafted row's earlier ones)."""
    last, earlier, end = [], [], 0
    for n, d in zip(extend_lens, draft_lens):
        end += n
        earlier.extend(range(end - 1 - d, end - 1))
        last.append(end - 1)
    return last, earlier


class LogitsProcessor(nn.Module):
    def forward(
        self, hidden: torch.Tensor, lm_head: ParallelLMHead, batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        if batch.return_all_logits:
            all_logits = lm_head.compute_logits(hidden).float()
            last = torch.cumsum(batch.extend_seq_lens, 0) - 1
            return LogitsProcessorOutput(all_logits[last], all_logits)
        if batch.draft_lens_cpu is not None:
            last, earlier = draft_positions(batch.extend_seq_lens_cpu, batch.draft_lens_cpu)
            index = torch.tensor(last + earlier, dtype=torch.int64).to(hidden.device, non_blocking=True)
            logits = lm_head.compute_logits(hidden[index]).float()
            return LogitsProcessorOutput(logits[: len(last)], verify_logits=logits[len(last) :])
        if batch.forward_mode.is_decode():
            last_hidden = hidden  # one token per sequence already
        else:
            # Only the last position of each sequence feeds sampling: skip the
            # (large) vocab projection for every other prompt token.
            last_hidden = hidden[torch.cumsum(batch.extend_seq_lens, 0) - 1]
        return LogitsProcessorOutput(lm_head.compute_logits(last_hidden).float())
