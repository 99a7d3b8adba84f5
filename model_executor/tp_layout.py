"""Can this model be split over `tp_size` ranks? Checked before any rank starts.

Torch-free (plain config.json), so the launching process can refuse a bad
`--tp-size` with one clear message instead of N ranks failing one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def tp_layout_errors(config: Mapping[str, Any], tp_size: int, ep_size: int = 1) -> list[str]:
    """Why `config` cannot be split over `tp_size` ranks, experts over
    `ep_size` groups of them (empty if it can)."""
    # Multimodal-style configs nest the language model's settings.
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    intermediate = config["intermediate_size"]
    errors = []
    if heads % tp_size:
        errors.append(f"the {heads} attention heads do not divide evenly over tp_size {tp_size}")
    if kv_heads >= tp_size and kv_heads % tp_size:
        errors.append(f"the {kv_heads} KV heads do not divide evenly over tp_size {tp_size}")
    if kv_heads < tp_size and tp_size % kv_heads:
        errors.append(
            f"tp_size {tp_size} is not a multiple of the {kv_heads} KV heads (each KV head "
            "is replicated on an equal number of ranks)"
        )
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if _has_dense_mlp(config, experts) and intermediate % tp_size:
        errors.append(f"the MLP intermediate size {intermediate} does not divide evenly over tp_size {tp_size}")
    errors += _expert_errors(config, experts, tp_size, ep_size)
    errors += _quantization_errors(config, tp_size)
    return errors


def _has_dense_mlp(config: Mapping[str, Any], experts: int) -> bool:
    """Whether some layer keeps a dense MLP of `intermediate_size` (Mixtral's
    `intermediate_size` is its experts')."""
    if not experts:
        return True
    if "moe_intermediate_size" not in config:
        return False
    return bool(config.get("mlp_only_layers")) or (config.get("decoder_sparse_step") or 1) > 1


def _expert_errors(config: Mapping[str, Any], experts: int, tp_size: int, ep_size: int) -> list[str]:
    if tp_size % ep_size:
        return [f"ep_size {ep_size} does not divide tp_size {tp_size}"]
    if not experts:
        return [f"ep_size {ep_size} needs a mixture-of-experts model; this one has no experts"] if ep_size > 1 else []
    errors = []
    if experts % ep_size:
        errors.append(f"the {experts} experts do not divide evenly over ep_size {ep_size}")
    per_expert = config.get("moe_intermediate_size") or config["intermediate_size"]
    sharing = tp_size // ep_size  # ranks that split each expert
    if per_expert % sharing:
        errors.append(f"the expert intermediate size {per_expert} does not divide evenly over the {sharing} "
                      f"ranks sharing each expert (tp_size {tp_size} / ep_size {ep_size})")
    shared = config.get("shared_expert_intermediate_size") or 0
    if shared % tp_size:
        errors.append(f"the shared expert's intermediate size {shared} does not divide evenly over tp_size {tp_size}")
    return errors


def _group_sizes(quant: Mapping[str, Any]) -> list[int]:
    """The input group sizes a quantized checkpoint's row-parallel layers must keep whole."""
    method = quant.get("quant_method")
    if method in ("gptq", "awq"):
        size = int(quant.get("group_size", quant.get("q_group_size", 128)))
        act_order = method == "gptq" and quant.get("desc_act", False)
        return [] if size == -1 or act_order else [size]
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (quant.get("config_groups") or {}).values()]
        sizes = [int(w["group_size"]) for w in weights if w.get("strategy") == "group" and w.get("group_size")]
        blocks = [int(w["block_structure"][1]) for w in weights if w.get("block_structure")]
        return sizes + blocks
    if method == "fp8" and quant.get("weight_block_size"):
        return [int(quant["weight_block_size"][1])]
    return []


def _quantization_errors(config: Mapping[str, Any], tp_size: int) -> list[str]:
    quant = config.get("quantization_config")
    if not quant:
        return []
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    # Inputs of the row-parallel layers per rank: o_proj and down_proj.
    row_inputs = {"o_proj": heads * head_dim // tp_size, "down_proj": config["intermediate_size"] // tp_size}
    errors = []
    for group in sorted(set(_group_sizes(quant))):
        for layer, size in row_inputs.items():
            if size % group:
                errors.append(f"tp_size {tp_size} splits the quantization groups of {group} input features "
                              f"({layer} gets {size} per rank)")
    block = quant.get("weight_block_size") if quant.get("quant_method") == "fp8" else None
    if block:
        kv_heads = config.get("num_key_value_heads") or heads
        outputs = {"q_proj": heads * head_dim // tp_size, "k/v_proj": max(1, kv_heads // tp_size) * head_dim,
                   "gate/up_proj": config["intermediate_size"] // tp_size}
        for layer, size in outputs.items():
            if size % int(block[0]):
                errors.append(f"tp_size {tp_size} splits the FP8 blocks of {block[0]} output features "
                              f"({layer} gets {size} per rank)")
    return errors


def check_tp_layout(model_path: str, tp_size: int, ep_size: int = 1) -> None:
    """Raise ValueError naming every reason `model_path` cannot run at `tp_size` / `ep_size`."""
    if tp_size == 1 and ep_size == 1:
        return
    with open(os.path.join(model_path, "config.json")) as f:
        errors = tp_layout_errors(json.load(f), tp_size, ep_size)
    if errors:
        flags = f"--tp-size {tp_size}" + (f" --ep-size {ep_size}" if ep_size != 1 else "")
        raise ValueError(f"{flags} does not fit {model_path}: " + "; ".join(errors))
