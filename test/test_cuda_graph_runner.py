"""CUDA-graph decode: batch-size buckets, padding, static buffers and the
backend's replay metadata.

On CPU the graphs themselves cannot be captured; `capture=False` replays by
running the model eagerly on the static buffers, which checks everything
else (Triton kernels under TRITON_INTERPRET). With CUDA, the real graphs are
captured and must match eager decode.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from model_executor.batch_runner import BatchRunner  # noqa: E402
from model_executor.cuda_graph_runner import CudaGraphRunner, capture_batch_sizes, padded_batch_size  # noqa: E402
from model_helpers import make_prompts, make_runner  # noqa: E402
from runtime.demo_model import demo_model_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


def test_padded_batch_size():
    sizes = capture_batch_sizes(32)
    assert [padded_batch_size(b, sizes) for b in (1, 3, 5, 9, 16, 17, 32)] == [1, 4, 8, 16, 16, 24, 32]
    assert padded_batch_size(33, sizes) is None


def _triton_runner(path):
    runner = make_runner(path, page_size=16, device=DEVICE, max_running_requests=8)
    runner.attn_backend = TritonAttnBackend(runner.device)
    runner.cuda_graph_runner = None
    return runner


@pytest.mark.parametrize("batch_size", [1, 3])  # 3 is padded to the captured 4
def test_replayed_decode_matches_eager(batch_size):
    path = demo_model_path("qwen3", "tiny")
    eager = BatchRunner(_triton_runner(path))
    graphed_runner = _triton_runner(path)
    graphed_runner.cuda_graph_runner = CudaGraphRunner(
        graphed_runner, max_bs=8, capture=torch.cuda.is_available()
    )
    graphed = BatchRunner(graphed_runner)
    prompts = make_prompts([5 + 7 * i for i in range(batch_size)], 4096, seed=1)
    ids_e = [eager.add_sequence() for _ in prompts]
    ids_g = [graphed.add_sequence() for _ in prompts]
    a, _ = eager.extend(ids_e, prompts)
    b, _ = graphed.extend(ids_g, prompts)  # prefill: not a graph
    for _ in range(2):
        tokens = a.next_token_logits.argmax(-1).view(-1, 1).tolist()
        a, _ = eager.extend(ids_e, tokens)
        b, fb = graphed.extend(ids_g, tokens)
        assert graphed_runner.cuda_graph_runner.can_run(fb)  # this step went through the replay path
        assert b.next_token_logits.shape == a.next_token_logits.shape
        assert (a.next_token_logits - b.next_token_logits).abs().max().item() <= 1e-4
    # Padding rows wrote only into the reserved slot: every real slot comes back.
    graphed.release_all()
    allocator = graphed_runner.token_to_kv_pool_allocator
    assert allocator.available_size() == graphed_runner.max_total_num_tokens


def test_batches_too_large_or_not_decode_run_eagerly():
    runner = _triton_runner(demo_model_path("qwen3", "tiny"))
    graphs = CudaGraphRunner(runner, max_bs=4, capture=torch.cuda.is_available())
    batch = BatchRunner(runner)
    seqs = [batch.add_sequence() for _ in range(5)]
    _, fb = batch.extend(seqs, make_prompts([4] * 5, 4096))
    assert not graphs.can_run(fb)  # extend
    _, fb = batch.extend(seqs, [[7]] * 5)
    assert fb.forward_mode.is_decode() and not graphs.can_run(fb)  # 5 > 4
    _, fb = batch.extend(seqs[:4], [[7]] * 4)
    assert graphs.can_run(fb)


def test_replay_when_shared_prefixes_exceed_the_pool():
    # Four sequences on one cached 64-token prefix: their contexts add up to
    # more tokens than the KV pool holds, which the static index buffer must allow.
    path = demo_model_path("qwen3", "tiny")
    runner = make_runner(path, page_size=16, device=DEVICE, max_running_requests=8, max_total_tokens=160)
    runner.attn_backend = TritonAttnBackend(runner.device)
    runner.cuda_graph_runner = CudaGraphRunner(runner, max_bs=4, capture=torch.cuda.is_available())
    eager_runner = make_runner(path, page_size=16, device=DEVICE, max_running_requests=8, max_total_tokens=160)
    eager_runner.attn_backend = TritonAttnBackend(eager_runner.device)
    outputs = []
    for r in (runner, eager_runner):
        batch = BatchRunner(r)
        source = batch.add_sequence()
        batch.extend([source], make_prompts([64], 4096, seed=8))
        seqs = [batch.add_sequence(share_prefix_of=source, prefix_len=64) for _ in range(4)]
        batch.extend(seqs, [[5], [6], [7], [8]])  # each gets its own first token after the prefix: 4-way MIXED/decode
        out, fb = batch.extend(seqs, [[9], [10], [11], [12]])
        assert sum(fb.seq_lens_cpu) > r.max_total_num_tokens
        outputs.append(out.next_token_logits)
    assert runner.cuda_graph_runner.can_run(fb)
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-4
