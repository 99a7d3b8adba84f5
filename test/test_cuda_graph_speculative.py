"""CUDA graphs for speculative decoding: verify steps (each sequence's last
token and its guesses, padded to a fixed number of rows), an EAGLE head's
decode (a static buffer for the target's hidden states), and the target's
hidden states handed back from replayed steps.

As in test_cuda_graph_runner.py, on CPU `capture=False` runs the model
eagerly on the static buffers (Triton kernels under TRITON_INTERPRET): every
part but the capture itself. With CUDA the graphs are real.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from managers.eagle_drafts import EagleProposer  # noqa: E402
from managers.ngram_drafts import NgramProposer  # noqa: E402
from model_executor.batch_runner import BatchRunner  # noqa: E402
from model_executor.cuda_graph_runner import CudaGraphRunner, is_verify_shaped  # noqa: E402
from model_executor.model_config import ModelRunnerConfig  # noqa: E402
from model_executor.model_runner import ModelRunner  # noqa: E402
from model_helpers import make_prompts, make_runner  # noqa: E402
from runtime.demo_model import demo_model_path  # noqa: E402
from scheduler_helpers import assert_no_leak, drafting_workload, make_scheduler, plain_outputs, run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAPTURE = torch.cuda.is_available()
ROWS = 4  # rows per sequence in the verify graphs: the last token and up to 3 guesses
VOCAB = 4000


def _on_graphs(runner: ModelRunner, verify_rows: int = 0, max_bs: int = 8) -> ModelRunner:
    """`runner` on the Triton backend, its steps going through the graph runner."""
    runner.attn_backend = TritonAttnBackend(runner.device)
    runner.cuda_graph_runner = CudaGraphRunner(runner, max_bs=max_bs, capture=CAPTURE, verify_rows=verify_rows)
    return runner


def _triton(runner: ModelRunner) -> ModelRunner:
    runner.attn_backend = TritonAttnBackend(runner.device)
    runner.cuda_graph_runner = None
    return runner


def _count_replays(runner: ModelRunner) -> list[str]:
    """A record of the steps the graph runner replays ("decode" / "verify")."""
    graphs = runner.cuda_graph_runner
    seen: list[str] = []
    replay = graphs.replay

    def counted(batch):
        seen.append("decode" if batch.forward_mode.is_decode() else "verify")
        return replay(batch)

    graphs.replay = counted
    return seen


@pytest.mark.parametrize("tokens_per_seq", [[1, 3, 4], [2], [4, 4, 1, 2, 3]],
                         ids=["3-padded-to-4", "one", "5-padded-to-8"])
def test_replayed_verify_matches_eager(tokens_per_seq):
    path = demo_model_path("qwen3", "tiny")
    eager_runner = _triton(make_runner(path, page_size=16, device=DEVICE, max_running_requests=8))
    graphed_runner = _on_graphs(make_runner(path, page_size=16, device=DEVICE, max_running_requests=8), ROWS)
    replays = _count_replays(graphed_runner)
    prompts = make_prompts([5 + 9 * i for i in range(len(tokens_per_seq))], VOCAB, seed=3)
    # Two steps, the second's guess counts reversed: its padding rows are rows
    # the first step's real tokens used.
    steps = [make_prompts(lengths, VOCAB, seed=4 + k) for k, lengths in enumerate([tokens_per_seq, tokens_per_seq[::-1]])]
    outputs = []
    for runner in (eager_runner, graphed_runner):
        batch = BatchRunner(runner)
        ids = [batch.add_sequence() for _ in prompts]
        batch.extend(ids, prompts)
        per_step = []
        for tokens in steps:
            out, fb = batch.extend(ids, tokens, draft_lens=[len(t) - 1 for t in tokens], capture_hidden=True)
            per_step.append(out)
            assert is_verify_shaped(fb)
        outputs.append(per_step)
        batch.release_all()
        # Padding rows wrote only into the reserved slot: every real slot comes back.
        assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    assert replays == ["verify", "verify"]
    for a, b in zip(*outputs):
        assert b.next_token_logits.shape == a.next_token_logits.shape
        assert b.verify_logits.shape == a.verify_logits.shape
        assert a.verify_logits.shape[0] == sum(tokens_per_seq) - len(tokens_per_seq)  # a row per guess
        assert b.hidden_states.shape == a.hidden_states.shape
        for x, y in ((a.next_token_logits, b.next_token_logits), (a.verify_logits, b.verify_logits),
                     (a.hidden_states, b.hidden_states)):
            assert (x - y).abs().max().item() <= 1e-4


def test_what_verify_graphs_take():
    runner = _on_graphs(make_runner(demo_model_path("qwen3", "tiny"), device=DEVICE, max_running_requests=8),
                        ROWS, max_bs=4)
    graphs = runner.cuda_graph_runner
    assert graphs.verify_batch_sizes == [1, 2, 4]
    batch = BatchRunner(runner)
    ids = [batch.add_sequence() for _ in range(5)]
    batch.extend(ids, make_prompts([6] * 5, VOCAB))
    _, fb = batch.extend(ids[:2], [[5, 6, 7, 8, 9], [5]], draft_lens=[4, 0])
    assert not graphs.can_run(fb)  # more guesses than the graphs have rows for
    _, fb = batch.extend(ids, [[5, 6]] * 5, draft_lens=[1] * 5)
    assert not graphs.can_run(fb)  # 5 sequences > 4
    _, fb = batch.extend(ids[:2], [[5, 6], [7, 8]])
    assert not graphs.can_run(fb)  # no guesses: an extend, not a verify step
    _, fb = batch.extend(ids[:2], [[5, 6], [7, 8]], draft_lens=[1, 1])
    assert graphs.can_run(fb)
    # Without verify rows only decode is captured.
    plain = _on_graphs(make_runner(demo_model_path("qwen3", "tiny"), device=DEVICE, max_running_requests=8))
    assert plain.cuda_graph_runner.verify_batch_sizes == [] and not plain.cuda_graph_runner.can_run(fb)


def _head_runner(tiny_llama, eagle_head) -> ModelRunner:
    config = ModelRunnerConfig(model_path=str(eagle_head), dtype="float32", device=DEVICE, max_total_tokens=4096,
                               max_running_requests=8, fallback_weight_paths=(str(tiny_llama),))
    return ModelRunner(config)


def test_eagle_head_decode_replays_with_the_targets_hidden_states(tiny_llama, eagle_head):
    eager = _triton(_head_runner(tiny_llama, eagle_head))
    graphed = _on_graphs(_head_runner(tiny_llama, eagle_head))
    assert graphed.cuda_graph_runner.spec_hidden is not None
    replays = _count_replays(graphed)
    hidden_size = eager.model.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    prompts = make_prompts([7, 12, 3], VOCAB, seed=6)
    prompt_hidden = torch.randn(sum(map(len, prompts)), hidden_size, generator=generator).to(DEVICE)
    step_hidden = [torch.randn(3, hidden_size, generator=generator).to(DEVICE) for _ in range(2)]
    outputs = []
    for runner in (eager, graphed):
        batch = BatchRunner(runner)
        ids = [batch.add_sequence() for _ in prompts]
        out, _ = batch.extend(ids, prompts, spec_hidden=prompt_hidden)
        per_step = []
        for hidden in step_hidden:  # the chained guesses: one token each, the head's own states
            tokens = out.next_token_logits.argmax(-1).view(-1, 1).tolist()
            out, _ = batch.extend(ids, tokens, spec_hidden=hidden)
            per_step.append(out)
        outputs.append(per_step)
        batch.release_all()
    assert replays == ["decode", "decode"]
    for a, b in zip(*outputs):
        assert (a.next_token_logits - b.next_token_logits).abs().max().item() <= 1e-4
        assert (a.hidden_states - b.hidden_states).abs().max().item() <= 1e-4


def test_replayed_decode_hands_back_the_targets_hidden_states(tiny_llama):
    eager = _triton(make_runner(tiny_llama, device=DEVICE, max_running_requests=8))
    graphed = _on_graphs(make_runner(tiny_llama, device=DEVICE, max_running_requests=8))
    prompts = make_prompts([4, 9, 6], VOCAB, seed=7)
    states = []
    for runner in (eager, graphed):
        batch = BatchRunner(runner)
        ids = [batch.add_sequence() for _ in prompts]
        batch.extend(ids, prompts)
        out, fb = batch.extend(ids, [[11], [12], [13]], capture_hidden=True)
        states.append(out.hidden_states)
        quiet, _ = batch.extend(ids, [[14], [15], [16]])
        assert quiet.hidden_states is None  # asked for nothing, handed nothing
    assert graphed.cuda_graph_runner.can_run(fb)
    assert states[1].shape == states[0].shape
    assert (states[0] - states[1]).abs().max().item() <= 1e-4


def _scheduler_on_graphs(path, drafter, capture_hidden: bool = False):
    sched = make_scheduler(path, drafter=drafter, max_running=8)
    runner = _on_graphs(sched.worker.model_runner, ROWS + 1)
    sched.capture_hidden = capture_hidden
    return sched, _count_replays(runner)


def test_ngram_speculation_on_graphs_equals_the_plain_run():
    path = demo_model_path("qwen3", "tiny")
    repeat = make_prompts([6], VOCAB, seed=8)[0] * 4
    workload = drafting_workload([repeat, make_prompts([9], VOCAB, seed=9)[0], repeat[:10]], [14, 10, 12])
    sched, replays = _scheduler_on_graphs(path, NgramProposer(1, 8, ROWS + 1))
    assert {rid: o.output_ids for rid, o in run(sched, workload).items()} == plain_outputs(path, workload)
    assert "verify" in replays and sched.stats()["spec_verify_steps"] > 0
    assert_no_leak(sched)
    sched.shutdown()


def test_eagle_on_graphs_equals_the_plain_run(tiny_llama, eagle_head):
    head_runner = _on_graphs(_head_runner(tiny_llama, eagle_head))
    proposer = EagleProposer(head_runner, ROWS + 1)
    head_replays = _count_replays(head_runner)
    workload = drafting_workload(make_prompts([5, 11], VOCAB, seed=10), [12, 9])
    sched, replays = _scheduler_on_graphs(tiny_llama, proposer, capture_hidden=True)
    sched.results.feature_sink = proposer.observe
    assert {rid: o.output_ids for rid, o in run(sched, workload).items()} == plain_outputs(tiny_llama, workload)
    assert "verify" in replays and "decode" in head_replays
    assert sched.stats()["spec_verify_steps"] > 0
    assert_no_leak(sched)
    assert not proposer.owners
    sched.shutdown()
