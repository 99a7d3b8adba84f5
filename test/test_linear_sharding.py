"""TP-structured layers: each rank's shard computes its part of the full op.

No process group here: column-parallel outputs are concatenated and
row-parallel partial sums added by hand, which is what the collectives do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPContext,
)


def _load(layer, tensor, shard_id=None, name="weight"):
    layer.weight_loader(getattr(layer, name), tensor, shard_id)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_and_row_parallel_recompose(tp_size):
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    w_up, w_down, bias = torch.randn(32, 16), torch.randn(16, 32), torch.randn(16)
    partial_sums = []
    for rank in range(tp_size):
        tp = TPContext(rank=rank, size=tp_size)
        up = ColumnParallelLinear(16, 32, bias=False, tp=tp)
        down = RowParallelLinear(32, 16, bias=True, tp=tp)
        _load(up, w_up)
        _load(down, w_down)
        _load(down, bias, name="bias")
        partial_sums.append(F.linear(up(x), down.weight))
    full = F.linear(F.linear(x, w_up), w_down, bias)
    assert torch.allclose(sum(partial_sums) + bias, full, atol=1e-4)


@pytest.mark.parametrize("tp_size,kv_heads", [(1, 2), (2, 2), (4, 2)])
def test_qkv_shards_hold_their_heads(tp_size, kv_heads):
    torch.manual_seed(0)
    heads, head_dim, hidden = 4, 8, 16
    wq, wk, wv = torch.randn(heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden)
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, tp=TPContext(rank, tp_size))
        for shard, tensor in (("q", wq), ("k", wk), ("v", wv)):
            _load(layer, tensor, shard)
        q, k, v = layer.weight.split([layer.q_size, layer.kv_size, layer.kv_size])
        q_heads = heads // tp_size
        assert torch.equal(q, wq[rank * q_heads * head_dim : (rank + 1) * q_heads * head_dim])
        # With more ranks than KV heads, neighbouring ranks share one KV head.
        kv_head = rank * kv_heads // tp_size
        size = layer.num_kv_heads * head_dim
        assert torch.equal(k, wk[kv_head * head_dim : kv_head * head_dim + size])
        assert torch.equal(v, wv[kv_head * head_dim : kv_head * head_dim + size])


def test_merged_column_loads_each_shard():
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    for rank in range(2):
        layer = MergedColumnParallelLinear(8, [12, 12], bias=False, tp=TPContext(rank, 2))
        _load(layer, gate, 0)
        _load(layer, up, 1)
        assert torch.equal(layer.weight, torch.cat([gate[rank * 6 : rank * 6 + 6], up[rank * 6 : rank * 6 + 6]]))


@pytest.mark.parametrize("tp_size", [1, 2, 3])
def test_vocab_parallel_embedding_and_lm_head(tp_size):
    torch.manual_seed(0)
    vocab, hidden = 10, 4  # 10 is not divisible by 3: the last shard is padded
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 3, 9, 5])
    hidden_states = torch.randn(2, hidden)
    lookups, logits = [], []
    for rank in range(tp_size):
        tp = TPContext(rank, tp_size)
        emb, head = VocabParallelEmbedding(vocab, hidden, tp), ParallelLMHead(vocab, hidden, tp)
        _load(emb, table)
        _load(head, table)
        lookups.append(emb(ids))  # zeros for ids outside this shard
        logits.append(F.linear(hidden_states, head.weight))
    assert torch.equal(sum(lookups), table[ids])
    assert torch.allclose(torch.cat(logits, dim=-1)[:, :vocab], hidden_states @ table.T, atol=1e-5)


def test_indivisible_heads_are_rejected():
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        QKVParallelLinear(16, 8, 3, 3, bias=False, tp=TPContext(0, 2))


def test_wrong_shape_is_rejected_before_slicing():
    layer = RowParallelLinear(32, 16, bias=False, tp=TPContext(1, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(layer, torch.randn(16, 30))
