"""Decode KV staging (torch-native backend) never changes results.

Reference: the same runner with staging disabled (budget 0), which gathers
every layer's KV from the pool on every step.
"""

from __future__ import annotations

import torch

from layers.attention.torch_native import TorchNativeAttnBackend
from model_executor.batch_runner import BatchRunner
from model_helpers import make_prompts, make_runner


def _scripted_run(runner, staging_bytes: int) -> list[torch.Tensor]:
    """Decode with the batch changing shape along the way: a sequence leaves,
    one joins (an extend in between), a different subset decodes, and one
    long stretch outgrows the staging capacity."""
    runner.attn_backend = TorchNativeAttnBackend(staging_bytes=staging_bytes)
    vocab = runner.model_config.vocab_size
    batch = BatchRunner(runner)
    seqs = [batch.add_sequence() for _ in range(3)]
    logits = [batch.extend(seqs, make_prompts([5, 12, 30], vocab))[0].next_token_logits]

    def decode(ids, steps):
        for step in range(steps):
            tokens = [[(7 * step + i) % 1000 + 4] for i in range(len(ids))]
            logits.append(batch.extend(ids, tokens)[0].next_token_logits)

    decode(seqs, 6)
    batch.release(seqs.pop(1))
    decode(seqs, 3)  # same rows minus one: must re-stage
    newcomer = batch.add_sequence()
    logits.append(batch.extend([newcomer], make_prompts([9], vocab, seed=3))[0].next_token_logits)
    decode(seqs + [newcomer], 4)
    decode([newcomer, seqs[0]], 3)  # other order
    decode(seqs + [newcomer], 140)  # past the staged capacity
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    return logits


def test_staged_decode_matches_pool_gather(tiny_qwen3):
    runner = make_runner(tiny_qwen3, page_size=4)
    staged = _scripted_run(runner, staging_bytes=64 << 20)
    assert runner.attn_backend.staging.keys, "staging was never used"
    gathered = _scripted_run(runner, staging_bytes=0)
    assert not runner.attn_backend.staging.keys
    assert len(staged) == len(gathered)
    for step, (a, b) in enumerate(zip(staged, gathered)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}"


def test_staging_budget_covers_some_layers_only(tiny_qwen3):
    runner = make_runner(tiny_qwen3)
    full = _scripted_run(runner, staging_bytes=64 << 20)
    # K and V of one layer: 3 sequences x 256 staged positions x 2 KV heads
    # x head_dim 32, fp32. With 1.5 layers' room, 1 of the 4 layers stages.
    one_layer = 2 * 3 * 256 * 2 * 32 * 4
    partial = _scripted_run(runner, staging_bytes=one_layer * 3 // 2)
    assert len(runner.attn_backend.staging.keys) == 1
    for a, b in zip(full, partial):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
