"""Cached-prefix extends give the same logits as one full extend.

Covers the three ways a sequence's KV can come from earlier work: a shared
prefix (what a radix-cache hit does), a prompt split across two extends
(chunked prefill; the split may fall inside a page), and extends mixed with
1-token decodes of other sequences in one batch.
"""

from __future__ import annotations

import pytest
import torch

from model_executor.batch_runner import BatchRunner
from model_executor.forward_batch import ForwardMode
from model_helpers import make_prompts, make_runner

# Same bound as the transformers parity: GEMMs over different row counts
# round differently, ~2e-5 on logits of magnitude ~10.
ATOL = 1e-4


def _full_extend_logits(batch: BatchRunner, prompt: list[int]) -> tuple[int, torch.Tensor]:
    seq = batch.add_sequence()
    out, _ = batch.extend([seq], [prompt], return_all_logits=True)
    return seq, out.all_logits


@pytest.mark.parametrize("page_size", [1, 16])
def test_shared_prefix_matches_full_extend(tiny_qwen3, page_size):
    runner = make_runner(tiny_qwen3, page_size=page_size)
    batch = BatchRunner(runner)
    prompt = make_prompts([70], runner.model_config.vocab_size)[0]
    source, full = _full_extend_logits(batch, prompt)

    for prefix_len in (16, 32, 64):
        seq = batch.add_sequence(share_prefix_of=source, prefix_len=prefix_len)
        out, fb = batch.extend([seq], [prompt[prefix_len:]], return_all_logits=True)
        assert fb.extend_prefix_lens_cpu == [prefix_len]
        diff = (out.all_logits - full[prefix_len:]).abs().max().item()
        assert diff <= ATOL, f"prefix {prefix_len}, page {page_size}: {diff}"
        batch.release(seq)
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("split", [1, 16, 21, 69])
def test_chunked_extend_matches_full_extend(tiny_qwen3, page_size, split):
    runner = make_runner(tiny_qwen3, page_size=page_size)
    batch = BatchRunner(runner)
    prompt = make_prompts([70], runner.model_config.vocab_size, seed=3)[0]
    _, full = _full_extend_logits(batch, prompt)

    seq = batch.add_sequence()
    first, _ = batch.extend([seq], [prompt[:split]], return_all_logits=True)
    second, _ = batch.extend([seq], [prompt[split:]], return_all_logits=True)
    chunked = torch.cat([first.all_logits, second.all_logits])
    assert (chunked - full).abs().max().item() <= ATOL
    table = runner.req_to_token_pool.req_to_token[batch.sequences[seq].row, : len(prompt)]
    # Paged layout: a token's slot sits at its position's offset within a page.
    assert torch.equal(table % page_size, torch.arange(len(prompt), dtype=table.dtype) % page_size)
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


@pytest.mark.parametrize("page_size", [1, 16])
def test_mixed_extend_and_decode_batch(tiny_qwen3, page_size):
    """New prompts and running sequences' next tokens in one forward."""
    runner = make_runner(tiny_qwen3, page_size=page_size)
    vocab = runner.model_config.vocab_size
    running_prompts = make_prompts([9, 30], vocab, seed=4)
    new_prompt = make_prompts([25], vocab, seed=5)[0]
    next_tokens = [[7], [11]]

    reference = BatchRunner(runner)
    expected = []
    for prompt, nxt in zip(running_prompts + [new_prompt], next_tokens + [[]]):
        _, logits = _full_extend_logits(reference, prompt + nxt)
        expected.append(logits[-1])
    reference.release_all()

    batch = BatchRunner(runner)
    running = [batch.add_sequence() for _ in running_prompts]
    batch.extend(running, running_prompts)
    fresh = batch.add_sequence()
    out, fb = batch.extend(running + [fresh], next_tokens + [new_prompt])
    assert fb.forward_mode == ForwardMode.MIXED and fb.extend_seq_lens_cpu == [1, 1, 25]
    diff = (out.next_token_logits - torch.stack(expected)).abs().max().item()
    assert diff <= ATOL
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_release_returns_every_slot_after_random_traffic(tiny_qwen3):
    runner = make_runner(tiny_qwen3, page_size=4, max_total_tokens=1024)
    batch = BatchRunner(runner)
    generator = torch.Generator().manual_seed(9)
    live: list[int] = []
    for step in range(30):
        action = int(torch.randint(0, 3, (1,), generator=generator))
        if action == 0 or not live:
            seq = batch.add_sequence()
            batch.extend([seq], make_prompts([int(torch.randint(1, 40, (1,), generator=generator))], 4000, seed=step))
            live.append(seq)
        elif action == 1:
            batch.extend(live, [[5]] * len(live))
        else:
            batch.release(live.pop(int(torch.randint(0, len(live), (1,), generator=generator))))
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    assert runner.req_to_token_pool.available_size() == runner.req_to_token_pool.size
