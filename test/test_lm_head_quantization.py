"""`--quantize-lm-head int8` (layers/quantization/online.py): the loaded LM
head rounded per row to int8 and run on the int kernel, the embedding left
as it is. Its logits stay within the rounding's worst case of the dense
head's and pick transformers' greedy token nearly everywhere; tied and
quantized checkpoints take it too; a bad kind is refused."""

from __future__ import annotations

import pytest
import torch

from layers.quantization.online import QuantizedLmHeadMethod, quantize_per_row
from model_executor.batch_runner import BatchRunner
from model_helpers import hf_model, make_prompts, make_runner, teacher_forced_top1
from quant_checkpoints import QuantSpec, quantized_demo_model
from runtime.demo_model import demo_model_path


def hidden_and_logits(runner, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = BatchRunner(runner)
    seq = batch.add_sequence()
    out, _ = batch.extend([seq], [prompt], capture_hidden=True)
    batch.release_all()
    return out.hidden_states[-1:].float(), out.next_token_logits.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_stay_within_the_rounding_of_the_dense_head(tiny_qwen3, dtype):
    dense = make_runner(tiny_qwen3, dtype=dtype)
    rounded = make_runner(tiny_qwen3, dtype=dtype, quantize_lm_head="int8")
    assert isinstance(rounded.model.lm_head.linear_method, QuantizedLmHeadMethod)
    assert rounded.quantization_info["lm_head"] == "int8" and "lm_head" not in dense.quantization_info
    # The rounded copy is held beside the plain weight (which may be the embedding's).
    head_bytes = rounded.model.lm_head.linear_method.kernel.nbytes
    assert head_bytes >= rounded.model.lm_head.weight.numel()  # a byte per weight, and the scales
    plain_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in dense.model.parameters()}.values())
    if dtype == "float32":  # nothing packed beside the plain weights
        assert rounded.quantization_info["weight_bytes"] == dense.quantization_info["weight_bytes"] + head_bytes
        assert dense.quantization_info["weight_bytes"] == plain_bytes
    prompt = make_prompts([17], vocab_size=4096, seed=3)[0]
    hidden, dense_logits = hidden_and_logits(dense, prompt)
    _, ours = hidden_and_logits(rounded, prompt)
    weight = dense.model.lm_head.weight.float()
    # Each weight moves by at most half a step of its row's max |w| / 127.
    half_step = weight.abs().amax(dim=1) / 254
    bound = (hidden.abs().sum(-1, keepdim=True) * half_step) * 1.01 + 2**-7 * dense_logits.abs() + 1e-4
    assert ((ours - dense_logits).abs() <= bound).all()
    assert not torch.equal(ours, dense_logits)  # it did round
    # The embedding is not touched.
    assert torch.equal(rounded.model.model.embed_tokens.weight, dense.model.model.embed_tokens.weight)


def test_greedy_tokens_agree_with_transformers(tiny_qwen3):
    reference = hf_model(tiny_qwen3, torch.float32)
    runner = make_runner(tiny_qwen3, dtype="float32", quantize_lm_head="int8")
    share = teacher_forced_top1(runner, reference, make_prompts([8, 20], vocab_size=4096, seed=5), 32)
    assert share >= 0.95, share
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_a_tied_head_rounds_while_the_embedding_keeps_its_weight():
    path = demo_model_path("llama", "tiny", tie_word_embeddings=True, rope_scaling="llama3")
    runner = make_runner(path, dtype="bfloat16", quantize_lm_head="int8")
    model = runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still shared, still bf16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.numel() > 0
    q = quantize_per_row(model.lm_head.weight.data, "int8")
    hidden = torch.randn(3, q.q.shape[1]).bfloat16()
    expected = hidden.float() @ (q.q.float() * q.scale).T
    ours = model.lm_head.linear_method.apply(model.lm_head, hidden, None).float()
    assert (ours - expected).abs().max().item() <= 2**-7 * expected.abs().max().item()


def test_a_quantized_checkpoint_takes_it_too():
    qdir, ref = quantized_demo_model(QuantSpec("gptq", bits=4, group_size=64))
    runner = make_runner(qdir, dtype="bfloat16", quantize_lm_head="int8")
    assert runner.quantization_info["quantization"] == "gptq" and runner.quantization_info["lm_head"] == "int8"
    prompt = make_prompts([12], vocab_size=4096, seed=8)[0]
    _, ours = hidden_and_logits(runner, prompt)
    _, dense_head = hidden_and_logits(make_runner(qdir, dtype="bfloat16"), prompt)
    assert torch.equal(ours.argmax(-1), dense_head.argmax(-1))


def test_an_unknown_kind_is_refused(tiny_qwen3):
    with pytest.raises(ValueError, match="LM head quantization is one of int8"):
        make_runner(tiny_qwen3, quantize_lm_head="int4")
