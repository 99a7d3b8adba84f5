"""The native CPU attention kernel against a plain per-sequence reference,
and the `cpu` backend against torch_native (its fallback) on the same batch."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layers.attention.cpu_backend import CpuAttnBackend
from layers.attention.torch_native import TorchNativeAttnBackend
from layers.radix_attention import RadixAttention
from mem_cache.memory_pool import KVPool, ReqToTokenPool
from model_executor.forward_batch import ForwardBatch, ForwardMode
from native_helpers import built_native_ops, level_params, requires_native_kernels

pytestmark = requires_native_kernels


@pytest.fixture(scope="module", params=level_params())
def ops(request):
    """The kernels at every level this CPU has (the portable unit included)."""
    return built_native_ops().at(request.param)


def reference_attention(q, k_cache, v_cache, req_to_token, rows, prefix, extend, scale):
    """Each sequence on its own, in fp32: its new queries against its prefix
    and new keys, causally."""
    outs, start = [], 0
    for row, p, n in zip(rows, prefix, extend):
        slots = req_to_token[row, : p + n].long()
        keys = k_cache[slots].float().transpose(0, 1)
        values = v_cache[slots].float().transpose(0, 1)
        queries = q[start : start + n].float().transpose(0, 1)
        mask = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
        start += n
    return torch.cat(outs)


# (heads, kv heads, head dim): GQA groups 1-8; 32/64/128 take the AVX512-BF16
# path in bf16 where the CPU has it, 48 always the portable one.
SHAPES = [(4, 2, 32), (12, 4, 64), (8, 8, 64), (16, 2, 128), (6, 3, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("trial", range(12))
def test_kernel_matches_reference_on_ragged_batches(ops, dtype, trial):
    rng = random.Random(trial)
    heads, kv_heads, head_dim = SHAPES[trial % len(SHAPES)]
    batch = rng.randint(1, 9)
    # Decodes (one new token), chunks on a cached prefix, whole prompts;
    # lengths that end mid key block and mid query block.
    prefix = [rng.choice([0, rng.randint(1, 300)]) for _ in range(batch)]
    extend = [rng.choice([1, 1, rng.randint(2, 150)]) for _ in range(batch)]
    num_slots, context = 4096, 512
    gen = torch.Generator().manual_seed(trial)
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype)
    req_to_token = torch.randint(0, num_slots, (16, context), dtype=torch.int32, generator=gen)
    rows = rng.sample(range(16), batch)
    q = (3 * torch.randn(sum(extend), heads, head_dim, generator=gen)).to(dtype)  # peaked softmax too
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    ops.paged_attention(
        q, k_cache, v_cache, req_to_token, torch.tensor(rows), torch.tensor(prefix), torch.tensor(extend), scale, out
    )
    expected = reference_attention(q, k_cache, v_cache, req_to_token, rows, prefix, extend, scale)
    # bf16: the output is rounded to bf16 (~3 significant digits) once.
    tolerance = 2e-5 if dtype == torch.float32 else 1.6e-2
    assert (out.float() - expected).abs().max().item() < tolerance


def test_kernel_refuses_inconsistent_inputs(ops):
    q = torch.randn(3, 4, 32)
    cache = torch.randn(64, 2, 32)
    table = torch.zeros(2, 16, dtype=torch.int32)
    args = (torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="extend lengths add up to 2"):
        ops.paged_attention(q, cache, cache, table, *args, torch.tensor([2]), 1.0, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="bad prefix/extend length"):
        ops.paged_attention(q, cache, cache, table, torch.tensor([0]), torch.tensor([14]), torch.tensor([3]), 1.0,
                            torch.empty_like(q))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.paged_attention(q, cache.bfloat16(), cache, table, *args, torch.tensor([3]), 1.0, torch.empty_like(q))


def _mixed_batch(dtype: torch.dtype):
    """A MIXED step on real pools: two prefill chunks (one on a cached prefix)
    riding with three decodes, keys scattered over the pool."""
    heads, kv_heads, head_dim = 8, 2, 64
    prefix, extend = [0, 37, 5, 90, 12], [20, 9, 1, 1, 1]
    req_pool = ReqToTokenPool(8, 256, "cpu")
    kv_pool = KVPool(1024, 1, kv_heads, head_dim, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(1023, generator=gen)[: sum(p + e for p, e in zip(prefix, extend))] + 1
    rows, used, new_slots = [3, 0, 6, 1, 5], 0, []
    for row, p, e in zip(rows, prefix, extend):
        req_pool.req_to_token[row, : p + e] = slots[used : used + p + e].int()
        new_slots.append(slots[used + p : used + p + e])
        used += p + e
    for k in (kv_pool.k_buffers[0], kv_pool.v_buffers[0]):
        k.copy_(torch.randn(k.shape, generator=gen).to(dtype))
    batch = ForwardBatch.build(
        ForwardMode.MIXED, [1] * sum(extend), rows, prefix, extend, torch.cat(new_slots), "cpu"
    )
    batch.req_to_token_pool, batch.kv_pool = req_pool, kv_pool
    layer = RadixAttention(heads, head_dim, head_dim**-0.5, kv_heads, layer_id=0)
    q = torch.randn(sum(extend), heads * head_dim, generator=gen).to(dtype)
    k = torch.randn(sum(extend), kv_heads * head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(extend), kv_heads * head_dim, generator=gen).to(dtype)
    return batch, layer, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_matches_torch_native_on_a_mixed_batch(ops, dtype):
    outputs, caches = [], []
    for backend in (CpuAttnBackend(torch.device("cpu")), TorchNativeAttnBackend()):
        batch, layer, q, k, v = _mixed_batch(dtype)
        backend.init_forward_metadata(batch)
        outputs.append(backend.forward(q, k, v, layer, batch).float())
        caches.append(batch.kv_pool.k_buffers[0].clone())
    assert CpuAttnBackend(torch.device("cpu")).fallback is None
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0)  # new K written to the same slots
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (outputs[0] - outputs[1]).abs().max().item() < tolerance


def test_backend_falls_back_to_torch_native_when_kernels_are_disabled():
    """RADIXSERVE_NO_NATIVE_KERNELS=1 (or a failed build): the backend still
    serves, through torch_native, and says so."""
    code = (
        "import torch, logging; logging.basicConfig();"
        "from layers.attention.cpu_backend import CpuAttnBackend;"
        "b = CpuAttnBackend(torch.device('cpu'));"
        "print(type(b.fallback).__name__)"
    )
    env = {**os.environ, "RADIXSERVE_NO_NATIVE_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "TorchNativeAttnBackend"
    assert "native kernels unavailable" in done.stderr
