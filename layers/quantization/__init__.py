"""Linear methods and the configs that choose them (base.py: the seam;
registry.py: which config a checkpoint loads with)."""

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
