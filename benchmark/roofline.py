"""The memory-bandwidth floor of a decode step.

A decode step must read every weight the step uses once (the embedding
table only for the batch's rows; all of it when it is tied to the LM head)
and every cached K/V of the batch. Divided by the bandwidth this device
sustains on a large copy, that is the fastest a step can be; the measured
step time against it says how much of the hardware the step uses.
"""

from __future__ import annotations

import time

import torch

from mem_cache.memory_pool import KVPool
from model_executor.model_loader import checkpoint_files, iterate_weights


def _llama_family_sizes(model_path: str) -> dict[str, int]:
    """Parameter counts from config.json alone (a `--load-format dummy`
    checkpoint has no weights to count): embeddings, per-layer attention and
    MLP matrices and norms, the LM head unless tied."""
    import json
    import os

    with open(os.path.join(model_path, "config.json")) as f:
        c = json.load(f)
    hidden, layers = c["hidden_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    per_layer = (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                 + 3 * hidden * c["intermediate_size"] + 2 * hidden)
    sizes = {"model.embed_tokens.weight": c["vocab_size"] * hidden, "layers": layers * per_layer, "norm": hidden}
    if not c.get("tie_word_embeddings", False):
        sizes["lm_head.weight"] = c["vocab_size"] * hidden
    return sizes


def weight_bytes_per_step(model_path: str, dtype: torch.dtype, tp_size: int = 1, model=None,
                          batch_size: int = 1) -> int:
    """Bytes of weights one rank reads per decode step (shapes only; nothing is
    loaded). With the loaded `model`: what its linear layers hold, so a
    quantized layer counts its packed integers and scales, and the experts a
    step of `batch_size` touches."""
    if model is not None:
        return loaded_linear_bytes(model, batch_size)
    try:
        sizes = {name: tensor.numel() for name, tensor in iterate_weights(checkpoint_files(model_path))}
    except FileNotFoundError:
        sizes = _llama_family_sizes(model_path)
    tied = "lm_head.weight" not in sizes
    total = sum(n for name, n in sizes.items() if tied or not name.endswith("embed_tokens.weight"))
    return total * torch.empty(0, dtype=dtype).element_size() // tp_size


def loaded_linear_bytes(model, decode_rows: int | None = None) -> int:
    """Bytes a decode step streams through the model's linear layers (the LM
    head too): a quantized layer's kernel tensors, else one dense copy; plus,
    with `decode_rows` (the batch size), the experts such a step touches."""
    total = 0 if decode_rows is None else expert_bytes_per_decode_step(model, decode_rows)
    for layer in model.modules():
        if getattr(layer, "linear_method", None) is None:
            continue
        kernel = getattr(layer, "quant_kernel", None)
        if kernel is not None:
            total += kernel.nbytes
        else:  # dense (the plain weight may be packed away: its shape is the layer's)
            rows, cols = (layer.out_features, layer.in_features) if hasattr(layer, "in_features") else layer.weight.shape
            total += rows * cols * layer.weight.element_size()
    return total


def kv_bytes_per_step(total_context_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    return total_context_tokens * KVPool.kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)


def copy_bandwidth(device: torch.device, size_bytes: int = 512 << 20, repeats: int = 10) -> float:
    """Bytes per second moved by a large device-to-device copy, counting the
    read and the write (so it compares with bytes read by a kernel)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def expert_bytes_per_decode_step(model, batch_size: int) -> int:
    """Expert weight bytes a decode step of `batch_size` tokens reads: each
    MoE layer reads only the experts its tokens were routed to. How many that
    is comes from the model's routing counts (layers/moe/load_stats.py) over
    the recorded decode steps (those routing batch_size * top_k tokens per
    layer); without any, uniform routing's expectation E (1 - (1 - k/E)^B)."""
    from layers.moe.layer import FusedMoE

    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not experts:
        return 0
    recorder = getattr(model, "expert_load", None)
    touched = None
    if recorder is not None:
        steps = recorder.ring[: min(recorder.steps, recorder.window_steps)]  # [steps, layers, experts]
        top_k = experts[0].top_k
        decode = steps[(steps.sum(dim=-1) == batch_size * top_k).all(dim=-1)]
        if len(decode):
            touched = (decode > 0).sum(dim=-1).float().mean().item()  # per layer and step
    total = 0
    for moe in experts:
        count = moe.placement.count
        # gate + up + down of one expert (packed away on CPU bf16: the shapes still say it).
        per_expert = 3 * moe.hidden * moe.intermediate * moe.w2_weight.element_size()
        expected = count * (1 - (1 - moe.top_k / moe.placement.total) ** batch_size) if touched is None else touched
        total += round(per_expert * min(expected, count))
    return total
