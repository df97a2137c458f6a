"""The direct-effect cut of one forward (docs/attribution-graphs.md §2): leaves at the alive subcomponents.

`direct_effect_leaves` makes every decomposed module feed downstream `a_dead @ U + Σ_j leaf_j u_{c_j} +
delta_leaf (+ bias)`, with detached leaves at the alive (t, c) entries only and at x Δᵀ, and the input
embedding's output a leaf too. Every path between two decomposed matrices then ends at a leaf or a
constant, so the gradient of a target with respect to a leaf is its direct effect. `attrgraph.edges` builds
the graph's edges on it; `attrgraph.reference.trace_layer_pairs` traces which layers connect.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError
from decomposer.vpd.components import ComponentModel, as_token_grid

__all__ = ["LeafRecord", "direct_effect_leaves"]


@dataclass
class LeafRecord:
    """What one `direct_effect_leaves` forward recorded.

    Attributes:
        acts: Path → a = xV (B, T, C), still attached to the graph; row 0 only, (1, T, C), with `copies`.
        inputs: Path → the module input x (B, T, d_in), attached; a target a_c at position t is x[t] · v_c,
            which backpropagates in O(d_in) instead of through the whole (B, T, C) product.
        comp_index: Path → (t, c) index tensors of the alive entries, in the column order of `comp_leaves`.
        comp_leaves: Path → the leaf (B, n_alive) standing in for a at the alive entries.
        delta_leaves: Path → the leaf fed downstream in place of x Δᵀ (B, T, d_out).
        emb: The leaf that replaced the input embedding's output (B, T, d_model).
    """

    acts: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    comp_index: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    comp_leaves: dict[str, Tensor] = field(default_factory=dict)
    delta_leaves: dict[str, Tensor] = field(default_factory=dict)
    emb: Tensor | None = None

    def leaves(self) -> list[Tensor]:
        """Every leaf: the embedding, then the comp leaves, then the delta leaves, each in module order."""
        if self.emb is None:
            raise VpdError("The embedding hook did not fire; run the target's forward inside the block first.")
        return [self.emb, *self.comp_leaves.values(), *self.delta_leaves.values()]


def _leaf(value: Tensor, rows: int | None = None) -> Tensor:
    """A new leaf holding `value`; with `rows`, a stride-0 broadcast of value's row(s) to `rows` rows, no copy."""
    if rows is None:
        return value.detach().clone().requires_grad_(True)
    return value.detach().expand(rows, *value.shape[1:]).requires_grad_(True)


