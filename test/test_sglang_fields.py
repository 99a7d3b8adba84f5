"""Which top-level /generate fields are taken, refused or ignored, and their
OpenAPI description, without a server (the server tests cover the routes)."""

from __future__ import annotations

import logging

import pytest

from managers.request_checks import SAMPLING_FIELDS
from runtime.request_schema import GenerateRequest, SamplingParamsBody
from runtime.sglang_fields import (
    ADVISORY_FIELDS,
    OWN_FIELDS,
    UNSUPPORTED_DEFAULTS,
    WarnOncePerName,
    split_generate_body,
)


def test_own_fields_pass_and_sglang_nulls_mean_our_defaults():
    fields, unknown = split_generate_body({
        "text": "hi", "rid": "r", "stream": None, "return_logprob": None, "top_logprobs_num": None,
        "lora_path": None, "logprob_start_len": -1, "log_metrics": False, "model": "m"})
    assert fields == {"text": "hi", "rid": "r", "stream": False, "return_logprob": False, "top_logprobs_num": 0}
    assert unknown == ["model"]


def test_defaults_and_per_prompt_lists_of_defaults_are_accepted():
    fields, unknown = split_generate_body({
        "text": ["a", "b"], "lora_path": [None, None], "image_data": [], "extra_key": "",
        "data_parallel_rank": 0, "return_hidden_states": False, "token_ids_logprob": []})
    assert fields == {"text": ["a", "b"]} and unknown == []


@pytest.mark.parametrize("field, value", [
    ("lora_path", "adapter"), ("lora_path", [None, "adapter"]), ("data_parallel_rank", 1),
    ("data_parallel_rank", False),  # False == 0 in Python, but it is no rank
    ("return_hidden_states", 0), ("logprob_start_len", 3), ("priority", 1), ("input_embeds", [[0.1]]),
])
def test_a_non_default_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} is not supported by this server"):
        split_generate_body({"text": "hi", field: value})


def test_every_refused_field_is_named_at_once():
    with pytest.raises(ValueError) as err:
        split_generate_body({"text": "hi", "lora_path": "a", "bootstrap_room": 5})
    assert "lora_path is not supported" in str(err.value) and "bootstrap_room is not supported" in str(err.value)
    assert "send null or leave it out" in str(err.value)


def test_field_sets_are_disjoint_and_all_described():
    assert not OWN_FIELDS & UNSUPPORTED_DEFAULTS.keys() and not OWN_FIELDS & ADVISORY_FIELDS
    assert not ADVISORY_FIELDS & UNSUPPORTED_DEFAULTS.keys()
    described = set(GenerateRequest.model_json_schema()["properties"])
    assert OWN_FIELDS | UNSUPPORTED_DEFAULTS.keys() | ADVISORY_FIELDS == described
    assert set(SamplingParamsBody.model_fields) == SAMPLING_FIELDS


def test_unknown_names_are_warned_once_each(caplog):
    warn = WarnOncePerName(logging.getLogger("test.warn_once"), "/generate")
    with caplog.at_level(logging.WARNING, logger="test.warn_once"):
        warn(["a", "b"])
        warn(["a"])
        warn(["b", "c"])
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["/generate: ignoring unknown field(s) 'a', 'b' (each is reported once)",
                        "/generate: ignoring unknown field(s) 'c' (each is reported once)"]


def test_remembered_names_are_bounded(caplog):
    warn = WarnOncePerName(logging.getLogger("test.warn_bound"), "/generate")
    warn.MAX_REMEMBERED = 3
    with caplog.at_level(logging.WARNING, logger="test.warn_bound"):
        warn(["a", "b", "c", "d"])
        warn(["e"])
    assert len(warn.seen) == 3 and len(caplog.records) == 1
