"""Configs the model executor needs: what the checkpoint says, and how to run it.

`ModelConfig` is read from a checkpoint directory; `ModelRunnerConfig` is the
small set of run-time choices that `runtime.server_args.ServerArgs` fills in
(lower packages never read CLI flags).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelRunnerConfig:
    model_path: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    context_length: int | None = None  # None: the checkpoint's max_position_embeddings
    page_size: int = 1
    max_total_tokens: int | None = None  # None: sized from free memory
    mem_fraction_static: float = 0.88
    max_running_requests: int = 256
    attention_backend: str = "torch_native"  # a name in layers/attention/registry.py
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 64
    # Speculative decoding: capture verify steps of this many rows per
    # sequence too (--speculative-num-draft-tokens; 0: decode graphs only).
    verify_graph_rows: int = 0
    # flashinfer backend only: its float workspace (why this size:
    # layers/attention/flashinfer_backend.py, DEFAULT_WORKSPACE_MB).
    flashinfer_workspace_mb: int = 256
    tp_size: int = 1
    tp_rank: int = 0
    # Expert parallelism inside the TP group (MoE models; layers/linear.py TPContext).
    ep_size: int = 1
    random_seed: int = 0
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random, from config.json alone
    # Let transformers run code shipped with the checkpoint (auto_map in config.json).
    trust_remote_code: bool = False
    # None: the checkpoint's quantization_config, if any; else a format name
    # or on-the-fly int8 / fp8 (layers/quantization/registry.py).
    quantization: str | None = None
    # "int8": the loaded LM head rounded per row (layers/quantization/online.py).
    quantize_lm_head: str | None = None
    # Checkpoints that supply tensors this one lacks (an EAGLE head takes the
    # target's embedding and LM head).
    fallback_weight_paths: tuple[str, ...] = ()
    # CPU bf16 only: pack linear weights into oneDNN's layout (layers/cpu_gemm.py).
    cpu_weight_prepack: bool = True
    # With prepack and the native kernels: a second weight copy for
    # small-batch decodes through the streaming kernel (layers/cpu_gemm.py),
    # up to `cpu_streaming_rows` rows (None: the CPU's default, 2 or 6).
    cpu_small_batch_gemv: bool = True
    cpu_streaming_rows: int | None = None
    # CPU bf16 with the native kernels: fused q/k norm + rotary + KV store and
    # fused SiLU-and-mul (layers/fused_attention_input.py, layers/activation.py).
    cpu_fused_ops: bool = True
    # CPU, with the fused ops: a dense decoder's layers run as one native call
    # where the kernels cover them (model_executor/cpu_decoder_stack.py).
    cpu_native_stack: bool = True


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # "default", "linear" or "llama3"; extra keys of the scaling dict live in `params`.
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)


def read_rope_config(hf_config: Any) -> RopeConfig:
    """Normalise the two spellings of rope settings.

    transformers < 5 writes `rope_theta` + `rope_scaling`; transformers >= 5
    writes one `rope_parameters` dict holding `rope_theta` and the scaling keys.
    Either may reach us, depending on which version saved the checkpoint and
    which version is loading it.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    merged: dict[str, Any] = {**scaling, **params}
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf_config, "rope_theta", 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    return RopeConfig(theta=float(theta), rope_type=rope_type, params=merged)


def resolve_dtype(dtype: str, hf_config: Any, device: str = "cuda") -> torch.dtype:
    if dtype == "auto" and str(device).startswith("cpu"):
        # bf16 is the fast path on CPUs (AVX-512 bf16 / AMX); fp16 GEMMs are
        # slow there and fp32 doubles the memory traffic of decode.
        return torch.bfloat16
    if dtype == "auto":
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = getattr(torch, saved, None)
        if saved in (torch.float16, torch.bfloat16, torch.float32):
            return saved
        return torch.bfloat16
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


@dataclass
class ModelConfig:
    """The architecture facts the runner and the memory pools need."""

    model_path: str
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    context_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    quantization_config: dict[str, Any] | None = None  # config.json's, as written

    @classmethod
    def from_pretrained(
        cls,
        model_path: str,
        dtype: str = "auto",
        context_length: int | None = None,
        device: str = "cuda",
        trust_remote_code: bool = False,
    ) -> "ModelConfig":
        # Imported here so that importing this module stays cheap.
        from transformers import AutoConfig

        from model_executor.models.registry import check_architectures

        config_file = os.path.join(model_path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in model path {model_path!r}")
        with open(config_file) as f:
            raw = json.load(f)
        architecture = check_architectures(raw.get("architectures"), config_file)
        # trust_remote_code: a checkpoint whose config class ships as code
        # (auto_map) loads only with --trust-remote-code.
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
        if context_length is not None and context_length > max_pos:
            raise ValueError(
                f"--context-length {context_length} exceeds the model's "
                f"max_position_embeddings {max_pos}"
            )
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            model_path=model_path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=resolve_dtype(dtype, hf_config, device),
            context_len=context_length or max_pos,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            quantization_config=raw.get("quantization_config"),
        )
