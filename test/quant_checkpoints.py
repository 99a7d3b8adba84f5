"""Tiny quantized HF checkpoints in the public on-disk formats, for loader tests.

`quantize_checkpoint(src, dst, spec, ref)` turns a dense HF checkpoint (e.g. a
`runtime.demo_model` one) into a quantized checkpoint packed exactly as the format's
public writers pack it (round-to-nearest quantization, no GPTQ/AWQ search), plus an
optional dense *reference* checkpoint whose fp32 weights are exactly the dequantized
values of every quantized linear, so tests can run plain transformers on it.

Formats (quantization_config / tensors per quantized linear `<m>`; N = out, K = in):

* ``gptq``  AutoGPTQ / GPTQModel v1 (``checkpoint_format: "gptq"``):
  ``<m>.qweight`` int32 [K/pack, N] (pack = 32/bits, packed along K, element j of a word
  at bits*j), ``<m>.qzeros`` int32 [G, N/pack] (packed along N, *stored zero = zero - 1*),
  ``<m>.scales`` fp16 [G, N], ``<m>.g_idx`` int32 [K]; w[n, k] = scales[g, n] *
  (q[k, n] - zero[g, n]) with g = g_idx[k]. desc_act=True draws a random column order
  (as act-order GPTQ does) and writes g_idx[perm[i]] = i // group_size.
* ``awq``   AutoAWQ GEMM: ``<m>.qweight`` int32 [K, N/8] (packed along N, nibble i of
  a word holds column 8c + AWQ_ORDER[i], AWQ_ORDER = 0 2 4 6 1 3 5 7),
  ``<m>.qzeros`` int32 [G, N/8] (same order, zero stored as is), ``<m>.scales`` fp16 [G, N].
* ``fp8_tensor`` AutoFP8 / vLLM "fp8" per-tensor: ``<m>.weight`` float8_e4m3fn [N, K],
  ``<m>.weight_scale`` fp32 scalar (0-dim), static: ``<m>.input_scale`` fp32 scalar.
* ``fp8_block`` DeepSeek-V3 / Qwen3-FP8 block-wise: ``<m>.weight`` float8_e4m3fn [N, K],
  ``<m>.weight_scale_inv`` fp32 [ceil(N/bn), ceil(K/bk)]; w = weight * scale_inv.
* ``ct_*`` compressed-tensors as llm-compressor writes it. pack-quantized (w4a16, w8a16):
  ``<m>.weight_packed`` int32 [N, K*bits/32] (value + 2^(bits-1), packed along K, element
  j of a word at bits*j), ``<m>.weight_scale`` [N, G] (G = 1 per channel),
  ``<m>.weight_shape`` int64 [2] = (N, K), asym: ``<m>.weight_zero_point`` int32
  [N*bits/32, G] (zero + 2^(bits-1), packed along N). int-quantized (w8a8_int):
  ``<m>.weight`` int8 [N, K] + ``<m>.weight_scale`` [N, 1]. float-quantized (fp8):
  ``<m>.weight`` float8_e4m3fn + ``<m>.weight_scale`` [N, 1] (dynamic: FP8_DYNAMIC
  preset) or [1] (static: FP8 preset, plus ``<m>.input_scale`` [1]). ct scales keep the
  checkpoint's own dtype (bf16 for the demo models), as llm-compressor's observers do.
  w = scale * (q - zero) with q, zero in the signed range.

Biases stay plain tensors next to the quantized ones; embeddings, norms and lm_head are
never quantized; every other tensor keeps its dtype. Static activation scales come from a
short calibration run of the dense model (amax over random tokens, times a 2x margin).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMATS = ("fp8_tensor", "fp8_block", "gptq", "awq", "ct_w4a16", "ct_w8a16", "ct_w8a8_int", "ct_fp8")

# Bump whenever the bytes a spec produces change (invalidates quantized_demo_model's cache).
WRITER_VERSION = 2
# The compressed-tensors release whose writer conventions this module follows.
CT_VERSION = "0.20.1"
# AutoAWQ's packing order: nibble i of a packed word holds output column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Static activation scales: amax seen in calibration times this margin. FP8 has a relative
# precision independent of the scale, so head-room for unseen prompts costs next to nothing.
STATIC_MARGIN = 2.0
# The decoder linears that get quantized (never embeddings, lm_head or norms).
LINEAR_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
# Files of the source checkpoint that are rewritten rather than copied.
_NOT_COPIED = {"config.json", "radixserve_demo.json"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    fmt: str
    bits: int = 4  # gptq: 4 or 8; awq: 4; fixed by fmt for the others (ct_w4a16 -> 4, ct_w8a* -> 8)
    group_size: int = 64  # gptq/awq/ct pack-quantized: a divisor of K, or -1 (per channel; not awq)
    sym: bool = True  # gptq / ct pack-quantized; awq always has zero points
    desc_act: bool = False  # gptq only: act-order with a non-trivial g_idx
    block: tuple[int, int] = (64, 64)  # fp8_block weight_block_size [block_n, block_k]
    activation_scheme: str = "dynamic"  # "static" for fp8_tensor / ct_fp8 writes input scales
    ignore: tuple[str, ...] = ()  # module names left dense; ct formats also take "re:<regex>"
    seed: int = 0  # desc_act permutation and calibration tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", tuple(self.block))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.fmt == "gptq" and self.bits not in (4, 8):
            raise ValueError(f"gptq bits must be 4 or 8, got {self.bits}")
        if self.fmt == "awq" and self.bits != 4:
            raise ValueError(f"awq is 4-bit only, got bits={self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.fmt == "awq" and self.group_size == -1:
            raise ValueError("awq needs a real group size (AutoAWQ has no per-channel GEMM layout)")
        if self.desc_act and self.fmt != "gptq":
            raise ValueError("desc_act is a gptq option")
        if not self.sym and self.fmt not in ("gptq", "awq", "ct_w4a16", "ct_w8a16"):  # awq: always zero points
            raise ValueError(f"sym=False is only meaningful for gptq and ct pack-quantized, not {self.fmt}")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"activation_scheme must be 'dynamic' or 'static', got {self.activation_scheme!r}")
        if self.activation_scheme == "static" and self.fmt not in ("fp8_tensor", "ct_fp8"):
            raise ValueError(f"static activation scales exist only for fp8_tensor and ct_fp8, not {self.fmt}")
        if len(self.block) != 2 or min(self.block) <= 0:
            raise ValueError(f"block must be two positive ints, got {self.block}")
        regexes = [name for name in self.ignore if name.startswith("re:")]
        if regexes and not self.fmt.startswith("ct_"):
            raise ValueError(f"'re:' ignore entries are a compressed-tensors feature, not {self.fmt}: {regexes}")

    @property
    def weight_bits(self) -> int:
        return {"fp8_tensor": 8, "fp8_block": 8, "ct_w4a16": 4, "ct_w8a16": 8, "ct_w8a8_int": 8,
                "ct_fp8": 8}.get(self.fmt, self.bits)

    def dirname(self) -> str:
        """A short, stable, filesystem-safe id of this spec."""
        fields = dataclasses.asdict(self)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.fmt}-{digest}"


# ----------------------------------------------------------------------------- packing

def pack_int32(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-bit ints, 32/bits consecutive ones along `dim` per int32 word.

    Element j of each run of 32/bits sits at bit offset bits*j ("little end first"); with
    `order`, slot j holds element order[j] of the run instead (AWQ's interleave).
    """
    if 32 % bits:
        raise ValueError(f"bits must divide 32, got {bits}")
    per_word = 32 // bits
    values = values.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values out of the unsigned {bits}-bit range")
    moved = values.movedim(dim, -1)
    if moved.shape[-1] % per_word:
        raise ValueError(f"dim {dim} of size {moved.shape[-1]} is not a multiple of {per_word}")
    runs = moved.reshape(*moved.shape[:-1], moved.shape[-1] // per_word, per_word)
    if order is not None:
        runs = runs[..., list(order)]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


# ----------------------------------------------------------------------------- quantizers
# Each takes the fp32 weight [N, K] and returns (tensors to write, dequantized fp32 weight).

Quantized = tuple[dict[str, torch.Tensor], torch.Tensor]


def _group_size(spec: QuantSpec, k: int, name: str) -> int:
    group = k if spec.group_size == -1 else spec.group_size
    if k % group:
        raise ValueError(f"group_size {spec.group_size} does not divide K={k} of {name}")
    return group


def _quant_gptq(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator) -> Quantized:
    n, k = w.shape
    bits, maxq = spec.bits, (1 << spec.bits) - 1
    group = _group_size(spec, k, name)
    # GPTQ quantizes columns in `perm` order (act-order: by Hessian diagonal; here: random)
    # and cuts groups in that order; g_idx maps each original column to its group. The
    # Hessian is the layer input's, so projections reading one input (q/k/v, gate/up)
    # share one order, as real checkpoints do (readers fuse them).
    shared_input = re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", name))
    digest = int(hashlib.sha256(f"{spec.seed}:{shared_input}".encode()).hexdigest()[:8], 16)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(digest)) if spec.desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // group
    grouped = w[:, perm].reshape(n, k // group, group)
    xmin = grouped.amin(dim=-1).clamp(max=0)
    xmax = grouped.amax(dim=-1).clamp(min=0)
    if spec.sym:  # GPTQ's Quantizer: symmetric range, zero fixed at the middle
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16)  # [N, G] as stored
    if spec.sym:
        zero = torch.full_like(xmin, (maxq + 1) // 2)
    else:
        # v1 stores zero - 1, so zero must stay >= 1 to be representable (AutoGPTQ would
        # wrap a stored -1 into the neighbouring fields).
        zero = torch.round(-xmin / scale.float()).clamp(1, maxq)
    s = scale.float()[:, g_idx]
    z = zero[:, g_idx]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    deq = (q - z) * s
    tensors = {
        "qweight": pack_int32(q.T.to(torch.int64), bits, dim=0),  # [K/pack, N]
        "qzeros": pack_int32((zero - 1).T.to(torch.int64), bits, dim=1),  # [G, N/pack]
        "scales": scale.T.contiguous(),  # [G, N] fp16
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, deq


def _quant_awq(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator) -> Quantized:
    n, k = w.shape
    maxq = 15
    group = _group_size(spec, k, name)
    grouped = w.reshape(n, k // group, group)
    wmax, wmin = grouped.amax(dim=-1), grouped.amin(dim=-1)
    # AutoAWQ's pseudo_quantize_tensor (zero_point=True), with the scale rounded to fp16 first
    scale_raw = (wmax - wmin).clamp(min=1e-5) / maxq
    zero = (-torch.round(wmin / scale_raw)).clamp(0, maxq)
    scale = scale_raw.to(torch.float16)
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    deq = (q - z) * s
    tensors = {
        "qweight": pack_int32(q.T.to(torch.int64), 4, dim=1, order=AWQ_ORDER),  # [K, N/8]
        "qzeros": pack_int32(zero.T.to(torch.int64), 4, dim=1, order=AWQ_ORDER),  # [G, N/8]
        "scales": scale.T.contiguous(),  # [G, N] fp16
    }
    return tensors, deq


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _quant_fp8_tensor(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator) -> Quantized:
    scale = (w.abs().amax().clamp(min=1e-12) / FP8_MAX).to(torch.float32)  # 0-dim, as AutoFP8
    q = _to_fp8(w, scale)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def _quant_fp8_block(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator) -> Quantized:
    n, k = w.shape
    bn, bk = spec.block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w
    amax = padded.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3))
    scale_inv = (amax.clamp(min=1e-12) / FP8_MAX).to(torch.float32)  # [ceil(N/bn), ceil(K/bk)]
    s = scale_inv.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:n, :k]
    q = _to_fp8(w, s)
    return {"weight": q, "weight_scale_inv": scale_inv}, q.float() * s


