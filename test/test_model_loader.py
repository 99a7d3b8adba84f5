"""Checkpoint loading: shards, rope config forms, and errors that name the problem."""

from __future__ import annotations

import json
import pathlib
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_executor.batch_runner import BatchRunner
from model_executor.model_config import read_rope_config
from model_helpers import make_prompts, make_runner


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def _prompt_logits(path, dtype="float32"):
    runner = make_runner(path, dtype=dtype)
    batch = BatchRunner(runner)
    seq = batch.add_sequence()
    prompt = make_prompts([12], runner.model_config.vocab_size)[0]
    out, _ = batch.extend([seq], [prompt], return_all_logits=True)
    return out.all_logits


def _edit_config(path, **changes):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


def test_sharded_checkpoint_loads_same_weights(tiny_qwen3, tmp_path):
    sharded = _copy_checkpoint(tiny_qwen3, tmp_path / "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(_prompt_logits(sharded), _prompt_logits(tiny_qwen3))


def test_dtype_conversion_from_bf16_checkpoint(tiny_qwen3):
    runner = make_runner(tiny_qwen3, dtype="float32")
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())
    runner = make_runner(tiny_qwen3, dtype="auto")
    assert runner.dtype == torch.bfloat16  # what the checkpoint's config says
    assert runner.kv_pool.k_buffers[0].dtype == torch.bfloat16


def test_tied_embeddings_share_one_tensor(parity_model):
    runner = make_runner(parity_model)
    model = runner.model
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == bool(tied)


def test_rope_config_forms_are_equivalent():
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    legacy = SimpleNamespace(rope_theta=500000.0, rope_scaling=dict(params))
    modern = SimpleNamespace(rope_parameters={"rope_theta": 500000.0, **params})
    old_spelling = SimpleNamespace(rope_theta=500000.0, rope_scaling={**params, "type": "llama3", "rope_type": None})
    for config in (legacy, modern, old_spelling):
        rope = read_rope_config(config)
        assert rope.theta == 500000.0 and rope.rope_type == "llama3"
        assert rope.params["factor"] == 8.0
    plain = read_rope_config(SimpleNamespace(rope_theta=10000.0))
    assert (plain.theta, plain.rope_type, plain.params) == (10000.0, "default", {})


def test_legacy_rope_scaling_config_loads_identically(tmp_path):
    from runtime.demo_model import demo_model_path

    modern_path = demo_model_path("llama", "tiny", tie_word_embeddings=True, rope_scaling="llama3")
    legacy = _copy_checkpoint(modern_path, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    params = dict(config.pop("rope_parameters", None) or config["rope_scaling"])
    theta = params.pop("rope_theta", config.get("rope_theta"))
    _edit_config(legacy, rope_parameters=None, rope_scaling=params, rope_theta=theta)
    assert torch.equal(_prompt_logits(legacy), _prompt_logits(modern_path))


def test_unknown_architecture_lists_supported(tiny_qwen3, tmp_path):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "bad")
    _edit_config(bad, architectures=["MambaForCausalLM"])
    with pytest.raises(ValueError, match="MambaForCausalLM") as err:
        make_runner(bad)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_missing_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_runner(tmp_path / "empty")


def test_missing_weights_file_is_named(tiny_qwen3, tmp_path):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        make_runner(bad)


def test_missing_shard_is_named(tiny_qwen3, tmp_path):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "noshard")
    names = list(load_file(bad / "model.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        make_runner(bad)


@pytest.mark.parametrize("dropped", ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_missing_tensor_is_named(tiny_qwen3, tmp_path, dropped):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "notensor")
    tensors = load_file(bad / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        make_runner(bad)


def test_wrong_tensor_shape_is_named(tiny_qwen3, tmp_path):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "badshape")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"down_proj\.weight.*shape mismatch"):
        make_runner(bad)


def test_unsupported_rope_type_is_named(tiny_qwen3, tmp_path):
    bad = _copy_checkpoint(tiny_qwen3, tmp_path / "rope")
    _edit_config(bad, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, rope_scaling=None)
    with pytest.raises(ValueError, match="dynamic"):
        make_runner(bad)


def test_auto_dtype_is_bf16_on_cpu_even_for_fp32_checkpoints(tiny_qwen3, tmp_path):
    fp32 = _copy_checkpoint(tiny_qwen3, tmp_path / "fp32")
    _edit_config(fp32, dtype="float32", torch_dtype="float32")
    runner = make_runner(fp32, dtype="auto")
    assert runner.dtype == torch.bfloat16


def _config_only_checkpoint(tmp_path, source) -> str:
    """A checkpoint directory with config.json and nothing else."""
    import shutil

    target = tmp_path / "shape-only"
    target.mkdir()
    shutil.copy(pathlib.Path(source) / "config.json", target / "config.json")
    return str(target)


def test_dummy_load_format_needs_only_config_json(tmp_path, tiny_qwen3):
    import torch

    from model_executor.batch_runner import BatchRunner
    from model_executor.model_config import ModelRunnerConfig
    from model_executor.model_runner import ModelRunner

    path = _config_only_checkpoint(tmp_path, tiny_qwen3)
    with pytest.raises(FileNotFoundError, match="no weights"):
        ModelRunner(ModelRunnerConfig(model_path=path, max_total_tokens=256, max_running_requests=2))

    logits = []
    for seed in (0, 0, 1):
        runner = ModelRunner(ModelRunnerConfig(model_path=path, max_total_tokens=256, max_running_requests=2,
                                               load_format="dummy", random_seed=seed))
        batch = BatchRunner(runner)
        out, _ = batch.extend([batch.add_sequence()], [[5, 6, 7, 8]])
        logits.append(out.next_token_logits)
    assert all(torch.isfinite(x).all() for x in logits)
    assert 0.1 < logits[0].std().item() < 10  # unit-scale logits, not 0 and not blown up
    assert torch.equal(logits[0], logits[1])  # the seed decides the weights
    assert not torch.equal(logits[0], logits[2])


def test_engine_serves_a_dummy_model_from_config_json_alone(tmp_path, tiny_qwen3):
    from runtime.engine import Engine

    path = _config_only_checkpoint(tmp_path, tiny_qwen3)
    engine = Engine(model_path=path, load_format="dummy", skip_tokenizer_init=True, max_total_tokens=1024)
    try:
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    finally:
        engine.shutdown()
    assert len(out["output_ids"]) == 4
