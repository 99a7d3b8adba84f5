"""Per-iteration accounting of the scheduler's time, so its overhead is visible."""

from __future__ import annotations

import time
from contextlib import contextmanager


class IterationTimings:
    """Where the scheduler's time goes: scheduling (choosing and allocating
    the batch), preparing its tensors, forward + sampling (waiting on the
    model), and processing results. Overhead is everything but forward."""

    PHASES = ("schedule", "prepare", "forward", "process")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.iterations = 0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        out = {f"{name}_ms_per_iter": 1e3 * s / max(1, self.iterations) for name, s in self.seconds.items()}
        out["overhead_fraction"] = (total - self.seconds["forward"]) / total if total else 0.0
        out["iterations"] = self.iterations
        return out
