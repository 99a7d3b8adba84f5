"""Per-request sampling parameters.

Lives in ``managers/`` because the tokenizer side validates them before a request
is queued; it deliberately does not import torch so the HTTP process stays light.
``sampling/`` turns them into the sampler's inputs and logits processors.
"""

from __future__ import annotations

from dataclasses import dataclass

from sampling.grammar import grammar_spec_of  # stdlib only at import: no torch here

# Temperatures below this sample as greedy: dividing logits by them overflows
# (1e-38 gave inf logits and NaN probabilities). SGLang and vLLM do the same.
GREEDY_TEMPERATURE = 1e-5
# logit_bias at or below this bans the token (OpenAI: "-100 should result in a ban").
BAN_BIAS = -100.0
# One request's logit_bias entries: the bias is a dense row per step, the
# entries are host work per step.
MAX_LOGIT_BIAS = 1024


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # EOS and stop tokens/strings are ignored until this many
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0, normalised to -1) disables top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    # {token id (a string, as JSON keys are): bias in [-100, 100]}, added to
    # the logits; -100 bans the token. OpenAI's and SGLang's field.
    logit_bias: dict[str, float] | None = None
    # Ban tokens that would repeat an n-gram of this size already in the
    # sequence (transformers' generate option); 0 disables it.
    no_repeat_ngram_size: int = 0
    # Constrained decoding, at most one (sampling/grammar.py): a JSON schema
    # (as a JSON string), a regular expression, an EBNF grammar (xgrammar's
    # dialect) or an xgrammar structural tag (a JSON string).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        # OpenAI-style clients send top_k=0 for "disabled"; keep a single spelling.
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field and its allowed range."""
        if self.top_k == 0:
            self.top_k = -1
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not self.temperature >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
            )
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.logit_bias:
            self._validate_logit_bias()
        grammar_spec_of(self)  # at most one grammar

    def _validate_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if not str(token).isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")

    def logit_bias_ids(self) -> list[int]:
        return [int(t) for t in self.logit_bias or ()]
