"""Can this model be split over `tp_size` ranks? Checked before any rank starts.

Torch-free (plain config.json), so the launching process can refuse a bad
`--tp-size` with one clear message instead of N ranks failing one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def tp_layout_errors(config: Mapping[str, Any], tp_size: int) -> list[str]:
    """Why `config` cannot be split over `tp_size` ranks (empty if it can)."""
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
    if intermediate % tp_size:
        errors.append(f"the MLP intermediate size {intermediate} does not divide evenly over tp_size {tp_size}")
    return errors


def check_tp_layout(model_path: str, tp_size: int) -> None:
    """Raise ValueError naming every reason `model_path` cannot run at `tp_size`."""
    if tp_size == 1:
        return
    with open(os.path.join(model_path, "config.json")) as f:
        errors = tp_layout_errors(json.load(f), tp_size)
    if errors:
        raise ValueError(f"--tp-size {tp_size} does not fit {model_path}: " + "; ".join(errors))
