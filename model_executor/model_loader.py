"""Build a model from a Hugging Face checkpoint directory (safetensors), or
with random weights from its config.json alone (`load_format="dummy"`, as
SGLang and vLLM offer: a model's shape benchmarked without its weights)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from layers.checkpoint_tensor import LazyCheckpointTensor
from layers.linear import TPContext
from layers.quantization import QuantizationConfig
from layers.quantization.online import QuantizedLmHeadMethod
from layers.quantization.quantized_method import QuantizedLinearMethod
from model_executor.model_config import ModelConfig
from model_executor.models.registry import get_model_class

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_path: str) -> list[str]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index_path = os.path.join(model_path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [os.path.join(model_path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"checkpoint shard(s) listed in {index_path} are missing: {', '.join(missing)}"
            )
        return files
    single = os.path.join(model_path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(model_path, f) for f in others]
    raise FileNotFoundError(
        f"no weights in {model_path!r}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
    )


def iterate_weights(files: list[str]) -> Iterator[tuple[str, LazyCheckpointTensor]]:
    """Every tensor of the checkpoint, unread: each layer reads only its
    TP slice (see layers/checkpoint_tensor.py)."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, LazyCheckpointTensor(f.get_slice(name))


LOAD_FORMATS = ("auto", "dummy")


def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of sensible scale, so activations stay finite through
    many layers: norms 1, vectors 0, matrices N(0, 1/fan_in) (embeddings and
    the LM head N(0, 1/hidden), giving unit-scale logits). Quantized layers
    get random integers / FP8 values in their format's groups, scaled alike,
    so a quantized model's shape benchmarks without its checkpoint."""
    # Drawn on the model's own device: an 8B model's weights in seconds on a
    # GPU, and no host copy of them.
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    random_layers = set()
    for module in model.modules():  # quantized layers: random values of their format's shape
        method = getattr(module, "linear_method", None)
        if isinstance(method, QuantizedLinearMethod) and method.random_form(module) is not None:
            method.use_random_weights(module, generator)
            bias = getattr(module, "bias", None)
            random_layers.update(id(p) for p in module.parameters(recurse=False) if p is not bias)
    for name, param in model.named_parameters():
        if id(param) in random_layers:  # the checkpoint form, which the random weight replaces
            continue
        if param.dim() < 2:
            param.data.fill_(1.0 if "norm" in name else 0.0)
        else:
            # The last dim is the input features (of every expert, for [E, out, in]).
            param.data.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)


def load_model(
    model_config: ModelConfig,
    device: torch.device | str,
    tp: TPContext | None = None,
    load_format: str = "auto",
    seed: int = 0,
    quant_config: QuantizationConfig | None = None,
    fallback_paths: tuple[str, ...] = (),
) -> nn.Module:
    """`fallback_paths`: checkpoints read, after the model's own, for the
    tensors it lacks (only those)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; available: {', '.join(LOAD_FORMATS)}")
    model_cls = get_model_class(model_config.architecture)
    files = checkpoint_files(model_config.model_path) if load_format == "auto" else []
    # Parameters are created empty on the target device in the target dtype,
    # then filled tensor by tensor, so peak memory is one copy of the weights
    # plus one checkpoint tensor.
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(model_config.dtype)
        try:
            model = model_cls(model_config.hf_config, tp or TPContext(), quant_config)
        finally:
            torch.set_default_dtype(previous)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        loaded = model.load_weights(iterate_weights(files))
        for path in fallback_paths:
            lacking = model.expected_checkpoint_names() - loaded
            if lacking:
                loaded |= model.load_weights((name, tensor) for name, tensor in
                                             iterate_weights(checkpoint_files(path)) if name in lacking)
        missing = sorted(model.expected_checkpoint_names() - loaded)
        if missing:
            raise ValueError(
                f"checkpoint {model_config.model_path!r} is missing tensors for: "
                + ", ".join(missing[:10])
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
    process_weights_after_loading(model)
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer's linear method finish its weights (pack, unpack, ...)."""
    for module in model.modules():
        for method in (getattr(module, "linear_method", None), getattr(module, "moe_method", None)):
            if method is not None:
                method.process_weights_after_loading(module)


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def weight_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes the weights hold now, bytes they would hold dense in the model's
    dtype): what quantization saved. A packed dense layer counts its packed
    copies (the streaming copy doubles it: layers/cpu_gemm.py)."""
    params = {id(p): p for p in model.parameters()}  # each tensor once (a tied head is the embedding's)
    actual = sum(_bytes(p) for p in params.values())
    dense = actual
    for layer in model.modules():
        packed_experts = getattr(layer, "packed_experts", None)
        if packed_experts is not None:  # MoE experts packed for the CPU kernels (layers/moe/method.py)
            onednn = sum(_bytes(linear.onednn) for pair in packed_experts for linear in pair)
            streaming = getattr(layer, "streaming_experts", None)
            actual += onednn + (sum(_bytes(stack) for stack in streaming) if streaming else 0)
            dense += onednn
            continue
        method = getattr(layer, "linear_method", None)
        if method is None:
            continue
        if isinstance(method, QuantizedLmHeadMethod):  # a rounded copy beside the plain (maybe shared) weight
            actual += method.kernel.nbytes
            continue
        weight = getattr(layer, "weight", None)
        kernel, packed = getattr(layer, "quant_kernel", None), getattr(layer, "packed_weight", None)
        if kernel is not None:
            actual += kernel.nbytes
            dense += layer.in_features * layer.out_features * torch.empty(0, dtype=layer.compute_dtype).element_size()
        elif packed is not None:
            actual += _bytes(packed.onednn) + _bytes(packed.streaming)
            if weight is not None and weight.numel() == 0:  # packed away: dense it was the plain weight
                dense += _bytes(packed.onednn)
    return actual, dense
