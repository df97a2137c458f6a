"""Routing masks ρ: which decomposed modules are replaced at each position (docs/method.md §6).

Every router returns a bool tensor of shape (L, B, T): ρ[l, b, t] is True where module l uses its
masked components at position (b, t), and False where it uses the target weight on the current input.

- `uniform_k_routing` [VPD]: per position draw k ~ Uniform{1, …, L}, then route a uniformly random
  k-subset of the L modules.
- `all_routing`, `layerwise_routing`, `bernoulli_routing` [SPD]: the routers kept for toy models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from decomposer.errors import VpdError

Device = torch.device | str | None


def _check_sizes(n_modules: int, batch: int, seq: int) -> None:
    for name, value in (("n_modules", n_modules), ("batch", batch), ("seq", seq)):
        if value < 1:
            raise VpdError(f"`{name}` must be a positive int; got {value}. Pass sizes of at least 1.")


def _resolve_device(device: Device, generator: torch.Generator | None) -> Device:
    # A generator only draws on its own device, so default to it rather than to the CPU.
    if device is None and generator is not None:
        return generator.device
    return device


def uniform_k_routing(
    n_modules: int,
    batch: int,
    seq: int,
    *,
    generator: torch.Generator | None = None,
    device: Device = None,
) -> Tensor:
    """[VPD] uniform-k subset routing: exactly k ~ Uniform{1, …, L} modules routed per position.

    The ranks of a random permutation per position are argsort(argsort(u)) of i.i.d. uniforms u,
    so `ranks < k` selects a uniformly random k-subset, vectorised over (B, T).

    Args:
        n_modules: L, the number of decomposed modules.
        batch: B.
        seq: T.
        generator: Source of randomness; its device is used when `device` is None.
        device: Where to build the mask.

    Returns:
        Bool tensor of shape (L, B, T).

    Raises:
        VpdError: A size is below 1.
    """
    _check_sizes(n_modules, batch, seq)
    device = _resolve_device(device, generator)
    k = torch.randint(1, n_modules + 1, (batch, seq), generator=generator, device=device)  # (B, T)
    u = torch.rand(n_modules, batch, seq, generator=generator, device=device)  # (L, B, T)
    ranks = u.argsort(dim=0).argsort(dim=0)  # (L, B, T), a permutation of 0..L-1 per (b, t)
    return ranks < k


def all_routing(n_modules: int, batch: int, seq: int, *, device: Device = None) -> Tensor:
    """[SPD] every module routed at every position.

    Args:
        n_modules: L.
        batch: B.
        seq: T.
        device: Where to build the mask.

    Returns:
        Bool tensor of shape (L, B, T), all True.

    Raises:
        VpdError: A size is below 1.
    """
    _check_sizes(n_modules, batch, seq)
    return torch.ones(n_modules, batch, seq, dtype=torch.bool, device=device)


def layerwise_routing(n_modules: int, batch: int, seq: int, index: int, *, device: Device = None) -> Tensor:
    """[SPD] only module `index` routed, at every position.

    Args:
        n_modules: L.
        batch: B.
        seq: T.
        index: The routed module, in [0, L).
        device: Where to build the mask.

    Returns:
        Bool tensor of shape (L, B, T), True only in row `index`.

    Raises:
        VpdError: A size is below 1 or `index` is outside [0, L).
    """
    _check_sizes(n_modules, batch, seq)
    if not 0 <= index < n_modules:
        raise VpdError(f"`index` must be in [0, {n_modules}); got {index}. Pass the position of one decomposed module.")
    rho = torch.zeros(n_modules, batch, seq, dtype=torch.bool, device=device)
    rho[index] = True
    return rho


def bernoulli_routing(
    n_modules: int,
    batch: int,
    seq: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: Device = None,
) -> Tensor:
    """[SPD] each (module, b, t) routed independently with probability `p`.

    Args:
        n_modules: L.
        batch: B.
        seq: T.
        p: Routing probability in [0, 1].
        generator: Source of randomness; its device is used when `device` is None.
        device: Where to build the mask.

    Returns:
        Bool tensor of shape (L, B, T).

    Raises:
        VpdError: A size is below 1 or `p` is outside [0, 1].
    """
    _check_sizes(n_modules, batch, seq)
    if not 0.0 <= p <= 1.0:
        raise VpdError(f"`p` must be in [0, 1]; got {p}. Pass a routing probability such as 0.5.")
    device = _resolve_device(device, generator)
    return torch.rand(n_modules, batch, seq, generator=generator, device=device) < p
