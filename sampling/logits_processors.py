"""Per-request logits processors: what a request asks to change in its
logits before sampling, beyond the sampling parameters.

A processor belongs to one request and lives as long as it does. Each step,
`fill` says what it wants for the request's row of the batch (tokens to ban,
a bias to add) into a `LogitAdjustments` that collects the whole batch on
the host; the sampler applies it on the device after the penalties and
before temperature, top-k and top-p. `accept` sees every token the request
keeps, in order, so a stateful processor (a grammar's matcher) can advance.

Under overlap the next batch is planned before the previous one's tokens are
known. A processor with `reads_output = False` (a fixed bias) is filled while
planning; one with `reads_output = True` is filled once the previous step's
tokens were accepted, while the next batch's forward already runs, and that
batch waits for it only just before sampling (sampling/planner.py).

To add one: a class with `reads_output`, `fill` and `accept`, and an entry
in `PROCESSOR_BUILDERS` that builds it from a request's sampling parameters.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from layers.sampler import SamplingBatchInfo
from managers.sampling_params import BAN_BIAS, SamplingParams


class LogitAdjustments:
    """A batch's processor output, collected on the host, applied on the device."""

    def __init__(self, batch_size: int = 0, vocab_size: int = 0) -> None:
        self.batch_size, self.vocab_size = batch_size, vocab_size
        # Allowed tokens as 32-bit words per row (xgrammar's layout, bit set =
        # allowed); made when a grammar row first asks, all-allowed elsewhere.
        self._bitmask: torch.Tensor | None = None
        self.ban_rows: list[int] = []
        self.ban_ids: list[int] = []
        self.bias_rows: list[int] = []
        self.bias_ids: list[int] = []
        self.bias_values: list[float] = []

    def ban(self, row: int, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.ban_rows.append(row)
            self.ban_ids.append(t)

    def allowed_bitmask(self) -> torch.Tensor:
        """[batch, ceil(vocab / 32)] int32 on the host, for a grammar to fill its row."""
        if self._bitmask is None:
            words = (self.vocab_size + 31) // 32
            self._bitmask = torch.full((self.batch_size, words), -1, dtype=torch.int32)
        return self._bitmask

    def add_bias(self, row: int, token_ids: Sequence[int], values: Sequence[float]) -> None:
        self.bias_rows.extend([row] * len(token_ids))
        self.bias_ids.extend(token_ids)
        self.bias_values.extend(values)

    def apply_to(self, info: SamplingBatchInfo, device: torch.device) -> None:
        """Dense [B, V] bias and ban mask on `info` (None when unused)."""
        shape = (len(info), info.vocab_size)
        if self.bias_ids:
            bias = torch.zeros(shape, dtype=torch.float32, device=device)
            index = (_index(self.bias_rows, device), _index(self.bias_ids, device))
            bias.index_put_(index, torch.tensor(self.bias_values, dtype=torch.float32, device=device), accumulate=True)
            info.logit_bias = bias
        if self.ban_ids:
            banned = torch.zeros(shape, dtype=torch.bool, device=device)
            banned[_index(self.ban_rows, device), _index(self.ban_ids, device)] = True
            info.banned = banned
        if self._bitmask is not None:
            info.allowed_bitmask = self._bitmask.to(device, non_blocking=True)


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


class LogitsProcessor(Protocol):
    # True when `fill` depends on the tokens generated so far.
    reads_output: bool

    def fill(self, adjustments: LogitAdjustments, row: int) -> None: ...

    def accept(self, token_id: int) -> None: ...

    def terminated(self) -> bool:
        """The request must stop here (a grammar that is complete)."""
        ...


class LogitBias:
    """OpenAI's `logit_bias`: a value added to a token's logit; -100 bans it
    outright (OpenAI: "-100 should result in a ban")."""

    reads_output = False

    def __init__(self, bias: dict[int, float]) -> None:
        self.banned = [t for t, v in bias.items() if v <= BAN_BIAS]
        kept = [(t, v) for t, v in bias.items() if v > BAN_BIAS and v != 0]
        self.ids = [t for t, _ in kept]
        self.values = [float(v) for _, v in kept]

    def fill(self, adjustments: LogitAdjustments, row: int) -> None:
        adjustments.ban(row, self.banned)
        if self.ids:
            adjustments.add_bias(row, self.ids, self.values)

    def accept(self, token_id: int) -> None:
        pass

    def terminated(self) -> bool:
        return False


class NoRepeatNGram:
    """Bans every token that would repeat an n-gram already in the sequence
    (prompt and output), as `no_repeat_ngram_size` in transformers' generate."""

    reads_output = True

    def __init__(self, n: int, prompt_ids: Sequence[int]) -> None:
        self.n = n
        self.next_tokens: defaultdict[tuple[int, ...], set[int]] = defaultdict(set)
        self.tail: deque[int] = deque(maxlen=n - 1)
        for t in prompt_ids:
            self.accept(t)

    def fill(self, adjustments: LogitAdjustments, row: int) -> None:
        if len(self.tail) == self.n - 1:
            adjustments.ban(row, self.next_tokens.get(tuple(self.tail), ()))

    def accept(self, token_id: int) -> None:
        if len(self.tail) == self.n - 1:
            self.next_tokens[tuple(self.tail)].add(token_id)
        if self.n > 1:
            self.tail.append(token_id)

    def terminated(self) -> bool:
        return False


# Sampling parameter -> builder of its processor (None: the request does not use it).
PROCESSOR_BUILDERS: dict[str, Callable[[SamplingParams, Sequence[int]], LogitsProcessor | None]] = {
    "logit_bias": lambda p, _prompt: LogitBias({int(t): v for t, v in p.logit_bias.items()}) if p.logit_bias else None,
    "no_repeat_ngram_size": lambda p, prompt: NoRepeatNGram(p.no_repeat_ngram_size, prompt)
    if p.no_repeat_ngram_size > 0 else None,
}


def logits_processors_for(params: SamplingParams, prompt_ids: Sequence[int]) -> list[LogitsProcessor]:
    built = (build(params, prompt_ids) for build in PROCESSOR_BUILDERS.values())
    return [p for p in built if p is not None]
