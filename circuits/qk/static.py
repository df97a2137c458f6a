"""Static query/key analysis over a dataset: densities, static strengths, head norms, and a q ablation check.

docs/attribution-graphs.md §7. For q subcomponent c and k subcomponent c′ of one layer, query head h and
offset τ = t − t′ ≥ 0:

    S(c, c′, τ, h) = (σ_Q ‖v_{Q,c}‖ u^h_{Q,c})ᵀ R_τ (σ_K ‖v_{K,c′}‖ u^h_{K,c′})

where u^h is the head-h slice of the write vector (kv head h // (H / H_kv) for k), σ the sign of the
mean activation over tokens where the subcomponent has CI > 0, and R_τ the relative RoPE rotation:
S(τ) equals (R_t ũ_Q)·(R_{t−τ} ũ_K) for every absolute t (the model's rotate-half pairing, base,
scaling and partial rotary; R = I without RoPE). Scores are per head z-scored over all (c, c′, τ) in
0..max_offset. The per-prompt, data-dependent split lives in `attrgraph.qk`; the layout, RoPE and head helpers
both use live in `attrgraph.attention`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attrgraph.attention import (
    apply_rope,
    attention_layout,
    attention_pattern,
    qk_blocks,
    qk_unavailable,
    rope_cos_sin,
    rope_of,
    split_heads,
)
from attrgraph.nodes import ComponentKey, module_short_name, resolve_component
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "AblationEffect",
    "FiringStats",
    "PreviousTokenPair",
    "StaticStrength",
    "ablation_attention_effect",
    "activation_signs",
    "densities",
    "find_previous_token_pair",
    "firing_stats",
    "head_norms",
    "mean_attention_by_offset",
    "near_always_on",
    "qk_layers",
    "static_strength",
    "top_densities",
]


def qk_layers(d: Decomposition) -> list[int]:
    """Blocks whose q and k projections (or fused qkv) are both decomposed and whose scores are bilinear in them."""
    return [] if qk_unavailable(d) is not None else sorted(qk_blocks(d))


# --- firing statistics ----------------------------------------------------------------------------


@dataclass
class FiringStats:
    """Per decomposed module, over every token of the batches.

    Attributes:
        tokens: Number of tokens seen.
        density: Path → (C,) fraction of tokens with CI > 0.
        mean_activation: Path → (C,) mean a = v·x over the tokens with CI > 0 (0 where it never fires).
    """

    tokens: int
    density: dict[str, Tensor]
    mean_activation: dict[str, Tensor]


def _batch_ids(batch: Any) -> Tensor:
    if not isinstance(batch, Tensor) or batch.is_floating_point() or batch.ndim not in (1, 2) or batch.numel() == 0:
        raise VpdError("`batches` must hold non-empty integer token-id tensors of shape (T,) or (B, T).")
    return batch if batch.ndim == 2 else batch[None]


def firing_stats(d: Decomposition, batches: Iterable[Tensor], *, progress: bool = False) -> FiringStats:
    """Density and mean firing activation of every subcomponent, in one pass over `batches`.

    Raises:
        VpdError: `batches` is empty or holds something other than token ids.
    """
    from tqdm.auto import tqdm

    counts: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    n = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="firing stats", disable=not progress, leave=False):
            ids = _batch_ids(batch).to(d.model_device)
            _, xs = d.model.forward_with_inputs(ids)
            g, _ = d.causal_importance(xs)
            for path in d.module_paths:
                fire = g[path] > 0
                acts = d.model.components(path).component_acts(xs[path])
                counts[path] = counts.get(path, 0) + fire.sum((0, 1)).double().cpu()
                sums[path] = sums.get(path, 0) + torch.where(fire, acts, 0).sum((0, 1)).double().cpu()
            n += ids.numel()
    if n == 0:
        raise VpdError("`batches` is empty; pass at least one batch of token ids.")
    density = {p: counts[p] / n for p in d.module_paths}
    mean = {p: sums[p] / counts[p].clamp(min=1) for p in d.module_paths}
    return FiringStats(n, density, mean)


def densities(d: Decomposition, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Path → (C,) fraction of the tokens in `batches` where each subcomponent has CI > 0."""
    return firing_stats(d, batches).density


def activation_signs(stats: FiringStats) -> dict[str, Tensor]:
    """Path → (C,) σ = sign of the mean firing activation, ±1; +1 where it is 0 or the subcomponent never fires."""
    return {p: torch.where(m < 0, -1.0, 1.0).double() for p, m in stats.mean_activation.items()}


