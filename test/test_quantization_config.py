"""Choosing the quantization (checkpoint config vs --quantization), the
pieces every format shares (int32 unpacking, ignore lists, regrouping by
g_idx), on-the-fly int8 / fp8, and TP layouts that would split a group."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layers.quantization.awq import AWQConfig
from layers.quantization.canonical import IntWeight, regroup_by_index, unpack_int32
from layers.quantization.compressed_tensors import CompressedTensorsConfig
from layers.quantization.dense import CpuPackedLinearMethod, CpuPackOptions, DenseConfig, DenseLinearMethod
from layers.quantization.fp8 import Fp8Config
from layers.quantization.gptq import GPTQConfig, GPTQLinearMethod
from layers.quantization.online import OnlineQuantConfig, quantize_per_row
from layers.quantization.quantized_method import left_dense
from layers.quantization.registry import QUANTIZATION_CHOICES, resolve_quantization
from model_executor.tp_layout import tp_layout_errors
from model_helpers import hf_greedy, hf_model, make_prompts, make_runner, our_greedy
from runtime.server_args import ServerArgs

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True}


def test_checkpoint_config_picks_the_format():
    assert isinstance(resolve_quantization(GPTQ, None), GPTQConfig)
    assert isinstance(resolve_quantization(GPTQ, "gptq"), GPTQConfig)  # naming it again is fine
    assert isinstance(resolve_quantization({"quant_method": "awq", "bits": 4, "group_size": 64}, None), AWQConfig)
    assert isinstance(resolve_quantization({"quant_method": "fp8"}, None), Fp8Config)
    ct = {"quant_method": "compressed-tensors", "format": "int-quantized",
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int",
                                                                      "strategy": "channel", "symmetric": True}}}}
    assert isinstance(resolve_quantization(ct, "compressed_tensors"), CompressedTensorsConfig)
    assert isinstance(resolve_quantization(None, None), DenseConfig)
    assert isinstance(resolve_quantization(None, "int8"), OnlineQuantConfig)


@pytest.mark.parametrize("checkpoint, requested, fragments", [
    (GPTQ, "awq", ["--quantization awq", "quant_method gptq"]),
    (GPTQ, "int8", ["--quantization int8", "quant_method gptq"]),
    (None, "gptq", ["needs a checkpoint quantized as gptq", "no quantization_config"]),
    (None, "int3", ["not supported", "int8"]),
    ({"quant_method": "bitsandbytes"}, None, ["bitsandbytes", "supported"]),
    ({**GPTQ, "bits": 3}, None, ["3 bits"]),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, None, ["gemv"]),
    ({"quant_method": "fp8", "fmt": "e5m2"}, None, ["e5m2"]),
])
def test_bad_choices_fail_naming_both_sides(checkpoint, requested, fragments):
    with pytest.raises(ValueError) as err:
        resolve_quantization(checkpoint, requested)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_server_flag_offers_the_registry_choices():
    from dataclasses import fields

    flag = next(f for f in fields(ServerArgs) if f.name == "quantization")
    assert set(flag.metadata["choices"]) == set(QUANTIZATION_CHOICES)


def test_unpack_int32_orders():
    values = torch.arange(16, dtype=torch.int32).reshape(2, 8) % 16
    words = sum(values[:, i] << (4 * i) for i in range(8)).to(torch.int32).reshape(2, 1)
    assert torch.equal(unpack_int32(words, 4, dim=1), values)
    # the same word read down dim 0
    assert torch.equal(unpack_int32(words.t().contiguous(), 4, dim=0), values.t())
    # AWQ: output j sits in slot (0, 4, 1, 5, 2, 6, 3, 7)[j]
    slots = (0, 4, 1, 5, 2, 6, 3, 7)
    assert unpack_int32(words, 4, dim=1, order=slots)[0].tolist() == [values[0, s].item() for s in slots]
    # negative words (top bit set) unpack as unsigned values
    assert unpack_int32(torch.tensor([[-1]], dtype=torch.int32), 8, dim=1).tolist() == [[255, 255, 255, 255]]


def test_left_dense_matches_checkpoint_names_and_refuses_half_fused_layers():
    assert left_dense("model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"])
    assert left_dense("model.layers.3.mlp.gate_up_proj", ["re:.*layers\\.3\\.mlp\\..*"])
    assert not left_dense("model.layers.1.mlp.down_proj", ["model.layers.0.mlp.down_proj", "lm_head"])
    assert left_dense("model.layers.2.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"])
    with pytest.raises(ValueError, match="fused"):
        left_dense("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.q_proj"])
    config = GPTQConfig.from_config({**GPTQ, "modules_to_not_convert": ["mlp.down_proj"]},
                                    CpuPackOptions(16, False))
    assert isinstance(config.linear_method("model.layers.0.mlp.down_proj"), CpuPackedLinearMethod)
    assert isinstance(config.linear_method("model.layers.0.mlp.gate_up_proj"), GPTQLinearMethod)
    assert isinstance(GPTQConfig.from_config(GPTQ).unquantized_method(), DenseLinearMethod)


def test_regroup_by_index_sorts_act_order_groups():
    generator = torch.Generator().manual_seed(0)
    n, k, group = 6, 32, 8
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
    scale = torch.rand(n, k // group, generator=generator) + 0.5
    offset = torch.randn(n, k // group, generator=generator)
    g_idx = torch.randperm(k, generator=generator) // group  # act-order: each group holds `group` columns
    expected = q.float() * scale[:, g_idx] + offset[:, g_idx]
    regrouped = regroup_by_index(q, scale, offset, g_idx.int(), 4)
    assert isinstance(regrouped, IntWeight) and regrouped.perm is not None and regrouped.group_size == group
    torch.testing.assert_close(regrouped.dequantize(), expected)
    # A TP shard's columns: uneven groups, so dense values
    shard = slice(0, k // 2)
    dense = regroup_by_index(q[:, shard], scale, offset, g_idx[shard].int(), 4)
    assert isinstance(dense, torch.Tensor)
    torch.testing.assert_close(dense, expected[:, shard])


def _reference_checkpoint(src, dst, kind: str):
    """The dense checkpoint with every decoder linear replaced by what
    on-the-fly quantization makes of it (dequantized, fp32)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, tensor in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            tensors[name] = quantize_per_row(tensor, kind).dequantize()
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_on_the_fly_quantization_matches_its_dequantized_weights(tiny_qwen3, tmp_path, kind):
    reference = tmp_path / "ref"
    _reference_checkpoint(tiny_qwen3, reference, kind)
    runner = make_runner(tiny_qwen3, quantization=kind)
    prompts = make_prompts([6, 17], vocab_size=4096, seed=4)
    ours = our_greedy(runner, prompts, 10)
    hf = hf_model(reference, torch.float32)
    assert ours == [hf_greedy(hf, p, 10) for p in prompts]
    assert runner.quantization_info["quantization"] == kind
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_on_the_fly_int8_in_bf16_halves_the_linear_weight_bytes(tiny_qwen3):
    dense = make_runner(tiny_qwen3, dtype="bfloat16").quantization_info["weight_bytes"]
    int8 = make_runner(tiny_qwen3, dtype="bfloat16", quantization="int8")
    # The embedding and LM head stay bf16; the decoder linears go to 1 byte (+ scales).
    linear_bf16 = sum(2 * n * k for n, k in [(256, 128), (128, 128), (768, 128), (128, 384)]) * 4
    saved = dense - int8.quantization_info["weight_bytes"]
    assert saved > 0.9 * linear_bf16 / 2, (dense, int8.quantization_info)


