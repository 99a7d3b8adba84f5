"""Model classes by the `architectures` name in a checkpoint's config.json."""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from model_executor.models.llama import LlamaForCausalLM
from model_executor.models.qwen2 import Qwen2ForCausalLM
from model_executor.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: MappingProxyType[str, type[nn.Module]] = MappingProxyType(
    {cls.__name__: cls for cls in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)}
)


def check_architectures(architectures: list[str] | None, config_file: str) -> str:
    """The first supported name in `architectures`, or an error listing what is supported."""
    supported = ", ".join(MODEL_CLASSES)
    if not architectures:
        raise ValueError(f"{config_file} has no 'architectures' entry; supported: {supported}")
    for name in architectures:
        if name in MODEL_CLASSES:
            return name
    raise ValueError(
        f"unsupported model architecture {', '.join(architectures)} in {config_file}; "
        f"supported: {supported}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    return MODEL_CLASSES[architecture]
