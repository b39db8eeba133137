"""Several processes on one stage: which share of the work is this rank's, and the few collective steps
the stages need (join, wait, gather).

Under `torchrun --nproc_per_node N python -m stages.<name>` every rank runs the same stage. Shard-parallel
stages (extract, tokenize, sample) give each rank a contiguous block of the job list (`my_block`); each rank
writes its own shards into the shared temporary output, and rank 0 alone writes metadata and renames the
result once every rank is done (`barrier`). Per-job work never depends on the rank or the number of ranks,
so the output is byte-identical to one process. Training uses the same group for DDP (pipeline/train.py).
Gloo on CPU (tests), NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: from the process group if joined, else from torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1). Returns True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join torchrun's group for the duration (a no-op in a single process); yields (rank, world)."""
    created = init_distributed(device)
    try:
        yield rank_world()
    finally:
        if created:
            dist.destroy_process_group()


def my_block(jobs: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s contiguous share of `jobs`: the first len % world ranks take one job more."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} process(es)")
    per, extra = divmod(len(jobs), world)
    start = rank * per + min(rank, extra)
    return list(jobs[start : start + per + (rank < extra)])


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process). Objects are pickled
    between the processes of one run, never read from disk."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
