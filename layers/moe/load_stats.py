"""Tokens routed to each expert over the last N forward steps: the input an
expert-placement balancer (EPLB) needs, reported in /get_server_info.

The MoE layers count into rows of one [layers, experts] table during a step
(in place, so CUDA graphs can capture it); `end_step` moves the table into a
ring of the last `window_steps` steps. Every rank routes every token the same
way (the router is replicated), so any rank's counts are the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layers.moe.layer import FusedMoE

DEFAULT_WINDOW_STEPS = 1000


class ExpertLoadRecorder:
    def __init__(self, layers: Sequence[tuple[int, FusedMoE]], window_steps: int = DEFAULT_WINDOW_STEPS) -> None:
        """`layers`: (decoder layer index, its experts) for every MoE layer."""
        if not layers:
            raise ValueError("an expert load recorder needs at least one MoE layer")
        self.layer_ids = [index for index, _ in layers]
        num_experts = layers[0][1].placement.total
        device = layers[0][1].step_counts.device
        self.window_steps = window_steps
        self.current = torch.zeros(len(layers), num_experts, dtype=torch.int64, device=device)
        self.ring = torch.zeros(window_steps, len(layers), num_experts, dtype=torch.int64, device=device)
        self.steps = 0
        for row, (_, moe) in enumerate(layers):
            moe.step_counts = self.current[row]

    def end_step(self) -> None:
        self.ring[self.steps % self.window_steps].copy_(self.current)
        self.current.zero_()
        self.steps += 1

    def snapshot(self) -> dict:
        """{"window_steps", "steps" (recorded in the window), "per_layer": {layer index: [tokens per expert]}}."""
        totals = self.ring.sum(dim=0).tolist()
        return {
            "window_steps": self.window_steps,
            "steps": min(self.steps, self.window_steps),
            "per_layer": {str(layer): counts for layer, counts in zip(self.layer_ids, totals)},
        }
