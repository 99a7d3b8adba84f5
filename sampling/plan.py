"""What the scheduler hands the worker about a batch's sampling: plain data,
built on the host (sampling/planner.py), read on the worker's thread
(sampling/row_state.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from sampling.batch_info import SamplingFlags

if TYPE_CHECKING:
    from sampling.logits_processors import LogitAdjustments

# Columns of SamplingRows.params and RowJoins.params.
TEMPERATURE, TOP_P, MIN_P, FREQUENCY, PRESENCE, REPETITION = range(6)


@dataclass
class RowJoins:
    """Rows requests joined since the previous batch, with what to write there."""

    rows: Tensor  # [J] int64
    params: Tensor  # [J, 6] float32, columns as above (temperature 1.0 on greedy rows)
    top_ks: Tensor  # [J] int64
    greedy: Tensor  # [J] bool
    # Rows whose penalties need their history counted in, and that history as
    # (row, token) pairs: generated tokens (counts) and prompt + generated (seen).
    penalised_rows: Tensor  # [P] int64
    output_index: tuple[Tensor, Tensor]
    seen_index: tuple[Tensor, Tensor]


class PendingAdjustments:
    """Logits processors' output for a batch that may be filled after the
    batch was launched (overlap); the worker waits for it just before sampling."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: LogitAdjustments | BaseException | None = None

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    def set(self, value: LogitAdjustments | BaseException) -> None:
        self._value = value
        self._done.set()

    def wait(self) -> LogitAdjustments:
        self._done.wait()
        if isinstance(self._value, BaseException):
            raise RuntimeError("filling the logits processors failed") from self._value
        return self._value


@dataclass
class SamplingPlan:
    rows: Tensor  # [B] int64 (host): each batch row's row in SamplingRows
    flags: SamplingFlags
    seeds: list[int | None]
    output_lens: list[int]  # per row, tokens generated before this step (seeded draws)
    joins: RowJoins | None
    counted: Tensor  # [K] int64 (host): batch rows whose sampled token the request keeps
    adjustments: PendingAdjustments | None = None
    # Per row, guesses it verifies this step (None: none do). A drafted row's
    # output_lens already count them: its next-token row samples the token
    # after its last guess; its guess positions sample the ones before.
    draft_lens: list[int] | None = None
