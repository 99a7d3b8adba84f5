"""Mixture-of-experts models split over real rank processes (gloo): tensor
parallelism (each expert's intermediate dim split), expert parallelism
(whole experts per rank) and both at once give transformers' greedy ids;
the per-expert load counts reach /get_server_info; layouts that do not
divide are refused before any rank starts.
"""

from __future__ import annotations

import pytest
import requests
import torch

from model_helpers import hf_greedy, hf_model, make_prompts
from runtime.demo_model import demo_model_path
from runtime.engine import Engine
from server_helpers import start_server

NEW_TOKENS = 10
PARALLEL_CASES = {
    # TP alone: every rank holds every expert's slice; the shared expert is split too.
    "qwen2_moe-tp2": (dict(arch="qwen2_moe"), dict(tp_size=2)),
    # EP = TP: whole experts per rank (4 of 8), the dense layer split by TP; fused checkpoint.
    "qwen3_moe-fused-tp2-ep2": (dict(arch="qwen3_moe", expert_layout="fused"), dict(tp_size=2, ep_size=2)),
    "mixtral-tp2-ep2": (dict(arch="mixtral"), dict(tp_size=2, ep_size=2)),
    # Both: 2 groups of 4 experts, each expert split over 2 ranks; overlap scheduling on.
    "qwen3_moe-tp4-ep2-overlap": (dict(arch="qwen3_moe"), dict(tp_size=4, ep_size=2, enable_cpu_overlap=True)),
}


@pytest.mark.parametrize("name", list(PARALLEL_CASES))
def test_parallel_greedy_matches_transformers(name):
    model, parallel = PARALLEL_CASES[name]
    path = demo_model_path(size="tiny", **model)
    prompts = make_prompts([6, 23, 41], vocab_size=4000, seed=4)
    engine = Engine(model_path=str(path), dtype="float32", max_total_tokens=2048, **parallel)
    try:
        outs = engine.generate(
            input_ids=prompts,
            sampling_params={"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        )
        states = engine.get_server_info()["internal_states"]
    finally:
        engine.shutdown()
    reference = hf_model(path, torch.float32)
    assert [o["output_ids"] for o in outs] == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    # The counts are the model's, whichever rank reports: every forwarded token, top_k = 2 times.
    # Overlap scheduling also runs the step it launched before seeing the requests finish.
    forwarded = sum(len(p) for p in prompts) + len(prompts) * (NEW_TOKENS - 1)
    extra = len(prompts) if parallel.get("enable_cpu_overlap") else 0
    per_layer = states[0]["expert_load"]["per_layer"]
    assert per_layer and all(2 * forwarded <= sum(counts) <= 2 * (forwarded + extra) for counts in per_layer.values())


def test_expert_parallel_split_that_does_not_divide_is_refused_before_start():
    path = demo_model_path("mixtral", "tiny")  # 4 experts
    with pytest.raises(ValueError, match="the 4 experts do not divide evenly over ep_size 3"):
        Engine(model_path=str(path), dtype="float32", max_total_tokens=2048, tp_size=3, ep_size=3)
    with pytest.raises(ValueError, match=r"--ep-size \(2\) must divide --tp-size \(3\)"):
        Engine(model_path=str(path), dtype="float32", max_total_tokens=2048, tp_size=3, ep_size=2)


def test_server_reports_expert_load(tmp_path):
    server = start_server(demo_model_path("qwen3_moe", "tiny"), tmp_path)
    try:
        body = {"input_ids": list(range(10, 30)), "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
        assert requests.post(server.url + "/generate", json=body, timeout=60).status_code == 200
        state = requests.get(server.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        load = state["expert_load"]
        assert set(load["per_layer"]) == {"0", "2", "3"}
        assert all(sum(counts) == 2 * (20 + 4) for counts in load["per_layer"].values())
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0
