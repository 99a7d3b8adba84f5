"""The CPU probe, the RADIXSERVE_CPU_ISA cap, and what each level runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from layers.cpu_features import (
    ISA_AMX,
    ISA_AVX2,
    ISA_AVX512,
    ISA_AVX512_BF16,
    TUNE_STREAM_PREFETCH,
    CpuFeatures,
    CpuIsa,
    IsaLevel,
    probe_features,
    read_prefetch_override,
)
from layers.cpu_kernels import build_dir
from native_helpers import built_native_ops, level_params, requires_native_kernels

X86 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 instruction sets")


@X86
@requires_native_kernels
def test_the_cpuid_probe_agrees_with_torchs_own():
    """Two independent readers of cpuid (ours, torch's cpuinfo) on what
    decides a level."""
    features = probe_features(built_native_ops().module)
    assert features.source == "cpuid"
    assert ("avx2" in features.flags) == torch.cpu._is_avx2_supported()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= features.flags
    assert avx512 == torch.cpu._is_avx512_supported()
    assert ("avx512_bf16" in features.flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_tile" in features.flags) == torch.cpu._is_amx_tile_supported()
    expected = {"DEFAULT": IsaLevel.GENERIC, "AVX2": IsaLevel.AVX2, "AVX512": IsaLevel.AVX512}
    torch_level = expected.get(torch.backends.cpu.get_cpu_capability())
    if torch_level is not None:  # torch has no AMX capability of its own
        assert min(features.level, IsaLevel.AVX512) == torch_level


def test_levels_need_every_feature_below_them():
    avx2 = frozenset({"avx2", "fma", "f16c"})
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    amx = avx512 | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_permitted"}
    assert CpuFeatures("x86_64", frozenset(), "cpuid").level == IsaLevel.GENERIC
    assert CpuFeatures("x86_64", frozenset({"avx2", "fma"}), "cpuid").level == IsaLevel.GENERIC  # no F16C
    assert CpuFeatures("x86_64", avx2, "cpuid").level == IsaLevel.AVX2
    assert CpuFeatures("x86_64", avx512 - {"avx512vl"}, "cpuid").level == IsaLevel.AVX2
    assert CpuFeatures("x86_64", avx512, "cpuid").level == IsaLevel.AVX512
    # AMX that Linux did not grant this process is no AMX.
    assert CpuFeatures("x86_64", amx - {"amx_permitted"}, "cpuid").level == IsaLevel.AVX512
    assert CpuFeatures("x86_64", amx, "cpuid").level == IsaLevel.AMX
    # A CPU nobody wrote kernels for: the portable paths, whatever it reports.
    assert CpuFeatures("riscv64", amx, "none").level == IsaLevel.GENERIC
    assert CpuFeatures("aarch64", frozenset({"asimd", "bf16", "i8mm"}), "hwcap").level == IsaLevel.GENERIC


def test_the_cap_lowers_the_level_and_never_raises_it():
    flags = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
    cpu = CpuFeatures("x86_64", flags, "cpuid")  # an AVX-512 CPU with bf16, no AMX
    masks = {
        None: ISA_AVX2 | ISA_AVX512 | ISA_AVX512_BF16,
        IsaLevel.GENERIC: 0,
        IsaLevel.AVX2: ISA_AVX2,
        IsaLevel.AVX512: ISA_AVX2 | ISA_AVX512 | ISA_AVX512_BF16,
        IsaLevel.AMX: ISA_AVX2 | ISA_AVX512 | ISA_AVX512_BF16,  # above the CPU: no AMX bit
    }
    for cap, mask in masks.items():
        isa = CpuIsa(cpu, cap)
        assert isa.kernel_mask == mask
        assert isa.level == (IsaLevel.AVX512 if cap is None else min(cap, IsaLevel.AVX512))
        assert isa.onednn_bf16 == (isa.level >= IsaLevel.AVX512)
    # A Skylake-SP: AVX-512 without bf16 never gets the bf16 attention unit.
    skylake = CpuIsa(CpuFeatures("x86_64", flags - {"avx512_bf16"}, "cpuid"), None)
    assert skylake.kernel_mask == ISA_AVX2 | ISA_AVX512
    amx = CpuFeatures("x86_64", flags | {"amx_tile", "amx_bf16", "amx_permitted"}, "cpuid")
    assert CpuIsa(amx, None).kernel_mask & ISA_AMX
    assert CpuIsa(amx, None).at(IsaLevel.AVX512).kernel_mask == ISA_AVX2 | ISA_AVX512 | ISA_AVX512_BF16
    # at() never goes above an existing cap.
    assert CpuIsa(amx, IsaLevel.AVX2).at(IsaLevel.AMX).level == IsaLevel.AVX2


def test_the_linears_prefetch_their_weights_on_intel_only_unless_told(monkeypatch):
    """A tuning bit, not an instruction set: measured to pay on a Xeon and to
    cost on a Zen 4; the environment overrides the vendor's default."""
    avx2 = frozenset({"avx2", "fma", "f16c"})
    intel = CpuFeatures("x86_64", avx2 | {"vendor_intel"}, "cpuid")
    amd = CpuFeatures("x86_64", avx2 | {"vendor_amd"}, "cpuid")
    assert CpuIsa(intel, None).kernel_mask == ISA_AVX2 | TUNE_STREAM_PREFETCH
    assert CpuIsa(amd, None).kernel_mask == ISA_AVX2
    assert CpuIsa(CpuFeatures("x86_64", avx2, "cpuid"), None).kernel_mask == ISA_AVX2  # vendor unknown: off
    assert CpuIsa(amd, None, prefetch_override=True).kernel_mask == ISA_AVX2 | TUNE_STREAM_PREFETCH
    assert CpuIsa(intel, None, prefetch_override=False).kernel_mask == ISA_AVX2
    # No native linear runs below AVX2, so no bit there; at() keeps the override.
    assert CpuIsa(intel, IsaLevel.GENERIC).kernel_mask == 0
    assert CpuIsa(amd, None, prefetch_override=True).at(IsaLevel.AVX2).stream_prefetch
    for value, expected in (("", None), ("0", False), ("1", True)):
        monkeypatch.setenv("RADIXSERVE_CPU_PREFETCH", value)
        assert read_prefetch_override() == expected
    monkeypatch.setenv("RADIXSERVE_CPU_PREFETCH", "yes")
    with pytest.raises(ValueError, match="0 or 1"):
        read_prefetch_override()


@X86
@requires_native_kernels
def test_the_probe_names_the_vendor_as_the_kernel_does():
    flags = probe_features(built_native_ops().module).flags
    assert not {"vendor_intel", "vendor_amd"} <= flags
    info = open("/proc/cpuinfo").read().splitlines()
    vendor = next(line.split(":")[1].strip() for line in info if line.startswith("vendor_id"))
    kernel_flags = set(next(line.split(":")[1].split() for line in info if line.startswith("flags")))
    if ("avx2" in flags) != ("avx2" in kernel_flags) or ("avx512f" in flags) != ("avx512f" in kernel_flags):
        pytest.skip("an emulator answers cpuid (qemu -cpu): the kernel's /proc/cpuinfo is the host's")
    assert ("vendor_intel" in flags) == (vendor == "GenuineIntel")
    assert ("vendor_amd" in flags) == (vendor in ("AuthenticAMD", "HygonGenuine"))


@requires_native_kernels
@pytest.mark.parametrize("level", level_params(IsaLevel.AVX2))
def test_prefetching_changes_no_linear_result(level):
    ops = built_native_ops().at(level)
    module, mask = ops.module, ops.isa.kernel_mask & ~TUNE_STREAM_PREFETCH
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(200, 256, generator=gen)
    packed = module.pack_bf16_weight(w.bfloat16())
    scale = w.abs().amax(1, keepdim=True) / 127
    int8 = module.pack_int_weight(torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale, None, 256, 8)
    groups = w.view(200, 2, 128).abs().amax(-1) / 7
    q4 = torch.round(w.view(200, 2, 128) / groups[..., None]).clamp(-8, 7).view(200, 256).to(torch.int8)
    int4 = module.pack_int_weight(q4, groups, None, 128, 4)
    for rows in (1, 2, 9):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        runs = [(module.bf16_linear(x, packed, None, 200, m), module.int_linear(x, int8, None, 200, 256, 8, False, 0, m),
                 module.int_linear(x, int4, None, 200, 128, 4, False, 0, m))
                for m in (mask, mask | TUNE_STREAM_PREFETCH)]
        for without, with_prefetch in zip(*runs):
            assert torch.equal(without, with_prefetch)


def test_a_misspelt_cap_is_an_error_that_names_the_choices():
    with pytest.raises(ValueError, match="generic|avx2|avx512|amx"):
        IsaLevel.parse("avx-512")
    assert IsaLevel.parse(" AVX2 ") == IsaLevel.AVX2


@requires_native_kernels
@pytest.mark.parametrize("level", level_params())
def test_each_level_runs_its_own_units(level):
    ops = built_native_ops().at(level)
    units = ops.kernel_units()
    portable = ("paged_attention", "rms_norm_bf16", "qk_norm_rope_store", "silu_and_mul_bf16")
    if level == IsaLevel.GENERIC:
        assert all(units[name] == "generic" for name in portable)
        assert units["bf16_linear"] == units["int_linear"] == "none"
        assert not ops.bf16_gemm_supported() and not ops.int_gemm_supported()
    elif level == IsaLevel.AVX2:
        assert set(units.values()) == {"avx2"}
    else:
        assert units["bf16_linear"] == units["int_linear"] == units["rms_norm_bf16"] == "avx512"
        bf16_dots = "avx512_bf16" in ops.isa.features.flags
        assert units["paged_attention"] == ("avx512bf16" if bf16_dots else "avx512")
        assert units["int_linear_many_rows"] == ("amx" if level == IsaLevel.AMX else "avx512")
        assert ops.int_gemm_amx_supported() == (level == IsaLevel.AMX)


def _report_in_a_fresh_process(cap: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "RADIXSERVE_CPU_ISA"}
    if cap is not None:
        env["RADIXSERVE_CPU_ISA"] = cap
    code = "import json; from layers.cpu_features import cpu_report; print(json.dumps(cpu_report()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@X86
@requires_native_kernels
def test_a_process_reads_the_cap_from_its_environment():
    report, _ = _report_in_a_fresh_process(None)
    detected = IsaLevel.parse(report["detected_level"])  # the child's own CPU (qemu emulates only this process)
    assert report["level"] == report["detected_level"] and report["cap"] is None
    if detected < IsaLevel.AVX2:
        pytest.skip("this CPU is below AVX2")
    report, _ = _report_in_a_fresh_process("avx2")
    assert report["level"] == "avx2" and report["cap"] == "avx2"
    assert report["kernels"]["bf16_linear"] == "avx2"
    report, _ = _report_in_a_fresh_process("generic")
    assert report["kernels"]["bf16_linear"] == "none" and report["kernels"]["rms_norm_bf16"] == "generic"
    if detected < IsaLevel.AMX:
        report, stderr = _report_in_a_fresh_process("amx")
        assert report["level"] == detected.name.lower()
        assert "above this CPU's level" in stderr


def test_a_misspelt_cap_stops_the_process():
    env = {**os.environ, "RADIXSERVE_CPU_ISA": "avx-512"}
    done = subprocess.run([sys.executable, "-c", "from layers.cpu_features import cpu_isa; cpu_isa()"], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert done.returncode != 0 and "expected one of generic|avx2|avx512|amx" in done.stderr


def _functions_with_simd(objdump: str, path: pathlib.Path) -> set[str]:
    """Symbols whose code uses VEX / EVEX instructions (AVX and up)."""
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                             check=True).stdout
    found, current = set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):
            current = line.split("<", 1)[1][:-2]
        elif current and "\t" in line:
            mnemonic = line.split("\t")[1].split()[0] if len(line.split("\t")) > 1 else ""
            if mnemonic.startswith("v") or mnemonic.startswith("tile") or mnemonic in ("ldtilecfg", "sttilecfg"):
                found.add(current)
    return found


@X86
@requires_native_kernels
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="needs binutils")
def test_no_instruction_set_code_reaches_code_every_cpu_runs():
    """The build is shared by every x86 CPU: the baseline objects hold no
    AVX at all, and no unit's copy of a shared inline function (which the
    linker may pick for everyone) was compiled for the unit's instruction set."""
    built_native_ops()
    folder = build_dir()
    for name in ("bindings.o", "dispatch.o", "packing.o", "isa_generic.o"):
        assert not _functions_with_simd("objdump", folder / name), name
    for unit in ("isa_avx2.o", "isa_avx512.o", "isa_avx512bf16.o", "isa_amx.o"):
        path = folder / unit
        simd = _functions_with_simd("objdump", path)
        assert simd, f"{unit} compiled no vector code at all"
        symbols = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout.split("\n")
        shared = {line.split()[-1] for line in symbols if line.split()[1:2] in (["W"], ["V"])}
        leaked = {name for name in simd & shared if not name.startswith("_ZN10radixserve")}
        assert not leaked, f"{unit}: shared symbols with its instruction set: {sorted(leaked)[:5]}"
