"""A random-weight EAGLE head for a demo target (speculative decoding tests
and benchmarks): EAGLE's own checkpoint layout, with no embedding or LM head
(the server takes the target's). Random, so its guesses rarely hold; what it
shows is that a head of this format loads, drafts and leaves outputs as they
were."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from runtime.demo_model import cache_root, demo_model_path

HEAD_FORMAT_VERSION = 1  # part of the cache path: bump when what is written changes


def write_eagle_head(target: pathlib.Path, out: pathlib.Path, seed: int = 0, prefixed: bool = False) -> pathlib.Path:
    """fc [H, 2H] + bias and one Llama decoder layer without its input norm,
    sized for `target`; `prefixed`: SGLang's "model."-prefixed names."""
    config = json.loads((target / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    tensors = {
        "fc.weight": rand(hidden, 2 * hidden), "fc.bias": torch.zeros(hidden, dtype=torch.bfloat16),
        "layers.0.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "layers.0.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": rand(inter, hidden), "layers.0.mlp.up_proj.weight": rand(inter, hidden),
        "layers.0.mlp.down_proj.weight": rand(hidden, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    if prefixed:
        tensors = {f"model.{name}": t for name, t in tensors.items()}
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    # A Llama-style layer whatever the target (per-layer lists of the target's would not fit one layer).
    head_config = {k: v for k, v in config.items() if k not in ("architectures", "num_hidden_layers", "layer_types")}
    head_config.update(architectures=["LlamaForCausalLMEagle"], model_type="llama", num_hidden_layers=1)
    (out / "config.json").write_text(json.dumps(head_config, indent=2) + "\n")
    return out


def demo_eagle_head_path(arch: str = "llama", size: str = "tiny") -> pathlib.Path:
    """The cached EAGLE head of the demo target (arch, size), written on first use."""
    target = demo_model_path(arch, size)
    out = cache_root() / "demo" / f"{target.name}-eagle-head-v{HEAD_FORMAT_VERSION}"
    if (out / "config.json").exists():
        return out
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_eagle_head(target, tmp / "head")
        try:
            (tmp / "head").rename(out)
        except OSError:  # another process wrote it first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
