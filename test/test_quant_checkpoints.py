"""The quantized-checkpoint writers of quant_checkpoints.py, checked against the formats' specs.

Every quantized linear is decoded here by small readers written from the public code that
reads each format (AutoGPTQ's QuantLinear / vLLM's gptq_gemm fallback, vLLM's AWQ
reverse-order dequant, DeepSeek's weight_dequant, compressed-tensors' unpack), and the
result must equal the reference checkpoint exactly and be within one quantization step of
the dense weights. Where compressed-tensors is installed its own pack/unpack helpers and
transformers' compressed-tensors loader are the readers too.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quant_checkpoints import AWQ_ORDER, FORMATS, QuantSpec, pack_int32, quantize_checkpoint, quantized_demo_model
from runtime.demo_model import demo_model_path

LAYER0_DOWN = "model.layers.0.mlp.down_proj"
SPECS = {
    "gptq4": QuantSpec("gptq"),
    "gptq8-asym-actorder": QuantSpec("gptq", bits=8, sym=False, desc_act=True, group_size=32),
    "gptq4-asym-channel": QuantSpec("gptq", sym=False, group_size=-1, desc_act=True),
    "awq": QuantSpec("awq", ignore=(LAYER0_DOWN,)),
    "fp8-tensor-static": QuantSpec("fp8_tensor", activation_scheme="static", ignore=(LAYER0_DOWN,)),
    "fp8-tensor-dynamic": QuantSpec("fp8_tensor"),
    "fp8-block": QuantSpec("fp8_block"),
    "fp8-block-ragged": QuantSpec("fp8_block", block=(128, 96)),
    "ct-w4a16": QuantSpec("ct_w4a16", group_size=32),
    "ct-w4a16-asym": QuantSpec("ct_w4a16", sym=False),
    "ct-w8a16-asym-channel": QuantSpec("ct_w8a16", sym=False, group_size=-1),
    "ct-w8a8-int": QuantSpec("ct_w8a8_int", ignore=("model.layers.3.self_attn.o_proj",)),
    "ct-fp8-static": QuantSpec("ct_fp8", activation_scheme="static", ignore=(r"re:.*layers\.1\.mlp\..*",)),
    "ct-fp8-dynamic": QuantSpec("ct_fp8"),
}
CT_SPECS = [key for key, spec in SPECS.items() if spec.fmt.startswith("ct_")]
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


@pytest.fixture(scope="module")
def source() -> pathlib.Path:
    return demo_model_path("qwen2", "tiny")  # Qwen2: q/k/v biases ride along with quantized weights


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    """spec id -> (quantized dir, reference dir), each written once."""
    cache: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}

    def get(key: str) -> tuple[pathlib.Path, pathlib.Path]:
        if key not in cache:
            root = tmp_path_factory.mktemp(key)
            quantize_checkpoint(source, root / "quant", SPECS[key], root / "ref")
            cache[key] = (root / "quant", root / "ref")
        return cache[key]

    return get


# ----------------------------------------------------------------------------- readers

def unpack_words(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned fields of int32 words: word w along `dim` holds elements w*per .. w*per + per - 1,
    field j (bits j*bits ..) holding element order[j] (default j) of its run."""
    per, mask = 32 // bits, (1 << bits) - 1
    unsigned = np.moveaxis(words.numpy().view(np.uint32), dim, -1)
    out = np.zeros(unsigned.shape[:-1] + (unsigned.shape[-1] * per,), dtype=np.int64)
    for field in range(per):
        element = order[field] if order else field
        out[..., element::per] = (unsigned >> np.uint32(bits * field)) & np.uint32(mask)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, dim)))


