"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) against
transformers on the same tiny random checkpoints, in both expert layouts;
the scheduler's features on a MoE model; per-expert load counts; loader and
configuration errors. TP / EP over gloo: test_moe_parallel.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layers.cpu_features import IsaLevel
from layers.moe.layer import FusedMoE
from model_executor.batch_runner import BatchRunner
from model_executor.tp_layout import tp_layout_errors
from model_helpers import hf_greedy, hf_logits, hf_model, make_prompts, make_runner, our_greedy
from native_helpers import level_params
from runtime.demo_model import demo_model_path
from scheduler_helpers import assert_no_leak, greedy, make_scheduler, run

VOCAB = 4000
FP32_ATOL = 1e-4
# (arch, expert layout): "per_expert" is what the hub ships, "fused" what newer transformers saves.
CASES = [(arch, layout) for arch in ("qwen3_moe", "qwen2_moe", "mixtral") for layout in ("per_expert", "fused")]


def _path(arch: str, layout: str = "per_expert"):
    return demo_model_path(arch, "tiny", expert_layout=None if layout == "per_expert" else layout)


def _idle_expert_seen(runner) -> bool:
    """Whether some recorded step left some expert of some layer without a token."""
    recorder = runner.expert_load
    steps = min(recorder.steps, recorder.window_steps)
    return bool((recorder.ring[:steps] == 0).any())


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_matches_transformers_in_fp32(arch, layout):
    path = _path(arch, layout)
    reference = hf_model(path, torch.float32)
    runner = make_runner(path)
    prompts = make_prompts([3, 17, 40], VOCAB, seed=1)
    # Logits at every prompt position, all prompts in one batch.
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in prompts]
    out, _ = batch.extend(seq_ids, prompts, return_all_logits=True)
    batch.release_all()
    offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in prompts]), 0).tolist()
    for i, prompt in enumerate(prompts):
        ours = out.all_logits[offsets[i] : offsets[i + 1]]
        torch.testing.assert_close(ours, hf_logits(reference, prompt), atol=FP32_ATOL, rtol=0)
    # Greedy continuations, decoded together (batch 3: most experts idle per step).
    assert our_greedy(runner, prompts, 12) == [hf_greedy(reference, p, 12) for p in prompts]
    assert _idle_expert_seen(runner)
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_layers_are_sparse_or_dense_as_configured():
    qwen3 = make_runner(_path("qwen3_moe")).model
    config = qwen3.config
    assert list(config.mlp_only_layers) == [1]
    kinds = [type(layer.mlp).__name__ for layer in qwen3.model.layers]
    assert kinds == ["SparseMoeBlock", "GatedMLP", "SparseMoeBlock", "SparseMoeBlock"]
    assert qwen3.model.layers[0].mlp.shared_expert is None
    qwen2 = make_runner(_path("qwen2_moe")).model
    assert qwen2.model.layers[0].mlp.shared_expert is not None


def test_bf16_tracks_transformers_bf16(tmp_path):
    # bf16 on the demo checkpoint flips routings: its random router gives
    # near-ties, and a token whose top-2 scores nearly tie may pick another
    # expert in any bf16 implementation (3 logits off, in transformers' bf16
    # against its fp32 as in ours). A router scaled 8x keeps each token's
    # choice clear, so what is left to compare is the experts' arithmetic.
    path = tmp_path / "decisive-router"

    def scale_router(tensors):
        for name in tensors:
            if name.endswith("mlp.gate.weight"):
                tensors[name] = tensors[name] * 8

    _rewrite_checkpoint(_path("qwen3_moe"), path, scale_router)
    runner = make_runner(path, dtype="bfloat16")
    experts = next(m for m in runner.model.modules() if isinstance(m, FusedMoE))
    assert hasattr(experts, "packed_experts") and experts.w13_weight.numel() == 0  # packed like dense linears
    reference, truth = hf_model(path, torch.bfloat16), hf_model(path, torch.float32)

    def assert_close_to_reference(ours: torch.Tensor, tokens: list[int]) -> None:
        ref, exact = hf_logits(reference, tokens)[-1], hf_logits(truth, tokens)[-1]
        ours = ours.float()
        # Within 3% of the largest logit of transformers' bf16 (seen: up to 2%),
        # and no further from the fp32 truth than twice transformers' bf16 is
        # (seen: up to 1.44x; the max over the vocabulary is a noisy statistic).
        assert (ours - ref).abs().max() <= 0.03 * ref.abs().max()
        assert (ours - exact).abs().max() <= 2 * (ref - exact).abs().max()

    prompts = make_prompts([9, 30], VOCAB, seed=2)
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in prompts]
    out, _ = batch.extend(seq_ids, prompts)
    batch.release_all()
    for row, prompt in enumerate(prompts):
        assert_close_to_reference(out.next_token_logits[row], prompt)
    # One sequence decoding alone: the native one-or-two-token path.
    batch = BatchRunner(runner)
    seq = batch.add_sequence()
    tokens = list(prompts[0])
    batch.extend([seq], [tokens])
    for token in (17, 99, 3, 250):
        tokens.append(token)
        out, _ = batch.extend([seq], [[token]])
        assert_close_to_reference(out.next_token_logits[0], tokens)
    batch.release_all()


