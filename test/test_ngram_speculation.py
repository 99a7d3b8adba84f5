"""NGRAM speculative decoding (managers/ngram_drafts.py): proposals against a
brute-force prompt lookup; greedy outputs identical with and without it
(batch sizes, radix cache, chunking, paging, overlap, stop conditions inside
an accepted run, TP); acceptance counted per request and in total."""

from __future__ import annotations

import random

import pytest
import requests

from managers.drafts import MAX_REST_ROUNDS, GuessBudget
from managers.io_struct import TokenizedGenerateReq
from managers.ngram_drafts import NgramIndex, NgramProposer
from managers.schedule_batch import Req
from managers.sampling_params import SamplingParams
from model_helpers import make_prompts
from runtime.demo_model import demo_model_path
from runtime.engine import Engine
from runtime.server_args import ServerArgs
from scheduler_helpers import Outcome, assert_no_leak, collect, greedy, make_scheduler, run
from server_helpers import start_server

VOCAB = 4000


def brute_force(tokens: list[int], n: int, max_window: int, k: int) -> list[int]:
    """The earlier occurrence (ending before the last token) of the newest
    `n` tokens whose match runs longest (up to max_window), most recent on a
    tie, among the last 8 occurrences; what followed it."""
    last = len(tokens)
    ends = [e for e in range(n, last) if tokens[e - n : e] == tokens[last - n :]][-8:]
    best, best_end = 0, -1
    for e in reversed(ends):
        m = n
        while m < max_window and e - m > 0 and tokens[e - m - 1] == tokens[last - m - 1]:
            m += 1
        if m > best:
            best, best_end = m, e
    return tokens[best_end : best_end + k] if best_end >= 0 and last > n else []


def test_proposals_follow_the_longest_earlier_match():
    index = NgramIndex(1)
    index.add([5, 1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3])
    # "1 2 3" matched 3 deep at position 1 beats "2 3" at position 6 (more recent, shallower).
    assert index.continuation(max_window=4, max_tokens=3) == [9, 7, 2]
    assert index.continuation(max_window=2, max_tokens=3) == [8, 1, 2]  # at depth 2 they tie: the most recent
    unique = NgramIndex(1)
    unique.add([1, 2, 3, 4])
    assert unique.continuation(4, 5) == []  # nothing recurs


