"""Which quantization a model loads with: the checkpoint's
`quantization_config` (its `quant_method`), or `--quantization`.

- a quantized checkpoint loads in its own format; `--quantization` may name
  that format again, and naming another one is an error (naming both);
- a dense checkpoint loads dense, or quantized on the fly with
  `--quantization int8 | fp8` (online.py).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from layers.quantization.awq import AWQConfig
from layers.quantization.base import QuantizationConfig
from layers.quantization.compressed_tensors import CompressedTensorsConfig
from layers.quantization.dense import DenseConfig
from layers.quantization.fp8 import Fp8Config
from layers.quantization.gptq import GPTQConfig
from layers.quantization.online import ONLINE_KINDS, OnlineQuantConfig

# quant_method in a checkpoint's config.json -> its config class
CHECKPOINT_FORMATS = MappingProxyType({
    "fp8": Fp8Config,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "compressed-tensors": CompressedTensorsConfig,
})
# --quantization values
QUANTIZATION_CHOICES = tuple(sorted(set(CHECKPOINT_FORMATS) | set(ONLINE_KINDS)))
_ALIASES = MappingProxyType({"compressed_tensors": "compressed-tensors"})


def _canonical_name(name: str) -> str:
    return _ALIASES.get(name.lower(), name.lower())


def resolve_quantization(checkpoint_config: dict[str, Any] | None, requested: str | None,
                         cpu_pack: Any = None) -> QuantizationConfig:
    """The config to load with. `checkpoint_config`: config.json's
    `quantization_config` (None if absent); `requested`: --quantization."""
    requested = None if requested is None else _canonical_name(requested)
    if requested is not None and requested not in QUANTIZATION_CHOICES:
        raise ValueError(f"--quantization {requested!r} is not supported; choose from {', '.join(QUANTIZATION_CHOICES)}")
    if checkpoint_config is None:
        if requested is None:
            return DenseConfig(cpu_pack=cpu_pack)
        if requested in ONLINE_KINDS:
            return OnlineQuantConfig(requested, cpu_pack)
        raise ValueError(f"--quantization {requested} needs a checkpoint quantized as {requested}, and this checkpoint's "
                         "config.json has no quantization_config (on-the-fly: --quantization int8 or fp8)")
    method = _canonical_name(str(checkpoint_config.get("quant_method", "")))
    if method not in CHECKPOINT_FORMATS:
        raise ValueError(f"the checkpoint's quantization_config has quant_method {method!r}; supported: "
                         f"{', '.join(CHECKPOINT_FORMATS)}")
    if requested is not None and requested != method:
        raise ValueError(f"--quantization {requested} contradicts the checkpoint's quantization_config "
                         f"(quant_method {method})")
    return CHECKPOINT_FORMATS[method].from_config(checkpoint_config, cpu_pack)
