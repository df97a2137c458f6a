"""Whole and local views of parameters that may be FSDP2-sharded DTensors (sharding.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a sharded parameter (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor, else `t`; detached and contiguous."""
    return (t.to_local() if is_dtensor(t) else t).detach().contiguous()


def load_full_into(param: nn.Parameter, value: Tensor) -> None:
    """Copy a whole tensor into a parameter, keeping only this rank's shard when it is sharded."""
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        param.copy_(value)
