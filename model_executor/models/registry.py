"""Model classes by the `architectures` name in a checkpoint's config.json."""

from __future__ import annotations

from torch import nn


def model_classes() -> dict[str, type[nn.Module]]:
    from model_executor.models.llama import LlamaForCausalLM
    from model_executor.models.qwen2 import Qwen2ForCausalLM
    from model_executor.models.qwen3 import Qwen3ForCausalLM

    return {
        "LlamaForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_architectures(architectures: list[str] | None, config_file: str) -> str:
    """The first supported name in `architectures`, or an error listing what is supported."""
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not architectures:
        raise ValueError(f"{config_file} has no 'architectures' entry; supported: {supported}")
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(
        f"unsupported model architecture {', '.join(architectures)} in {config_file}; "
        f"supported: {supported}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    return model_classes()[architecture]
