"""Messages that cross process boundaries (and the in-process scheduler API).

Plain dataclasses only: they are pickled over ZMQ between the tokenizer
manager, the scheduler and the detokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from managers.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    input_text: str | None = None
    stream: bool = False


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FinishReason:
    kind: str  # "length" | "stop" | "abort"
    matched: int | str | None = None  # the EOS / stop token id or stop string that ended it
    message: str | None = None  # why, for aborts and rejections

    def to_json(self) -> dict:
        out: dict = {"type": self.kind}
        if self.matched is not None:
            out["matched"] = self.matched
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
