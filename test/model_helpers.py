"""Helpers for tests that run our ModelRunner next to transformers."""

from __future__ import annotations

import pathlib

import torch

from model_executor.batch_runner import BatchRunner
from model_executor.model_config import ModelRunnerConfig
from model_executor.model_runner import ModelRunner


def make_runner(path: pathlib.Path | str, dtype: str = "float32", page_size: int = 1, **kw) -> ModelRunner:
    config = ModelRunnerConfig(
        model_path=str(path),
        dtype=dtype,
        page_size=page_size,
        max_total_tokens=kw.pop("max_total_tokens", 4096),
        max_running_requests=kw.pop("max_running_requests", 16),
        **kw,
    )
    return ModelRunner(config)


def make_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Below the special tokens' ids and inside the trained vocabulary.
    return [torch.randint(4, vocab_size - 128, (n,), generator=generator).tolist() for n in lengths]


def hf_model(path: pathlib.Path | str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@torch.inference_mode()
def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] float32 logits for every position of one sequence."""
    return model(torch.tensor([tokens])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int, **generate_options) -> list[int]:
    """transformers' greedy continuation; `generate_options` e.g. its
    repetition_penalty or no_repeat_ngram_size."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **generate_options,
    )
    return out[0, len(prompt):].tolist()


def our_greedy(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in prompts]
    out, _ = batch.extend(seq_ids, prompts)
    generated = [[] for _ in prompts]
    for step in range(new_tokens):
        next_ids = torch.argmax(out.next_token_logits, dim=-1).tolist()
        for row, token in zip(generated, next_ids):
            row.append(token)
        if step + 1 < new_tokens:
            out, _ = batch.extend(seq_ids, [[t] for t in next_ids])
    batch.release_all()
    return generated


def teacher_forced_top1(runner, reference, prompts, positions: int) -> float:
    """Share of positions where our argmax equals transformers' greedy token,
    both fed transformers' tokens."""
    batch = BatchRunner(runner)
    agree = total = 0
    for prompt in prompts:
        target = hf_greedy(reference, prompt, positions)
        seq = batch.add_sequence()
        out, _ = batch.extend([seq], [prompt])
        for token in target:
            agree += int(torch.argmax(out.next_token_logits[0]).item() == token)
            total += 1
            out, _ = batch.extend([seq], [[token]])
    batch.release_all()
    return agree / total
