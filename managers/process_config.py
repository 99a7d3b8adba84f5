"""Typed configs for the managers' processes, built by runtime/server_args.py.

The scheduler and detokenizer processes get exactly these (pickled into the
child), never the CLI's `ServerArgs`: what a process reads is declared here,
and managers/ does not depend on runtime/.
"""

from __future__ import annotations

from dataclasses import dataclass

from managers.scheduler_config import SchedulerConfig
from model_executor.model_config import ModelRunnerConfig


@dataclass(frozen=True)
class TokenizerConfig:
    path: str
    # A tokenizer class shipped as code with the checkpoint (auto_map) loads
    # only with this (--trust-remote-code).
    trust_remote_code: bool = False


@dataclass
class SchedulerProcessConfig:
    runner: ModelRunnerConfig  # for this rank (device, tp_rank)
    scheduler: SchedulerConfig
    tokenizer: TokenizerConfig | None  # None: --skip-tokenizer-init (stop strings need one)
    model_path: str  # for the EOS ids in generation_config.json
    tp_size: int
    ranks_per_node: int  # CPU TP: the node's cores are split between its ranks
    dist_timeout_s: int
    log_level: str = "info"


@dataclass
class DetokenizerProcessConfig:
    tokenizer: TokenizerConfig
    log_level: str = "info"
