"""Draft sources: guesses at a decoding request's next tokens, which the
next step checks in one forward (sampling/verify.py) so a step can return
several tokens for a request. Speculative decoding's algorithms (n-gram,
draft model, EAGLE) are `DraftProposer`s; the scheduler, the KV trim of
rejected guesses and the variable-length step result are shared.

Requests without penalties or logits processors get drafts: verification
picks each position's token as a plain step would (sampling/verify.py), so
their output is the same with or without guesses: token for token when
greedy or seeded, in distribution otherwise. (Penalties and processors
depend on the tokens before each position, which a step of several tokens
would have to update between positions.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sampling.batch_info import uses_counts

if TYPE_CHECKING:
    from managers.scheduler_config import SpeculativeConfig
    from managers.schedule_batch import Req


class DraftProposer(Protocol):
    def propose(self, req: Req, max_tokens: int) -> list[int]:
        """Up to `max_tokens` guesses at what follows `req`'s tokens so far."""
        ...


def draft_room(req: Req) -> int:
    """How many guesses `req` may verify this step: none unless verification
    keeps its output unchanged, and never past its last token (max_new_tokens)."""
    p = req.sampling_params
    if uses_counts(p) or req.logits_processors or req.hidden:
        return 0
    # This step yields up to guesses + 1 tokens.
    return max(0, p.max_new_tokens - len(req.output_ids) - 1)


@dataclass
class AcceptanceStats:
    """Verify steps and accepted guesses, per request (`Req.spec_*`, in its
    meta_info) and in total (/get_server_info, /metrics)."""

    verify_steps: int = 0
    accepted_tokens: int = 0

    def record(self, req: Req, accepted: int) -> None:
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted
        self.verify_steps += 1
        self.accepted_tokens += accepted

    def accept_length(self) -> float:
        """Tokens a verify step yields on average: accepted guesses plus the model's own."""
        return 1.0 + self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


def make_drafter(config: SpeculativeConfig | None) -> DraftProposer | None:
    """The draft source `--speculative-algorithm` names (None: no speculation)."""
    if config is None:
        return None
    if config.algorithm == "NGRAM":
        from managers.ngram_drafts import NgramProposer

        return NgramProposer(config.ngram_min_match_window, config.ngram_max_match_window, config.num_draft_tokens)
    raise ValueError(f"unknown speculative algorithm {config.algorithm!r}")
