"""Shared fixtures: demo checkpoints (built once per machine, then cached)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from native_helpers import cpu_level  # noqa: F401 (a fixture: tests run at a capped CPU level)
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


@pytest.fixture(scope="session")
def tiny_llama() -> pathlib.Path:
    return demo_model_path("llama", "tiny")


@pytest.fixture(scope="session")
def eagle_head(tiny_llama, tmp_path_factory) -> pathlib.Path:
    """A random-weight EAGLE head for `tiny_llama` (runtime/demo_eagle.py)."""
    from runtime.demo_eagle import write_eagle_head

    return write_eagle_head(tiny_llama, tmp_path_factory.mktemp("eagle") / "head")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Parity tolerances are tight; keep torch's reduction order stable.
    torch.manual_seed(0)
    yield
