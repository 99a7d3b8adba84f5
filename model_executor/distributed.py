"""Tensor-parallel process groups and the collectives the engine needs.

One `TPGroup` per rank, made by `init_tp_group` and passed down (no module
globals). It holds two `torch.distributed` groups over the same ranks:

- the *device* group (NCCL on CUDA, gloo on CPU) carries the model's
  all-reduce / all-gather and the broadcast of sampled ids; only the forward
  (worker) thread uses it;
- the *control* group (always gloo, on CPU) carries the scheduler's Python
  objects (new requests, aborts) and the KV-capacity agreement; only the
  scheduler thread uses it.

Two groups, because with overlap scheduling the two threads issue
collectives concurrently, and collectives on one group must be issued in
the same order on every rank.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from layers.linear import TPContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInitConfig:
    """Where and how the ranks of one TP group meet."""

    tp_size: int
    tp_rank: int
    init_addr: str  # host:port of rank 0's rendezvous store
    device: str  # "cpu" or "cuda[:i]": picks the device group's backend
    timeout_s: float = 300.0  # for joining and for any single collective

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    @property
    def device_id(self) -> torch.device | None:
        """The GPU this rank binds its process group to (None on CPU). Bound,
        NCCL creates the communicator inside init_process_group instead of
        lazily at the first collective (which could be in a CUDA-graph
        warm-up), and a rank that cannot reach the others fails there."""
        if self.backend != "nccl":
            return None
        device = torch.device(self.device)
        if device.index is None:
            raise ValueError(
                f"TP rank {self.tp_rank} needs an indexed CUDA device (cuda:<local rank>), got {self.device!r}"
            )
        return device


class RankJoinTimeout(RuntimeError):
    pass


class TPGroup:
    def __init__(self, config: DistInitConfig, device_group: Any, control_group: Any) -> None:
        self.config = config
        self.rank = config.tp_rank
        self.size = config.tp_size
        self.device_group = device_group
        self.control_group = control_group

    # -- tensors (device group) ------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (and returned)."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def broadcast_tensor(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `x` with rank `src`'s copy."""
        dist.broadcast(x, src=src, group=self.device_group)
        return x

    def tp_context(self, ep_size: int = 1) -> TPContext:
        """What the layers see: this rank's shard and the two combiners."""
        return TPContext(rank=self.rank, size=self.size, all_reduce=self.all_reduce, all_gather=self.all_gather,
                         ep_size=ep_size)

    # -- Python objects and scalars (control group) -----------------------------

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (pickled; others pass anything)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest `value` over all ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_tp_group(config: DistInitConfig) -> TPGroup:
    """Join the group at `config.init_addr`; raises `RankJoinTimeout` (with
    the address and the missing ranks' count) if the others do not arrive
    within `timeout_s`."""
    device_id = config.device_id
    if device_id is not None:
        torch.cuda.set_device(device_id)
    timeout = datetime.timedelta(seconds=config.timeout_s)
    try:
        dist.init_process_group(
            backend=config.backend,
            init_method=f"tcp://{config.init_addr}",
            world_size=config.tp_size,
            rank=config.tp_rank,
            timeout=timeout,
            device_id=device_id,  # torch >= 2.3
        )
    except RuntimeError as err:  # DistStoreError (timeout) is a RuntimeError
        raise RankJoinTimeout(
            f"rank {config.tp_rank} of {config.tp_size} could not join the TP group at "
            f"{config.init_addr} within {config.timeout_s:g} s ({err}); check that every "
            "node was started with the same --tp-size/--nnodes/--dist-init-addr"
        ) from err
    device_group = dist.group.WORLD
    # Its own group even on CPU, where WORLD is gloo too: see the module doc.
    control_group = dist.new_group(backend="gloo", timeout=timeout)
    logger.info("rank %d/%d joined the TP group (%s)", config.tp_rank, config.tp_size, config.backend)
    return TPGroup(config, device_group, control_group)
