"""ModelRunner: memory sizing, forward modes, sampling with per-request params."""

from __future__ import annotations

import pytest
import torch

from sampling.batch_info import build_sampling_info, record_tokens
from managers.sampling_params import SamplingParams
from model_executor.batch_runner import BatchRunner
from model_executor.forward_batch import ForwardBatch, ForwardMode
from model_executor.model_runner import ModelRunner
from model_executor.model_config import ModelRunnerConfig
from mem_cache.memory_pool import KVPool
from model_helpers import make_prompts, make_runner


def test_capacity_from_max_total_tokens_is_page_aligned(tiny_qwen3):
    runner = make_runner(tiny_qwen3, page_size=16, max_total_tokens=1000)
    assert runner.max_total_num_tokens == 992
    assert runner.token_to_kv_pool_allocator.available_size() == 992
    # Page 0 is the padding page, on top of the capacity.
    assert runner.kv_pool.k_buffers[0].shape[0] == 992 + 16


def test_capacity_from_free_memory(tiny_qwen3):
    config = ModelRunnerConfig(model_path=str(tiny_qwen3), dtype="float32", max_running_requests=4,
                               context_length=512, mem_fraction_static=0.5)
    runner = ModelRunner(config)
    mc = runner.model_config
    per_token = KVPool.kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32)
    # On CPU the pool never exceeds every request slot at full context.
    assert runner.max_total_num_tokens == 4 * 512
    assert runner.kv_pool.mem_bytes() == (4 * 512 + 1) * per_token


def test_context_length_above_model_limit_is_rejected(tiny_qwen3):
    with pytest.raises(ValueError, match="context-length"):
        make_runner(tiny_qwen3, context_length=10**6)


def test_unknown_attention_backend_is_named(tiny_qwen3):
    with pytest.raises(ValueError, match="flashattn"):
        make_runner(tiny_qwen3, attention_backend="flashattn")


def test_decode_batch_rejects_multi_token_sequences():
    with pytest.raises(ValueError, match="exactly one token"):
        ForwardBatch.build(ForwardMode.DECODE, [1, 2, 3], [0, 1], [4, 5], [2, 1], torch.zeros(3), "cpu")


@pytest.mark.parametrize("extend_lens", [[1, 1, 1], [3, 0, 2], [1, 2, 1]], ids=["decode", "ragged", "mixed"])
def test_positions_continue_each_prefix(extend_lens):
    prefix_lens = [4, 0, 9]
    tokens = sum(extend_lens)
    mode = ForwardMode.DECODE if extend_lens == [1, 1, 1] else ForwardMode.EXTEND
    batch = ForwardBatch.build(mode, list(range(tokens)), [0, 1, 2], prefix_lens, extend_lens,
                               torch.zeros(tokens, dtype=torch.int64), "cpu")
    expected = [p + i for p, e in zip(prefix_lens, extend_lens) for i in range(e)]
    assert batch.positions.tolist() == expected and batch.positions.dtype == torch.int64


def _sample_run(runner, prompts, params, steps):
    """Generate `steps` tokens per prompt through ModelRunner.sample."""
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in prompts]
    info = build_sampling_info(params, runner.model_config.vocab_size, runner.device, prompt_ids=prompts)
    out, fb = batch.extend(seq_ids, prompts, sampling_info=info)
    tokens, logits = [], []
    for step in range(steps):
        next_ids = runner.sample(out, fb)
        record_tokens(info, next_ids)
        tokens.append(next_ids.tolist())
        logits.append(out.next_token_logits.clone())
        if step + 1 < steps:
            out, fb = batch.extend(seq_ids, [[t] for t in next_ids.tolist()], sampling_info=info)
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    return [list(col) for col in zip(*tokens)], torch.stack(logits, 1)


def test_sampling_honours_per_request_params_in_one_batch(tiny_qwen3):
    runner = make_runner(tiny_qwen3)
    prompts = make_prompts([6, 11, 6, 9], runner.model_config.vocab_size, seed=7)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1234),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=1.5, top_k=5, seed=99),
    ]
    first, logits = _sample_run(runner, prompts, params, 12)
    second, _ = _sample_run(runner, prompts, params, 12)
    assert first == second  # greedy rows deterministic, seeded rows reproducible

    assert first[0] == logits[0].argmax(-1).tolist()  # temperature 0 is argmax
    seeded_alone, _ = _sample_run(runner, prompts[1:2], params[1:2], 12)
    assert first[1] == seeded_alone[0]  # same seed, same tokens whatever the batch
    # Penalties steer the greedy row away from plain greedy's continuation.
    plain, _ = _sample_run(runner, prompts[2:3], [SamplingParams(temperature=0.0)], 12)
    assert first[2] != plain[0]
    # top_k=5 at temperature 1.5: every token is among that step's 5 most likely,
    # and the high temperature makes it leave the argmax at least once.
    top5 = logits[3].topk(5, dim=-1).indices
    assert all(token in top5[step].tolist() for step, token in enumerate(first[3]))
    assert first[3] != logits[3].argmax(-1).tolist()