def test_tp_layout_refuses_splitting_a_group():
    config = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=128, head_dim=32,
                  intermediate_size=384, quantization_config={**GPTQ, "group_size": 128})
    errors = tp_layout_errors(config, 2)
    assert any("splits the quantization groups of 128" in e and "down_proj gets 192" in e for e in errors), errors
    config["quantization_config"] = {**GPTQ, "group_size": 64}
    assert tp_layout_errors(config, 2) == []
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    errors = tp_layout_errors(config, 2)
    assert any("FP8 blocks of 128 output features" in e for e in errors), errors


def test_a_cuda_kernel_that_cannot_take_the_groups_fails_at_start_up():
    from layers.quantization.kernels import build_kernel

    weight = IntWeight(torch.zeros(32, 48, dtype=torch.int8), torch.ones(32, 2), None, 24, 4)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: the CUDA int4 kernel needs groups of a "
                                         "multiple of 32 input features; this layer's are 24"):
        build_kernel(weight, torch.bfloat16, torch.device("cuda"), None, layer="model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("bits, packed_dim", [(4, 1), (8, 1), (4, 0)])
def test_our_unpacking_reads_compressed_tensors_packing(bits, packed_dim):
    """Our reader against the library that writes pack-quantized checkpoints:
    weights packed along the input dim (1), zero points along the output dim (0)."""
    compressors = pytest.importorskip("compressed_tensors.compressors")
    half = 1 << (bits - 1)
    signed = torch.randint(-half, half, (16, 64), generator=torch.Generator().manual_seed(bits))
    packed = compressors.pack_to_int32(signed.to(torch.int8), bits, packed_dim=packed_dim)
    assert torch.equal(unpack_int32(packed, bits, dim=packed_dim) - half, signed.int())
