"""Linear methods and the configs that choose them (see base.py for the seam)."""

from layers.quantization.base import LinearMethod, QuantizationConfig, set_weight_attrs
from layers.quantization.dense import CpuPackedLinearMethod, CpuPackOptions, DenseConfig, DenseLinearMethod

__all__ = [
    "CpuPackOptions",
    "CpuPackedLinearMethod",
    "DenseConfig",
    "DenseLinearMethod",
    "LinearMethod",
    "QuantizationConfig",
    "set_weight_attrs",
]
