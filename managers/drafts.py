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

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sampling.batch_info import uses_counts

if TYPE_CHECKING:
    from managers.scheduler_config import SpeculativeConfig
    from model_executor.model_config import ModelRunnerConfig
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
    drafted_tokens: int = 0

    def record(self, req: Req, accepted: int, drafted: int) -> None:
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted
        self.verify_steps += 1
        self.accepted_tokens += accepted
        self.drafted_tokens += drafted

    def accept_length(self) -> float:
        """Tokens a verify step yields on average: accepted guesses plus the model's own."""
        return 1.0 + self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


# Rounds a request sits out at most after its guesses kept missing.
MAX_REST_ROUNDS = 16


@dataclass
class GuessBudget:
    """How many guesses a request gets, adapted to how its last ones fared:
    all accepted, twice as many next time (up to the cap); some rejected, one
    more than were accepted. A verify step's cost grows with its rows (on
    this CPU up to 5 guesses cost 1.0-1.15x a decode step where the streaming
    kernel serves 6 rows, 1.4-1.6x where it serves 2; a draft model pays a
    forward per guess: benchmark/RESULTS.md), so guessing long only pays
    where guesses hold.

    Guesses that keep missing cost without paying (a draft model that does
    not fit the target, text an n-gram cannot predict): from the second miss
    in a row the request sits out 1, 2, 4, ... rounds (at most
    MAX_REST_ROUNDS) and decodes plainly, its output unchanged. Kept in a
    draft source's per-request state; 0 means no guesses this round."""

    budget: int = 1
    proposed: int = 0  # guesses in the last proposal, until it is verified
    verify_ct: int = 0  # the request's counts when it was made
    accepted: int = 0
    misses: int = 0  # verified proposals in a row of which none held
    resting: int = 0  # rounds left to sit out

    def next(self, req: Req, cap: int) -> int:
        if req.spec_verify_ct > self.verify_ct and self.proposed:  # the last proposal was verified
            accepted = req.spec_accepted_tokens - self.accepted
            self.budget = min(cap, 2 * self.proposed) if accepted >= self.proposed else accepted + 1
            self.misses = 0 if accepted else self.misses + 1
            if self.misses >= 2:
                self.resting = min(MAX_REST_ROUNDS, 2 ** (self.misses - 2))
            self.proposed = 0
        self.verify_ct, self.accepted = req.spec_verify_ct, req.spec_accepted_tokens
        if self.resting:
            self.resting -= 1
            return 0
        return max(1, min(self.budget, cap))


def make_drafter(config: SpeculativeConfig | None, target: ModelRunnerConfig, capacity: int,
                 rank: int = 0) -> DraftProposer | None:
    """The draft source `--speculative-algorithm` names (None: no speculation,
    or a TP rank other than 0 for a draft model, whose drafts rank 0 shares)."""
    if config is None:
        return None
    if config.algorithm == "NGRAM":
        from managers.ngram_drafts import NgramProposer

        return NgramProposer(config.ngram_min_match_window, config.ngram_max_match_window, config.num_draft_tokens)
    if config.algorithm in ("STANDALONE", "EAGLE"):
        if rank != 0:
            return None
        from managers.model_drafts import check_draft_compatible
        from model_executor.model_runner import ModelRunner

        assert config.draft_model_path is not None
        check_draft_compatible(target.model_path, config.draft_model_path)
        # One draft model per server, on rank 0 alone, unsharded; its pool
        # holds as many tokens as the target's; its decode steps (every guess
        # after the first) replay CUDA graphs where the target's do. An EAGLE
        # head takes the target's embedding and LM head where its checkpoint has none.
        draft = dataclasses.replace(target, model_path=config.draft_model_path, page_size=1, tp_size=1, tp_rank=0,
                                    ep_size=1, quantization=None, verify_graph_rows=0, max_total_tokens=capacity,
                                    fallback_weight_paths=(target.model_path,) if config.algorithm == "EAGLE" else ())
        if config.algorithm == "EAGLE":
            from managers.eagle_drafts import EagleProposer

            return EagleProposer(ModelRunner(draft), config.num_draft_tokens)
        from managers.model_drafts import DraftModelProposer

        return DraftModelProposer(ModelRunner(draft), config.num_draft_tokens)
    raise ValueError(f"unknown speculative algorithm {config.algorithm!r}")


def drafts_shared_from_rank_zero(config: SpeculativeConfig | None) -> bool:
    """Whether TP ranks take rank 0's drafts (a draft model runs there only)
    rather than each computing the same ones (NGRAM: pure, cheap)."""
    return config is not None and config.algorithm in ("STANDALONE", "EAGLE")
