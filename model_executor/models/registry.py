"""Model classes by the `architectures` name in a checkpoint's config.json.

Modules are imported on first use, so a model's dependencies (a fused MoE
kernel, say) cost nothing to the users of the others. Adding an architecture:
one file here and one line below.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

from torch import nn

# architecture name -> module defining a class of that name
MODEL_MODULES: MappingProxyType[str, str] = MappingProxyType(
    {
        "LlamaForCausalLM": "model_executor.models.llama",
        "LlamaForCausalLMEagle": "model_executor.models.llama_eagle",
        "MistralForCausalLM": "model_executor.models.mistral",
        "MixtralForCausalLM": "model_executor.models.mixtral",
        "Qwen2ForCausalLM": "model_executor.models.qwen2",
        "Qwen2MoeForCausalLM": "model_executor.models.qwen2_moe",
        "Qwen3ForCausalLM": "model_executor.models.qwen3",
        "Qwen3MoeForCausalLM": "model_executor.models.qwen3_moe",
    }
)


def check_architectures(architectures: list[str] | None, config_file: str) -> str:
    """The first supported name in `architectures`, or an error listing what is supported."""
    supported = ", ".join(MODEL_MODULES)
    if not architectures:
        raise ValueError(f"{config_file} has no 'architectures' entry; supported: {supported}")
    for name in architectures:
        if name in MODEL_MODULES:
            return name
    raise ValueError(
        f"unsupported model architecture {', '.join(architectures)} in {config_file}; "
        f"supported: {supported}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_MODULES:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: {', '.join(MODEL_MODULES)}")
    return getattr(importlib.import_module(MODEL_MODULES[architecture]), architecture)