def decode_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """AutoGPTQ QuantLinear's torch fallback (v1: zeros + 1), dequantized per g_idx."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    maxq = (1 << bits) - 1
    zeros = torch.bitwise_and(torch.bitwise_right_shift(t["qzeros"].unsqueeze(2), wf.view(1, 1, -1)), maxq)
    zeros = zeros.reshape(t["scales"].shape) + 1  # [G, N]
    weight = torch.bitwise_and(torch.bitwise_right_shift(t["qweight"].unsqueeze(1), wf.view(1, -1, 1)), maxq)
    weight = weight.reshape(-1, weight.shape[-1])  # [K, N]
    g_idx = t["g_idx"].long()
    return (t["scales"].float()[g_idx] * (weight - zeros[g_idx])).T


def decode_awq(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """vLLM's awq_dequantize_torch: unpack fields in order, then undo AWQ's interleave."""
    shifts = torch.arange(0, 32, 4)
    reverse = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ_REVERSE_ORDER

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        fields = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]).reshape(packed.shape[0], -1)
        index = torch.arange(fields.shape[-1]).view(-1, 8)[:, list(reverse)].reshape(-1)
        return fields[:, index] & 0xF

    weight, zeros = unpack(t["qweight"]), unpack(t["qzeros"])  # [K, N], [G, N]
    zeros = zeros.repeat_interleave(group, dim=0)
    scales = t["scales"].float().repeat_interleave(group, dim=0)
    return ((weight - zeros) * scales).T


def decode_ct_pack(t: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dequantized weight, signed ints, signed zero points) of a pack-quantized linear."""
    n, k = t["weight_shape"].tolist()
    offset = 1 << (bits - 1)
    q = unpack_words(t["weight_packed"], bits, dim=1)[:, :k] - offset
    scale = t["weight_scale"].float()
    group = k // scale.shape[1]
    zero = None
    if "weight_zero_point" in t:
        zero = unpack_words(t["weight_zero_point"], bits, dim=0)[:n] - offset
    z = 0 if zero is None else zero.repeat_interleave(group, dim=1)
    return (q - z) * scale.repeat_interleave(group, dim=1), q, zero


