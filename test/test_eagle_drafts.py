"""EAGLE speculative decoding (managers/eagle_drafts.py,
model_executor/models/llama_eagle.py): an EAGLE head checkpoint written here
in EAGLE's own layout (no embedding or LM head: the target's are used) loads
and drafts from the target's hidden states; outputs equal the plain run's
(greedy and seeded sampled; radix-cache hits, chunking, overlap, retraction,
TP); no KV is left in either pool."""

from __future__ import annotations

import pytest
import torch

from managers.eagle_drafts import EagleProposer
from model_executor.model_config import ModelRunnerConfig
from model_executor.model_runner import ModelRunner
from model_helpers import make_prompts
from runtime.demo_eagle import write_eagle_head
from scheduler_helpers import (assert_no_leak, drafting_workload, greedy, make_scheduler, plain_outputs, run,
                               speculative_engine_runs)

VOCAB = 4000


def _proposer(tiny_llama, eagle_head) -> EagleProposer:
    config = ModelRunnerConfig(model_path=str(eagle_head), dtype="float32", max_total_tokens=8192,
                               max_running_requests=32, fallback_weight_paths=(str(tiny_llama),))
    return EagleProposer(ModelRunner(config), 5)


def _workload(sampled: bool = False):
    return drafting_workload(make_prompts([5, 30, 64, 17], VOCAB, seed=61) + [make_prompts([8], VOCAB, seed=62)[0] * 6], [24, 40, 16, 33, 30], sampled)


def _assert_head_pool_empty(proposer: EagleProposer) -> None:
    runner = proposer.runner
    assert not proposer.owners
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_the_head_loads_with_the_targets_embedding_and_lm_head(tiny_llama, eagle_head, tmp_path):
    proposer = _proposer(tiny_llama, eagle_head)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = proposer.runner.model
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    # SGLang's "model."-prefixed names load the same head.
    prefixed = _proposer(tiny_llama, write_eagle_head(tiny_llama, tmp_path / "prefixed", prefixed=True)).runner.model
    assert torch.equal(prefixed.model.fc.weight, model.model.fc.weight)


def _check_hidden_capture_drafts(sched):
    stats = sched.stats()
    assert stats["spec_verify_steps"] > 0 and stats["spec_drafted_tokens"] > 0


@pytest.mark.parametrize("options", [dict(), dict(overlap=True), dict(chunk=16), dict(radix=False)],
                         ids=["plain", "overlap", "chunked", "no-radix"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampled"])
def test_outputs_equal_the_plain_run(tiny_llama, eagle_head, options, sampled):
    workload = _workload(sampled)
    proposer = _proposer(tiny_llama, eagle_head)
    sched = make_scheduler(tiny_llama, drafter=proposer, **options)
    sched.capture_hidden = True  # what --speculative-algorithm EAGLE sets
    sched.results.feature_sink = proposer.observe
    # Twice: the second round's prompts hit the radix cache (no hidden states for the cached prefix).
    for _ in range(2):
        assert {rid: o.output_ids for rid, o in run(sched, workload).items()} == plain_outputs(tiny_llama, workload)
    _check_hidden_capture_drafts(sched)
    assert_no_leak(sched)
    _assert_head_pool_empty(proposer)
    sched.shutdown()


def test_retraction_rebuilds_the_head_state(tiny_llama, eagle_head):
    prompts = make_prompts([60 + i for i in range(16)], VOCAB, seed=63)
    workload = [(f"m{i}", p, greedy(40)) for i, p in enumerate(prompts)]
    proposer = _proposer(tiny_llama, eagle_head)
    tight = make_scheduler(tiny_llama, drafter=proposer, max_total_tokens=420)
    tight.capture_hidden = True
    tight.results.feature_sink = proposer.observe
    assert {rid: o.output_ids for rid, o in run(tight, workload).items()} == plain_outputs(tiny_llama, workload)
    assert tight.num_retractions > 0
    assert_no_leak(tight)
    _assert_head_pool_empty(proposer)
    tight.shutdown()


def test_engine_eagle_with_tp2(tiny_llama, eagle_head):
    runs = speculative_engine_runs(str(tiny_llama), "EAGLE", str(eagle_head), [p for _, p, _ in _workload()[:3]])
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in runs[(1, "EAGLE")] + runs[(2, "EAGLE")])
    ids = {key: [o["output_ids"] for o in outs] for key, outs in runs.items()}
    assert ids[(1, "EAGLE")] == ids[(1, None)] == ids[(2, "EAGLE")]


def test_the_head_reads_each_position_with_the_token_after_it(tiny_llama, eagle_head):
    """The first guess after a prefill is the head's prediction from the
    pairs (target hidden state at p, token at p + 1), computed here
    independently: transformers' final (normed) hidden states, and the head
    run by hand on them."""
    from transformers import AutoModelForCausalLM

    from managers.io_struct import AbortReq, TokenizedGenerateReq
    from model_executor.batch_runner import BatchRunner

    prompt = make_prompts([21], VOCAB, seed=64)[0]
    proposer = _proposer(tiny_llama, eagle_head)
    sched = make_scheduler(tiny_llama, drafter=proposer)
    sched.capture_hidden = True
    sched.results.feature_sink = proposer.observe
    sched.add_request(TokenizedGenerateReq("x", prompt, greedy(8)))
    sched.step()  # the prefill: its hidden states reach the head, and the first token
    req = sched.running[0]
    tokens = req.origin_input_ids + req.output_ids
    guess = proposer.propose(req, 1)

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        states = reference(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
    by_hand = BatchRunner(_proposer(tiny_llama, eagle_head).runner)
    seq = by_hand.add_sequence()
    out, _ = by_hand.extend([seq], [tokens[1:]], spec_hidden=states)
    assert guess == [int(out.next_token_logits[0].argmax())]
    sched.abort_request(AbortReq("x"))
    sched.run_until_idle()
    by_hand.release_all()
    _assert_head_pool_empty(proposer)
    sched.shutdown()
