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


def weight_bytes_per_step(model_path: str, dtype: torch.dtype, tp_size: int = 1, model=None) -> int:
    """Bytes of weights one rank reads per decode step (shapes only; nothing is
    loaded). With the loaded `model`: what its linear layers hold, so a
    quantized layer counts its packed integers and scales."""
    if model is not None:
        return loaded_linear_bytes(model)
    try:
        sizes = {name: tensor.numel() for name, tensor in iterate_weights(checkpoint_files(model_path))}
    except FileNotFoundError:
        sizes = _llama_family_sizes(model_path)
    tied = "lm_head.weight" not in sizes
    total = sum(n for name, n in sizes.items() if tied or not name.endswith("embed_tokens.weight"))
    return total * torch.empty(0, dtype=dtype).element_size() // tp_size


def loaded_linear_bytes(model) -> int:
    """Bytes a decode step streams through the model's linear layers (the LM
    head too): a quantized layer's kernel tensors, else one dense copy."""
    total = 0
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
