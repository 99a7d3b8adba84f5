"""Stop conditions: max_new_tokens, EOS, stop_token_ids, ignore_eos, min_new_tokens,
stop strings; and n > 1 samples sharing their prompt."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from model_helpers import make_prompts
from scheduler_helpers import assert_no_leak, greedy, make_scheduler, run

VOCAB = 4000


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    """A 24-token greedy continuation with no stop condition but the length."""
    prompt = make_prompts([12], VOCAB, seed=51)[0]
    sched = make_scheduler(tiny_qwen3)
    out = run(sched, [("ref", prompt, greedy(24))])["ref"].output_ids
    sched.shutdown()
    return prompt, out


def _first_new_token_at(tokens: list[int], start: int) -> int:
    """Index of a token at or after `start` that did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("overlap", [False, True])
def test_eos_stop_token_ignore_eos_and_min_new_tokens(tiny_qwen3, reference, overlap):
    prompt, ref = reference
    k = _first_new_token_at(ref, 5)
    eos = ref[k]
    sched = make_scheduler(tiny_qwen3, eos=frozenset({eos}), overlap=overlap)
    outcomes = run(sched, [
        ("eos", prompt, greedy(24)),
        ("ignore", prompt, greedy(24, ignore_eos=True)),
        ("min", prompt, greedy(24, min_new_tokens=k + 2)),
    ])
    assert outcomes["eos"].output_ids == ref[: k + 1]
    assert outcomes["eos"].finish.kind == "stop" and outcomes["eos"].finish.matched == eos
    assert outcomes["ignore"].output_ids == ref and outcomes["ignore"].finish.kind == "length"
    later = [i for i in range(k + 2, len(ref)) if ref[i] == eos]
    expected_len = later[0] + 1 if later else len(ref)
    assert outcomes["min"].output_ids == ref[:expected_len]
    assert_no_leak(sched)
    sched.shutdown()

    sched = make_scheduler(tiny_qwen3, overlap=overlap)
    outcomes = run(sched, [("stop_id", prompt, greedy(24, stop_token_ids=[eos]))])
    assert outcomes["stop_id"].output_ids == ref[: k + 1]
    assert_no_leak(sched)
    sched.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_string_ends_generation_at_once(tiny_qwen3, reference, overlap):
    prompt, ref = reference
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    k = _first_new_token_at(ref, 6)
    # A stop string that first shows up when token k is decoded.
    prefix_text = tokenizer.decode(ref[:k])
    full_text = tokenizer.decode(ref[: k + 1])
    stop = full_text[len(prefix_text) - 2 :] if len(prefix_text) >= 2 else full_text
    first = next(i for i in range(1, len(ref) + 1) if stop in tokenizer.decode(ref[:i]))
    sched = make_scheduler(tiny_qwen3, tokenizer=tokenizer, overlap=overlap)
    outcomes = run(sched, [("stop", prompt, greedy(24, stop=[stop]))])
    assert outcomes["stop"].output_ids == ref[:first]
    assert outcomes["stop"].finish.kind == "stop" and outcomes["stop"].finish.matched == stop
    assert_no_leak(sched)
    sched.shutdown()


def test_max_new_tokens_zero_is_prefill_only(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3)
    outcomes = run(sched, [("zero", make_prompts([20], VOCAB)[0], greedy(0))])
    assert outcomes["zero"].output_ids == [] and outcomes["zero"].finish.kind == "length"
    assert_no_leak(sched)
    sched.shutdown()


def test_eos_ids_come_from_generation_config_and_tokenizer(tiny_qwen3, tmp_path):
    import json
    import shutil

    from managers.schedule_batch import eos_token_ids_of

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    assert eos_token_ids_of(str(tiny_qwen3)) == {tokenizer.eos_token_id}
    model = shutil.copytree(tiny_qwen3, tmp_path / "m")
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [7, 9]
    (model / "generation_config.json").write_text(json.dumps(config))
    assert eos_token_ids_of(str(model), tokenizer) == {7, 9, tokenizer.eos_token_id}
