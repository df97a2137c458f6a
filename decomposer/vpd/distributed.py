"""Processes launched by `torchrun`: the process group's lifetime, and work split by rank then gathered."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def torchrun_group(*, always: bool = False) -> Iterator[tuple[int, int]]:
    """Join the process group that torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, …) for the block.

    Yields (rank, world). Outside torchrun, inside an existing group, or with one process and not `always`,
    nothing is set up. A group set up here is torn down in a fixed order: when the block succeeded every rank
    meets at a barrier first, so no rank closes its connections while a peer is still inside a collective;
    then the group is destroyed, which joins the backend's threads before the interpreter exits.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()) or (world == 1 and not always):
        yield rank_and_world()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    finished = False
    try:
        yield dist.get_rank(), dist.get_world_size()
        finished = True
    finally:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items; shares differ in size by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (all of them without a process group)."""
    rank, world = rank_and_world()
    start, stop = share_bounds(len(items), rank, world)
    return list(items[start:stop])


def gather_shares(local: list[T]) -> list[T]:
    """Every rank's `my_share` results, concatenated in rank order: the list one process would have made.

    A collective: every rank must call it. The objects travel between ranks in memory only.
    """
    if rank_and_world()[1] == 1:
        return local
    parts: list[list[T] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]
