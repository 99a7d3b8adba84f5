"""The native bf16 RMSNorm (with and without the residual add) against the
torch path it replaces."""

from __future__ import annotations


import pytest
import torch

import layers.layernorm as layernorm
from layers.layernorm import RMSNorm
from native_helpers import built_native_ops, level_params, requires_native_kernels

pytestmark = requires_native_kernels


@pytest.mark.parametrize("hidden", [128, 768, 1001])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("level", level_params())
def test_native_rms_norm_matches_torch(level, hidden, tokens, monkeypatch):
    ops = built_native_ops().at(level)
    monkeypatch.setattr(layernorm, "native_ops", lambda: ops)
    gen = torch.Generator().manual_seed(hidden + tokens)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.randn(hidden, generator=gen) * 0.5 + 1
    norm = norm.bfloat16()
    x = (3 * torch.randn(tokens, hidden, generator=gen)).bfloat16()
    residual = torch.randn(tokens, hidden, generator=gen).bfloat16()

    native_out, native_residual = norm(x.clone(), residual.clone())
    native_plain = norm(x.clone())
    monkeypatch.setattr(layernorm, "native_ops", lambda: None)
    torch_out, torch_residual = norm(x.clone(), residual.clone())
    torch_plain = norm(x.clone())

    assert torch.equal(native_residual, torch_residual)  # the sum is rounded to bf16 alike
    for ours, theirs in ((native_out, torch_out), (native_plain, torch_plain)):
        # Same arithmetic up to the order of the sum of squares: at most one
        # bf16 step apart, on few elements.
        steps = (ours.float() - theirs.float()).abs() / theirs.float().abs().clamp_min(1e-3)
        assert steps.max().item() <= 2**-7
        assert (ours != theirs).float().mean().item() < 0.01


def test_native_rms_norm_updates_the_residual_in_place():
    norm = RMSNorm(64).bfloat16()
    x, residual = torch.ones(2, 64).bfloat16(), torch.ones(2, 64).bfloat16()
    _, returned = norm(x, residual)
    assert returned.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, torch.full((2, 64), 2.0).bfloat16())
