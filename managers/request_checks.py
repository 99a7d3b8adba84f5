"""Checks of a generate call's fields, before anything is tokenized or queued.

JSON bodies can hold anything: each check names the field and what it must
be, as a ValueError the routes turn into a 400. Pure functions of the
request; the tokenizer manager calls them (and owns the limits that depend
on the model: vocabulary, context length, KV capacity).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from managers.io_struct import FinishReason, GenerateReqInput, TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from sampling.grammar import GRAMMAR_FIELDS

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
MAX_TOP_LOGPROBS = 20
# Stop strings are checked against every new token of the request: bound the
# work one request can ask for (100,000 of them slowed others 16x).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
_INT_FIELDS = {"max_new_tokens", "min_new_tokens", "top_k", "n", "seed", "no_repeat_ngram_size"}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens"}


def check_field_type(name: str, value: Any) -> None:
    """JSON gives us any type; name the field whose value has the wrong one."""
    # max_new_tokens None: as many as the context has room for.
    if value is None and name in ("seed", "stop", "stop_token_ids", "max_new_tokens", "logit_bias", *GRAMMAR_FIELDS):
        return
    if name in _INT_FIELDS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif name in _BOOL_FIELDS:
        ok, expected = isinstance(value, bool), "true or false"
    elif name == "stop":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected = "a string or a list of strings"
    elif name in GRAMMAR_FIELDS:
        ok, expected = isinstance(value, str), "a string"
    elif name == "logit_bias":
        ok, expected = isinstance(value, dict), "an object mapping token ids to numbers"
    elif name == "stop_token_ids":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        expected = "a list of integers"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_request_types(obj: GenerateReqInput) -> None:
    """JSON bodies can hold anything: refuse wrong shapes with a message, not a 500."""
    text, ids = obj.text, obj.input_ids
    if text is not None and not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise ValueError("text must be a string or a list of strings")
    if ids is not None:
        flat = isinstance(ids, list) and all(_is_int(i) for i in ids)
        nested = isinstance(ids, list) and all(isinstance(p, list) and all(_is_int(i) for i in p) for p in ids)
        if not (flat or nested):
            raise ValueError("input_ids must be a list of integers or a list of such lists")
    params = obj.sampling_params
    if params is not None and not isinstance(params, (dict, list)):
        raise ValueError("sampling_params must be an object or a list of objects")
    if not isinstance(obj.stream, bool) or not isinstance(obj.return_logprob, bool):
        raise ValueError("stream and return_logprob must be true or false")
    if obj.rid is not None and not isinstance(obj.rid, (str, list)):
        raise ValueError("rid must be a string or a list of strings")


def request_rids(rid: str, n: int) -> list[str]:
    """The ids a request's outputs travel under (n > 1 fans out in the scheduler)."""
    return [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]


def check_unique_rids(reqs: list[TokenizedGenerateReq], in_use: Any) -> None:
    seen: dict[str, str] = {}
    for msg in reqs:
        for rid in request_rids(msg.rid, msg.sampling_params.n):
            if rid in in_use:
                raise ValueError(f"request id {rid!r} is already in use")
            if rid in seen:
                clash = "" if seen[rid] == rid else f" (from rid {seen[rid]!r} with n > 1)"
                raise ValueError(f"request id {rid!r} appears more than once in this request{clash}")
            seen[rid] = msg.rid


def first_out_of_vocab(ids: list[int], vocab_size: int) -> tuple[int, int] | None:
    """(position, id) of the first id outside [0, vocab_size), if any."""
    if min(ids) >= 0 and max(ids) < vocab_size:
        return None
    return next((pos, i) for pos, i in enumerate(ids) if not 0 <= i < vocab_size)


def check_stop_bounds(raw: dict) -> None:
    stop = raw.get("stop") or []
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}")
    if len(raw.get("stop_token_ids") or []) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed")


def parse_sampling_params(raw: dict) -> SamplingParams:
    """A request's `sampling_params` object, type-checked and validated;
    `max_new_tokens: null` stays None (the caller sets it per prompt)."""
    if not isinstance(raw, dict):
        raise ValueError("sampling_params must be an object")
    unknown = set(raw) - SAMPLING_FIELDS
    if unknown:
        raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    raw = dict(raw)
    if isinstance(raw.get("stop"), str):
        raw["stop"] = [raw["stop"]]
    for name, value in raw.items():
        check_field_type(name, value)
    check_stop_bounds(raw)
    rest_of_context = "max_new_tokens" in raw and raw["max_new_tokens"] is None
    if rest_of_context:
        # Set per prompt by the caller; validate with the least it may become.
        raw["max_new_tokens"] = raw.get("min_new_tokens", 0)
    params = SamplingParams(**raw)
    params.validate()
    if rest_of_context:
        params.max_new_tokens = None  # type: ignore[assignment]
    return params


def refusal(input_ids: list[int], params: SamplingParams, *, vocab_size: int, context_len: int, capacity: int,
            max_queued: int | None) -> FinishReason | None:
    """Why the scheduler refuses a request outright (an abort with the HTTP
    status the caller should see), or None. `max_queued` is given only when
    the queue is full."""
    limit = min(capacity, context_len)
    if not input_ids:
        return FinishReason("abort", message="the prompt is empty", status_code=400)
    if (bad := first_out_of_vocab(input_ids, vocab_size)) is not None:
        # The tokenizer manager refuses these first; an out-of-range id
        # reaching the embedding would kill the process (or the GPU).
        return FinishReason("abort", message=f"token id {bad[1]} is outside the vocabulary [0, {vocab_size})",
                            status_code=400)
    if (bad_bias := first_out_of_vocab(params.logit_bias_ids() or [0], vocab_size)) is not None:
        return FinishReason("abort", message=f"logit_bias token id {bad_bias[1]} is outside the vocabulary "
                            f"[0, {vocab_size})", status_code=400)
    max_new_tokens = params.max_new_tokens
    if max_queued is not None:
        return FinishReason("abort", message=f"the queue is full ({max_queued} requests waiting); retry later",
                            status_code=503)
    if len(input_ids) + max_new_tokens > limit:
        return FinishReason("abort", status_code=400, message=(
            f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the limit of "
            f"{limit} tokens (context length {context_len}, KV capacity {capacity})"
        ))
    return None