# --- static strength and head norms ---------------------------------------------------------------


@dataclass
class StaticStrength:
    """S(c, c′, τ, h) of one layer and its per-head z-scores.

    Attributes:
        layer: Block index.
        q_path, k_path: The q and k projections.
        offsets: (n_τ,) the offsets τ = 0..max_offset.
        S: (H, n_τ, C_Q, C_K) static strengths.
        z: (H, n_τ, C_Q, C_K) S z-scored per head over all (τ, c, c′) (population std).
    """

    layer: int
    q_path: str
    k_path: str
    offsets: Tensor
    S: Tensor
    z: Tensor


def static_strength(
    d: Decomposition, layer: int, *, signs: dict[str, Tensor] | None = None, max_offset: int = 16
) -> StaticStrength:
    """Static q/k strengths of block `layer` at offsets 0..max_offset (see the module docstring).

    Args:
        d: The decomposition.
        layer: Block index with decomposed q and k projections.
        signs: Path → (C,) σ from `activation_signs`; default all +1.
        max_offset: Largest offset τ.

    Raises:
        VpdError: A bad `layer` or `max_offset`.
    """
    if not isinstance(max_offset, int) or isinstance(max_offset, bool) or max_offset < 0:
        raise VpdError(f"`max_offset` must be an int >= 0; got {max_offset!r}.")
    lay = attention_layout(d, layer)
    dh = lay.d_head

    def scaled(path: str, cols: Tensor | None) -> Tensor:
        comp = d.model.components(path)
        V, U = comp.V.detach().double().cpu(), comp.U.detach().double().cpu()
        U = U if cols is None else U[:, cols]  # this side's heads of a fused qkv matrix
        sigma = signs[path].double().cpu() if signs is not None else torch.ones(comp.C, dtype=torch.float64)
        return split_heads(U * (sigma * V.norm(dim=0))[:, None], dh)  # (C, n_heads, d_head)

    q = scaled(lay.q_path, lay.q_cols)  # (C_Q, H, d)
    k = scaled(lay.k_path, lay.k_cols)[:, lay.kv_index]  # (C_K, H, d)
    rope = rope_of(d)
    offsets = torch.arange(max_offset + 1)
    # (R_t a)·(R_{t−τ} b) = (R_τ a)·(R_0 b): rotate q by τ, and let R_0 apply the rope scaling to k's rotary dims.
    cos, sin = rope_cos_sin(rope, offsets, head_dim=dh)
    cos0, sin0 = rope_cos_sin(rope, torch.zeros(1), head_dim=dh)
    pairs = {"interleaved": rope is not None and rope.interleaved}
    q_rot = apply_rope(q[None], cos[:, None, None], sin[:, None, None], **pairs)  # (n_τ, C_Q, H, d)
    k0 = apply_rope(k, cos0, sin0, **pairs)
    S = torch.einsum("tchd,ehd->htce", q_rot, k0)
    flat = S.flatten(1)
    mean, std = flat.mean(1), flat.std(1, correction=0).clamp(min=1e-30)
    z = (S - mean[:, None, None, None]) / std[:, None, None, None]
    return StaticStrength(layer, lay.q_path, lay.k_path, offsets, S, z)


def head_norms(d: Decomposition, layer: int) -> dict[str, Tensor]:
    """Per-head weight norms of the decomposed q, k, v, o subcomponents of block `layer`.

    The norm is the Frobenius norm of the head's block of the rank-one matrix u_c v_cᵀ: ‖u^h_c‖ ‖v_c‖
    for q, k and v (head slices of the write vector; k and v have H_kv heads) and ‖u_c‖ ‖v^h_c‖ for o,
    which reads the concatenated heads (head slices of the read vector).

    Returns:
        Path → (C, n_heads of that matrix).

    Raises:
        VpdError: `layer` has no decomposed q and k projections.
    """
    lay = attention_layout(d, layer)
    out = {}
    for short, path in (("q", lay.q_path), ("k", lay.k_path), ("v", lay.v_path), ("o", lay.o_path)):
        if path is None:
            continue
        comp = d.model.components(path)
        V, U = comp.V.detach().double().cpu(), comp.U.detach().double().cpu()
        if short == "o":
            out[path] = split_heads(V.T, lay.d_head).norm(dim=-1) * U.norm(dim=1)[:, None]
        else:
            out[path] = split_heads(U, lay.d_head).norm(dim=-1) * V.norm(dim=0)[:, None]
    return out


# --- the previous-token pair ----------------------------------------------------------------------