def _quant_ct_pack(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator, dtype: torch.dtype) -> Quantized:
    """compressed-tensors pack-quantized (W4A16 / W8A16 presets, group or channel strategy)."""
    n, k = w.shape
    bits = spec.weight_bits
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    group = _group_size(spec, k, name)
    grouped = w.reshape(n, k // group, group)
    # compressed-tensors' calculate_qparams: the range always includes 0
    wmin = grouped.amin(dim=-1).clamp(max=0)
    wmax = grouped.amax(dim=-1).clamp(min=0)
    if spec.sym:
        scale = torch.maximum(wmin.abs(), wmax) / ((qmax - qmin) / 2)
    else:
        scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale).to(dtype)  # stored [N, G]
    if spec.sym:
        zero = torch.zeros_like(wmin)
    else:
        zero = torch.round(qmin - wmin / scale.float()).clamp(qmin, qmax)
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    deq = (q - z) * s
    tensors = {
        "weight_packed": pack_int32((q - qmin).to(torch.int64), bits, dim=1),  # [N, K*bits/32]
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not spec.sym:
        tensors["weight_zero_point"] = pack_int32((zero - qmin).to(torch.int64), bits, dim=0)  # [N*bits/32, G]
    return tensors, deq


def _quant_ct_int8(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator, dtype: torch.dtype) -> Quantized:
    """compressed-tensors int-quantized, W8A8 preset: int8 per-channel symmetric weights."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = amax / 127.5  # (qmax - qmin) / 2, as compressed-tensors computes it
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale).to(dtype)  # [N, 1]
    q = torch.clamp(torch.round(w / scale.float()), -128, 127)
    return {"weight": q.to(torch.int8), "weight_scale": scale}, q * scale.float()


def _quant_ct_fp8(w: torch.Tensor, spec: QuantSpec, name: str, gen: torch.Generator, dtype: torch.dtype) -> Quantized:
    """compressed-tensors float-quantized: FP8_DYNAMIC (channel) or FP8 (tensor, static input)."""
    if spec.activation_scheme == "static":
        amax = w.abs().amax().reshape(1)  # tensor strategy: scale shape [1]
    else:
        amax = w.abs().amax(dim=1, keepdim=True)  # channel strategy: [N, 1]
    scale = torch.where(amax == 0, torch.finfo(dtype).eps, amax / FP8_MAX).to(dtype)
    q = _to_fp8(w, scale.float())
    return {"weight": q, "weight_scale": scale}, q.float() * scale.float()


# ----------------------------------------------------------------------------- configs

def _ct_args(num_bits: int, type_: str, strategy: str, *, symmetric: bool = True, group_size: int | None = None,
             dynamic: bool = False, observer: str | None = "minmax") -> dict[str, Any]:
    # The full key set llm-compressor checkpoints on the hub carry (newer compressed-tensors
    # releases omit the null ones; readers must accept both).
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": observer, "observer_kwargs": {}}


def _ct_config(spec: QuantSpec) -> dict[str, Any]:
    inputs = None
    if spec.fmt in ("ct_w4a16", "ct_w8a16"):
        fmt = "pack-quantized"
        strategy = "channel" if spec.group_size == -1 else "group"
        weights = _ct_args(spec.weight_bits, "int", strategy, symmetric=spec.sym,
                           group_size=None if spec.group_size == -1 else spec.group_size)
    elif spec.fmt == "ct_w8a8_int":
        fmt = "int-quantized"
        weights = _ct_args(8, "int", "channel")
        inputs = _ct_args(8, "int", "token", dynamic=True, observer=None)
    else:  # ct_fp8
        fmt = "float-quantized"
        if spec.activation_scheme == "static":  # llm-compressor's FP8 preset
            weights = _ct_args(8, "float", "tensor")
            inputs = _ct_args(8, "float", "tensor", observer="minmax")
        else:  # FP8_DYNAMIC preset
            weights = _ct_args(8, "float", "channel")
            inputs = _ct_args(8, "float", "token", dynamic=True, observer=None)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": fmt}},
        "ignore": _with_lm_head(spec.ignore),
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _with_lm_head(ignore: tuple[str, ...]) -> list[str]:
    return ["lm_head", *(name for name in ignore if name != "lm_head")]


def quantization_config(spec: QuantSpec) -> dict[str, Any]:
    """The `quantization_config` dict that goes into config.json for this spec."""
    ignore = list(spec.ignore)
    if spec.fmt == "gptq":
        config: dict[str, Any] = {
            "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act,
            "sym": spec.sym, "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "lm_head": False, "model_name_or_path": None, "model_file_base_name": None,
            "checkpoint_format": "gptq",
        }
        if ignore:
            config["modules_to_not_convert"] = ignore
            # GPTQModel's own per-module switch, which vLLM honours: "-:" = leave dense
            config["dynamic"] = {f"-:{re.escape(name)}$": {} for name in ignore}
        return config
    if spec.fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": spec.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ignore or None}
    if spec.fmt == "fp8_tensor":  # AutoFP8's config (vLLM reads ignored_layers first)
        return {"quant_method": "fp8", "activation_scheme": spec.activation_scheme,
                "ignored_layers": _with_lm_head(spec.ignore)}
    if spec.fmt == "fp8_block":  # DeepSeek-V3 / Qwen3-*-FP8 / HF FineGrainedFP8Config
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(spec.block), "modules_to_not_convert": _with_lm_head(spec.ignore)}
    return _ct_config(spec)


# ----------------------------------------------------------------------------- driver

def _is_ignored(name: str, spec: QuantSpec) -> bool:
    for entry in spec.ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):  # compressed-tensors / vLLM: re.match on the module name
                return True
        elif entry == name:
            return True
    return False


def _load_dense(src: pathlib.Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def _calibrate_input_amax(src: pathlib.Path, names: list[str], seed: int) -> dict[str, float]:
    """amax of each linear's input over a forward pass of the dense model on random tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(src).vocab_size
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.eval()
    amax: dict[str, float] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    tokens = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    return amax


def quantize_checkpoint(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], spec: QuantSpec,
                        ref_dir: str | os.PathLike[str] | None = None) -> None:
    """Write `spec`'s quantized version of the dense checkpoint `src_dir` to `dst_dir`.

    `ref_dir` (optional) gets the same model with dense fp32 weights equal to the
    dequantized values of every quantized linear and no quantization_config.
    """
    src, dst = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized")
    dense = _load_dense(src)

    linears = sorted(key[: -len(".weight")] for key in dense if key.endswith(".weight")
                     and LINEAR_RE.match(key[: -len(".weight")]))
    modules = {key.rsplit(".", 1)[0] for key in dense}
    for entry in spec.ignore:
        if not entry.startswith("re:") and entry not in modules:
            raise ValueError(f"ignore entry {entry!r} names no module of {src}")
    targets = [name for name in linears if not _is_ignored(name, spec)]
    if not targets:
        raise ValueError("nothing left to quantize")

    scale_dtype = dense[f"{targets[0]}.weight"].dtype  # ct scales follow the checkpoint's weights
    quantizer: Callable[..., Quantized] = {
        "gptq": _quant_gptq, "awq": _quant_awq, "fp8_tensor": _quant_fp8_tensor, "fp8_block": _quant_fp8_block,
        "ct_w4a16": functools.partial(_quant_ct_pack, dtype=scale_dtype),
        "ct_w8a16": functools.partial(_quant_ct_pack, dtype=scale_dtype),
        "ct_w8a8_int": functools.partial(_quant_ct_int8, dtype=scale_dtype),
        "ct_fp8": functools.partial(_quant_ct_fp8, dtype=scale_dtype),
    }[spec.fmt]

    input_amax = _calibrate_input_amax(src, targets, spec.seed) if spec.activation_scheme == "static" else {}
    gen = torch.Generator().manual_seed(spec.seed)
    quantized: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    target_set = set(targets)
    for key, tensor in dense.items():
        module = key.rsplit(".", 1)[0]
        if module in target_set and key.endswith(".weight"):
            tensors, deq = quantizer(tensor.float(), spec, module, gen)
            quantized.update({f"{module}.{suffix}": value for suffix, value in tensors.items()})
            if module in input_amax:
                scale = torch.tensor(max(input_amax[module], 1e-6) * STATIC_MARGIN / FP8_MAX)
                if spec.fmt == "fp8_tensor":
                    quantized[f"{module}.input_scale"] = scale.to(torch.float32)  # 0-dim, as AutoFP8
                else:
                    quantized[f"{module}.input_scale"] = scale.reshape(1).to(scale_dtype)
            reference[key] = deq.to(torch.float32).contiguous()
        else:
            quantized[key] = tensor
            reference[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor

    _write(src, dst, dict(config, quantization_config=quantization_config(spec)), quantized)
    if ref_dir is not None:
        ref_config = {key: value for key, value in config.items() if key != "quantization_config"}
        ref_config["dtype"] = "float32"  # transformers 5's key
        if "torch_dtype" in ref_config:  # older configs
            ref_config["torch_dtype"] = "float32"
        _write(src, pathlib.Path(ref_dir), ref_config, reference)


def _write(src: pathlib.Path, out: pathlib.Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED \
                and not path.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copyfile(path, out / path.name)
    save_file({key: value.contiguous() for key, value in sorted(tensors.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def quantized_demo_model(spec: QuantSpec, arch: str = "qwen3", size: str = "tiny", *,
                         cache_dir: str | os.PathLike[str] | None = None,
                         **demo_kwargs: Any) -> tuple[pathlib.Path, pathlib.Path]:
    """(quantized dir, reference dir) for a demo model, built once and cached (by default
    under the demo models' cache root, in quant/)."""
    from runtime.demo_model import cache_root, demo_model_path

    src = demo_model_path(arch, size, **demo_kwargs)
    marker = json.dumps({"writer": WRITER_VERSION, "src": (src / "radixserve_demo.json").read_text(),
                         "spec": dataclasses.asdict(spec)}, sort_keys=True)
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / "quant"
    out = root / f"{src.name}-{spec.dirname()}"
    if (out / "marker.json").exists() and (out / "marker.json").read_text() == marker:
        return out / "quant", out / "ref"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        quantize_checkpoint(src, tmp / "quant", spec, tmp / "ref")
        (tmp / "marker.json").write_text(marker)  # last: its presence means the rest is complete
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # a concurrent builder won; its result is identical
            if not ((out / "marker.json").exists() and (out / "marker.json").read_text() == marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "quant", out / "ref"
