"""What the scheduler needs to know from the server arguments.

Its own module so that building it (runtime/server_args.py) imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (managers/drafts.py): which draft source, and how
    many tokens a verify step feeds per request (its last token + guesses)."""

    algorithm: str  # "NGRAM" or "STANDALONE"
    num_draft_tokens: int = 8
    draft_model_path: str | None = None  # STANDALONE
    # NGRAM: shortest and longest run of newest tokens matched against earlier ones.
    ngram_min_match_window: int = 1
    ngram_max_match_window: int = 12


@dataclass
class SchedulerConfig:
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = 8192  # None: no chunking
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    enable_overlap: bool = True
    # Running decodes ride along in prefill batches (MIXED): steadier TPOT,
    # slower prefills (TTFT). Off: prefills run alone, decodes wait a step.
    enable_mixed_chunk: bool = True
    # Share of running requests' remaining max_new_tokens reserved when
    # admitting new ones (an estimate; retraction corrects a wrong one).
    new_token_ratio: float = 0.5
    # Requests allowed to wait for admission; more are refused (503). None: no bound.
    max_queued_requests: int | None = None
    # Constrained decoding (sampling/grammar.py): "xgrammar" or "none".
    grammar_backend: str = "xgrammar"
    # JSON schemas compile without free whitespace between tokens.
    constrained_json_disable_any_whitespace: bool = False
    # A request whose grammar has not compiled by then is refused.
    grammar_compile_timeout_s: float = 30.0
    speculative: SpeculativeConfig | None = None
