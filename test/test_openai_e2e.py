"""The official `openai` client against a real server; outputs equal the Engine's."""

from __future__ import annotations

import time

import openai
import pytest

from runtime import Engine
from server_helpers import alive, start_server


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    # Compact JSON: a random model given free whitespace may never close the object.
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"), "--dtype", "float32", "--served-model-name", "tiny",
                       "--constrained-json-disable-any-whitespace")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models(client):
    models = client.models.list()
    assert models.data[0].id == "tiny"


def test_completion_and_stream(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    chunks = list(client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_chat_n_and_stop(client):
    messages = [{"role": "user", "content": "Tell me something"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 12
    two = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    stop = text[4:7]
    if stop.strip():
        stopped = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[stop])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == text[: text.find(stop)]


def test_bad_requests_get_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["message"] and err.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_outputs_equal_the_engine(tiny_qwen3, client):
    prompts = ["The weather today", "def main():"]
    http = [client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text for p in prompts]
    with Engine(model_path=str(tiny_qwen3), dtype="float32", max_total_tokens=8192, device="cpu") as engine:
        out = engine.generate(prompts, {"max_new_tokens": 10, "temperature": 0})
        pids = [p.pid for p in engine.children.processes.values()]
    assert [o["text"] for o in out] == http
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids)


def test_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Log probs", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(alts) == 2 for alts in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)


def test_logit_bias_pulls_a_token_and_checks_ids(tiny_qwen3, client):
    """OpenAI's logit_bias reaches the sampler (+100 all but forces a token;
    -100 bans, tested through the scheduler); a bad id is a 400."""
    from transformers import AutoTokenizer

    forced = client.completions.create(model="tiny", prompt="Bias me", max_tokens=3, temperature=0,
                                       logit_bias={"77": 100})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    assert forced.choices[0].text == tokenizer.decode([77, 77, 77])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logit_bias={"77": 100})
    assert chat.choices[0].message.content == tokenizer.decode([77] * 4)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"999999": 5})
    assert "logit_bias token id 999999" in err.value.body["message"]


SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "kind": {"enum": ["cat", "dog"]}},
    "required": ["id", "kind"],
    "additionalProperties": False,
}


def test_structured_outputs(client):
    import json
    import re

    import jsonschema

    messages = [{"role": "user", "content": "Describe a pet"}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    assert out.choices[0].finish_reason == "stop"
    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=1.0, seed=3,
                                             n=3, response_format={"type": "json_object"})
    assert all(isinstance(json.loads(c.message.content), dict) for c in sampled.choices)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content
    text = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=0,
                                     extra_body={"regex": "[A-Z]{2}-[0-9]{3}"}).choices[0].text
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", text)
    ebnf = client.completions.create(model="tiny", prompt="Pick:", max_tokens=10, temperature=0,
                                     extra_body={"ebnf": 'root ::= "yes" | "no"'}).choices[0].text
    assert ebnf in ("yes", "no")


def test_a_grammar_that_does_not_compile_is_a_400_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}})
    assert 'Unsupported type "nope"' in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body={"regex": "([a-z"})
    assert "regex does not compile" in err.value.body["message"]
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