def _alive_index(
    path: str, alive: Mapping[str, Tensor] | None, T: int, C: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(t, c) of the entries that get a leaf, position-major; every entry when `alive` is None."""
    if alive is None:
        t_idx, c_idx = torch.meshgrid(torch.arange(T, device=device), torch.arange(C, device=device), indexing="ij")
        return t_idx.reshape(-1), c_idx.reshape(-1)
    if path not in alive or tuple(alive[path].shape) != (T, C):
        got = tuple(alive[path].shape) if path in alive else "nothing"
        raise VpdError(f"`alive[{path!r}]` must be a (T, C) = ({T}, {C}) mask for this forward; got {got}.")
    return alive[path].to(device).nonzero(as_tuple=True)


def _alive_writes(leaf: Tensor, t_idx: Tensor, c_idx: Tensor, U: Tensor, T: int) -> Tensor:
    """Σ_j leaf_j · u_{c_j} placed at position t_j, as (B, T, d_out).

    The entries are packed per position into m = max_t n_t slots (zero padding), so the sum is one batched
    matmul over positions, (T, B, m) @ (T, m, d_out), and so is its backward, costing O(B · T · m · d_out)
    ≈ O(B · n_alive · d_out) rather than the O(B · T · C · d_out) of a dense (B, T, C) leaf. Entries must be
    position-major (the order of `mask.nonzero()`).
    """
    B, n = leaf.shape
    if n == 0:
        return leaf.new_zeros(B, T, U.shape[-1])
    counts = torch.bincount(t_idx, minlength=T)
    rank = torch.arange(n, device=leaf.device) - (counts.cumsum(0) - counts)[t_idx]
    m = int(counts.max())
    U_pad = U.new_zeros(T, m, U.shape[-1])
    U_pad[t_idx, rank] = U[c_idx]
    slots = leaf.new_zeros(B, T * m).index_copy(1, t_idx * m + rank, leaf)
    # Contiguous (B, T, d_out): HF reshapes module outputs with `view`.
    return torch.bmm(slots.view(B, T, m).transpose(0, 1), U_pad).transpose(0, 1).contiguous()


@contextmanager
def direct_effect_leaves(
    model: ComponentModel,
    *,
    alive: Mapping[str, Tensor] | None = None,
    copies: bool = False,
    replace: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    replace_emb: Tensor | None = None,
) -> Iterator[LeafRecord]:
    """Hook the target so that a forward run inside the block cuts the graph at every decomposed matrix.

    Each decomposed module feeds downstream `a_dead @ U + Σ_j leaf_j · u_{c_j} at t_j + delta_leaf (+ bias)`,
    where `leaf` (B, n_alive) holds a at the alive entries (t_j, c_j) and `a_dead` is a with those entries
    zeroed, a constant. The value equals the target's output up to float rounding, and a backward pass
    costs O(B · n_alive · d_out) per module instead of O(B · T · C · d_out): dead entries get no gradient.

    Args:
        model: The component model; its target is run as usual (`model.target(...)`) inside the block.
        alive: Path → (T, C) boolean mask of the entries that get a leaf (e.g. CI > 0); None: every entry.
            Leaf columns follow `mask.nonzero()` order (position-major).
        copies: Every batch row is a copy of one prompt (the batch only carries one target per row): a,
            x Δᵀ and the constant a_dead @ U are computed from row 0 alone and broadcast, the leaves are
            stride-0 broadcasts of row 0, and `acts` holds row 0 only.
        replace: Path → (a (B, T, C), delta (B, T, d_out)) to use for that module's leaves and constant
            instead of the computed ones. Used by tests to hold leaves at clean values while one is perturbed.
        replace_emb: Value for the embedding leaf instead of the embedding's output.

    Yields:
        The record, filled in by the forward.

    Raises:
        VpdError: (during the forward) if an `alive` mask is missing or does not match the module's (T, C).
    """
    replace = replace or {}
    record = LeafRecord()

    def make_hook(path: str) -> Any:
        comp = model.components(path)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
            x = args[0] if args else next(iter(kwargs.values()))
            x = as_token_grid(x, tuple(record.emb.shape[:-1]) if record.emb is not None else None)
            B, T = x.shape[0], x.shape[-2]
            # V and U are detached: the gradients wanted are with respect to activations, not parameters.
            V, U = comp.V.detach(), comp.U.detach()
            rows = x[:1] if copies else x
            a = rows @ V
            record.acts[path], record.inputs[path] = a, x
            t_idx, c_idx = _alive_index(path, alive, T, a.shape[-1], a.device)
            record.comp_index[path] = (t_idx, c_idx)
            with torch.no_grad():  # leaf values and the dead part are constants; no_grad also reuses cached Δ
                a_val, delta_val = replace.get(path) or (a, F.linear(rows, comp.delta()))
                a_dead = a_val.clone()
                a_dead[:, t_idx, c_idx] = 0
                dead_out = a_dead @ U if comp.bias is None else a_dead @ U + comp.bias
            rows_out = B if copies else None
            record.comp_leaves[path] = leaf = _leaf(a_val[:, t_idx, c_idx], rows_out)
            record.delta_leaves[path] = delta_leaf = _leaf(delta_val, rows_out)
            return (dead_out + _alive_writes(leaf, t_idx, c_idx, U, T) + delta_leaf).reshape(output.shape)

        return hook

    def emb_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        record.emb = _leaf(output if replace_emb is None else replace_emb)
        return record.emb

    handles = [model.target.get_input_embeddings().register_forward_hook(emb_hook)]
    try:
        for path in model.module_paths:
            module = model.target.get_submodule(path)
            handles.append(module.register_forward_hook(make_hook(path), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
