"""Tiny random-weight Hugging Face checkpoints (plus a tokenizer) for tests and the demo server.

Everything is made offline and deterministically: a byte-level BPE tokenizer trained on the
Python standard library's own sources, and a Qwen3 / Qwen2 / Llama model whose weights are
re-initialised from a seeded generator. Results are cached, so only the first call is slow.

    python -m runtime.demo_model DIR --arch qwen3 --size tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

# Bump whenever the bytes a spec produces change, so stale caches get rebuilt.
FORMAT_VERSION = 2
MARKER_NAME = "radixserve_demo.json"

# Special tokens take ids 0..3, in this order (the BPE trainer adds them first).
PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN = "<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN)
# ChatML, like Qwen's: tools (Hermes style, as the qwen25 tool-call parser
# reads them) in a system turn, assistant tool calls as <tool_call> blocks,
# tool results as <tool_response> user turns, and enable_thinking=False
# closing an empty <think> block (as Qwen3 does). Plain chats render as before.
CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call functions. Their signatures are in <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nWrite each call as <tool_call>\\n{\"name\": <name>, \"arguments\": <object>}\\n'"
    " + '</tool_call><|im_end|>\\n' }}{%- endif %}"
    "{% for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{ '<tool_call>\\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

ARCHS = MappingProxyType({"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral",
                         "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe", "mixtral": "Mixtral"})
SIZES = MappingProxyType({
    "tiny": MappingProxyType(dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, intermediate_size=384,
                                  max_position_embeddings=2048)),
    "small": MappingProxyType(dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   num_key_value_heads=4, head_dim=64, intermediate_size=2048,
                                   max_position_embeddings=4096)),
    # A draft model for `small` (speculative decoding): tiny's body, small's vocabulary and tokenizer.
    "draft": MappingProxyType(dict(vocab_size=32000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, intermediate_size=384,
                                   max_position_embeddings=4096)),
})
# Mixture-of-experts settings per architecture and size. `small` keeps the
# dense small model's active MLP (2 of 8 experts of 1024 = its 2048), so the
# two compare at equal active parameters. Qwen3-MoE keeps one dense layer, as
# `mlp_only_layers` allows; Qwen2-MoE adds its shared expert.
_QWEN_MOE = dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1)
MOE_DIMS = MappingProxyType({
    ("qwen3_moe", "tiny"): MappingProxyType(dict(_QWEN_MOE, moe_intermediate_size=96, mlp_only_layers=[1],
                                                 norm_topk_prob=True)),
    ("qwen3_moe", "small"): MappingProxyType(dict(_QWEN_MOE, moe_intermediate_size=1024, norm_topk_prob=True)),
    ("qwen2_moe", "tiny"): MappingProxyType(dict(_QWEN_MOE, moe_intermediate_size=96,
                                                 shared_expert_intermediate_size=192)),
    ("qwen2_moe", "small"): MappingProxyType(dict(_QWEN_MOE, moe_intermediate_size=1024,
                                                  shared_expert_intermediate_size=1024)),
    ("mixtral", "tiny"): MappingProxyType(dict(num_local_experts=4, num_experts_per_tok=2)),
    ("mixtral", "small"): MappingProxyType(dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=1024)),
})
EXPERT_LAYOUTS = ("per_expert", "fused")  # how the checkpoint stores experts (see DemoSpec)
LLAMA3_ROPE = MappingProxyType({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 512})

# The trained vocab stays a little below the model's, like real checkpoints whose embedding
# tables are padded; every token id is then a valid row.
VOCAB_MARGIN = 64
# 8 MB of stdlib source is enough to learn ~32k merges and trains in about two seconds.
CORPUS_BYTES = 8_000_000
# Target std of the final logits across the vocab: large enough that greedy decoding has a clear
# winner (HF's std-0.02 init gives near-uniform logits), small enough not to be one-hot.
LOGIT_STD = 4.0
BIAS_STD = 0.1


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    arch: str
    size: str
    seed: int = 0
    tie_word_embeddings: bool = False
    rope_scaling: str | None = None
    # Overrides the size's KV-head count (TP tests need MHA and 1-KV-head models).
    num_key_value_heads: int | None = None
    # MoE archs: "per_expert" tensors (the hub's layout; also what
    # transformers saves by default) or transformers' "fused" [E, ...] tensors.
    expert_layout: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tie_word_embeddings", bool(self.tie_word_embeddings))  # None means False
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.expert_layout not in (None, *EXPERT_LAYOUTS):
            raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {self.expert_layout!r}")
        if self.rope_scaling not in (None, "llama3"):
            raise ValueError(f"rope_scaling must be None or 'llama3', got {self.rope_scaling!r}")

    def marker(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if fields["num_key_value_heads"] is None:  # keeps markers written before the field existed valid
            del fields["num_key_value_heads"]
        if fields["expert_layout"] is None:
            del fields["expert_layout"]
        return {"version": FORMAT_VERSION, **fields}

    def dirname(self) -> str:
        parts = [self.arch, self.size]
        parts += [f"seed{self.seed}"] if self.seed else []
        parts += ["tied"] if self.tie_word_embeddings else []
        parts += [f"rope-{self.rope_scaling}"] if self.rope_scaling else []
        parts += [f"kv{self.num_key_value_heads}"] if self.num_key_value_heads else []
        parts += [f"experts-{self.expert_layout}"] if self.expert_layout else []
        return "-".join(parts)


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RADIXSERVE_CACHE") or pathlib.Path.home() / ".cache" / "radixserve")


def demo_model_path(arch: str = "qwen3", size: str = "tiny", **kwargs: Any) -> pathlib.Path:
    """Path of the cached demo model for this spec, building it on first use."""
    spec = DemoSpec(arch, size, **kwargs)
    return make_demo_model(cache_root() / "demo" / spec.dirname(), arch, size, **kwargs)


def make_demo_model(out_dir: str | os.PathLike[str], arch: str = "qwen3", size: str = "tiny", *, seed: int = 0,
                    tie_word_embeddings: bool | None = None, rope_scaling: str | None = None,
                    num_key_value_heads: int | None = None, expert_layout: str | None = None) -> pathlib.Path:
    """Write a random-weight HF checkpoint + tokenizer to `out_dir` (skipped if already there)."""
    spec = DemoSpec(arch, size, seed, bool(tie_word_embeddings), rope_scaling, num_key_value_heads, expert_layout)
    out = pathlib.Path(out_dir).absolute()
    if _read_marker(out) == spec.marker():
        return out
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).exists():
        raise FileExistsError(f"{out} is not empty and holds no demo model; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename stays on one filesystem (atomic).
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_model(spec, tmp)
        _make_readable(tmp)
        _publish(tmp, out, spec.marker())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_readable(model_dir: pathlib.Path) -> None:
    # mkdtemp (and safetensors' own temp files) are private (0700/0600); a shared cache must not be.
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _read_marker(model_dir: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _publish(tmp: pathlib.Path, out: pathlib.Path, marker: dict[str, Any]) -> None:
    """Move the finished `tmp` into place; a concurrent writer's identical result wins ties."""
    if _read_marker(out) == marker:
        return  # another process finished first; ours is discarded by the caller
    if out.is_dir() and any(out.iterdir()):
        # An older version / other spec of a demo model: rename can't replace a non-empty dir.
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.replace(out, trash / "old")
        except FileNotFoundError:
            pass  # a concurrent writer moved it already
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, out)  # POSIX rename also replaces an empty directory
    except OSError:
        # Losing the race to another writer's identical, complete model is fine; anything else is not.
        if _read_marker(out) != marker:
            raise


