"""Shared fixtures: demo checkpoints (built once per machine, then cached)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from runtime.demo_model import demo_model_path

# Each parity case: (id, demo_model_path kwargs).
PARITY_MODELS = {
    "qwen3": dict(arch="qwen3"),
    "qwen2": dict(arch="qwen2"),
    "llama3-tied": dict(arch="llama", tie_word_embeddings=True, rope_scaling="llama3"),
    "mistral": dict(arch="mistral"),
}


@pytest.fixture(scope="session", params=list(PARITY_MODELS))
def parity_model(request) -> pathlib.Path:
    return demo_model_path(size="tiny", **PARITY_MODELS[request.param])


@pytest.fixture(scope="session")
def tiny_qwen3() -> pathlib.Path:
    return demo_model_path("qwen3", "tiny")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Parity tolerances are tight; keep torch's reduction order stable.
    torch.manual_seed(0)
    yield
