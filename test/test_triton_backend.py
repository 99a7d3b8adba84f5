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

from layers.attention.kv_indices import build_kv_indices  # noqa: E402
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
