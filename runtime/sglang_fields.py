"""The top-level fields of a native /generate body, as SGLang clients send them.

SGLang's ``GenerateReqInput`` has many more fields than this server implements
(adapters, multimodal inputs, prompt logprobs, disaggregation, sessions ...),
and its clients send them even when unused: SGLang's own bench_serving posts
``"lora_path": null, "logprob_start_len": -1``, and sglang-router re-serializes
every body with its defaults filled in. So:

- our own fields (``managers.io_struct.GenerateReqInput``) pass through, with
  SGLang's ``null`` spelling of their defaults mapped to ours;
- a field of SGLang's we do not implement is accepted at its default value
  (or a per-prompt list of defaults) and refused with a 400 that names it
  otherwise: silently ignoring a LoRA or an image would return wrong output;
- a few fields only steer logging or tracing; they are accepted at any value
  and ignored (``ADVISORY_FIELDS``);
- a field nobody defines is ignored with one warning per name, as SGLang
  (whose pydantic model drops extras) does; routers add e.g. ``model``.

Unknown keys inside ``sampling_params`` remain a 400 (managers/request_checks.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from managers.io_struct import GenerateReqInput

OWN_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerateReqInput))

# SGLang writes these defaults of our own fields as null.
_NULL_MEANS_DEFAULT = {"stream": False, "return_logprob": False, "top_logprobs_num": 0}

# SGLang's fields we do not implement -> the values that ask for nothing
# (its defaults, and the spellings of "nothing" it treats the same way).
# From SGLang's python/sglang/srt/managers/io_struct.py, GenerateReqInput.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    # Inputs other than text / token ids.
    "input_embeds": (None,),
    "image_data": (None, []),
    "video_data": (None, []),
    "audio_data": (None, []),
    "mm_hashes": (None,),
    "mm_content_hashes": (None,),
    "use_audio_in_video": (False,),
    "video_config": (None,),
    "modalities": (None, []),
    "positional_embed_overrides": (None,),
    "max_dynamic_patch": (None,),
    "min_dynamic_patch": (None,),
    "image_max_dynamic_patch": (None,),
    "video_max_dynamic_patch": (None,),
    "images_config": (None,),
    "need_wait_for_mm_inputs": (None, False),
    "num_items_assigned": (None,),
    "encoder_urls": (None,),
    # Logprobs beyond the output tokens' (-1: "output tokens only", ours).
    "logprob_start_len": (None, -1),
    "token_ids_logprob": (None, []),
    "return_sampling_mask": (None, False),
    "return_flat_raw_top_logprobs": (False,),
    "return_flat_raw_top_logprobs_b64": (False,),
    "multi_item_delimiter_indices": (None,),
    # Extra outputs.
    "return_hidden_states": (False,),
    "return_routed_experts": (False,),
    "routed_experts_start_len": (0,),
    "return_indexer_topk": (False,),
    "return_bytes": (False,),
    "return_entropy": (False,),
    "return_prompt_token_ids": (False,),
    # Adapters and custom sampling code.
    "lora_path": (None,),
    "lora_id": (None,),
    "custom_logit_processor": (None,),
    # Sessions, cache namespaces, priorities, reasoning budgets.
    "session_id": (None,),
    "session_params": (None,),
    "extra_key": (None, ""),
    "cache_salt": (None, ""),
    "priority": (None,),
    "routing_key": (None,),
    "custom_labels": (None,),
    "background": (False,),
    "require_reasoning": (False,),
    "max_thinking_tokens": (None,),
    # Prefill/decode disaggregation and data parallelism: we run one rank, rank 0.
    "bootstrap_host": (None,),
    "bootstrap_port": (None,),
    "bootstrap_room": (None,),
    "bootstrap_pair_key": (None,),
    "decode_tp_size": (None,),
    "routed_dp_rank": (None, 0),
    "data_parallel_rank": (None, 0),
    "disagg_prefill_dp_rank": (None, 0),
    "kv_router_hint": (None,),
    "http_worker_ipc": (None,),
}

# Accepted at any value and ignored: they change neither the output nor the
# schedule. (Logprob entries always carry their token's text here, so
# return_text_in_logprobs: false only costs a few bytes.)
ADVISORY_FIELDS = frozenset({
    "log_metrics", "no_logs", "return_text_in_logprobs", "conversation_id",
    "received_time", "external_trace_header",
})

KNOWN_FIELDS = OWN_FIELDS | UNSUPPORTED_DEFAULTS.keys() | ADVISORY_FIELDS


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    # By type as well as value: False == 0 in Python, but false is no rank.
    return any(value is None if d is None else type(value) is type(d) and value == d for d in defaults)


def _accepted(value: Any, defaults: tuple[Any, ...]) -> bool:
    """A default, or (SGLang's per-prompt form) a list of defaults."""
    if _is_default(value, defaults):
        return True
    return isinstance(value, list) and all(_is_default(v, defaults) for v in value)


def _json(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def split_generate_body(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(keyword arguments for GenerateReqInput, unknown field names).

    Raises ValueError naming every SGLang field that asks for a feature this
    server does not have."""
    refused = [
        f"{name} is not supported by this server (got {_json(value)}; send "
        f"{' or '.join(_json(d) for d in UNSUPPORTED_DEFAULTS[name])} or leave it out)"
        for name, value in body.items()
        if name in UNSUPPORTED_DEFAULTS and not _accepted(value, UNSUPPORTED_DEFAULTS[name])
    ]
    if refused:
        raise ValueError("; ".join(refused))
    own = {name: value for name, value in body.items() if name in OWN_FIELDS}
    for name, default in _NULL_MEANS_DEFAULT.items():
        if name in own and own[name] is None:
            own[name] = default
    unknown = [name for name in body if name not in KNOWN_FIELDS]
    return own, unknown


class WarnOncePerName:
    """Logs each unknown field name once per process: a router that adds the
    same field to every request should not write a line per request."""

    MAX_REMEMBERED = 1024  # names are client input: bound what we keep

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.seen: set[str] = set()

    def __call__(self, names: list[str]) -> None:
        new = [n for n in names if n not in self.seen]
        if not new or len(self.seen) >= self.MAX_REMEMBERED:
            return
        self.seen.update(new[: self.MAX_REMEMBERED - len(self.seen)])
        shown = ", ".join(repr(n[:64]) for n in new[:10]) + (f" and {len(new) - 10} more" if len(new) > 10 else "")
        self.logger.warning("%s: ignoring unknown field(s) %s (each is reported once)", self.what, shown)
