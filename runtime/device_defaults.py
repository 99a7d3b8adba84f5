"""What runs where when the flags leave it open: the device, the attention
backend, and whether decode may replay CUDA graphs. Torch-free unless the
device must be detected."""

from __future__ import annotations

import importlib.util


def detect_device() -> str:
    # torch is imported only when the user left --device unset.
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_attention_backend(device: str, dtype: str) -> str:
    if device == "cpu":
        return "cpu"
    # FlashInfer's kernels are fp16/bf16 only; an explicit fp32 model gets triton.
    if dtype != "float32" and importlib.util.find_spec("flashinfer") is not None:
        return "flashinfer"
    return "triton"


def cuda_graph_off_reason(device: str, tp_size: int) -> str | None:
    """Why decode must run without CUDA graphs on this setup, or None.

    TP on CUDA: the layers' all-reduce / all-gather are plain torch.distributed
    NCCL calls, and capturing those in a CUDA graph is untested here (SGLang
    and vLLM capture their own pynccl / custom all-reduce under a graph-capture
    context instead). There is no flag to force graphs back on until that has
    run on several GPUs."""
    if device == "cuda" and tp_size > 1:
        return (
            f"--tp-size {tp_size} on CUDA: capturing NCCL collectives in CUDA graphs is "
            "not supported yet; decode runs eagerly"
        )
    return None