@dataclass
class PreviousTokenPair:
    """The q/k pair whose static strength stands out most at τ = 1.

    Attributes:
        layer: Block index.
        q_key, k_key: Short names, e.g. `1.attn.q:31`.
        q_density, k_density: Fraction of tokens with CI > 0.
        margin: max over heads of z(τ=1) − max_{τ≠1} z(τ), in z units; > 0 means a peak at τ = 1.
        head: The head with that margin.
        peak_heads: Every head where the pair's z peaks at τ = 1.
        near_always_on: Both came from the ≥ `min_density` candidates (False: from the densest fallback).
        profile: (H, n_τ) the pair's z-scores.
        strength: The layer's static strengths.
    """

    layer: int
    q_key: str
    k_key: str
    q_density: float
    k_density: float
    margin: float
    head: int
    peak_heads: list[int]
    near_always_on: bool
    profile: Tensor
    strength: StaticStrength

    @property
    def q_index(self) -> int:
        return ComponentKey.parse(self.q_key).index

    @property
    def k_index(self) -> int:
        return ComponentKey.parse(self.k_key).index

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "layer": self.layer,
            "q": self.q_key,
            "k": self.k_key,
            "q_density": self.q_density,
            "k_density": self.k_density,
            "margin": self.margin,
            "head": self.head,
            "peak_heads": self.peak_heads,
            "near_always_on": self.near_always_on,
            "z_by_head_and_offset": self.profile.tolist(),
        }


def _candidates(density: Tensor, min_density: float, fallback: int) -> tuple[Tensor, bool]:
    on = (density >= min_density).nonzero().flatten()
    if on.numel():
        return on, True
    return density.argsort(descending=True)[:fallback], False


def find_previous_token_pair(
    d: Decomposition,
    batches: Iterable[Tensor],
    layer: int | None = None,
    *,
    min_density: float = 0.95,
    max_offset: int = 16,
    fallback: int = 5,
    stats: FiringStats | None = None,
) -> PreviousTokenPair:
    """Among near-always-on q and k subcomponents, the pair whose static strength peaks at τ = 1 (previous token).

    Candidates are the q and k subcomponents with density ≥ `min_density` (the `fallback` densest of a
    matrix if none reaches it). For a candidate pair and head h, the margin is z_h(1) − max_{τ≠1} z_h(τ)
    over τ in 0..max_offset; the pair with the largest margin over all heads (and layers) wins.

    Args:
        d: The decomposition.
        batches: Token-id batches for densities and the signs σ (unused when `stats` is given).
        layer: Block to search; None searches every block with decomposed q and k.
        min_density: Density threshold of "near-always-on".
        max_offset: Largest offset τ of the static strength; at least 2.
        fallback: Candidates per matrix when none reaches `min_density`.
        stats: Precomputed `firing_stats(d, batches)`.

    Raises:
        VpdError: A bad `layer`, `min_density`, `max_offset` or `fallback`.
    """
    if not 0.0 <= min_density <= 1.0:
        raise VpdError(f"`min_density` must be in [0, 1]; got {min_density!r}.")
    if not isinstance(max_offset, int) or max_offset < 2:
        raise VpdError(f"`max_offset` must be an int >= 2 so that τ = 1 has neighbours; got {max_offset!r}.")
    if not isinstance(fallback, int) or fallback < 1:
        raise VpdError(f"`fallback` must be a positive int; got {fallback!r}.")
    layers = [attention_layout(d, layer).layer] if layer is not None else qk_layers(d)
    if not layers:
        attention_layout(d, -1)  # raises the message for a decomposition without q/k pairs
    stats = stats if stats is not None else firing_stats(d, batches)
    signs = activation_signs(stats)
    best: PreviousTokenPair | None = None
    for L in layers:
        st = static_strength(d, L, signs=signs, max_offset=max_offset)
        dq, dk = stats.density[st.q_path], stats.density[st.k_path]
        qs, q_on = _candidates(dq, min_density, fallback)
        ks, k_on = _candidates(dk, min_density, fallback)
        z = st.z[:, :, qs][:, :, :, ks]  # (H, n_τ, n_q, n_k)
        others = torch.cat((z[:, :1], z[:, 2:]), dim=1).amax(1)
        margin = z[:, 1] - others  # (H, n_q, n_k)
        per_pair, heads = margin.max(0)
        i = int(per_pair.flatten().argmax())
        iq, ik = divmod(i, len(ks))
        if best is not None and float(per_pair.flatten()[i]) <= best.margin:
            continue
        c, c_k = int(qs[iq]), int(ks[ik])
        best = PreviousTokenPair(
            layer=L,
            q_key=str(ComponentKey.of(st.q_path, c)),
            k_key=str(ComponentKey.of(st.k_path, c_k)),
            q_density=float(dq[c]),
            k_density=float(dk[c_k]),
            margin=float(per_pair[iq, ik]),
            head=int(heads[iq, ik]),
            peak_heads=[h for h in range(margin.shape[0]) if margin[h, iq, ik] > 0],
            near_always_on=q_on and k_on,
            profile=st.z[:, :, c, c_k].clone(),
            strength=st,
        )
    assert best is not None
    return best


