"""Tests for runtime.demo_model: tiny random HF checkpoints + tokenizer, built offline and cached."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from runtime.demo_model import MARKER_NAME, DemoSpec, _publish, _train_bpe, demo_model_path, make_demo_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
UNICODE_TEXT = "Grüße, 世界! naïve café — 🤖🚀 Ω≈ç√∫\n\tdef f(x):  return x ** 2  # ½ \u200b end "


@pytest.fixture(scope="module", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    # One cache for this module: tokenizers are trained once and ~/.cache is never touched.
    # Module scope (not session) so the env var does not leak into other test files.
    root = tmp_path_factory.mktemp("radixserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADIXSERVE_CACHE", str(root))
        yield root


def _fp32_model(path: pathlib.Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def _random_logits(model: torch.nn.Module, vocab_size: int, n: int = 4, length: int = 16) -> torch.Tensor:
    prompts = torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return model(input_ids=prompts).logits.float()


def _assert_peaked(logits: torch.Tensor) -> None:
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).median().item() > 0.05  # greedy has a clear winner
    assert 2.0 < logits.std(dim=-1).median().item() < 6.0


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _mtimes(path: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


@pytest.mark.parametrize("arch, cls", [("qwen3", "Qwen3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("llama", "LlamaForCausalLM")])
def test_tiny_model_loads_and_has_peaked_logits(arch: str, cls: str) -> None:
    path = demo_model_path(arch, "tiny")
    assert path.name == f"{arch}-tiny"
    assert json.loads((path / "config.json").read_text())["architectures"] == [cls]
    assert (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists()
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (128, 4, 2)
    assert config.vocab_size == 4096 and not config.tie_word_embeddings

    model = _fp32_model(path)
    assert type(model).__name__ == cls
    assert 1_500_000 < sum(p.numel() for p in model.parameters()) < 3_000_000
    _assert_peaked(_random_logits(model, config.vocab_size))

    tensors = _tensors(path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "lm_head.weight" in tensors
    biases = [name for name in tensors if name.endswith(".bias")]
    if arch == "qwen2":  # q/k/v biases exist and are non-trivial
        assert len(biases) == 3 * config.num_hidden_layers
        assert all(tensors[name].abs().mean() > 0.01 for name in biases)
    else:
        assert biases == []
    norms = [t for name, t in tensors.items() if name.endswith("norm.weight")]
    assert all(bool((t == 1).all()) for t in norms)
    if arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in tensors


def test_same_seed_is_deterministic_and_spec_change_rebuilds(tmp_path: pathlib.Path) -> None:
    a = make_demo_model(tmp_path / "a", seed=0)
    b = make_demo_model(tmp_path / "b", seed=0)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[name], tb[name]) for name in ta)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()

    make_demo_model(tmp_path / "b", seed=1)  # a different spec replaces the old model in place
    assert json.loads((b / MARKER_NAME).read_text())["seed"] == 1
    tc = _tensors(b)
    assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left behind


def test_cached_call_is_fast_and_does_not_rewrite(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                                  session_cache: pathlib.Path) -> None:
    demo_model_path()  # make sure the session's tiny tokenizer exists, then reuse it (saves training)
    shutil.copytree(session_cache / "tokenizers", tmp_path / "tokenizers")
    monkeypatch.setenv("RADIXSERVE_CACHE", str(tmp_path))
    path = demo_model_path("qwen3", "tiny")
    assert path == tmp_path / "demo" / "qwen3-tiny"
    before = _mtimes(path)
    start = time.perf_counter()
    again = demo_model_path("qwen3", "tiny")
    assert time.perf_counter() - start < 0.5
    assert again == path and _mtimes(path) == before
    assert make_demo_model(path) == path and _mtimes(path) == before


def test_concurrent_writers_do_not_corrupt(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "shared"
    results: list[pathlib.Path] = []
    threads = [threading.Thread(target=lambda: results.append(make_demo_model(out, "llama"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [out, out]
    assert json.loads((out / MARKER_NAME).read_text()) == DemoSpec("llama", "tiny").marker()
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    _assert_peaked(_random_logits(_fp32_model(out), 4096))


def test_publish_keeps_existing_identical_model(tmp_path: pathlib.Path) -> None:
    marker = DemoSpec("qwen3", "tiny").marker()
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for directory, text in ((first, "first"), (second, "second")):
        directory.mkdir()
        (directory / "payload").write_text(text)
        (directory / MARKER_NAME).write_text(json.dumps(marker))
    _publish(first, out, marker)
    _publish(second, out, marker)  # a writer that lost the race leaves the winner alone
    assert (out / "payload").read_text() == "first"


def test_refuses_to_overwrite_foreign_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        make_demo_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bpe_training_is_deterministic() -> None:
    # Each training run hashes with fresh random seeds inside `tokenizers`; the result must not care.
    first, second = (_train_bpe(600, corpus_bytes=300_000).to_str() for _ in range(2))
    assert first == second


@pytest.mark.parametrize("kwargs", [{"arch": "gpt2"}, {"size": "huge"}, {"rope_scaling": "yarn"}])
def test_rejects_unknown_spec(tmp_path: pathlib.Path, kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        make_demo_model(tmp_path / "m", **kwargs)


def test_tokenizer_round_trips_and_matches_config() -> None:
    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(UNICODE_TEXT)
    assert tokenizer.decode(ids) == UNICODE_TEXT
    config = AutoConfig.from_pretrained(path)
    assert max(ids) < config.vocab_size and len(tokenizer) <= config.vocab_size
    specials = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3]
    assert tokenizer.encode("<|im_start|>x<|im_end|>")[0] == 2 and tokenizer.encode("<|im_end|>") == [3]
    expected = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id}
    assert expected == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 3}
    generation = json.loads((path / "generation_config.json").read_text())
    for key, value in expected.items():
        assert getattr(config, key) == value and generation[key] == value


def test_chat_template_renders_chatml() -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ✓<|im_end|>\n<|im_start|>assistant\n"
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("assistant\n")


def test_tied_embeddings_save_no_lm_head() -> None:
    path = demo_model_path("qwen3", "tiny", tie_word_embeddings=True)
    assert path.name == "qwen3-tiny-tied"
    assert "lm_head.weight" not in _tensors(path)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    model = _fp32_model(path)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    _assert_peaked(_random_logits(model, 4096))


def test_llama3_rope_scaling_in_config() -> None:
    path = demo_model_path("llama", "tiny", rope_scaling="llama3")
    assert path.name == "llama-tiny-rope-llama3"
    raw = json.loads((path / "config.json").read_text())
    rope = raw.get("rope_parameters") or raw["rope_scaling"]  # transformers 5 vs 4 spelling
    assert rope["rope_type"] == "llama3"
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 512
    assert rope.get("rope_theta", raw.get("rope_theta")) == 500_000.0
    assert raw["attention_bias"] is False
    _assert_peaked(_random_logits(_fp32_model(path), 4096))


def test_small_model_is_sharded_with_expected_shape() -> None:
    path = demo_model_path("qwen3", "small")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (path / "model.safetensors").exists()
    assert all((path / shard).exists() for shard in shards)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(str(path / shard), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    assert 110e6 < sum(torch.Size(s).numel() for s in shapes.values()) < 135e6
    assert shapes["model.embed_tokens.weight"] == (32000, 768)
    assert shapes["model.layers.11.self_attn.q_proj.weight"] == (12 * 64, 768)
    assert shapes["model.layers.11.self_attn.k_proj.weight"] == (4 * 64, 768)
    assert shapes["model.layers.11.mlp.gate_proj.weight"] == (2048, 768)
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.max_position_embeddings) == (12, 12, 4096)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 30_000 < len(tokenizer) <= 32_000
    logits = _random_logits(_fp32_model(path), 32000, n=2, length=8)
    assert torch.isfinite(logits).all()


def test_cli_writes_model_and_prints_path(tmp_path: pathlib.Path, session_cache: pathlib.Path) -> None:
    out = tmp_path / "cli-model"
    cmd = [sys.executable, "-m", "runtime.demo_model", str(out), "--arch", "llama", "--size", "tiny",
           "--seed", "3", "--tie-word-embeddings", "--rope-scaling", "llama3"]
    env = {**os.environ, "RADIXSERVE_CACHE": str(session_cache)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker == DemoSpec("llama", "tiny", 3, True, "llama3").marker()
    assert "lm_head.weight" not in _tensors(out)
