"""The linear-method seam (layers/quantization): methods chosen per layer by
name, TP loaders sharding along the dims a method tags, post-load processing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layers.cpu_gemm import prepack_supported
from layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPContext,
)
from layers.quantization import (
    CpuPackedLinearMethod,
    CpuPackOptions,
    DenseConfig,
    DenseLinearMethod,
    LinearMethod,
    QuantizationConfig,
    set_weight_attrs,
)
from model_executor.batch_runner import BatchRunner
from model_executor.model_config import ModelConfig
from model_executor.model_loader import load_model
from model_helpers import make_prompts


class TransposedDenseMethod(LinearMethod):
    """A format whose checkpoint (and so its parameter) stores W^T ([in, out]),
    as GPTQ's qweight puts the input dim first: the sharded dims differ from
    dense's, so the loaders must follow the tags."""

    def create_weights(self, layer, in_features, out_features, dtype):
        weight = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype), requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 1, "input_dim": 0})
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        out = x @ layer.weight
        return out if bias is None else out + bias


class OneMethodConfig(QuantizationConfig):
    name = "test"

    def __init__(self, method: LinearMethod) -> None:
        self.method = method

    def linear_method(self, prefix: str) -> LinearMethod:
        return self.method


def _load(layer, param_name, tensor, shard_id=None):
    if isinstance(layer.linear_method, TransposedDenseMethod) and tensor.dim() == 2:
        tensor = tensor.T.contiguous()  # that format's checkpoint layout
    layer.weight_loader(getattr(layer, param_name), tensor, shard_id)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_loaders_shard_along_the_dims_a_method_tags(tp_size):
    """Every TP layer kind loads the same checkpoint tensors into the
    transposed layout, shard by shard, and computes what dense computes."""
    gen = torch.Generator().manual_seed(tp_size)
    hidden, head_dim, heads, kv_heads = 16, 4, 4, 2
    x = torch.randn(3, hidden, generator=gen)
    x_row = torch.randn(3, 24, generator=gen)  # the row-parallel layer's full input
    full = {  # checkpoint tensors, [out, in] as checkpoints store them
        "col": torch.randn(24, hidden, generator=gen),
        "gate": torch.randn(20, hidden, generator=gen),
        "up": torch.randn(20, hidden, generator=gen),
        "q": torch.randn(heads * head_dim, hidden, generator=gen),
        "k": torch.randn(kv_heads * head_dim, hidden, generator=gen),
        "v": torch.randn(kv_heads * head_dim, hidden, generator=gen),
        "row": torch.randn(hidden, 24, generator=gen),
    }
    outputs = {}
    for name, config in (("dense", None), ("transposed", OneMethodConfig(TransposedDenseMethod()))):
        col_parts, merged_parts, qkv_parts, row_sum = [], [], [], 0
        for rank in range(tp_size):
            tp = TPContext(rank, tp_size)
            col = ColumnParallelLinear(hidden, 24, False, tp, config)
            _load(col, "weight", full["col"])
            col_parts.append(col(x))
            merged = MergedColumnParallelLinear(hidden, [20, 20], False, tp, config)
            _load(merged, "weight", full["gate"], 0)
            _load(merged, "weight", full["up"], 1)
            merged_parts.append(merged(x))
            qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, True, tp, config)
            for shard in "qkv":
                _load(qkv, "weight", full[shard], shard)
                _load(qkv, "bias", torch.arange(full[shard].shape[0], dtype=torch.float32), shard)
            qkv_parts.append(qkv(x))
            row = RowParallelLinear(24, hidden, False, tp, config)
            _load(row, "weight", full["row"])
            width = 24 // tp_size
            row_sum = row_sum + row(x_row[:, rank * width : (rank + 1) * width])  # partial sums, all-reduced
            assert isinstance(col.linear_method, DenseLinearMethod if config is None else TransposedDenseMethod)
        outputs[name] = (torch.cat(col_parts, -1), torch.cat(merged_parts, -1), torch.cat(qkv_parts, -1), row_sum)
    for dense, transposed in zip(outputs["dense"], outputs["transposed"]):
        torch.testing.assert_close(transposed, dense)
    # And dense is the real thing: x W^T.
    torch.testing.assert_close(outputs["dense"][0], x @ full["col"].T)
    torch.testing.assert_close(outputs["dense"][3], x_row @ full["row"].T)


class PackMlpOnly(QuantizationConfig):
    """A per-layer choice by name: CPU-packed for MLP projections, plain elsewhere."""

    name = "pack-mlp-only"

    def linear_method(self, prefix: str) -> LinearMethod:
        if ".mlp." in prefix:
            return CpuPackedLinearMethod(CpuPackOptions(batch_size_hint=4, small_batch_gemv=True))
        return DenseLinearMethod()


@pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16")
def test_a_config_picks_each_layers_method_by_name(tiny_qwen3):
    config = ModelConfig.from_pretrained(str(tiny_qwen3), dtype="bfloat16", device="cpu")
    mixed = load_model(config, "cpu", quant_config=PackMlpOnly())
    dense = load_model(config, "cpu", quant_config=DenseConfig())
    for name, module in mixed.named_modules():
        method = getattr(module, "linear_method", None)
        if method is None or name == "lm_head":
            continue
        packed = isinstance(method, CpuPackedLinearMethod)
        assert packed == (".mlp." in name), name
        # Packing happened after loading, and the plain copy went away.
        assert (module.weight.numel() == 0) == packed and (getattr(module, "packed_weight", None) is not None) == packed
    # The LM head stays on the config's unquantized method (here the base class's: plain).
    assert isinstance(mixed.lm_head.linear_method, DenseLinearMethod)

    prompts = make_prompts([9, 4], config.vocab_size)
    logits = []
    for model in (mixed, dense):
        from model_helpers import make_runner

        runner = make_runner(tiny_qwen3, dtype="bfloat16", attention_backend="torch_native", cpu_weight_prepack=False)
        runner.model = model
        batch = BatchRunner(runner)
        seqs = [batch.add_sequence() for _ in prompts]
        logits.append(batch.extend(seqs, prompts)[0].next_token_logits.float())
        batch.release_all()
    scale = logits[1].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() <= 0.03 * scale
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
