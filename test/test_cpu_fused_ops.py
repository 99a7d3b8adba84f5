"""The fused native attention-input (q/k norm + rotary + KV store) and
SiLU-and-mul kernels against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layers.activation as activation
from layers.activation import SiluAndMul
from layers.rotary import RotaryEmbedding, apply_rotary
from model_helpers import make_runner
from native_helpers import built_native_ops, level_params, requires_native_kernels

pytestmark = requires_native_kernels


@pytest.fixture(scope="module", params=level_params())
def ops(request):
    """The kernels at every level this CPU has (the portable unit included)."""
    return built_native_ops().at(request.param)


def torch_attention_input(qkv, q_weight, k_weight, eps, rope, heads, kv_heads, head_dim):
    """The unfused path of LlamaAttention.forward, op for op."""
    tokens = qkv.shape[0]
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :]
    if q_weight is not None:
        qk = F.rms_norm(qk, (head_dim,), None, eps)
        qk = qk * torch.cat((q_weight.expand(heads, -1), k_weight.expand(kv_heads, -1)))
    qk = apply_rotary(qk, rope)
    return (
        qk[:, :heads].reshape(tokens, heads * head_dim),
        qk[:, heads:].reshape(tokens, kv_heads, head_dim),
        v.reshape(tokens, kv_heads, head_dim),
    )


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "llama"])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 12, 4, 64), (7, 4, 2, 32), (40, 8, 8, 128)])
def test_rope_and_store_matches_the_torch_ops(ops, qk_norm, tokens, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)).bfloat16()
    weights = [(torch.randn(head_dim, generator=gen) * 0.3 + 1).bfloat16() for _ in range(2)] if qk_norm else [None, None]
    rotary = RotaryEmbedding(head_dim, 4096, 1e6)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    rope = rotary.lookup(positions, torch.bfloat16)
    slots_total = 3 * tokens + 5
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    slots = torch.randperm(slots_total, generator=gen)[:tokens]
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    k_before, v_before = k_cache.clone(), v_cache.clone()

    q = ops.qk_norm_rope_store(qkv, *weights, 1e-6, rope.cos[:, 0], rope.signed_sin[:, 0],
                               k_cache, v_cache, slots, heads, kv_heads)
    q_ref, k_ref, v_ref = torch_attention_input(qkv, *weights, 1e-6, rope, heads, kv_heads, head_dim)

    assert torch.equal(v_cache[slots], v_ref)
    assert torch.equal(k_cache[untouched], k_before[untouched]) and torch.equal(v_cache[untouched], v_before[untouched])
    for ours, theirs in ((q, q_ref), (k_cache[slots], k_ref)):
        assert ours.shape == theirs.shape
        if not qk_norm:
            assert torch.equal(ours, theirs)  # the same roundings, nothing summed
        else:
            # Only the sum of squares may be ordered differently: one bf16 step, rarely.
            steps = (ours.float() - theirs.float()).abs() / theirs.float().abs().clamp_min(1e-2)
            assert steps.max().item() <= 2**-6
            assert (ours != theirs).float().mean().item() < 0.02


def test_rope_and_store_refuses_a_slot_outside_the_cache(ops):
    qkv = torch.randn(2, (2 + 2) * 32).bfloat16()
    rope = RotaryEmbedding(32, 64, 1e4).lookup(torch.tensor([0, 1]), torch.bfloat16)
    cache = torch.zeros(4, 1, 32).bfloat16()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.qk_norm_rope_store(qkv, None, None, 1e-6, rope.cos[:, 0], rope.signed_sin[:, 0],
                               cache, cache.clone(), torch.tensor([1, 4]), 2, 1)
    with pytest.raises(RuntimeError, match="both q_weight and k_weight"):
        ops.qk_norm_rope_store(qkv, torch.ones(32).bfloat16(), None, 1e-6, rope.cos[:, 0], rope.signed_sin[:, 0],
                               cache, cache.clone(), torch.tensor([1, 2]), 2, 1)


@pytest.mark.parametrize("tokens,width", [(1, 2048), (3, 100), (33, 512)])
def test_silu_and_mul_matches_torch(ops, tokens, width, monkeypatch):
    gen = torch.Generator().manual_seed(tokens + width)
    # Wide range: exercises exp far into both tails, and exact zeros.
    x = (6 * torch.randn(tokens, 2 * width, generator=gen)).bfloat16()
    x[0, :3] = torch.tensor([0.0, -100.0, 100.0])
    monkeypatch.setattr(activation, "native_ops", lambda: ops)
    ours = SiluAndMul()(x)
    monkeypatch.setattr(activation, "native_ops", lambda: None)
    theirs = SiluAndMul()(x)
    assert ours.shape == theirs.shape == (tokens, width)
    steps = (ours.float() - theirs.float()).abs() / theirs.float().abs().clamp_min(1e-2)
    assert steps.max().item() <= 2**-7  # at most one bf16 step (a tie broken the other way)
    assert (ours != theirs).float().mean().item() < 0.01


def test_strided_rows_go_through_the_kernel(ops):
    """gate_up output viewed with a row stride (as a slice would be) still works."""
    x = torch.randn(4, 2 * 64 + 6).bfloat16()[:, :128]
    assert torch.equal(ops.silu_and_mul_bf16(x), ops.silu_and_mul_bf16(x.contiguous()))


@pytest.mark.parametrize("cpu_level", level_params(), indirect=True)
def test_model_decode_is_unchanged_by_the_fused_attention_input(cpu_level, tiny_qwen3):
    """A bf16 Qwen3 model (q/k norms) through the cpu backend: prefill, a
    mixed step and decodes give the same logits with the fused kernel and
    with the torch ops (cpu_fused_ops off)."""
    from model_executor.batch_runner import BatchRunner

    logits = []
    for fused in (True, False):
        runner = make_runner(tiny_qwen3, dtype="bfloat16", attention_backend="cpu", cpu_fused_ops=fused)
        assert runner.attn_backend.accepts_stored_kv == fused
        batch = BatchRunner(runner)
        seqs = [batch.add_sequence() for _ in range(2)]
        steps = [batch.extend(seqs[:1], [[5, 9, 11, 40, 8]])[0].next_token_logits.float()]
        steps.append(batch.extend(seqs, [[17], [7, 3, 2]])[0].next_token_logits.float())
        for token in (23, 29, 31):
            steps.append(batch.extend(seqs, [[token], [token + 1]])[0].next_token_logits.float())
        batch.release_all()
        logits.append(steps)
    for ours, theirs in zip(*logits):
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= 0.02 * scale
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
