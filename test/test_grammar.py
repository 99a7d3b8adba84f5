"""Grammar-constrained decoding (xgrammar) through the scheduler: outputs
match their regex / validate against their JSON schema, beside unconstrained
requests in one batch, with overlap on and off, n > 1, prefix-cache hits,
retraction under a tiny KV pool and chunked prefill; no KV leaks."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer

from managers.io_struct import TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from model_helpers import make_prompts
from sampling.grammar import GrammarSpec, check_grammar
from scheduler_helpers import Outcome, assert_no_leak, make_scheduler, run

VOCAB = 4000
REGEX = r"[0-9]{3}-[a-z]{2,4}"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "kind", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(str(tiny_qwen3))


def scheduler(path, tokenizer, **kw):
    from managers.scheduler import Scheduler

    sched = make_scheduler(path, tokenizer=tokenizer, eos=frozenset({tokenizer.eos_token_id}), **kw)
    assert isinstance(sched, Scheduler) and sched.grammars is not None
    sched.grammars.any_whitespace = False  # compact JSON: a random model never stops adding spaces
    return sched


def text_of(tokenizer, outcome: Outcome) -> str:
    return tokenizer.decode(outcome.output_ids, skip_special_tokens=True)


def workload(n: int = 6, seed: int = 101):
    prompts = make_prompts([5 + 7 * i for i in range(n)], VOCAB, seed=seed)
    kinds = [
        dict(regex=REGEX, temperature=0.0),
        dict(json_schema=json.dumps(SCHEMA), temperature=0.0),
        dict(temperature=0.0),  # unconstrained, in the same batches
        dict(regex=REGEX, temperature=1.0, seed=3),
        dict(json_schema=json.dumps(SCHEMA), temperature=0.8, seed=4),
        dict(temperature=0.9, seed=5),
    ]
    return [(f"r{i}", p, SamplingParams(max_new_tokens=40, **kinds[i % len(kinds)])) for i, p in enumerate(prompts)]


def check_outputs(tokenizer, requests, outcomes) -> None:
    for rid, _ids, params in requests:
        out = outcomes[rid]
        if params.regex:
            assert re.fullmatch(params.regex, text_of(tokenizer, out)), (rid, text_of(tokenizer, out))
            assert out.finish.kind == "stop"
        elif params.json_schema:
            jsonschema.validate(json.loads(text_of(tokenizer, out)), json.loads(params.json_schema))
            assert out.finish.kind == "stop"


@pytest.mark.parametrize("options", [dict(), dict(overlap=True, chunk=16)], ids=["plain", "overlap-chunked"])
def test_constrained_and_free_requests_share_batches(tiny_qwen3, tokenizer, options):
    requests = workload()
    sched = scheduler(tiny_qwen3, tokenizer, **options)
    outcomes = run(sched, requests)
    check_outputs(tokenizer, requests, outcomes)
    assert_no_leak(sched)
    sched.shutdown()


def test_overlap_changes_nothing(tiny_qwen3, tokenizer):
    requests = workload(seed=102)
    results = []
    for overlap in (False, True):
        sched = scheduler(tiny_qwen3, tokenizer, overlap=overlap)
        results.append({rid: o.output_ids for rid, o in run(sched, requests).items()})
        assert_no_leak(sched)
        sched.shutdown()
    assert results[0] == results[1]


def test_free_requests_are_unchanged_by_constrained_neighbours(tiny_qwen3, tokenizer):
    requests = workload(seed=103)
    free = [r for r in requests if not (r[2].regex or r[2].json_schema)]
    sched = scheduler(tiny_qwen3, tokenizer, overlap=True)
    alone = run(sched, free)
    together = run(sched, requests)
    assert {rid: together[rid].output_ids for rid in alone} == {rid: o.output_ids for rid, o in alone.items()}
    assert_no_leak(sched)
    sched.shutdown()


def test_parallel_samples_and_prefix_hits(tiny_qwen3, tokenizer):
    prompt = make_prompts([60], VOCAB, seed=104)[0]
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=9, n=3, json_schema=json.dumps(SCHEMA))
    sched = scheduler(tiny_qwen3, tokenizer, overlap=True)
    requests = [("multi", prompt, params)] + [
        (f"more{i}", prompt + [7 + i], SamplingParams(max_new_tokens=30, regex=REGEX, temperature=0.0))
        for i in range(4)
    ]
    outcomes = run(sched, requests)
    for i in range(3):
        jsonschema.validate(json.loads(text_of(tokenizer, outcomes[f"multi-{i}"])), SCHEMA)
    for i in range(4):
        assert re.fullmatch(REGEX, text_of(tokenizer, outcomes[f"more{i}"]))
        assert outcomes[f"more{i}"].cached_tokens >= 59  # the shared prompt came from the cache
    assert_no_leak(sched)
    sched.shutdown()


def test_matcher_state_survives_retraction(tiny_qwen3, tokenizer):
    """Outputs that fill max_new_tokens under a grammar, in a pool too small
    for all of them: requests are retracted and re-prefilled, their matchers
    carry on, and the outputs equal a roomy run's."""
    prompts = make_prompts([30, 31, 32, 33], VOCAB, seed=106)
    requests = [(f"r{i}", p, SamplingParams(max_new_tokens=40, regex=r"[a-z]{200}", temperature=0.0))
                for i, p in enumerate(prompts)]
    roomy = scheduler(tiny_qwen3, tokenizer, overlap=True)
    want = {rid: o.output_ids for rid, o in run(roomy, requests).items()}
    roomy.shutdown()
    tight = scheduler(tiny_qwen3, tokenizer, overlap=True, max_total_tokens=200)
    got = run(tight, requests)
    assert tight.num_retractions > 0
    assert {rid: o.output_ids for rid, o in got.items()} == want
    assert all(re.fullmatch("[a-z]+", text_of(tokenizer, o)) and len(o.output_ids) == 40 for o in got.values())
    assert_no_leak(tight)
    tight.shutdown()