def test_the_guess_count_adapts_to_acceptance():
    proposer = NgramProposer(min_window=1, max_window=4, num_draft_tokens=6)  # at most 5 guesses
    req = Req("r", [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, SamplingParams())

    def verified(accepted: int) -> None:  # what result processing records after a verify step
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted

    assert len(proposer.propose(req, 10)) == 1  # a first guess
    verified(1)
    assert len(proposer.propose(req, 10)) == 2  # all held: twice as many
    verified(2)
    assert len(proposer.propose(req, 10)) == 4
    verified(4)
    assert len(proposer.propose(req, 10)) == 5  # capped by num_draft_tokens - 1
    verified(2)
    assert len(proposer.propose(req, 10)) == 3  # two held: one more than that
    assert len(proposer.propose(req, 2)) == 2  # room caps the guesses (unverified: same budget)


def test_a_request_whose_guesses_keep_missing_sits_out_rounds():
    budget = GuessBudget()
    req = Req("r", [1, 2, 3], SamplingParams())

    def one_round(accepted: int) -> int:  # ask for guesses; if any, verify them with `accepted` holding
        n = budget.next(req, 7)
        if n:
            budget.proposed = n
            req.spec_verify_ct += 1
            req.spec_accepted_tokens += accepted
        return n

    # From the second miss in a row: 1, 2, 4 rounds without guesses.
    assert [one_round(0) for _ in range(12)] == [1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    rests = []
    for _ in range(6):  # rests grow to a cap
        rest = 0
        while one_round(0) == 0:
            rest += 1
        rests.append(rest)
    assert rests == [8, 16, 16, 16, 16, 16] and MAX_REST_ROUNDS == 16
    # A guess that holds ends the rests; misses count afresh.
    while one_round(1) == 0:
        pass
    assert [one_round(1), one_round(0), one_round(0), one_round(0), one_round(0)] == [2, 2, 1, 0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_incremental_index_matches_brute_force(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(6) for _ in range(40)]
    index = NgramIndex(2)
    index.add(tokens[:10])
    for end in range(10, len(tokens)):
        assert index.continuation(5, 3) == brute_force(tokens[:end], 2, 5, 3)
        index.add(tokens[end : end + 1])


def _workload():
    prompts = make_prompts([5, 30, 64, 17, 9, 40], VOCAB, seed=31)
    repetitive = make_prompts([10], VOCAB, seed=32)[0] * 5
    lengths = [40, 25, 60, 33, 48, 20, 64]
    return [(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts + [repetitive], lengths))]


@pytest.fixture(scope="module")
def plain_outputs(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3)
    out = {rid: o.output_ids for rid, o in run(sched, _workload()).items()}
    sched.shutdown()
    return out


@pytest.mark.parametrize("options,batch", [
    (dict(), 7), (dict(), 1), (dict(overlap=True), 3), (dict(chunk=16, page_size=16), 7), (dict(radix=False), 4),
], ids=["all-at-once", "one-at-a-time", "overlap-3", "paged-chunked", "no-radix"])
def test_greedy_outputs_equal_the_plain_run(tiny_qwen3, plain_outputs, options, batch):
    sched = make_scheduler(tiny_qwen3, drafter=NgramProposer(1, 12, 6), **options)
    workload = _workload()
    outcomes = {}
    for start in range(0, len(workload), batch):
        outcomes.update(run(sched, workload[start : start + batch]))
    assert {rid: o.output_ids for rid, o in outcomes.items()} == plain_outputs
    stats = sched.stats()
    assert stats["spec_verify_steps"] > 0 and stats["avg_spec_accept_length"] > 1.0
    assert_no_leak(sched)
    sched.shutdown()


def test_repetitive_generation_accepts_more_than_one_token_per_step(tiny_qwen3):
    # Greedy decoding of a random model falls into loops; NGRAM drafts them
    # from the output so far.
    sched = make_scheduler(tiny_qwen3, drafter=NgramProposer(1, 12, 8))
    run(sched, [("x", make_prompts([16], VOCAB, seed=1)[0], greedy(200))])
    stats = sched.stats()
    assert stats["avg_spec_accept_length"] > 1.4  # seen: 1.52
    assert_no_leak(sched)
    sched.shutdown()


def test_stops_inside_an_accepted_run_keep_nothing_past_them(tiny_qwen3, plain_outputs):
    workload = _workload()
    rid, prompt, _ = workload[2]
    plain = plain_outputs[rid]
    stop_at = plain[37]
    first = plain.index(stop_at)  # the stop ends the output at its first occurrence
    requests_ = [
        ("stop-token", prompt, greedy(60, stop_token_ids=[stop_at])),
        ("length", prompt, greedy(23)),
    ]
    sched = make_scheduler(tiny_qwen3, drafter=NgramProposer(1, 12, 8))
    for name, ids, params in requests_:
        sched.add_request(TokenizedGenerateReq(name, ids, params))
    outcomes: dict[str, Outcome] = {}
    lengths = []
    while not sched.is_idle():
        out = sched.step()
        collect(outcomes, out)
        lengths += [len(t) for t in out.new_token_ids]
    assert outcomes["stop-token"].output_ids == plain[: first + 1]
    assert outcomes["stop-token"].finish.kind == "stop"
    assert outcomes["length"].output_ids == plain[:23] and outcomes["length"].finish.kind == "length"
    assert max(lengths) > 1  # some steps returned an accepted run
    assert_no_leak(sched)
    sched.shutdown()


def test_eos_inside_an_accepted_run_keeps_nothing_past_it(tiny_qwen3, plain_outputs):
    rid, prompt, _ = _workload()[6]  # the repeated passage: long accepted runs
    plain = plain_outputs[rid]
    eos = plain[30]
    first = plain.index(eos)
    sched = make_scheduler(tiny_qwen3, drafter=NgramProposer(1, 12, 8), eos=frozenset({eos}))
    outcome = run(sched, [("eos", prompt, greedy(64))])["eos"]
    assert outcome.output_ids == plain[: first + 1] and outcome.finish.kind == "stop"
    assert sched.stats()["spec_accepted_tokens"] > 0
    assert_no_leak(sched)
    sched.shutdown()


def test_flags_are_checked():
    path = str(demo_model_path("qwen3", "tiny"))
    with pytest.raises(ValueError, match="--speculative-algorithm must be one of NGRAM"):
        ServerArgs(model_path=path, speculative_algorithm="MEDUSA")
    with pytest.raises(ValueError, match="--speculative-num-draft-tokens must be >= 2"):
        ServerArgs(model_path=path, speculative_algorithm="NGRAM", speculative_num_draft_tokens=1)
    with pytest.raises(ValueError, match="min-match-window-size must be >= 1 and <="):
        ServerArgs(model_path=path, speculative_ngram_min_match_window_size=5,
                   speculative_ngram_max_match_window_size=3)
    config = ServerArgs(model_path=path, speculative_algorithm="NGRAM").scheduler_config().speculative
    assert config.algorithm == "NGRAM" and config.num_draft_tokens == 8


def test_server_reports_acceptance(tmp_path):
    server = start_server(demo_model_path("qwen3", "tiny"), tmp_path, "--speculative-algorithm", "NGRAM")
    try:
        prompt = make_prompts([10], VOCAB, seed=32)[0] * 5  # a repeated passage: NGRAM's guesses hold at times
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 200, "temperature": 0}}
        meta = requests.post(server.url + "/generate", json=body, timeout=120).json()["meta_info"]
        assert meta["completion_tokens"] == 200
        assert 0 < meta["spec_verify_ct"] and 0 < meta["spec_accepted_tokens"] < 200
        state = requests.get(server.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        assert state["spec_verify_steps"] == meta["spec_verify_ct"]
        assert state["avg_spec_accept_length"] == pytest.approx(1 + meta["spec_accepted_tokens"] / meta["spec_verify_ct"])
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert "radixserve_spec_accept_length" in metrics
    finally:
        assert server.stop() == 0


def test_tp2_drafts_agree_across_ranks():
    path = str(demo_model_path("qwen3", "tiny"))
    prompts = [p for _, p, _ in _workload()[:4]]
    greedy_params = {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}
    # Sampled draws at the guess positions come from rank 0, like every sampled token.
    sampled_params = {"max_new_tokens": 30, "temperature": 0.8, "top_k": 20, "seed": 5, "ignore_eos": True}
    outputs = {}
    for spec in (None, "NGRAM"):
        engine = Engine(model_path=path, dtype="float32", max_total_tokens=4096, tp_size=2,
                        speculative_algorithm=spec)
        try:
            outputs[spec] = [[o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
                             for params in (greedy_params, sampled_params)]
            info = engine.get_server_info()["internal_states"][0]
        finally:
            engine.shutdown()
    assert outputs["NGRAM"] == outputs[None]
    assert info["spec_accepted_tokens"] > 0


# ---- sampled requests --------------------------------------------------------


def test_seeded_sampled_outputs_equal_the_plain_run(tiny_qwen3):
    """Each guess position samples with the seed of its output position, so a
    seeded request's tokens are the plain run's, whatever was accepted."""
    prompts = make_prompts([12, 33], VOCAB, seed=41) + [make_prompts([6], VOCAB, seed=42)[0] * 6]
    requests_ = [(f"s{i}-{seed}", p, SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.95, top_k=40,
                                                       seed=seed))
                 for i, p in enumerate(prompts) for seed in range(4)]
    plain = make_scheduler(tiny_qwen3)
    want = {rid: o.output_ids for rid, o in run(plain, requests_).items()}
    plain.shutdown()
    for options in (dict(), dict(overlap=True)):
        sched = make_scheduler(tiny_qwen3, drafter=NgramProposer(1, 12, 6), **options)
        assert {rid: o.output_ids for rid, o in run(sched, requests_).items()} == want
        assert sched.stats()["spec_accepted_tokens"] > 0
        assert_no_leak(sched)
        sched.shutdown()


class FixedGuesses:
    """Guesses `tokens` at the second output position, nothing elsewhere."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def propose(self, req, max_tokens: int) -> list[int]:
        return self.tokens[:max_tokens] if len(req.output_ids) == 1 else []


def test_rejection_sampling_keeps_the_target_distribution(tiny_qwen3):
    """Unseeded requests whose second token is verified against a fixed
    guess: among runs whose first token is the likeliest, the second token's
    empirical distribution matches the model's (temperature 1, top-4, so 4
    outcomes), by a chi-square test at significance 0.001 (critical value
    16.27 for 3 degrees of freedom). The guess is the second likeliest token:
    accepted about as often as it is likely, the rest drawn from the residual."""
    import torch

    from model_executor.batch_runner import BatchRunner
    from model_helpers import make_runner

    prompt = make_prompts([10], VOCAB, seed=43)[0]
    runner = make_runner(tiny_qwen3)
    batch = BatchRunner(runner)
    seq = batch.add_sequence()
    out, _ = batch.extend([seq], [prompt])
    first = int(out.next_token_logits[0].argmax())
    out, _ = batch.extend([seq], [[first]])
    batch.release_all()
    probs = torch.softmax(out.next_token_logits[0].float(), dim=-1)
    top_probs, top_ids = probs.topk(4)
    target = (top_probs / top_probs.sum()).tolist()
    guess = int(top_ids[1])

    # Three tokens: after the first, room for one guess (and the bonus token after it).
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
    sched = make_scheduler(tiny_qwen3, drafter=FixedGuesses([guess, guess]), max_running=64)
    outcomes = run(sched, [(f"u{i}", prompt, params) for i in range(1200)])
    seconds = [o.output_ids[1] for o in outcomes.values() if o.output_ids[0] == first]
    assert sched.stats()["spec_verify_steps"] >= len(seconds)  # every one of them was verified
    assert_no_leak(sched)
    sched.shutdown()
    n = len(seconds)
    assert n >= 200
    observed = [seconds.count(int(t)) for t in top_ids]
    assert sum(observed) == n  # nothing outside the top 4
    chi2 = sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, target))
    assert chi2 < 16.27, (observed, [round(n * p, 1) for p in target])


def test_stop_strings_and_parallel_samples_through_the_engine():
    """A stop string that ends inside an accepted run cuts the text (and the
    tokens) exactly where the plain run does; n = 2 samples each equal the
    plain run's."""
    path = str(demo_model_path("qwen3", "tiny"))
    prompt = "def parse(tokens):\n    for token in tokens:\n        if token == 'x':\n" * 3
    base = {"max_new_tokens": 60, "temperature": 0}
    results = {}
    for spec in (None, "NGRAM"):
        engine = Engine(model_path=path, dtype="float32", max_total_tokens=4096, speculative_algorithm=spec)
        try:
            free = engine.generate(prompt, base)
            if spec is None:
                text = free["text"]
                stop = text[len(text) // 2 : len(text) // 2 + 3]
            stopped = engine.generate(prompt, base | {"stop": [stop]})
            pair = engine.generate(prompt, base | {"n": 2})
            results[spec] = (free["text"], stopped["text"], stopped["meta_info"]["finish_reason"],
                             [o["output_ids"] for o in pair])
            spec_steps = engine.get_server_info()["internal_states"][0]["spec_verify_steps"]
        finally:
            engine.shutdown()
    assert results["NGRAM"] == results[None]
    assert results[None][2]["type"] == "stop" and stop not in results[None][1]
    assert spec_steps > 0
