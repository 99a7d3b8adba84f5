"""NGRAM speculative decoding (prompt lookup): guesses copied from the
request's own tokens. Where the newest tokens occurred before (in the prompt
or the output so far), what followed them then is the guess for what
follows now: repeating or editing a given text, code with recurring names,
structured output. No model, no extra forward.

Per request an index maps each `min_window`-gram to where it ended (the
last `CANDIDATES` times), built incrementally as tokens arrive, so a
proposal costs O(candidates x max_window), not a scan of the sequence. Of
the candidates, the one whose match with the newest tokens runs longest
(up to `max_window`) wins; on a tie, the most recent.

How many guesses a request gets adapts to how its last ones fared
(`GuessBudget`, managers/drafts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from managers.drafts import GuessBudget

if TYPE_CHECKING:
    from managers.schedule_batch import Req

CANDIDATES = 8  # most recent earlier occurrences of the suffix compared per proposal


@dataclass
class NgramIndex:
    """One request's tokens and where each `n`-gram in them ended (exclusive)."""

    n: int
    tokens: list[int] = field(default_factory=list)
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    outputs_seen: int = 0
    budget: GuessBudget = field(default_factory=GuessBudget)

    def add(self, new_tokens: list[int]) -> None:
        """Append tokens; index the n-grams ending before the last token (the
        suffix ending at the last token is what proposals look up)."""
        start = len(self.tokens)
        self.tokens += new_tokens
        tokens, n = self.tokens, self.n
        for end in range(max(start, n), len(tokens)):
            ends = self.ends.setdefault(tuple(tokens[end - n : end]), [])
            ends.append(end)
            if len(ends) > CANDIDATES:
                del ends[0]

    def continuation(self, max_window: int, max_tokens: int) -> list[int]:
        tokens, n, last = self.tokens, self.n, len(self.tokens)
        if last <= n:
            return []
        best_len, best_end = 0, -1
        for end in reversed(self.ends.get(tuple(tokens[last - n :]), ())):
            length = n
            while length < max_window and end - length > 0 and tokens[end - length - 1] == tokens[last - length - 1]:
                length += 1
            if length > best_len:
                best_len, best_end = length, end
        return tokens[best_end : best_end + max_tokens] if best_end >= 0 else []


class NgramProposer:
    """A `DraftProposer` (managers/drafts.py). Its state lives on each
    request (`Req.draft_state`), so it goes when the request does."""

    def __init__(self, min_window: int = 1, max_window: int = 12, num_draft_tokens: int = 8) -> None:
        if not 1 <= min_window <= max_window:
            raise ValueError(f"n-gram match windows must satisfy 1 <= min <= max, got {min_window}..{max_window}")
        self.min_window, self.max_window = min_window, max_window
        self.max_guesses = num_draft_tokens - 1  # a verify step also feeds the request's last token

    def propose(self, req: Req, max_tokens: int) -> list[int]:
        index = req.draft_state
        if not isinstance(index, NgramIndex):
            index = req.draft_state = NgramIndex(self.min_window)
            index.add(list(req.origin_input_ids))
        if index.outputs_seen < len(req.output_ids):
            index.add(req.output_ids[index.outputs_seen :])
            index.outputs_seen = len(req.output_ids)
        guesses = index.continuation(self.max_window, min(max_tokens, index.budget.next(req, self.max_guesses)))
        index.budget.proposed = len(guesses)
        return guesses
