"""Quantized checkpoints made here from a tiny random model, packed as each
format prescribes (test/quant_checkpoints.py), load and compute what their
dequantized weights mean: transformers running those weights in fp32 is the
reference.

Weight-only formats give the reference's greedy ids exactly (in fp32 our
kernels dequantize in registers and sum in another order: differences far
below the logit gaps). Int8 W8A8 also rounds the activations to int8 per
token, so its logits differ by that rounding: it must agree on the top-1
token for >= 95% of 128 teacher-forced positions.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_executor.batch_runner import BatchRunner
from model_helpers import hf_greedy, hf_model, make_prompts, make_runner, our_greedy, teacher_forced_top1
from native_helpers import level_params
from quant_checkpoints import QuantSpec, quantize_checkpoint, quantized_demo_model
from runtime.demo_model import demo_model_path

NEW_TOKENS = 10

WEIGHT_ONLY = {
    "gptq-int4-g64": QuantSpec("gptq", bits=4, group_size=64),
    "gptq-int4-g32-asym-act-order": QuantSpec("gptq", bits=4, group_size=32, sym=False, desc_act=True),
    "gptq-int8-per-channel": QuantSpec("gptq", bits=8, group_size=-1),
    "gptq-int8-g128-asym": QuantSpec("gptq", bits=8, group_size=128, sym=False),
    "awq-g64": QuantSpec("awq", group_size=64),
    "awq-g128-ignore-down-proj": QuantSpec("awq", group_size=128, ignore=("model.layers.0.mlp.down_proj",)),
    "fp8-per-tensor-static": QuantSpec("fp8_tensor", activation_scheme="static"),
    "fp8-per-tensor-dynamic": QuantSpec("fp8_tensor"),
    "fp8-block-64": QuantSpec("fp8_block", block=(64, 64)),
    "ct-w4a16-g32-asym": QuantSpec("ct_w4a16", group_size=32, sym=False),
    "ct-w4a16-per-channel": QuantSpec("ct_w4a16", group_size=-1),
    "ct-w8a16": QuantSpec("ct_w8a16", group_size=64),
    "ct-fp8-ignore-regex": QuantSpec("ct_fp8", ignore=("re:.*layers\\.1\\.self_attn\\..*",)),
}


def quantized(tmp_path_factory, spec: QuantSpec, arch: str = "qwen3", private: bool = False):
    """(quantized checkpoint, dense reference of its dequantized weights):
    built once per machine, or into a private folder for a test to edit."""
    if not private:
        return quantized_demo_model(spec, arch)
    root = tmp_path_factory.mktemp(spec.fmt)
    quantize_checkpoint(demo_model_path(arch, "tiny"), root / "q", spec, ref_dir=root / "ref")
    return root / "q", root / "ref"


@pytest.mark.parametrize("name", list(WEIGHT_ONLY))
def test_weight_only_formats_match_their_dequantized_weights(tmp_path_factory, name):
    qdir, ref = quantized(tmp_path_factory, WEIGHT_ONLY[name])
    runner = make_runner(qdir)
    prompts = make_prompts([5, 13, 30], vocab_size=4096, seed=11)
    ours = our_greedy(runner, prompts, NEW_TOKENS)
    reference = hf_model(ref, torch.float32)
    assert ours == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


# The int kernels at every lower CPU level (AVX2's own variant; dequantized
# dense at the portable level), on formats that cover int4 / int8, offsets
# and act-order.
LOWER_LEVELS = [param for param in level_params() if param.values[0] < max(p.values[0] for p in level_params())]


@pytest.mark.parametrize("cpu_level", LOWER_LEVELS, indirect=True)
@pytest.mark.parametrize("name", ["gptq-int4-g32-asym-act-order", "gptq-int8-g128-asym", "awq-g64"])
def test_weight_only_formats_match_at_lower_cpu_levels(tmp_path_factory, name, cpu_level):
    test_weight_only_formats_match_their_dequantized_weights(tmp_path_factory, name)


@pytest.mark.parametrize("cpu_level", LOWER_LEVELS, indirect=True)
def test_bf16_quantized_model_tracks_the_dense_model_at_lower_cpu_levels(tmp_path_factory, cpu_level):
    test_bf16_quantized_model_tracks_the_dense_bf16_model(tmp_path_factory)


def test_qwen2_biases_load_next_to_quantized_weights(tmp_path_factory):
    qdir, ref = quantized(tmp_path_factory, QuantSpec("gptq", bits=4, group_size=64), arch="qwen2")
    prompts = make_prompts([9, 21], vocab_size=4096, seed=2)
    reference = hf_model(ref, torch.float32)
    assert our_greedy(make_runner(qdir), prompts, NEW_TOKENS) == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]


def test_int8_activation_format_agrees_on_the_top_token(tmp_path_factory):
    qdir, ref = quantized(tmp_path_factory, QuantSpec("ct_w8a8_int"))
    runner = make_runner(qdir)
    assert runner.quantization_info["schemes"][0]["activations"] == "dynamic"
    share = teacher_forced_top1(runner, hf_model(ref, torch.float32), make_prompts([8, 20], 4096, seed=5), 64)
    assert share >= 0.95, share
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_bf16_quantized_model_tracks_the_dense_bf16_model(tmp_path_factory):
    """bf16 runs the native int4 kernel (integer dot products on x rounded to
    int8 at one or two rows, FMAs above; dequantized dense at the portable
    level); it must track the same dequantized weights run dense in bf16."""
    qdir, ref = quantized(tmp_path_factory, QuantSpec("gptq", bits=4, group_size=64))
    prompts = make_prompts([12, 25], vocab_size=4096, seed=8)
    share = teacher_forced_top1(make_runner(qdir, dtype="bfloat16"), hf_model(ref, torch.float32), prompts, 32)
    dense_share = teacher_forced_top1(make_runner(ref, dtype="bfloat16"), hf_model(ref, torch.float32), prompts, 32)
    assert share >= dense_share - 0.05, (share, dense_share)


def test_start_up_reports_the_quantization_and_weight_memory(tmp_path_factory, caplog):
    qdir, _ = quantized(tmp_path_factory, QuantSpec("gptq", bits=4, group_size=64))
    with caplog.at_level(logging.INFO, logger="model_executor.model_runner"):
        runner = make_runner(qdir, dtype="bfloat16")
    info = runner.quantization_info
    assert info["quantization"] == "gptq" and info["bits"] == 4 and info["group_size"] == 64
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("weights:"))
    assert "quantization: gptq" in line and "dense" in line
    dense = make_runner(demo_model_path("qwen3", "tiny"), dtype="bfloat16").quantization_info["weight_bytes"]
    assert info["weight_bytes"] < dense


# ---- loader errors ---------------------------------------------------------


def _edit_checkpoint(qdir, edit_tensors=None, edit_config=None):
    if edit_tensors is not None:
        tensors = load_file(qdir / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, qdir / "model.safetensors")
    if edit_config is not None:
        config = json.loads((qdir / "config.json").read_text())
        edit_config(config["quantization_config"])
        (qdir / "config.json").write_text(json.dumps(config))


SCALES = "model.layers.1.mlp.down_proj.scales"


@pytest.mark.parametrize("case, edit, fragments", [
    ("missing scales", dict(edit_tensors=lambda t: t.pop(SCALES)), ["missing tensors", SCALES]),
    ("wrong shape", dict(edit_tensors=lambda t: t.__setitem__(SCALES, t[SCALES][:, :-8].contiguous())),
     [SCALES, "shape"]),
    ("unsupported bits", dict(edit_config=lambda c: c.update(bits=3)), ["3 bits"]),
    ("group size", dict(edit_config=lambda c: c.update(group_size=96)), ["group size 96", "128 input features"]),
])
def test_gptq_loader_errors_say_what_is_wrong(tmp_path_factory, case, edit, fragments):
    qdir, _ = quantized(tmp_path_factory, QuantSpec("gptq", bits=4, group_size=64), private=True)
    _edit_checkpoint(qdir, **edit)
    with pytest.raises(ValueError) as err:
        make_runner(qdir)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_fp8_block_scales_of_the_wrong_shape_are_refused(tmp_path_factory):
    qdir, _ = quantized(tmp_path_factory, QuantSpec("fp8_block", block=(64, 64)), private=True)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _edit_checkpoint(qdir, edit_tensors=lambda t: t.__setitem__(name, torch.ones(3, 3)))
    with pytest.raises(ValueError, match="o_proj.weight_scale_inv"):
        make_runner(qdir)


def test_explicit_quantization_that_contradicts_the_checkpoint_is_refused(tmp_path_factory):
    qdir, _ = quantized(tmp_path_factory, QuantSpec("awq", group_size=64))
    with pytest.raises(ValueError, match="--quantization gptq contradicts .*quant_method awq"):
        make_runner(qdir, quantization="gptq")


# ---- tensor parallelism ----------------------------------------------------

TP_CASES = {
    "gptq-int4-g64": QuantSpec("gptq", bits=4, group_size=64),
    # act-order: each row shard keeps every group's scales (uneven groups: dequantized)
    "gptq-int4-g32-asym-act-order": QuantSpec("gptq", bits=4, group_size=32, sym=False, desc_act=True),
    "fp8-block-32x64": QuantSpec("fp8_block", block=(32, 64)),
}


@pytest.mark.parametrize("name", list(TP_CASES))
def test_tp2_matches_the_dequantized_reference(tmp_path_factory, name):
    from runtime.engine import Engine

    qdir, ref = quantized(tmp_path_factory, TP_CASES[name])
    prompts = make_prompts([7, 19, 33], vocab_size=4096, seed=3)
    engine = Engine(model_path=str(qdir), dtype="float32", max_total_tokens=2048, tp_size=2)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                                   "ignore_eos": True})
        states = engine.get_server_info()["internal_states"]
    finally:
        engine.shutdown()
    reference = hf_model(ref, torch.float32)
    assert [o["output_ids"] for o in outs] == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert all(s["kv_used_tokens"] == s["cache_evictable_tokens"] for s in states), states


def test_tp_size_that_splits_fp8_blocks_is_refused_before_start(tmp_path_factory):
    from runtime.engine import Engine

    qdir, _ = quantized(tmp_path_factory, QuantSpec("fp8_block", block=(64, 64)))
    with pytest.raises(ValueError, match="splits the FP8 blocks of 64 output features"):
        Engine(model_path=str(qdir), dtype="float32", max_total_tokens=2048, tp_size=2)


# ---- the server ------------------------------------------------------------


def test_server_serves_a_gptq_checkpoint_and_reports_it(tmp_path_factory, tmp_path):
    import requests

    from server_helpers import start_server

    qdir, _ = quantized(tmp_path_factory, QuantSpec("gptq", bits=4, group_size=64))
    server = start_server(qdir, tmp_path, "--quantization", "gptq")
    try:
        info = requests.get(server.url + "/get_model_info", timeout=10).json()
        assert info["quantization"] == "gptq" and info["bits"] == 4 and info["weight_bytes"] > 0
        out = requests.post(server.url + "/generate", json={
            "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        }, timeout=60).json()
        assert len(out["output_ids"]) == 4
    finally:
        server.stop()


def test_server_refuses_a_format_the_checkpoint_is_not_in(tmp_path):
    import subprocess
    import sys

    from server_helpers import free_port

    path = str(demo_model_path("qwen3", "tiny"))
    result = subprocess.run([sys.executable, "-m", "runtime.launch_server", "--model-path", path,
                             "--quantization", "awq", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--quantization awq needs a checkpoint quantized as awq" in result.stderr, result.stderr[-2000:]


DUMMY_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]},
    "ct-w8a8": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}},
}


@pytest.mark.parametrize("name", list(DUMMY_CONFIGS))
def test_dummy_weights_of_a_quantized_shape_run(tmp_path, name):
    """--load-format dummy with a quantization_config: config.json alone
    benchmarks a quantized model's shape (random values in its format)."""
    import shutil

    src = demo_model_path("qwen3", "tiny")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = DUMMY_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = make_runner(tmp_path, dtype="bfloat16", load_format="dummy")
    assert runner.quantization_info["quantization"] == DUMMY_CONFIGS[name]["quant_method"]
    batch = BatchRunner(runner)
    seq = batch.add_sequence()
    out, _ = batch.extend([seq], [[5, 9, 300, 12]])
    logits = out.next_token_logits.float()
    assert torch.isfinite(logits).all() and 0.1 < logits.std().item() < 100
    batch.release_all()