SCHEDULER_OPTIONS = [dict(), dict(overlap=True), dict(chunk=16), dict(page_size=16, chunk=32, overlap=True)]


@pytest.fixture(scope="module")
def moe_workload():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 70, (12,), generator=gen).tolist()
    new = torch.randint(1, 16, (12,), generator=gen).tolist()
    prompts = make_prompts(lengths, VOCAB, seed=5)
    return [(f"r{i}", p, greedy(m)) for i, (p, m) in enumerate(zip(prompts, new))]


@pytest.fixture(scope="module")
def moe_alone(moe_workload):
    sched = make_scheduler(_path("qwen2_moe"), radix=False)
    ref = {}
    for request in moe_workload:
        ref.update(run(sched, [request]))
    assert_no_leak(sched)
    sched.shutdown()
    return {rid: o.output_ids for rid, o in ref.items()}


@pytest.mark.parametrize("options", SCHEDULER_OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_batching_chunking_overlap_match_one_at_a_time(moe_workload, moe_alone, options):
    sched = make_scheduler(_path("qwen2_moe"), **options)
    outcomes = run(sched, moe_workload)
    assert {rid: o.output_ids for rid, o in outcomes.items()} == moe_alone
    assert_no_leak(sched)
    sched.shutdown()


def test_prefix_cache_hits_and_retraction_on_a_moe_model():
    path = _path("mixtral")
    prefix = make_prompts([120], VOCAB, seed=7)[0]
    suffixes = make_prompts([60 + i for i in range(10)], VOCAB, seed=8)
    requests = [(f"m{i}", prefix + s, greedy(30)) for i, s in enumerate(suffixes)]
    ample = make_scheduler(path, radix=False)
    expected = {rid: o.output_ids for rid, o in run(ample, requests).items()}
    ample.shutdown()
    cached = make_scheduler(path)
    first = run(cached, requests[:1])
    rest = run(cached, requests[1:])
    assert first["m0"].cached_tokens == 0 and all(o.cached_tokens >= 110 for o in rest.values())
    assert {rid: o.output_ids for rid, o in {**first, **rest}.items()} == expected
    assert_no_leak(cached)
    cached.shutdown()
    for overlap in (False, True):
        tight = make_scheduler(path, max_total_tokens=700, overlap=overlap)  # about three requests at once
        assert {rid: o.output_ids for rid, o in run(tight, requests).items()} == expected
        assert tight.num_retractions > 0
        assert_no_leak(tight)
        tight.shutdown()


def test_expert_load_counts_every_routed_token():
    path = _path("qwen3_moe")
    sched = make_scheduler(path, radix=False)
    prompts = make_prompts([11, 25], VOCAB, seed=9)
    run(sched, [("a", prompts[0], greedy(6)), ("b", prompts[1], greedy(4))])
    load = sched.stats()["expert_load"]
    # Every forwarded token goes to top_k = 2 experts in each sparse layer:
    # the prompts once each, and every output token but the last is fed back.
    forwarded = 11 + 25 + (6 - 1) + (4 - 1)
    assert set(load["per_layer"]) == {"0", "2", "3"}  # layer 1 is dense (mlp_only_layers)
    assert all(len(counts) == 8 and sum(counts) == 2 * forwarded for counts in load["per_layer"].values())
    assert 0 < load["steps"] <= load["window_steps"]
    json.dumps(load)  # what /get_server_info sends
    assert_no_leak(sched)
    sched.shutdown()


def test_dummy_weights_run():
    runner = make_runner(_path("mixtral"), load_format="dummy")
    out = our_greedy(runner, make_prompts([8], VOCAB), 3)
    assert len(out[0]) == 3


def test_quantizing_expert_weights_is_refused_clearly():
    with pytest.raises(ValueError, match="int8 quantization of mixture-of-experts weights is not supported"):
        make_runner(_path("qwen3_moe"), quantization="int8")


def _rewrite_checkpoint(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def test_a_missing_expert_tensor_is_named(tmp_path):
    dst = tmp_path / "model"
    _rewrite_checkpoint(_path("mixtral"), dst,
                        lambda t: t.pop("model.layers.2.block_sparse_moe.experts.3.w3.weight", None))
    with pytest.raises(ValueError, match=r"missing tensors for: model\.layers\.2\.mlp\.experts\.3\.w3\.weight"):
        make_runner(dst)


def test_a_fused_expert_tensor_of_the_wrong_shape_is_refused(tmp_path):
    dst = tmp_path / "model"
    name = "model.layers.0.mlp.experts.gate_up_proj"

    def transpose(tensors):
        if name in tensors:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()  # [E, H, 2I], an older layout

    _rewrite_checkpoint(_path("qwen3_moe", "fused"), dst, transpose)
    with pytest.raises(ValueError, match=f"checkpoint tensor '{name}': expected 192 gate\\+up rows"):
        make_runner(dst)


def _moe_config(**overrides):
    config = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=128, intermediate_size=384,
                  num_experts=8, moe_intermediate_size=96, num_experts_per_tok=2)
    return {**config, **overrides}


@pytest.mark.parametrize("config,tp,ep,fragment", [
    (_moe_config(), 2, 3, "ep_size 3 does not divide tp_size 2"),
    (_moe_config(num_experts=6), 4, 4, "the 6 experts do not divide evenly over ep_size 4"),
    (_moe_config(moe_intermediate_size=90), 4, 1, "expert intermediate size 90 does not divide evenly over the 4"),
    (_moe_config(shared_expert_intermediate_size=100), 8, 8, "shared expert's intermediate size 100"),
    (dict(num_attention_heads=4, hidden_size=128, intermediate_size=384), 2, 2, "needs a mixture-of-experts model"),
])
def test_layout_check_names_the_reason(config, tp, ep, fragment):
    assert any(fragment in error for error in tp_layout_errors(config, tp, ep))


def test_layouts_that_fit_pass():
    assert tp_layout_errors(_moe_config(), 2, 2) == []
    assert tp_layout_errors(_moe_config(), 4, 2) == []  # 4 experts per group, each split over 2 ranks
    # Mixtral: intermediate_size is the experts'; there is no dense MLP to split.
    mixtral = dict(num_attention_heads=4, hidden_size=128, intermediate_size=96, num_local_experts=4)
    assert tp_layout_errors(mixtral, 4, 4) == []
    assert tp_layout_errors(_moe_config(intermediate_size=9), 2, 1) == []  # no layer is dense
    assert tp_layout_errors(_moe_config(intermediate_size=9, mlp_only_layers=[1]), 2, 1) != []


@pytest.mark.parametrize("cpu_level", [p for p in level_params() if p.values[0] >= IsaLevel.AVX2], indirect=True)
def test_native_decode_path_matches_the_grouped_path(cpu_level):
    """CPU bf16 at one or two tokens runs the experts in one native call
    (cpu_kernels/dispatch.cpp); it must agree with the grouped torch path on
    the same packed weights, also with slots routed to another rank (-1), at
    every CPU level with the streaming kernel (below AVX-512 the grouped path
    runs it too, without oneDNN)."""
    from layers.cpu_kernels import native_ops
    from layers.linear import TPContext
    from layers.moe.method import CpuPackedGroupedExperts, GroupedExperts
    from layers.moe.router import select_experts
    from layers.quantization import CpuPackOptions, DenseConfig

    ops = native_ops()
    if ops is None or not ops.bf16_gemm_supported():
        pytest.skip("native bf16 kernels not built here")
    gen = torch.Generator().manual_seed(4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = FusedMoE(8, 2, 128, 96, True, TPContext(), DenseConfig(cpu_pack=CpuPackOptions(16, True)))
    finally:
        torch.set_default_dtype(previous)
    layer.w13_weight.data.copy_(torch.randn(layer.w13_weight.shape, generator=gen) / 11)
    layer.w2_weight.data.copy_(torch.randn(layer.w2_weight.shape, generator=gen) / 10)
    method = layer.moe_method
    assert isinstance(method, CpuPackedGroupedExperts)
    method.process_weights_after_loading(layer)
    assert layer.streaming_experts is not None
    for tokens in (1, 2):
        hidden = torch.randn(tokens, 128, generator=gen).bfloat16()
        weights, ids = select_experts(torch.randn(tokens, 8, generator=gen), 2, True)
        for local_ids in (ids, torch.where(ids % 2 == 1, -1, ids)):
            native = method.apply(layer, hidden, weights, local_ids)
            grouped = GroupedExperts.apply(method, layer, hidden, weights, local_ids)
            # Both round each projection to bf16; the weighted sums differ in
            # the weights' precision (fp32 here, bf16 in the batched product).
            torch.testing.assert_close(native.float(), grouped.float(), atol=2**-7 * grouped.abs().max().item(),
                                       rtol=2**-7)


def test_weight_memory_counts_packed_experts():
    from model_executor.model_loader import weight_memory

    path = _path("qwen3_moe")
    checkpoint_bytes = sum(t.numel() * 2 for f in path.glob("*.safetensors") for t in load_file(f).values())
    runner = make_runner(path, dtype="bfloat16")
    held, dense = weight_memory(runner.model)
    assert dense == checkpoint_bytes  # bf16 checkpoint: dense = what it holds
    # Packed for the CPU kernels: oneDNN's copy plus the streaming one of every linear and expert.
    has_streaming = runner.model.model.layers[0].mlp.experts.streaming_experts is not None
    assert held > 1.9 * dense if has_streaming else held >= dense