# --- ablating a q subcomponent --------------------------------------------------------------------


def mean_attention_by_offset(attention: Tensor, max_offset: int) -> Tensor:
    """(H, n_τ) mean of A[b, h, t, t − τ] over samples b and query positions t ≥ τ, for τ = 0..max_offset.

    Args:
        attention: (B, H, T, T) attention weights.
        max_offset: Largest offset; offsets ≥ T are left out.
    """
    T = attention.shape[-1]
    cols = [
        torch.diagonal(attention, offset=-tau, dim1=-2, dim2=-1).mean((0, 2))
        for tau in range(min(max_offset, T - 1) + 1)
    ]
    return torch.stack(cols, dim=1)


@dataclass
class AblationEffect:
    """Attention of one layer with and without a q subcomponent.

    Attributes:
        q_key: The ablated subcomponent, e.g. `1.attn.q:31`.
        layer: Its block.
        before, after: (B, H, T, T) attention weights of the target and of the model with the
            subcomponent's mask 0 at every position (all other masks 1, delta on).
        mean_before, mean_after: (H, n_τ) `mean_attention_by_offset` of each.
    """

    q_key: str
    layer: int
    before: Tensor
    after: Tensor
    mean_before: Tensor
    mean_after: Tensor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: mean attention by head and offset, before and after."""
        return {
            "q": self.q_key,
            "layer": self.layer,
            "samples": self.before.shape[0],
            "mean_attention_before": self.mean_before.tolist(),
            "mean_attention_after": self.mean_after.tolist(),
        }


def ablation_attention_effect(d: Decomposition, ids: Tensor, q_key: str, *, max_offset: int = 8) -> AblationEffect:
    """Attention patterns per head of the q subcomponent's layer, with and without that subcomponent.

    Ablation follows docs/attribution-graphs.md §3: the subcomponent's mask is 0 at every position, every
    other mask of the matrix is 1 and its delta is on, so the weight is W − u_c v_cᵀ.

    Args:
        d: The decomposition.
        ids: Token ids (T,) or (B, T).
        q_key: A q subcomponent, e.g. `1.attn.q:31`.
        max_offset: Largest offset of the mean attention by offset.

    Raises:
        VpdError: `q_key` is malformed or not a q subcomponent, or `ids` is not a batch of token ids.
    """
    path, c = resolve_component(d.Cs, q_key, argument="q_key")
    layer, _, short = module_short_name(path)
    if short != "q":
        raise VpdError(
            f"`q_key` {q_key!r} is a {short} subcomponent; pass a query subcomponent such as {layer}.attn.q:{c}."
        )
    ids = _batch_ids(ids).to(d.model_device)
    comp = d.model.components(path)
    B, T = ids.shape
    mask = torch.ones(B, T, comp.C, dtype=comp.V.dtype, device=d.model_device)
    mask[..., c] = 0
    delta = torch.ones(B, T, dtype=comp.V.dtype, device=d.model_device)
    before = attention_pattern(d, ids, layer).double().cpu()
    after = attention_pattern(d, ids, layer, masks={path: mask}, delta_masks={path: delta}).double().cpu()
    return AblationEffect(
        q_key,
        layer,
        before,
        after,
        mean_attention_by_offset(before, max_offset),
        mean_attention_by_offset(after, max_offset),
    )


def top_densities(stats: FiringStats, path: str, n: int = 5) -> list[tuple[int, float]]:
    """The `n` densest subcomponents of `path` as (c, density), densest first."""
    values, index = stats.density[path].sort(descending=True)
    return [(int(c), float(v)) for c, v in zip(index[:n], values[:n], strict=True)]


def near_always_on(stats: FiringStats, paths: Sequence[str], min_density: float = 0.95) -> dict[str, list[int]]:
    """Path → the subcomponents with density ≥ `min_density`."""
    return {p: (stats.density[p] >= min_density).nonzero().flatten().tolist() for p in paths}
