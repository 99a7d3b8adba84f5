"""Sharded loading: each TP rank reads only its slices of the checkpoint,
and the ranks' shards put back together are the checkpoint's tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from layers.linear import TPContext
from model_executor.model_config import ModelConfig
from model_executor.model_loader import checkpoint_files, iterate_weights
from model_executor.models.registry import get_model_class
from runtime.demo_model import demo_model_path


def _load_rank(model_path, rank: int, size: int):
    config = ModelConfig.from_pretrained(str(model_path), "float32", None, "cpu")
    torch.set_default_dtype(torch.float32)
    model = get_model_class(config.architecture)(config.hf_config, TPContext(rank=rank, size=size))
    weights = list(iterate_weights(checkpoint_files(str(model_path))))
    model.load_weights(weights)
    elements_read = sum(t.elements_read for _, t in weights)
    total = sum(t.numel() for _, t in weights)
    return model, elements_read, total


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_rank_reads_only_its_slices(kv_heads):
    path = demo_model_path("qwen3", "tiny", num_key_value_heads=kv_heads if kv_heads != 2 else None)
    _, read_tp1, total = _load_rank(path, 0, 1)
    assert read_tp1 == total
    for rank in range(2):
        _, read, _ = _load_rank(path, rank, 2)
        # Everything but norms (and, at 1 KV head, the replicated k/v) is split in two.
        assert read < 0.6 * total, (rank, read, total)


def test_shards_recompose_the_checkpoint():
    path = demo_model_path("qwen3", "tiny")
    full = {}
    for f in checkpoint_files(str(path)):
        full.update(load_file(f))
    shards = [_load_rank(path, rank, 2)[0] for rank in range(2)]
    layer = "model.layers.1"
    params = [dict(m.named_parameters()) for m in shards]
    # Column-parallel (gate/up: rows split), row-parallel (down: columns split).
    gate_up = [p[f"{layer}.mlp.gate_up_proj.weight"] for p in params]
    inter = gate_up[0].shape[0] // 2
    gate = torch.cat([g[:inter] for g in gate_up])
    up = torch.cat([g[inter:] for g in gate_up])
    assert torch.equal(gate, full[f"{layer}.mlp.gate_proj.weight"].float())
    assert torch.equal(up, full[f"{layer}.mlp.up_proj.weight"].float())
    down = torch.cat([p[f"{layer}.mlp.down_proj.weight"] for p in params], dim=1)
    assert torch.equal(down, full[f"{layer}.mlp.down_proj.weight"].float())
    # Vocab-parallel embedding: rows split.
    embed = torch.cat([p["model.embed_tokens.weight"] for p in params])
    assert torch.equal(embed[: full["model.embed_tokens.weight"].shape[0]], full["model.embed_tokens.weight"].float())
    # Norms are whole on every rank.
    for p in params:
        assert torch.equal(p[f"{layer}.input_layernorm.weight"], full[f"{layer}.input_layernorm.weight"].float())
