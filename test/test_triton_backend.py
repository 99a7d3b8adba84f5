"""The Triton attention backend matches torch_native.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set before the kernels are imported); with CUDA, on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from layers.attention.kv_indices import build_kv_indices, host_indptr  # noqa: E402
from layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from model_executor.batch_runner import BatchRunner  # noqa: E402
from model_helpers import make_prompts, make_runner  # noqa: E402
from runtime.demo_model import demo_model_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: both compute in fp32 with different summation orders.
FP32_ATOL = 1e-4


def _pair(path, page_size: int, dtype: str = "float32"):
    """Two runners on the same weights: torch_native, and triton."""
    reference = make_runner(path, dtype=dtype, page_size=page_size, device=DEVICE)
    triton_runner = make_runner(path, dtype=dtype, page_size=page_size, device=DEVICE)
    triton_runner.attn_backend = TritonAttnBackend(triton_runner.device)
    return BatchRunner(reference), BatchRunner(triton_runner)


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_extend_with_prefix_mixed_and_decode_match_torch_native(page_size, kv_heads):
    path = demo_model_path("qwen3", "tiny", num_key_value_heads=None if kv_heads == 2 else kv_heads)
    ref, tri = _pair(path, page_size)
    vocab = ref.runner.model_config.vocab_size
    prompts = make_prompts([5, 23, 40], vocab)

    # Plain extend of three prompts of different lengths.
    ref_ids = [ref.add_sequence() for _ in prompts]
    tri_ids = [tri.add_sequence() for _ in prompts]
    a, _ = ref.extend(ref_ids, prompts, return_all_logits=True)
    b, _ = tri.extend(tri_ids, prompts, return_all_logits=True)
    assert _max_diff(a.all_logits, b.all_logits) <= FP32_ATOL

    # Extend over a shared cached prefix (a radix hit), in one MIXED batch
    # with a 1-token decode of another sequence.
    shared = 16 if page_size == 16 else 17
    ref_new = ref.add_sequence(share_prefix_of=ref_ids[2], prefix_len=shared)
    tri_new = tri.add_sequence(share_prefix_of=tri_ids[2], prefix_len=shared)
    tail = make_prompts([19], vocab, seed=9)[0]
    next_tok = a.next_token_logits.argmax(-1).tolist()
    a, fa = ref.extend([ref_ids[0], ref_new], [[next_tok[0]], tail], return_all_logits=True)
    b, _ = tri.extend([tri_ids[0], tri_new], [[next_tok[0]], tail], return_all_logits=True)
    assert fa.forward_mode.name == "MIXED"
    assert _max_diff(a.all_logits, b.all_logits) <= FP32_ATOL

    # Pure decode steps over all four sequences (lengths 7..60).
    ref_all, tri_all = ref_ids + [ref_new], tri_ids + [tri_new]
    tokens = [[t] for t in make_prompts([4], vocab, seed=11)[0]]
    for _ in range(2):
        a, fa = ref.extend(ref_all, tokens)
        b, _ = tri.extend(tri_all, tokens)
        assert fa.forward_mode.name == "DECODE"
        assert _max_diff(a.next_token_logits, b.next_token_logits) <= FP32_ATOL
        tokens = a.next_token_logits.argmax(-1).view(-1, 1).tolist()
    for batch in (ref, tri):
        batch.release_all()
        allocator = batch.runner.token_to_kv_pool_allocator
        assert allocator.available_size() == batch.runner.max_total_num_tokens


def test_bf16_decode_within_tolerance_of_torch_native():
    # bf16 pools and activations; both accumulate in fp32, but round q/k/v
    # and outputs to bf16 at different points: bound stated relative to the
    # logits' scale (std ~4 by construction of the demo weights).
    ref, tri = _pair(demo_model_path("qwen3", "tiny"), page_size=1, dtype="bfloat16")
    prompts = make_prompts([12, 30], ref.runner.model_config.vocab_size, seed=2)
    ref_ids = [ref.add_sequence() for _ in prompts]
    tri_ids = [tri.add_sequence() for _ in prompts]
    a, _ = ref.extend(ref_ids, prompts)
    b, _ = tri.extend(tri_ids, prompts)
    tokens = a.next_token_logits.argmax(-1).view(-1, 1).tolist()
    a, _ = ref.extend(ref_ids, tokens)
    b, _ = tri.extend(tri_ids, tokens)
    scale = a.next_token_logits.float().abs().max().item()
    assert _max_diff(a.next_token_logits, b.next_token_logits) <= 0.03 * scale
    assert torch.equal(a.next_token_logits.argmax(-1), b.next_token_logits.argmax(-1))


def test_build_kv_indices_lists_each_sequence_slots_in_order():
    table = torch.arange(40, dtype=torch.int32).view(4, 10) + 100
    rows = torch.tensor([2, 0, 3])
    seq_lens = torch.tensor([3, 1, 5])
    indptr, indices = build_kv_indices(table, rows, seq_lens, 9)
    assert indptr.tolist() == [0, 3, 4, 9]
    assert indices.tolist() == [120, 121, 122, 100, 130, 131, 132, 133, 134]


def test_host_indptr_matches_the_device_one():
    # flashinfer's plan() gets this host copy; the kernels' kv_indices come
    # from build_kv_indices, so the two must agree.
    seq_lens = [3, 1, 5, 0, 2]
    device_indptr, _ = build_kv_indices(
        torch.arange(60, dtype=torch.int32).view(5, 12), torch.arange(5), torch.tensor(seq_lens), sum(seq_lens)
    )
    host = host_indptr(seq_lens)
    assert host.device.type == "cpu" and host.dtype == torch.int32
    assert torch.equal(host, device_indptr.cpu())
    assert host_indptr([]).tolist() == [0]


@pytest.mark.parametrize("splits", [0, -4, 3, 6, 12])
def test_num_kv_splits_must_be_a_power_of_two(splits):
    with pytest.raises(ValueError, match=f"num_kv_splits must be a power of two >= 1, got {splits}"):
        TritonAttnBackend(torch.device(DEVICE), num_kv_splits=splits)


@pytest.mark.parametrize("splits", [1, 2, 16])
def test_decode_kernel_with_other_split_counts_matches_softmax(splits):
    # The merge kernel spans the splits with tl.arange: every power of two,
    # 1 included, must work, and more splits than keys leaves empty chunks.
    from layers.attention.triton_kernels import decode_attention

    torch.manual_seed(0)
    heads, kv_heads, dim, seq_lens = 4, 2, 32, [1, 7, 40]
    slots = torch.randperm(64)[: sum(seq_lens)]
    k_pool, v_pool = torch.randn(64, kv_heads, dim), torch.randn(64, kv_heads, dim)
    q = torch.randn(len(seq_lens), heads, dim)
    indptr = host_indptr(seq_lens).to(DEVICE)
    backend = TritonAttnBackend(torch.device(DEVICE), num_kv_splits=splits)
    partial_out, partial_lse = backend._decode_scratch(len(seq_lens), heads, dim)
    out = torch.empty_like(q)
    args = [t.to(DEVICE) for t in (q, k_pool, v_pool, out)]
    decode_attention(*args, indptr, slots.to(DEVICE), partial_out, partial_lse, dim**-0.5)
    out = args[3].cpu()
    for b, (start, n) in enumerate(zip(indptr.tolist(), seq_lens)):
        own = slots[start : start + n]
        for h in range(heads):
            k, v = k_pool[own, h // 2], v_pool[own, h // 2]
            expected = torch.softmax(q[b, h] @ k.T * dim**-0.5, dim=-1) @ v
            assert torch.allclose(out[b, h], expected, atol=1e-5)


def test_engine_greedy_with_triton_backend_equals_torch_native(monkeypatch):
    from runtime.engine import Engine

    # The scheduler processes inherit the environment: kernels interpreted there too.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = str(demo_model_path("qwen3", "tiny"))
    prompts = make_prompts([6, 14], 4096, seed=4)
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    outputs = {}
    for backend in ("torch_native", "triton"):
        engine = Engine(model_path=path, dtype="float32", max_total_tokens=1024, attention_backend=backend,
                        device=DEVICE)
        try:
            outputs[backend] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        finally:
            engine.shutdown()
    assert outputs["triton"] == outputs["torch_native"]
    assert all(len(ids) == 5 for ids in outputs["triton"])


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TritonAttnBackend(torch.device("cpu"))


def test_flashinfer_backend_refuses_cpu_fp32_and_a_missing_package(monkeypatch):
    import sys

    from layers.attention.flashinfer_backend import FlashInferAttnBackend, import_flashinfer

    with pytest.raises(ValueError, match="fp16/bf16 models only"):
        FlashInferAttnBackend(torch.device("cuda"), torch.float32)

    with pytest.raises(ValueError, match="needs a CUDA device"):
        import_flashinfer(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'radixserve\[gpu\]'"):
        import_flashinfer(torch.device("cuda"))


def test_flashinfer_plan_inputs_are_built_on_the_host():
    # plan() schedules on the host and would copy device indptrs back (a
    # blocking sync per step); only kv_indices is for the kernels. The
    # backend itself needs CUDA and flashinfer, so only the metadata
    # step runs here, on an instance whose __init__ (CUDA-only) is skipped.
    from layers.attention.flashinfer_backend import FlashInferAttnBackend
    from mem_cache.memory_pool import ReqToTokenPool
    from model_executor.forward_batch import ForwardBatch, ForwardMode

    pool = ReqToTokenPool(4, 32, "cpu")
    pool.req_to_token.copy_(torch.arange(128, dtype=torch.int32).view(4, 32))
    backend = FlashInferAttnBackend.__new__(FlashInferAttnBackend)
    backend.device = torch.device("cpu")
    for mode, prefix, extend, ragged in [
        (ForwardMode.EXTEND, [0, 0], [3, 5], True),
        (ForwardMode.MIXED, [4, 0], [1, 5], False),
        (ForwardMode.DECODE, [4, 6], [1, 1], None),
    ]:
        batch = ForwardBatch.build(mode, [1] * sum(extend), [2, 0], prefix, extend,
                                   torch.zeros(sum(extend), dtype=torch.int64), "cpu")
        batch.req_to_token_pool = pool
        backend.init_forward_metadata(batch)
        meta = backend.metadata
        seq_lens = [p + e for p, e in zip(prefix, extend)]
        assert meta.kv_indptr.tolist() == [0, seq_lens[0], sum(seq_lens)]
        assert meta.last_page_len.tolist() == [1, 1]
        host = [meta.kv_indptr, meta.last_page_len] + ([] if ragged is None else [meta.qo_indptr])
        assert all(t.device.type == "cpu" and t.dtype == torch.int32 for t in host)
        assert meta.kv_indices.tolist() == [64 + i for i in range(seq_lens[0])] + list(range(seq_lens[1]))
        if ragged is None:
            assert meta.qo_indptr is None
        else:
            assert meta.qo_indptr.tolist() == [0, extend[0], sum(extend)] and meta.ragged is ragged