def _write_model(spec: DemoSpec, out: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dims = SIZES[spec.size]
    tokenizer = _hf_tokenizer(_bpe_tokenizer(dims["vocab_size"] - VOCAB_MARGIN))
    config = _build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's global RNG
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, spec.seed)
    _check_logits(model, dims["vocab_size"], spec.seed)
    model.to(torch.bfloat16)
    # safetensors is the default format; MoE experts per expert unless "fused" is asked for.
    model.save_pretrained(out, max_shard_size="100MB", save_original_format=spec.expert_layout != "fused")
    tokenizer.save_pretrained(out)
    # The marker goes last: its presence means every other file is complete.
    (out / MARKER_NAME).write_text(json.dumps(spec.marker(), indent=2) + "\n")


def _build_config(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    import transformers

    prefix = ARCHS[spec.arch]
    config_cls = getattr(transformers, f"{prefix}Config")
    dims = dict(SIZES[spec.size])
    if spec.num_key_value_heads:
        dims["num_key_value_heads"] = spec.num_key_value_heads
    dims.update(MOE_DIMS.get((spec.arch, spec.size), {}))
    config = config_cls(
        **dims,
        **_rope_kwargs(config_cls, spec),
        attention_bias=spec.arch == "qwen2",  # Qwen2 has q/k/v biases, the others none (Qwen2-MoE: qkv_bias)
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=[f"{prefix}ForCausalLM"],
        rms_norm_eps=1e-6,
        # Mistral's config defaults to a 4096-token sliding window, which we refuse.
        **({"sliding_window": None} if spec.arch in ("mistral", "mixtral") else {}),
    )
    # No dtype here: the model is built and checked in fp32, then cast to bfloat16 before
    # saving, and save_pretrained records that dtype in config.json itself.
    return config


def _rope_theta(spec: DemoSpec) -> float:
    if spec.rope_scaling == "llama3" or (spec.arch == "llama" and spec.size == "small"):
        return 500_000.0  # Llama 3's base
    return 10_000.0 if spec.size == "tiny" else 1_000_000.0  # small Qwen: Qwen2/3's long-context base


def _rope_kwargs(config_cls: type, spec: DemoSpec) -> dict[str, Any]:
    theta, scaling = _rope_theta(spec), dict(LLAMA3_ROPE) if spec.rope_scaling == "llama3" else None
    # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight from a private generator so logits are peaked, not flat."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            param.normal_(0.0, _init_std(name, param.shape, hidden), generator=generator)
            # Round through bf16 so the sanity check sees exactly the weights that get saved.
            param.copy_(param.to(torch.bfloat16))


def _init_std(name: str, shape: torch.Size, hidden: int) -> float:
    if name.endswith(".bias"):
        return BIAS_STD
    if "embed_tokens" in name or "lm_head" in name:
        # After the final RMSNorm the hidden state has unit RMS, so this gives logits with std ~LOGIT_STD.
        return LOGIT_STD / hidden**0.5
    # Linear layers (and each expert of [E, out, in]): unit-variance outputs for unit-variance inputs.
    return 1.0 / shape[-1] ** 0.5


def _check_logits(model: torch.nn.Module, vocab_size: int, seed: int) -> None:
    import torch

    prompts = torch.randint(0, vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=prompts).logits.float()
    std = logits.std(dim=-1).median().item()
    if not torch.isfinite(logits).all() or not 0.5 < std < 50:
        raise RuntimeError(f"demo model logits look broken (median std across vocab {std:.3g})")


def _hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,  # would break decode(encode(text)) == text
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _bpe_tokenizer(vocab_size: int) -> Tokenizer:
    """The BPE tokenizer with this vocab size, trained at most once per cache dir."""
    from tokenizers import Tokenizer

    path = cache_root() / "tokenizers" / f"bpe-{vocab_size}-v{FORMAT_VERSION}" / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = _train_bpe(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json", dir=path.parent)
    os.close(fd)
    tokenizer.save(tmp)
    os.chmod(tmp, 0o644)  # mkstemp files are private; the cache may be shared
    os.replace(tmp, path)  # atomic: concurrent trainers produce the same file anyway
    return tokenizer


def _train_bpe(vocab_size: int, corpus_bytes: int = CORPUS_BYTES) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer + decoder: any unicode string round-trips exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_stdlib_corpus(corpus_bytes), trainer=trainer)
    return tokenizer


def _stdlib_corpus(max_bytes: int) -> Iterator[str]:
    """Source files of the running Python's stdlib, in sorted order (so training is deterministic).

    The corpus, and so the tokenizer, differs between Python versions; it is cached per machine.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}  # odd encodings, third-party code
    total = 0
    for path in sorted(root.rglob("*.py")):
        if total >= max_bytes:
            return
        if skip.isdisjoint(path.relative_to(root).parts):
            raw = path.read_bytes()
            total += len(raw)
            yield raw.decode("utf-8", errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--rope-scaling", choices=["llama3"], default=None)
    parser.add_argument("--expert-layout", choices=EXPERT_LAYOUTS, default=None,
                        help="MoE archs: how the checkpoint stores the experts (default: per expert)")
    args = parser.parse_args(argv)
    path = make_demo_model(args.out_dir, args.arch, args.size, seed=args.seed,
                           tie_word_embeddings=args.tie_word_embeddings, rope_scaling=args.rope_scaling,
                           expert_layout=args.expert_layout)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
