"""What a step hands back to the scheduler: the executor contract.

Each row of the batch produced one token, or, when it verified drafted
tokens (sampling/verify.py), several: `token_ids` holds them all, flattened
in batch order, and `num_tokens` says how many belong to each row (None: one
each, the plain path). Under overlap the next batch's placeholder for a row
stands for the row's last token (`last_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class StepResult:
    token_ids: torch.Tensor  # [T], T = B when num_tokens is None
    num_tokens: list[int] | None = None  # per row; host values
    # Only when the batch asked for logprobs (`top_logprobs_num` >= 0), one
    # per token: log-softmax of the model's raw logits (before temperature,
    # penalties and processors) at the token, and the top-k.
    token_logprobs: torch.Tensor | None = None  # [T]
    top_logprobs: torch.Tensor | None = None  # [T, K]
    top_ids: torch.Tensor | None = None  # [T, K]
    # The target's final hidden state at each new token of the batch, when it
    # was captured (an EAGLE head's input); stays on the device.
    hidden_states: torch.Tensor | None = None  # [num_tokens, hidden]

    def last_token_ids(self) -> torch.Tensor:
        """[B] each row's last token (same device as `token_ids`)."""
        if self.num_tokens is None:
            return self.token_ids
        ends = [e - 1 for e in accumulate(self.num_tokens)]
        return self.token_ids[torch.tensor(ends, dtype=torch.int64, device=self.token_ids.device)]

    def rows(self) -> list[list[int]]:
        """Host token lists, one per row."""
        ids = self.token_ids.tolist()
        if self.num_tokens is None:
            return [[t] for t in ids]
        out, start = [], 0
        for n in self.num_tokens:
            out.append(ids[start : start + n])
            start += n
        return out

    def per_row_logprobs(self) -> list[list[tuple[float, list[tuple[float, int]]]] | None]:
        """Per row, per token: (the token's logprob, [(logprob, id) of the top k]); None without logprobs."""
        counts = self.num_tokens or [1] * len(self.token_ids)
        if self.token_logprobs is None:
            return [None] * len(counts)
        token = self.token_logprobs.tolist()
        if self.top_logprobs is None:
            per_token = [(lp, []) for lp in token]
        else:
            top = zip(self.top_logprobs.tolist(), self.top_ids.tolist())
            per_token = [(lp, list(zip(v, i))) for lp, (v, i) in zip(token, top)]
        out, start = [], 0
        for n in counts:
            out.append(per_token[start : start + n])
            start += n
        return out

    def cpu(self, non_blocking: bool = False) -> StepResult:
        """Host copies. With `non_blocking` (CUDA), they land in pinned memory
        asynchronously: read them only after an event recorded after this call."""
        move = lambda t: None if t is None else t.to("cpu", non_blocking=non_blocking)  # noqa: E731
        return StepResult(move(self.token_ids), self.num_tokens,
                          *(move(t) for t in (self.token_logprobs, self.top_logprobs, self.top_ids)),
                          hidden_states=self.hidden_states)
