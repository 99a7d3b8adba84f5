"""GPU checks (skipped without CUDA): every backend against torch_native on
the GPU, CUDA-graph replay against eager decode and verify steps at every
captured size, greedy ids against transformers in fp32, overlap against no
overlap, speculative decoding on graphs against plain decoding.

The CPU-checkable halves of these live in test_triton_backend.py,
test_cuda_graph_runner.py and test_cuda_graph_speculative.py; this file is
what the lent GPU machine runs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model_executor.batch_runner import BatchRunner
from model_helpers import hf_model, make_prompts, make_runner
from runtime.demo_model import demo_model_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_BACKENDS = ["triton"] + (["flashinfer"] if importlib.util.find_spec("flashinfer") else [])
# bf16 against torch_native (both accumulate in fp32; they round at different
# points): within 3% of the largest logit, same argmax.
BF16_REL_TOL = 0.03


def _runner(path, backend: str, dtype: str, cuda_graph: bool = False, **kw):
    return make_runner(path, dtype=dtype, device="cuda", attention_backend=backend,
                       disable_cuda_graph=not cuda_graph, **kw)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_backend_matches_torch_native_on_gpu(backend, page_size):
    path = demo_model_path("qwen3", "tiny")
    ref = BatchRunner(_runner(path, "torch_native", "bfloat16", page_size=page_size))
    other = BatchRunner(_runner(path, backend, "bfloat16", page_size=page_size))
    prompts = make_prompts([5, 23, 40], 4096)
    ids_r = [ref.add_sequence() for _ in prompts]
    ids_o = [other.add_sequence() for _ in prompts]
    a, _ = ref.extend(ids_r, prompts)
    b, _ = other.extend(ids_o, prompts)
    # A radix hit: a new sequence on another's first 16 tokens, mixed with a decode.
    new_r = ref.add_sequence(share_prefix_of=ids_r[2], prefix_len=16)
    new_o = other.add_sequence(share_prefix_of=ids_o[2], prefix_len=16)
    tail = make_prompts([19], 4096, seed=9)[0]
    rows_r, rows_o = [ids_r[0], new_r], [ids_o[0], new_o]
    mixed = [[int(a.next_token_logits[0].argmax())], tail]
    a, _ = ref.extend(rows_r, mixed)
    b, _ = other.extend(rows_o, mixed)
    for _ in range(4):
        tokens = [[t] for t in a.next_token_logits.argmax(-1).tolist()]
        a, _ = ref.extend(rows_r, tokens)
        b, _ = other.extend(rows_o, tokens)
        scale = a.next_token_logits.abs().max().item()
        assert (a.next_token_logits - b.next_token_logits).abs().max().item() <= BF16_REL_TOL * scale
        assert torch.equal(a.next_token_logits.argmax(-1), b.next_token_logits.argmax(-1))


def test_cuda_graph_replay_matches_eager_at_every_captured_size():
    from model_executor.cuda_graph_runner import capture_batch_sizes

    path = demo_model_path("qwen3", "tiny")
    eager = BatchRunner(_runner(path, "triton", "float32", max_running_requests=16))
    graphed_runner = _runner(path, "triton", "float32", cuda_graph=True, max_running_requests=16,
                             cuda_graph_max_bs=16)
    assert graphed_runner.cuda_graph_runner is not None
    graphed = BatchRunner(graphed_runner)
    for bs in capture_batch_sizes(16) + [3, 13]:  # exact sizes, then padded ones
        prompts = make_prompts([4 + 3 * i for i in range(bs)], 4096, seed=bs)
        ids_e = [eager.add_sequence() for _ in prompts]
        ids_g = [graphed.add_sequence() for _ in prompts]
        a, _ = eager.extend(ids_e, prompts)
        graphed.extend(ids_g, prompts)
        tokens = [[t] for t in a.next_token_logits.argmax(-1).tolist()]
        a, _ = eager.extend(ids_e, tokens)
        b, fb = graphed.extend(ids_g, tokens)
        assert graphed_runner.cuda_graph_runner.can_run(fb)
        assert (a.next_token_logits - b.next_token_logits).abs().max().item() <= 1e-3, bs
        eager.release_all()
        graphed.release_all()


@pytest.mark.parametrize("backend", ["torch_native", "triton"])  # flashinfer runs fp16/bf16 only
def test_greedy_matches_transformers_fp32_on_gpu(backend):
    from runtime.engine import Engine

    path = demo_model_path("qwen3", "tiny")
    prompts = make_prompts([7, 19, 33], 4096, seed=3)
    engine = Engine(model_path=str(path), dtype="float32", device="cuda", attention_backend=backend,
                    max_total_tokens=4096)
    try:
        ours = [o["output_ids"] for o in engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})]
    finally:
        engine.shutdown()
    reference = hf_model(path, torch.float32).cuda()
    assert ours == [_hf_greedy_cuda(reference, p, 16) for p in prompts]


@torch.inference_mode()
def _hf_greedy_cuda(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_overlap_equals_no_overlap_on_gpu():
    from runtime.engine import Engine

    path = str(demo_model_path("qwen3", "tiny"))
    prompts = make_prompts([5 + i for i in range(12)], 4096, seed=6)
    # Greedy in fp32: overlap changes batch shapes (graph padding, one-step-late
    # admission), and a different GEMM or split plan may flip a bf16 near-tie
    # of a seeded sample; the schedule must not change greedy fp32 outputs.
    params = [{"max_new_tokens": 8 + i, "temperature": 0.0, "ignore_eos": True} for i in range(12)]
    outputs = []
    for disable_overlap in (False, True):
        engine = Engine(model_path=path, device="cuda", dtype="float32", disable_overlap=disable_overlap,
                        max_total_tokens=4096)
        try:
            outputs.append([o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)])
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]


def test_verify_graph_replay_matches_eager_at_every_captured_size():
    path = demo_model_path("qwen3", "tiny")
    eager = BatchRunner(_runner(path, "triton", "float32", max_running_requests=16))
    graphed_runner = _runner(path, "triton", "float32", cuda_graph=True, max_running_requests=16,
                             cuda_graph_max_bs=16, verify_graph_rows=4)
    graphs = graphed_runner.cuda_graph_runner
    assert graphs is not None and graphs.verify_batch_sizes == [1, 2, 4, 8, 16]
    graphed = BatchRunner(graphed_runner)
    for bs in graphs.verify_batch_sizes + [3, 13]:  # exact sizes, then padded ones
        prompts = make_prompts([4 + 3 * i for i in range(bs)], 4096, seed=bs)
        ids_e = [eager.add_sequence() for _ in prompts]
        ids_g = [graphed.add_sequence() for _ in prompts]
        eager.extend(ids_e, prompts)
        graphed.extend(ids_g, prompts)
        steps = make_prompts([1 + i % 4 for i in range(bs)], 4096, seed=100 + bs)  # 0 to 3 guesses each
        drafts = [len(s) - 1 for s in steps]
        a, _ = eager.extend(ids_e, steps, draft_lens=drafts, capture_hidden=True)
        b, fb = graphed.extend(ids_g, steps, draft_lens=drafts, capture_hidden=True)
        assert graphs.can_run(fb)
        for x, y in ((a.next_token_logits, b.next_token_logits), (a.verify_logits, b.verify_logits),
                     (a.hidden_states, b.hidden_states)):
            assert (x - y).abs().max().item() <= 1e-3, bs
        eager.release_all()
        graphed.release_all()


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE", "EAGLE"])
def test_speculative_greedy_equals_plain_with_cuda_graphs(algorithm, tmp_path):
    """Verify steps and the draft model's decode replay graphs; greedy fp32
    outputs stay those of plain decoding."""
    from runtime.demo_eagle import write_eagle_head
    from runtime.engine import Engine

    path = demo_model_path("llama", "tiny")
    draft = {"NGRAM": None, "STANDALONE": str(demo_model_path("llama", "tiny", seed=1)),
             "EAGLE": str(write_eagle_head(path, tmp_path / "head"))}[algorithm]
    repeat = make_prompts([8], 4000, seed=11)[0] * 4
    prompts = [repeat, *make_prompts([9, 30], 4000, seed=12)]
    params = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    outputs = []
    for speculative in (None, dict(speculative_algorithm=algorithm, speculative_draft_model_path=draft)):
        engine = Engine(model_path=str(path), device="cuda", dtype="float32", attention_backend="triton",
                        max_total_tokens=4096, **(speculative or {}))
        try:
            outputs.append([o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)])
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]
