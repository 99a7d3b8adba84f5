"""Checkpoint tensors into a model's parameters, with fused projections.

A model fuses some checkpoint tensors into one parameter (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`): its `stacked_params` map says which
(checkpoint fragment, our fragment, shard id), and the owning layer's
`weight_loader(param, tensor, shard_id)` puts each piece (this rank's shard)
in place. Parameters of layers without a loader are copied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from layers.checkpoint_tensor import as_tensor
from layers.linear import Loaded

StackedParam = tuple[str, str, Any]  # (checkpoint fragment, our fragment, shard id)


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, Loaded]],
    stacked_params: Iterable[StackedParam],
    skip: Callable[[str], bool] = lambda name: False,
) -> set[str]:
    """Load `weights` into `model`; returns the checkpoint names used, so the
    loader can name the ones a checkpoint lacks."""
    stacked = tuple(stacked_params)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        checkpoint_name = name
        shard_id = None
        for ckpt_part, our_part, sid in stacked:
            if f".{ckpt_part}." in name:
                name, shard_id = name.replace(ckpt_part, our_part), sid
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        try:
            if hasattr(owner, "weight_loader"):
                owner.weight_loader(param, tensor.to(param.dtype), shard_id)
            else:
                _copy_plain(param, tensor, name)
        except ValueError as err:
            raise ValueError(f"checkpoint tensor {checkpoint_name!r}: {err}") from err
        loaded.add(checkpoint_name)
    return loaded


def expected_checkpoint_names(
    model: nn.Module, stacked_params: Iterable[StackedParam], skip: Callable[[str], bool] = lambda name: False
) -> set[str]:
    stacked = tuple(stacked_params)
    names: set[str] = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if skip(name):
            continue
        fused = [(c, o) for c, o, _ in stacked if f".{o}." in name]
        if fused:
            names.update(name.replace(ours, theirs) for theirs, ours in fused)
        else:
            names.add(name)
    return names


def _copy_plain(param: torch.Tensor, tensor: Loaded, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, expected {tuple(param.shape)}"
        )
    param.data.copy_(as_tensor(tensor))
