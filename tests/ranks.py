"""Run a function on several gloo ranks on the CPU: the harness of every distributed test.

Teardown is where such tests abort, so it is done in one place and in a fixed order:

- The ranks meet through a FileStore in the test's own folder, not a TCPStore on a "free" port. A port
  found free by binding and closing a socket can be taken by any other process in the seconds a spawned
  interpreter needs to start (other test runs bind gloo and store ports all the time), and a rank that
  then reaches a foreign store joins the wrong group. The TCPStore server also lives in rank 0's process
  as a native thread, so rank 0 leaving first tore down the store under a peer that still used it.
- A rank whose work succeeded waits at a barrier before `destroy_process_group`, so no rank closes its gloo
  connections while a peer is still inside the last collective. Only then is the group destroyed, which
  joins gloo's worker threads before the interpreter shuts down.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., None], world: int, workdir: str | Path, *args: Any) -> None:
    """Call `fn(rank, world, *args)` in `world` spawned processes joined into one gloo group.

    `fn` must be importable (a module-level function); `workdir` must be a fresh folder, which holds the store.
    """
    store = Path(workdir) / "rendezvous"
    store.parent.mkdir(parents=True, exist_ok=True)
    if store.exists():
        raise FileExistsError(f"{store} exists from an earlier group; give each group a fresh `workdir`.")
    mp.spawn(_rank_main, args=(fn, world, f"file://{store}", args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world: int, init_method: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    finished = False
    try:
        fn(rank, world, *args)
        finished = True
    finally:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rank_slice(batches: Callable[[int], torch.Tensor], rank: int, world: int) -> Callable[[int], torch.Tensor]:
    """`step → batch` giving this rank its contiguous 1/world of the global batch of that step."""

    def batch(step: int) -> torch.Tensor:
        full = batches(step)
        local = len(full) // world
        return full[rank * local : (rank + 1) * local]

    return batch