def decode(fmt: str, spec: QuantSpec, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    n, k = shape
    if fmt == "gptq":
        return decode_gptq(t, spec.bits)
    if fmt == "awq":
        return decode_awq(t, spec.group_size)
    if fmt == "fp8_block":  # DeepSeek-V3's weight_dequant: each [bn, bk] tile times its scale
        bn, bk = spec.block
        s = t["weight_scale_inv"].repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
        return t["weight"].float() * s
    if fmt in ("ct_w4a16", "ct_w8a16"):
        return decode_ct_pack(t, spec.weight_bits)[0]
    return t["weight"].float() * t["weight_scale"].float()  # fp8_tensor, ct_w8a8_int, ct_fp8: broadcast


def expected_tensors(spec: QuantSpec, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-format tensor names, shapes and dtypes of one quantized linear (bias excluded)."""
    group = k if spec.group_size == -1 else spec.group_size
    bits, static = spec.weight_bits, spec.activation_scheme == "static"
    if spec.fmt == "gptq":
        pack = 32 // bits
        return {"qweight": ((k // pack, n), torch.int32), "qzeros": ((k // group, n // pack), torch.int32),
                "scales": ((k // group, n), torch.float16), "g_idx": ((k,), torch.int32)}
    if spec.fmt == "awq":
        return {"qweight": ((k, n // 8), torch.int32), "qzeros": ((k // group, n // 8), torch.int32),
                "scales": ((k // group, n), torch.float16)}
    if spec.fmt == "fp8_tensor":
        out = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((), torch.float32)}
        return out | ({"input_scale": ((), torch.float32)} if static else {})
    if spec.fmt == "fp8_block":
        bn, bk = spec.block
        return {"weight": ((n, k), torch.float8_e4m3fn),
                "weight_scale_inv": ((-(-n // bn), -(-k // bk)), torch.float32)}
    if spec.fmt in ("ct_w4a16", "ct_w8a16"):
        out = {"weight_packed": ((n, k * bits // 32), torch.int32), "weight_scale": ((n, k // group), torch.bfloat16),
               "weight_shape": ((2,), torch.int64)}
        return out | ({} if spec.sym else {"weight_zero_point": ((n * bits // 32, k // group), torch.int32)})
    if spec.fmt == "ct_w8a8_int":
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), torch.bfloat16)}
    scale_shape = (1,) if static else (n, 1)  # ct_fp8: FP8 (tensor) or FP8_DYNAMIC (channel) preset
    out = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": (scale_shape, torch.bfloat16)}
    return out | ({"input_scale": ((1,), torch.bfloat16)} if static else {})


def step_bound(spec: QuantSpec, t: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
    """Largest allowed |dequantized - dense| per element: fp8's rounding for floats; for ints one
    step, or 1.5 with zero points (the rounded zero point and the scale's rounding to its stored
    dtype can each push the range's far end half a step inwards)."""
    n, k = dense.shape
    if spec.fmt in ("fp8_tensor", "fp8_block", "ct_fp8"):
        return dense.abs() / 16 + 1e-6
    steps = 1.0001 if spec.sym and spec.fmt != "awq" else 1.5
    if spec.fmt in ("gptq", "awq"):
        group = k if spec.group_size == -1 else spec.group_size
        g_idx = t["g_idx"].long() if "g_idx" in t else torch.arange(k) // group
        return t["scales"].float()[g_idx].T * steps
    scale = t["weight_scale"].float()
    return scale.repeat_interleave(k // scale.shape[1], dim=1) * steps


# ----------------------------------------------------------------------------- tests

def test_pack_int32_field_order():
    nibbles = torch.arange(1, 9).view(1, 8)
    # element j in bits 4j..4j+3: 0x87654321
    assert pack_int32(nibbles, 4, dim=1).item() == np.int32(np.uint32(0x87654321))
    # AWQ: field j holds element AWQ_ORDER[j] = 0 2 4 6 1 3 5 7 -> values 1 3 5 7 2 4 6 8
    assert pack_int32(nibbles, 4, dim=1, order=AWQ_ORDER).item() == np.int32(np.uint32(0x86427531))
    assert pack_int32(torch.tensor([[1], [2], [3], [4]]), 8, dim=0).tolist() == [[0x04030201]]
    values = torch.randint(0, 16, (24, 16), generator=torch.Generator().manual_seed(0))
    for dim in (0, 1):
        assert torch.equal(unpack_words(pack_int32(values, 4, dim), 4, dim), values)
    assert torch.equal(unpack_words(pack_int32(values, 4, 1, AWQ_ORDER), 4, 1, AWQ_ORDER), values)


@pytest.mark.parametrize("kwargs", [
    dict(fmt="marlin"), dict(fmt="gptq", bits=3), dict(fmt="awq", bits=8), dict(fmt="awq", group_size=-1),
    dict(fmt="awq", desc_act=True), dict(fmt="ct_w8a8_int", sym=False),
    dict(fmt="fp8_block", activation_scheme="static"),
    dict(fmt="gptq", ignore=("re:.*",)), dict(fmt="ct_w4a16", group_size=0),
])
def test_spec_rejects_what_the_format_cannot_say(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_every_format_is_covered():
    assert {spec.fmt for spec in SPECS.values()} == set(FORMATS)


@pytest.mark.parametrize("key", list(SPECS))
def test_checkpoint_matches_format_and_reference(key, built, source):
    spec = SPECS[key]
    quant_dir, ref_dir = built(key)
    dense = load_file(str(source / "model.safetensors"))
    quant = load_file(str(quant_dir / "model.safetensors"))
    ref = load_file(str(ref_dir / "model.safetensors"))

    # Side files come along; the demo marker does not (these are not demo models).
    for directory in (quant_dir, ref_dir):
        names = {path.name for path in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        assert "radixserve_demo.json" not in names
    src_config = json.loads((source / "config.json").read_text())
    config = json.loads((quant_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src_config
    ref_config = json.loads((ref_dir / "config.json").read_text())
    assert "quantization_config" not in ref_config and ref_config["dtype"] == "float32"
    check_config(spec, config["quantization_config"])

    linears = sorted(name[: -len(".weight")] for name in dense if LINEAR.match(name[: -len(".weight")]))
    assert len(linears) == 28
    ignored = {name for name in linears if any(
        re.match(entry[3:], name) if entry.startswith("re:") else entry == name for entry in spec.ignore)}
    assert ignored or not spec.ignore
    expected_keys = set()
    for name in linears:
        w = dense[f"{name}.weight"].float()
        n, k = w.shape
        if name in ignored:  # left dense, in the checkpoint's dtype
            assert torch.equal(quant[f"{name}.weight"], dense[f"{name}.weight"])
            assert torch.equal(ref[f"{name}.weight"], w)
            expected_keys.add(f"{name}.weight")
            continue
        shapes = expected_tensors(spec, n, k)
        t = {suffix: quant[f"{name}.{suffix}"] for suffix in shapes}
        for suffix, (shape, dtype) in shapes.items():
            assert (tuple(t[suffix].shape), t[suffix].dtype) == (shape, dtype), f"{name}.{suffix}"
        expected_keys |= {f"{name}.{suffix}" for suffix in shapes}
        deq = decode(spec.fmt, spec, t, (n, k))
        assert ref[f"{name}.weight"].dtype == torch.float32
        assert torch.equal(deq, ref[f"{name}.weight"]), f"{name}: reference != dequantized checkpoint"
        assert ((deq - w).abs() <= step_bound(spec, t, w)).all(), f"{name}: dequantized too far from dense"
        check_ints(spec, t, n, k)
        if "input_scale" in t:
            assert torch.isfinite(t["input_scale"]).all() and (t["input_scale"] > 0).all()
    for name, tensor in dense.items():  # everything else (biases included) is untouched
        if name.endswith(".weight") and name[: -len(".weight")] in linears:
            continue  # checked above
        assert torch.equal(quant[name], tensor), name
        assert torch.equal(ref[name], tensor.float()), name
        expected_keys.add(name)
    assert any(name.endswith("q_proj.bias") for name in quant)
    assert set(quant) == expected_keys
    assert set(ref) == set(dense)


def check_ints(spec: QuantSpec, t: dict[str, torch.Tensor], n: int, k: int) -> None:
    """Format-level invariants of the stored integers."""
    if spec.fmt == "gptq":
        group = k if spec.group_size == -1 else spec.group_size
        counts = torch.bincount(t["g_idx"].long())
        assert counts.tolist() == [group] * (k // group)  # every group holds group_size columns
        monotone = bool((t["g_idx"][1:] >= t["g_idx"][:-1]).all())
        assert monotone == (not spec.desc_act or spec.group_size == -1)
        stored = unpack_words(t["qzeros"], spec.bits, dim=1)
        if spec.sym:  # v1: zero 2^(bits-1) is stored as 2^(bits-1) - 1 (0x77777777 for 4 bits)
            assert (stored == (1 << (spec.bits - 1)) - 1).all()
    if spec.fmt == "ct_w8a8_int":  # per-channel scales: every row reaches the end of the int8 range
        assert (t["weight"].to(torch.int16).abs().amax(dim=1) >= 127).all()


def check_config(spec: QuantSpec, qc: dict) -> None:
    ignore = list(spec.ignore)
    if spec.fmt == "gptq":
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
        assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == \
            (spec.bits, spec.group_size, spec.desc_act, spec.sym)
        assert qc.get("modules_to_not_convert") == (ignore or None)
    elif spec.fmt == "awq":
        assert qc == {"quant_method": "awq", "bits": 4, "group_size": spec.group_size, "zero_point": True,
                      "version": "gemm", "modules_to_not_convert": ignore or None}
    elif spec.fmt == "fp8_tensor":
        assert qc == {"quant_method": "fp8", "activation_scheme": spec.activation_scheme,
                      "ignored_layers": ["lm_head", *ignore]}
    elif spec.fmt == "fp8_block":
        assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": list(spec.block), "modules_to_not_convert": ["lm_head", *ignore]}
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
        assert qc["ignore"] == ["lm_head", *ignore]
        (group,) = qc["config_groups"].values()
        assert group["targets"] == ["Linear"]
        weights, inputs = group["weights"], group["input_activations"]
        assert weights["num_bits"] == spec.weight_bits
        if spec.fmt in ("ct_w4a16", "ct_w8a16"):
            assert qc["format"] == "pack-quantized" and inputs is None
            assert weights["type"] == "int" and weights["symmetric"] == spec.sym
            assert (weights["strategy"], weights["group_size"]) == (
                ("channel", None) if spec.group_size == -1 else ("group", spec.group_size))
        elif spec.fmt == "ct_w8a8_int":
            assert qc["format"] == "int-quantized"
            assert (weights["type"], weights["strategy"], weights["symmetric"]) == ("int", "channel", True)
            assert (inputs["type"], inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == \
                ("int", 8, "token", True)
        else:
            assert qc["format"] == "float-quantized" and weights["type"] == "float" and inputs["type"] == "float"
            static = spec.activation_scheme == "static"
            assert weights["strategy"] == ("tensor" if static else "channel")
            assert (inputs["strategy"], inputs["dynamic"]) == (("tensor", False) if static else ("token", True))


@pytest.mark.parametrize("key", CT_SPECS)
def test_compressed_tensors_library_reads_the_same(key, built):
    """compressed-tensors' own helpers and config model agree with the written tensors."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    spec = SPECS[key]
    quant_dir, _ = built(key)
    config = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    fields = {k: v for k, v in config.items() if k in QuantizationConfig.model_fields}
    parsed = QuantizationConfig.model_validate(fields)
    assert parsed.format == config["format"] and parsed.ignore == config["ignore"]
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.num_bits == spec.weight_bits and scheme.weights.symmetric == spec.sym
    if spec.fmt not in ("ct_w4a16", "ct_w8a16"):
        return
    quant = load_file(str(quant_dir / "model.safetensors"))
    bits = spec.weight_bits
    for name in {k.rsplit(".", 1)[0] for k in quant if k.endswith(".weight_packed")}:
        suffixes = ("weight_packed", "weight_scale", "weight_shape") + (() if spec.sym else ("weight_zero_point",))
        t = {suffix: quant[f"{name}.{suffix}"] for suffix in suffixes}
        _, q, zero = decode_ct_pack(t, bits)
        shape = torch.Size(t["weight_shape"].tolist())
        assert torch.equal(unpack_from_int32(t["weight_packed"], bits, shape).long(), q), ct.__version__
        assert torch.equal(pack_to_int32(q.to(torch.int8), bits), t["weight_packed"])
        if not spec.sym:
            zp = t["weight_zero_point"]
            assert torch.equal(pack_to_int32(zero.to(torch.int8), bits, packed_dim=0), zp)
            assert torch.equal(unpack_from_int32(zp, bits, zero.shape, packed_dim=0).long(), zero)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("key", CT_SPECS)
def test_transformers_decompresses_ct_checkpoint_to_reference(key, built):
    """transformers + compressed-tensors (an independent reader) dequantize to the reference."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quant_dir, ref_dir = built(key)
    ref = load_file(str(ref_dir / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(quant_dir, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    for name, expected in ref.items():
        # the library dequantizes in the scales' dtype (bf16): one bf16 rounding apart
        torch.testing.assert_close(state[name].float(), expected, rtol=2**-7, atol=1e-7, msg=name)


@pytest.mark.parametrize("key", ["fp8-tensor-static", "fp8-block", "fp8-block-ragged"])
def test_transformers_fp8_dequant_matches_reference(key, built):
    """transformers' FineGrainedFP8 dequantizer (per-tensor: block None) reads the same weights."""
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    dequant = getattr(finegrained, "_dequantize_fp8_weight", None)
    if dequant is None:
        pytest.skip("transformers has no _dequantize_fp8_weight")
    spec = SPECS[key]
    quant_dir, ref_dir = built(key)
    quant, ref = load_file(str(quant_dir / "model.safetensors")), load_file(str(ref_dir / "model.safetensors"))
    for name in {k.rsplit(".", 1)[0] for k in quant if quant[k].dtype == torch.float8_e4m3fn}:
        scale = quant[f"{name}.weight_scale_inv" if spec.fmt == "fp8_block" else f"{name}.weight_scale"]
        block = list(spec.block) if spec.fmt == "fp8_block" else None
        got = dequant(quant[f"{name}.weight"], scale, block, torch.float32)
        assert torch.equal(got, ref[f"{name}.weight"]), name


def test_reference_runs_in_transformers_close_to_dense(built, source):
    from transformers import AutoModelForCausalLM

    _, ref_dir = built("ct-w8a8-int")
    tokens = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(1))
    logits = {}
    for label, path in (("ref", ref_dir), ("dense", source)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            logits[label] = model(input_ids=tokens).logits[0]
    assert torch.isfinite(logits["ref"]).all()
    agree = (logits["ref"].argmax(-1) == logits["dense"].argmax(-1)).float().mean()
    assert agree >= 0.75, f"int8 reference disagrees with the dense model on {1 - agree:.0%} of tokens"


def test_quantized_demo_model_is_cached(tmp_path):
    spec = QuantSpec("awq", group_size=128)
    quant_dir, ref_dir = quantized_demo_model(spec, "qwen3", "tiny", cache_dir=tmp_path)
    assert quant_dir.parent.parent == tmp_path
    assert json.loads((quant_dir / "config.json").read_text())["quantization_config"]["group_size"] == 128
    stamp = (quant_dir / "model.safetensors").stat().st_mtime_ns
    assert quantized_demo_model(spec, "qwen3", "tiny", cache_dir=tmp_path) == (quant_dir, ref_dir)
    assert (quant_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert quantized_demo_model(QuantSpec("awq"), "qwen3", "tiny", cache_dir=tmp_path)[0] != quant_dir
