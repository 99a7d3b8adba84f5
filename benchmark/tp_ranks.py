"""TP ranks for `bench_one_batch --tp-size N`: N processes that join one TP
group, build the same runner and prompts, and run one static batch each
time they are told to, timing the collectives on the way.

They sit blocked on their command queue between rounds, so the in-process
tp-1 runner and the tp-N ranks take turns on the machine (A B A B).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import torch

from benchmark.bench_one_batch import RoundResult, clock, make_runner, parse_args, random_prompts, run_ours
from model_executor.distributed import DistInitConfig, TPGroup, init_tp_group
from runtime.launch import free_port


@dataclass
class CollectiveTimes:
    all_reduce_s: float = 0.0
    all_gather_s: float = 0.0

    def instrument(self, group: TPGroup) -> None:
        """Time the group's collectives from now on. (On CPU, gloo returns
        when the collective is done, so wall time is its cost, including
        the wait for the slowest rank. NCCL returns at once, so on CUDA the
        clock is read after a synchronize on both sides: the work queued
        before the collective is charged to the step, not to it.)"""
        reduce, gather = group.all_reduce, group.all_gather

        def timed_reduce(x: torch.Tensor) -> torch.Tensor:
            start = clock(x.device)
            out = reduce(x)
            self.all_reduce_s += clock(x.device) - start
            return out

        def timed_gather(x: torch.Tensor) -> torch.Tensor:
            start = clock(x.device)
            out = gather(x)
            self.all_gather_s += clock(x.device) - start
            return out

        group.all_reduce, group.all_gather = timed_reduce, timed_gather  # type: ignore[method-assign]


@dataclass
class TPRound:
    result: RoundResult
    all_reduce_s: float  # during the decode steps
    all_gather_s: float


def _rank_main(rank: int, tp_size: int, init_addr: str, argv: list[str], model_path: str, commands, results) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // tp_size))
    if args.device == "cuda":  # one GPU per rank, as the server places them
        args.device = f"cuda:{rank}"
    group = init_tp_group(DistInitConfig(tp_size, rank, init_addr, args.device))
    times = CollectiveTimes()
    times.instrument(group)  # before the runner: the layers capture the group's combiners
    runner = make_runner(args, model_path, {"tp_size": tp_size, "tp_rank": rank}, None, tp_group=group)
    prompts = random_prompts(args.batch_size, args.input_len, runner.model_config.vocab_size, args.seed)
    if rank == 0:
        results.put("ready")
    while commands.get() is not None:
        run = run_ours(runner, prompts, args.output_len)
        prefill = next(run)
        times.all_reduce_s = times.all_gather_s = 0.0
        steps = list(run)
        if rank == 0:
            results.put(TPRound(RoundResult(prefill, steps), times.all_reduce_s, times.all_gather_s))
    group.destroy()


class TPRanks:
    def __init__(self, argv: list[str], model_path: str, tp_size: int) -> None:
        ctx = mp.get_context("spawn")
        init_addr = f"127.0.0.1:{free_port()}"
        self.commands = [ctx.Queue() for _ in range(tp_size)]
        self.results = ctx.Queue()
        self.processes = [
            ctx.Process(
                target=_rank_main,
                args=(rank, tp_size, init_addr, argv, model_path, self.commands[rank], self.results),
                daemon=True,
            )
            for rank in range(tp_size)
        ]
        for proc in self.processes:
            proc.start()
        if self._get() != "ready":
            raise RuntimeError("TP ranks failed to start")

    def run_round(self) -> TPRound:
        for queue in self.commands:
            queue.put("run")
        return self._get()

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for proc in self.processes:
            proc.join(30)
            if proc.is_alive():
                proc.kill()

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=1.0)
            except Exception:  # queue.Empty: check the ranks are still there
                dead = [p for p in self.processes if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"a TP rank exited with code {dead[0].exitcode}") from None
