"""The offline Engine: batch, streaming, async, control calls, clean shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime import Engine
from server_helpers import alive


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = Engine(model_path=str(tiny_qwen3), dtype="float32", max_total_tokens=8192, device="cpu")
    yield eng
    pids = [p.pid for p in eng.children.processes.values()]
    eng.shutdown()
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids)


GREEDY = {"max_new_tokens": 8, "temperature": 0}


def test_single_and_batch(engine):
    one = engine.generate("The cat sat", GREEDY)
    assert set(one) == {"text", "output_ids", "meta_info"}
    meta = one["meta_info"]
    assert meta["completion_tokens"] == 8 and meta["finish_reason"]["type"] == "length"
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] > 0
    batch = engine.generate(["The cat sat", "A dog ran", "The cat sat"], GREEDY)
    assert [b["output_ids"] for b in batch][0] == one["output_ids"] == batch[2]["output_ids"]
    assert batch[2]["meta_info"]["cached_tokens"] > 0 or batch[0]["meta_info"]["cached_tokens"] > 0
    ids = engine.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 3}])
    assert [len(r["output_ids"]) for r in ids] == [8, 3]


def test_stream_matches_non_stream(engine):
    full = engine.generate("Streaming works", GREEDY)
    chunks = list(engine.generate("Streaming works", GREEDY, stream=True))
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert len(chunks) > 1


def test_async_generate_from_another_loop(engine):
    async def main():
        one, two = await asyncio.gather(
            engine.async_generate("Async one", GREEDY), engine.async_generate("Async two", GREEDY)
        )
        chunks = [c async for c in await engine.async_generate("Async one", GREEDY, stream=True)]
        return one, two, chunks

    one, two, chunks = asyncio.run(main())
    assert one["meta_info"]["completion_tokens"] == 8 == two["meta_info"]["completion_tokens"]
    assert chunks[-1]["output_ids"] == one["output_ids"]


def test_n_samples_and_errors(engine):
    out = engine.generate("Pick one", {"max_new_tokens": 5, "temperature": 1.0, "n": 3, "seed": 4})
    assert len(out) == 3
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("x", {"temperature": -2})
    with pytest.raises(ValueError, match="context length"):
        engine.generate("x", {"max_new_tokens": 5000})
    with pytest.raises(ValueError, match=r"token id 4096 at position 1 is outside the vocabulary \[0, 4096\)"):
        engine.generate(input_ids=[3, 4096], sampling_params={"max_new_tokens": 2})
    assert engine.generate(input_ids=[3, 4095], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_progress_bar_and_server_info(engine, capsys):
    engine.generate([f"prompt {i}" for i in range(10)], {"max_new_tokens": 2, "temperature": 0})
    assert "generate" in capsys.readouterr().err  # tqdm writes to stderr
    engine.generate([f"prompt {i}" for i in range(10)], {"max_new_tokens": 2}, show_progress=False)
    assert "generate" not in capsys.readouterr().err
    info = engine.get_server_info()
    state = info["internal_states"][0]
    assert info["model_path"] and state["kv_capacity_tokens"] == 8192
    assert info["cpu"]["level"] in ("generic", "avx2", "avx512", "amx") and info["cpu"]["features"]
    assert engine.flush_cache()
    assert engine.get_server_info()["internal_states"][0]["kv_used_tokens"] == 0


def test_logprobs(engine):
    out = engine.generate("Log my probs", GREEDY, return_logprob=True, top_logprobs_num=3)
    meta = out["meta_info"]
    tokens, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(tokens) == len(tops) == 8
    for (lp, tid, text), alts, out_id in zip(tokens, tops, out["output_ids"]):
        assert tid == out_id and lp <= 0 and isinstance(text, str)
        assert len(alts) == 3 and alts[0][1] == tid and abs(alts[0][0] - lp) < 1e-5  # greedy = top 1
        assert alts[0][0] >= alts[1][0] >= alts[2][0]
    plain = engine.generate("Log my probs", GREEDY)
    assert "output_token_logprobs" not in plain["meta_info"]
    assert plain["output_ids"] == out["output_ids"]
    with pytest.raises(ValueError, match="top_logprobs_num"):
        engine.generate("x", GREEDY, return_logprob=True, top_logprobs_num=99)
