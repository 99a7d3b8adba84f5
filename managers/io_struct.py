"""Messages that cross process boundaries (and the in-process scheduler API).

Plain dataclasses only: they are pickled over ZMQ between the tokenizer
manager, the scheduler and the detokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from managers.sampling_params import SamplingParams


@dataclass
class GenerateReqInput:
    """A generate call as users make it (HTTP /generate, Engine.generate)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    input_text: str | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheReqOutput:
    success: bool


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class GetInternalStateReqOutput:
    state: dict


@dataclass
class SchedulerReady:
    """Sent once over the start-up pipe: the scheduler is up, with these figures."""

    max_total_num_tokens: int
    max_running_requests: int
    context_len: int
    vocab_size: int
    dtype: str
    device: str
    # the model's quantization (QuantizationConfig.describe) and weight bytes per rank
    quantization: dict = field(default_factory=dict)
    # on CPU: the instruction-set level and each kernel's variant (layers/cpu_features.cpu_report)
    cpu: dict | None = None


@dataclass
class FinishReason:
    kind: str  # "length" | "stop" | "abort"
    matched: int | str | None = None  # the EOS / stop token id or stop string that ended it
    message: str | None = None  # why, for aborts and rejections
    # For a request refused before it ran: the HTTP status the caller should
    # see (400 bad input, 503 overloaded). None for everything else.
    status_code: int | None = None

    def to_json(self) -> dict:
        out: dict = {"type": self.kind}
        if self.matched is not None:
            # SGLang's shape: {"type": "length", "length": n} / {"type": "stop", "matched": x}.
            out["length" if self.kind == "length" else "matched"] = self.matched
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass
class BatchTokenIDOut:
    """One scheduler iteration's news: new token ids per request, and finishes."""

    rids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    finished_reasons: list[FinishReason | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    spec_verify_ct: list[int] = field(default_factory=list)  # per rid: verify steps so far
    spec_accepted_tokens: list[int] = field(default_factory=list)  # per rid: guesses accepted so far
    # Per rid (None unless it asked): (logprob, id) per new token, and top alternatives.
    new_token_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    new_top_logprobs: list[list[list[tuple[float, int]]] | None] = field(default_factory=list)
    # Per rid, for the detokenizer.
    skip_special_tokens: list[bool] = field(default_factory=list)
    stop_strings: list[list[str]] = field(default_factory=list)


@dataclass
class BatchStrOut:
    """The detokenizer's view of one iteration: new text per request."""

    rids: list[str] = field(default_factory=list)
    new_texts: list[str] = field(default_factory=list)  # text to append (stop strings trimmed)
    new_token_ids: list[list[int]] = field(default_factory=list)
    finished_reasons: list[FinishReason | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    spec_verify_ct: list[int] = field(default_factory=list)  # per rid: verify steps so far
    spec_accepted_tokens: list[int] = field(default_factory=list)  # per rid: guesses accepted so far
    new_token_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    new_top_logprobs: list[list[list[tuple[float, int]]] | None] = field(default_factory=list)