def test_a_grammar_that_does_not_compile_is_refused_with_the_reason(tiny_qwen3, tokenizer):
    sched = scheduler(tiny_qwen3, tokenizer)
    prompt = make_prompts([6], VOCAB, seed=105)[0]
    outcomes = run(sched, [("bad", prompt, SamplingParams(regex="([a-z")),
                           ("good", prompt, SamplingParams(max_new_tokens=20, regex=REGEX, temperature=0.0))])
    assert outcomes["bad"].finish.kind == "abort" and outcomes["bad"].finish.status_code == 400
    assert "regex does not compile" in outcomes["bad"].finish.message
    assert re.fullmatch(REGEX, text_of(tokenizer, outcomes["good"]))
    assert_no_leak(sched)
    sched.shutdown()


@pytest.mark.parametrize(("spec", "message"), [
    (GrammarSpec("json_schema", "{not json"), "json_schema is not valid JSON"),
    (GrammarSpec("json_schema", '{"type": "nope"}'), 'Unsupported type "nope"'),
    (GrammarSpec("regex", "([a-z"), "Unclosed"),
    (GrammarSpec("ebnf", 'root ::= "a" |'), "EBNF parser error"),
])
def test_grammar_check_names_the_compilers_complaint(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_grammar(spec)


def test_sglang_structural_tags_compile_and_constrain(tokenizer):
    """SGLang's structural_tag form (structures + triggers): free text until a
    trigger, then the tagged JSON must match its schema."""
    from sampling.grammar import GrammarCompilers, GrammarProcessor

    tag = json.dumps({"type": "structural_tag", "triggers": ["<function="], "structures": [
        {"begin": "<function=f>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                             "required": ["x"]}, "end": "</function>"}]})
    check_grammar(GrammarSpec("structural_tag", tag))
    compilers = GrammarCompilers(tokenizer, 4096, [tokenizer.eos_token_id])
    compiled = compilers.compile(GrammarSpec("structural_tag", tag)).result(timeout=60)

    def accepts(text: str) -> bool:
        processor = GrammarProcessor(compiled)
        return all(processor.matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert accepts('hi <function=f>{"x": 12}</function> bye')
    assert not accepts('hi <function=f>{"x": "no"}</function>')
    compilers.shutdown()



@pytest.mark.parametrize("parser", ["qwen3", "deepseek-r1"])
def test_a_grammar_after_reasoning_binds_only_the_answer(tokenizer, parser):
    from sampling.grammar import GrammarCompilers, GrammarProcessor, after_reasoning

    spec = after_reasoning(GrammarSpec("regex", "[0-9]{3}"), parser)
    check_grammar(spec)
    compilers = GrammarCompilers(tokenizer, 4096, [tokenizer.eos_token_id])
    compiled = compilers.compile(spec).result(timeout=60)

    def complete(text: str) -> bool:
        """`text` is a whole output the grammar allows (then the end of sequence)."""
        processor = GrammarProcessor(compiled)
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        return all(processor.matcher.accept_token(t) for t in ids)

    opened = "<think>" if parser == "qwen3" else ""
    assert complete(f"{opened}Is it 12? No, abc.</think>\n\n123")
    assert not complete(f"{opened}fine</think>\n\n12a")
    assert not complete(f"{opened}123")  # the answer comes after the reasoning
    assert complete("123") == (parser == "qwen3")  # qwen3's thinking is optional
    compilers.shutdown()


def test_stop_strings_and_logprobs_under_a_grammar(tiny_qwen3, tokenizer):
    prompt = make_prompts([12], VOCAB, seed=107)[0]
    sched = scheduler(tiny_qwen3, tokenizer, overlap=True)
    free = run(sched, [("free", prompt, SamplingParams(max_new_tokens=30, regex=r"[a-z]{4}-[0-9]{3}",
                                                          temperature=0.0))])["free"]
    text = text_of(tokenizer, free)
    stopped = run(sched, [("stop", prompt, SamplingParams(max_new_tokens=30, regex=r"[a-z]{4}-[0-9]{3}",
                                                             temperature=0.0, stop=["-"]))])["stop"]
    assert stopped.finish.kind == "stop" and stopped.finish.matched == "-"
    assert text.startswith(text_of(tokenizer, stopped).rstrip("-")) and len(stopped.output_ids) < len(free.output_ids)
    sched.add_request(TokenizedGenerateReq("lp", prompt, SamplingParams(max_new_tokens=30, regex=r"[a-z]{4}-[0-9]{3}",
                                                                        temperature=0.0),
                                           return_logprob=True, top_logprobs_num=2))
    logprobs = []
    for out in sched.run_until_idle():
        for rid, lps in zip(out.rids, out.new_token_logprobs):
            logprobs += lps or []
    assert [t for _, t in logprobs] == free.output_ids and all(lp <= 0 for lp, _ in logprobs)
    assert_no_leak(sched)
    sched.shutdown()
