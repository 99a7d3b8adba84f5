"""STANDALONE speculative decoding (managers/model_drafts.py): a draft model
with its own KV pool. Outputs equal the plain run's (greedy and seeded
sampled; batching, radix cache, chunking, overlap, retraction, TP); the
target as its own draft accepts every guess; no KV left in either pool; a
draft with another vocabulary is refused before start."""

from __future__ import annotations

import json
import shutil

import pytest

from managers.model_drafts import DraftModelProposer
from model_helpers import make_prompts, make_runner
from runtime.demo_model import demo_model_path
from runtime.engine import Engine
from runtime.server_args import ServerArgs
from scheduler_helpers import (assert_no_leak, drafting_workload, greedy, make_scheduler, plain_outputs, run,
                               speculative_engine_runs)

VOCAB = 4000


def _workload(sampled: bool = False):
    return drafting_workload(make_prompts([5, 30, 64, 17, 9], VOCAB, seed=51), [24, 40, 16, 33, 28], sampled)


def _drafter(draft_path, tokens: int = 5) -> DraftModelProposer:
    return DraftModelProposer(make_runner(draft_path, max_total_tokens=8192, max_running_requests=32), tokens)


def _assert_draft_pool_empty(drafter: DraftModelProposer) -> None:
    runner = drafter.runner
    assert not drafter.owners
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    assert runner.req_to_token_pool.available_size() == runner.req_to_token_pool.size


def test_the_target_as_its_own_draft_accepts_every_guess(tiny_qwen3):
    workload = _workload()
    drafter = _drafter(tiny_qwen3)
    sched = make_scheduler(tiny_qwen3, drafter=drafter)
    outcomes = run(sched, workload)
    assert {rid: o.output_ids for rid, o in outcomes.items()} == plain_outputs(tiny_qwen3, workload)
    stats = sched.stats()
    assert stats["spec_drafted_tokens"] > 0 and stats["spec_accepted_tokens"] == stats["spec_drafted_tokens"]
    assert_no_leak(sched)
    _assert_draft_pool_empty(drafter)
    sched.shutdown()


@pytest.mark.parametrize("options", [dict(), dict(overlap=True), dict(chunk=16), dict(radix=False)],
                         ids=["plain", "overlap", "chunked", "no-radix"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampled"])
def test_another_draft_model_leaves_outputs_unchanged(tiny_qwen3, options, sampled):
    workload = _workload(sampled)
    # A second random model (same tokenizer): its guesses are mostly
    # rejected, so every step exercises the rollback of draft and target KV.
    drafter = _drafter(demo_model_path("qwen3", "tiny", seed=1))
    sched = make_scheduler(tiny_qwen3, drafter=drafter, **options)
    assert {rid: o.output_ids for rid, o in run(sched, workload).items()} == plain_outputs(tiny_qwen3, workload)
    assert sched.stats()["spec_verify_steps"] > 0
    assert_no_leak(sched)
    _assert_draft_pool_empty(drafter)
    sched.shutdown()


def test_retraction_rebuilds_the_draft_state(tiny_qwen3):
    prompts = make_prompts([60 + i for i in range(16)], VOCAB, seed=52)
    workload = [(f"m{i}", p, greedy(40)) for i, p in enumerate(prompts)]
    want = plain_outputs(tiny_qwen3, workload)
    drafter = _drafter(tiny_qwen3, tokens=4)
    tight = make_scheduler(tiny_qwen3, drafter=drafter, max_total_tokens=420)  # about four at once
    assert {rid: o.output_ids for rid, o in run(tight, workload).items()} == want
    assert tight.num_retractions > 0
    assert tight.stats()["spec_accepted_tokens"] > 0
    assert_no_leak(tight)
    _assert_draft_pool_empty(drafter)
    tight.shutdown()


def test_a_full_draft_pool_drafts_nothing_that_step(tiny_qwen3):
    workload = _workload()
    drafter = DraftModelProposer(make_runner(tiny_qwen3, max_total_tokens=64, max_running_requests=32), 5)
    sched = make_scheduler(tiny_qwen3, drafter=drafter)
    assert {rid: o.output_ids for rid, o in run(sched, workload).items()} == plain_outputs(tiny_qwen3, workload)
    assert_no_leak(sched)
    _assert_draft_pool_empty(drafter)
    sched.shutdown()


def test_flags_and_vocabulary_are_checked(tmp_path):
    path = str(demo_model_path("qwen3", "tiny"))
    with pytest.raises(ValueError, match="and they need it"):
        ServerArgs(model_path=path, speculative_algorithm="STANDALONE")
    with pytest.raises(ValueError, match="must be --speculative-num-steps"):
        ServerArgs(model_path=path, speculative_algorithm="STANDALONE", speculative_draft_model_path=path,
                   speculative_num_steps=3, speculative_num_draft_tokens=6)
    args = ServerArgs(model_path=path, speculative_algorithm="STANDALONE", speculative_draft_model_path=path,
                      speculative_num_steps=3)
    assert args.scheduler_config().speculative.num_draft_tokens == 4
    other = tmp_path / "other-vocab"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 5000
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="draft model's vocabulary \\(5000 tokens"):
        Engine(model_path=path, max_total_tokens=2048, speculative_algorithm="STANDALONE",
               speculative_draft_model_path=str(other))


def test_engine_and_tp2_share_rank_zero_drafts():
    path = str(demo_model_path("qwen3", "tiny"))
    runs = speculative_engine_runs(path, "STANDALONE", path, [p for _, p, _ in _workload()[:3]])
    assert all(o["meta_info"]["spec_accepted_tokens"] > 0 for o in runs[(1, "STANDALONE")] + runs[(2, "STANDALONE")])
    ids = {key: [o["output_ids"] for o in outs] for key, outs in runs.items()}
    assert ids[(1, "STANDALONE")] == ids[(1, None)] == ids[(2, "STANDALONE")]
