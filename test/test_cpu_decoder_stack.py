"""The C++ decoder stack (model_executor/cpu_decoder_stack.py) against the
module path it replaces: the same kernels in the same order, so the logits of
a prefill, a mixed step and decodes are bit-identical, at every CPU level
this machine has, for bf16, int8 and GPTQ int4 weights and for the Llama,
Qwen2 (qkv bias) and Qwen3 (q/k norms) layers; and where it does not apply,
nothing is built or the step keeps the modules."""

from __future__ import annotations

import pytest
import torch

from model_executor.batch_runner import BatchRunner
from model_executor.cpu_decoder_stack import CpuDecoderStack
from model_helpers import make_runner
from native_helpers import level_params, requires_native_kernels
from quant_checkpoints import QuantSpec, quantized_demo_model
from runtime.demo_model import demo_model_path

pytestmark = requires_native_kernels

# The levels with a streaming GEMM (the portable level has none: no stack there).
STACK_LEVELS = [param for param in level_params() if param.values[0].name != "GENERIC"]


def run_steps(runner) -> list[torch.Tensor]:
    """Prefill one sequence, a mixed step (a decode and a new 3-token
    prompt), then three decodes of both; every step's logits."""
    batch = BatchRunner(runner)
    seqs = [batch.add_sequence() for _ in range(2)]
    steps = [batch.extend(seqs[:1], [[5, 9, 11, 40, 8]])[0].next_token_logits.clone()]
    steps.append(batch.extend(seqs, [[17], [7, 3, 2]])[0].next_token_logits.clone())
    for token in (23, 29, 31):
        steps.append(batch.extend(seqs, [[token], [token + 1]])[0].next_token_logits.clone())
    batch.release_all()
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens
    return steps


@pytest.fixture
def stack_calls(monkeypatch) -> list[int]:
    """Rows of every step the stack ran (a spy on the real call)."""
    rows: list[int] = []
    real = CpuDecoderStack.__call__

    def spy(self, hidden, rope, batch):
        rows.append(hidden.shape[0])
        return real(self, hidden, rope, batch)

    monkeypatch.setattr(CpuDecoderStack, "__call__", spy)
    return rows


def assert_stack_matches_modules(path, stack_calls, **runner_kw) -> None:
    with_stack = make_runner(path, dtype="bfloat16", attention_backend="cpu", **runner_kw)
    without = make_runner(path, dtype="bfloat16", attention_backend="cpu", cpu_native_stack=False, **runner_kw)
    stack = with_stack.model.model.native_stack
    assert stack is not None and without.model.model.native_stack is None
    ours = run_steps(with_stack)
    assert stack_calls, "the stack never ran"
    assert all(rows <= stack.max_rows for rows in stack_calls)
    calls = len(stack_calls)
    theirs = run_steps(without)
    assert len(stack_calls) == calls  # the module runner never entered it
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"step {step} differs"


@pytest.mark.parametrize("cpu_level", STACK_LEVELS, indirect=True)
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_bf16_layers_are_bit_identical_to_the_modules(cpu_level, arch, stack_calls):
    assert_stack_matches_modules(demo_model_path(arch, "tiny"), stack_calls)


@pytest.mark.parametrize("cpu_level", STACK_LEVELS, indirect=True)
def test_int8_on_the_fly_is_bit_identical_to_the_modules(cpu_level, stack_calls):
    assert_stack_matches_modules(demo_model_path("qwen3", "tiny"), stack_calls, quantization="int8")


@pytest.mark.parametrize("cpu_level", STACK_LEVELS, indirect=True)
def test_gptq_int4_is_bit_identical_to_the_modules(cpu_level, stack_calls):
    qdir, _ = quantized_demo_model(QuantSpec("gptq", bits=4, group_size=64), "qwen2")
    assert_stack_matches_modules(qdir, stack_calls)


def test_rows_beyond_a_projections_native_kernel_take_the_modules(tiny_qwen3, stack_calls):
    """On AVX-512 oneDNN serves linears above a few rows: the stack's
    max_rows says so and those steps (the prefills here) keep the modules."""
    runner = make_runner(tiny_qwen3, dtype="bfloat16", attention_backend="cpu")
    stack = runner.model.model.native_stack
    if stack.max_rows > 5:
        pytest.skip("every row count runs the native kernels here (no oneDNN bf16 at this level)")
    run_steps(runner)
    assert stack_calls and max(stack_calls) <= stack.max_rows
    assert len(stack_calls) < 5  # the 5-token prefill (and a 4-row mixed step) went elsewhere


@pytest.mark.parametrize("case", ["fp32", "unfused", "torch_native", "moe", "act-order"])
def test_not_built_where_the_kernels_do_not_cover_the_layers(tiny_qwen3, case):
    path, kw = tiny_qwen3, dict(dtype="bfloat16", attention_backend="cpu")
    if case == "fp32":
        kw["dtype"] = "float32"
    elif case == "unfused":
        kw["cpu_fused_ops"] = False
    elif case == "torch_native":
        kw["attention_backend"] = "torch_native"
    elif case == "moe":
        path = demo_model_path("qwen3_moe", "tiny")
    else:  # a permuted input (act-order) runs an index_select before the kernel
        path, _ = quantized_demo_model(QuantSpec("gptq", bits=4, group_size=32, sym=False, desc_act=True))
    runner = make_runner(path, **kw)
    assert runner.model.model.native_stack is None
