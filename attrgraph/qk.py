"""Query/key pair interactions of one prompt: the exact split of attention scores (docs/attribution-graphs.md §7).

Notation: a q subcomponent c writes u_{Q,c} (row c of `U`, length H·d_head) with activation a_{Q,c}(t) = v_{Q,c}·x(t);
u^h is the head-h slice `U[c, h*d_head:(h+1)*d_head]`. With GQA (H_kv < H key/value heads) query head h reads
kv head h // (H / H_kv). R_t is the rotary embedding at position t.

Algorithm (`score_terms`):

1. One clean forward records the inputs x of the layer's q and k projections (and o), and the rotation
   that the attention module itself received, so the rotation is the model's own at the actual positions:
   rotate-half pairing (Llama, NeoX) or adjacent pairs (GPT-J), its base and scaling, and partial rotary
   (only the first `cos.shape[-1]` dims of each head rotate). Learned positions (GPT-2, OPT) add no
   rotation (R_t = I); ALiBi (Falcon) adds a per-head bias to the score that no q/k piece carries, kept as
   the "position" term. The family's layout comes from `decomposer.architectures`: q and k are separate
   matrices, or column slices of one fused qkv matrix (GPT-2 c_attn, NeoX, Phi-3, Falcon), in which case a
   q/k pair is two subcomponents of that one matrix.
2. Each side splits exactly into pieces: q(t) = Σ_c a_{Q,c}(t) u_{Q,c} + x(t) Δ_Qᵀ + b_Q, where Δ = W − Σ_c u_c v_cᵀ.
   R_t is linear, so every piece is rotated separately: a_{Q,c}(t) R_t u^h_{Q,c}, R_t (x Δ_Qᵀ)^h, R_t b^h_Q.
3. The pre-softmax score of head h (before the 1/√d_head scale) is (R_t q^h(t)) · (R_{t′} k^{kv(h)}(t′)).
   Expanding both sums gives, for every pair of pieces, one term; the (component, component) terms are
   the data-dependent strengths DD(c, c′, t, t′, h) = a_{Q,c}(t) a_{K,c′}(t′) (R_t u^h_{Q,c})·(R_{t′} u^h_{K,c′}).
   All terms together reproduce the model's score exactly (up to float rounding).

Everything is computed in float64, whatever the model's dtype, so that the sums hold to ~1e-12.
Models with q/k normalisation after the projection (q_norm/k_norm) are refused: their scores are not
bilinear in the pieces. `attrgraph.attention.qk_unavailable` says, in one sentence, why a decomposition has no
q/k pairs; the layout, RoPE and head helpers live in `attrgraph.attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrgraph.attention import (
    AttentionLayout,
    apply_rope,
    attention_layout,
    qk_unavailable,
    rope_cos_sin,
    rotary_module,
    split_heads,
)
from attrgraph.nodes import NodeId, module_short_name, short_label
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "ScoreTerms",
    "add_qk_pairs",
    "data_dependent_strength",
    "qk_pairs_for_o",
    "score_decomposition",
    "score_terms",
]


# --- rotary embedding -----------------------------------------------------------------------------


# --- the score decomposition ----------------------------------------------------------------------


def _prompt_ids(d: Decomposition, ids: Tensor) -> Tensor:
    if not isinstance(ids, Tensor) or ids.is_floating_point():
        raise VpdError("`ids` must be an integer tensor of token ids, shape (T,) or (1, T).")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise VpdError(f"`ids` must have shape (T,) or (1, T) with T ≥ 1; got {tuple(ids.shape)}.")
    return ids.to(d.model_device)


@dataclass
class ScoreTerms:
    """The rotated pieces of q and k for one prompt and one layer; every score term is a dot product of two.

    Attributes:
        layout: The layer's attention layout.
        q_comp: (T, H, C_Q, d_head): a_{Q,c}(t) · R_t u^h_{Q,c}.
        k_comp: (T, H_kv, C_K, d_head): a_{K,c′}(t′) · R_{t′} u^h_{K,c′}.
        q_rest: "delta" (R_t x Δ_Qᵀ) and, if the projection has one, "bias" (R_t b_Q), each (T, H, d_head).
        k_rest: The same for k, (T, H_kv, d_head).
        q: (T, H, d_head): the model's rotated query R_t (x W_Qᵀ + b_Q).
        k: (T, H_kv, d_head): the model's rotated key.
        x_o: (T, H·d_head): the input of o_proj (the concatenated head outputs), or None if o is not decomposed.
        position: (H, T, T) ALiBi's score bias in the same units (before the scale); None for other schemes.
    """

    layout: AttentionLayout
    q_comp: Tensor
    k_comp: Tensor
    q_rest: dict[str, Tensor]
    k_rest: dict[str, Tensor]
    q: Tensor
    k: Tensor
    x_o: Tensor | None
    position: Tensor | None = None

    @property
    def n_positions(self) -> int:
        return self.q.shape[0]

    def scores(self) -> Tensor:
        """(H, T, T) pre-softmax scores of the model before the scale, [h, t, t′] = q^h(t)·k^{kv(h)}(t′)."""
        k = self.k[:, self.layout.kv_index]  # (T, H, d)
        scores = torch.einsum("thd,shd->hts", self.q, k)
        return scores if self.position is None else scores + self.position

    def attention(self) -> Tensor:
        """(H, T, T) causal attention weights softmax(scaling · score) over keys t′ ≤ t (soft-capped where the
        model caps its scores)."""
        T = self.n_positions
        logits = self.layout.scaling * self.scores()
        if self.layout.softcap is not None:
            logits = self.layout.softcap * torch.tanh(logits / self.layout.softcap)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return logits.masked_fill(~causal, float("-inf")).softmax(-1)


@contextmanager
def _capture_attention_inputs(d: Decomposition, attn_path: str) -> Iterator[dict[str, Any]]:
    """Record the `position_embeddings` (rotation) and `attention_mask` the attention module is called with."""
    seen: dict[str, Any] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["pe"] = kwargs.get("position_embeddings")
        seen["mask"] = kwargs.get("attention_mask")

    handle = d.model.target.get_submodule(attn_path).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _rotation(d: Decomposition, layout: AttentionLayout, seen: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T, rotary_dim), per dim in the layout `apply_rope` expects for the family."""
    T = x.shape[1]
    if not layout.positions.rotary:
        return rope_cos_sin(None, torch.arange(T), head_dim=layout.d_head)
    pe = seen.get("pe")
    if pe is not None:
        first, second = (t[0].double().cpu() for t in pe)  # exactly what the model used
        if layout.positions.kind == "rope_interleaved":  # GPT-J hands (sin, cos), one angle per adjacent pair
            return second.repeat_interleave(2, -1), first.repeat_interleave(2, -1)
        return first, second
    module = rotary_module(d.model.target)
    if module is None:
        raise VpdError(f"Attention {layout.attn_path!r} received no rotation and the model has no rotary module.")
    # The attention computes no rotation itself: the model hands it one, so ask its rotary module.
    cos, sin = module(x, torch.arange(T, device=x.device)[None])
    return cos[0].double().cpu(), sin[0].double().cpu()


def _alibi(layout: AttentionLayout, seen: dict[str, Any], T: int) -> Tensor | None:
    """ALiBi's (H, T, T) score bias, read back from the mask the model added it to, in pre-scale units."""
    mask = seen.get("mask")
    if layout.positions.kind != "alibi":
        return None
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        raise VpdError(f"Attention {layout.attn_path!r} received no ALiBi bias in its attention mask.")
    bias = mask[0].double().cpu().expand(layout.n_heads, T, T) / layout.scaling
    return torch.where(torch.ones(T, T, dtype=torch.bool).tril(), bias, 0.0)


def score_terms(d: Decomposition, ids: Tensor, layer: int) -> ScoreTerms:
    """Split every attention score of block `layer` on one prompt into q-piece × k-piece terms.

    Args:
        d: The decomposition; q_proj and k_proj of `layer` must be decomposed.
        ids: Token ids (T,) or (1, T), one prompt without padding (positions 0..T−1).
        layer: Block index.

    Returns:
        The rotated pieces; see `data_dependent_strength` and `score_decomposition` for the terms.

    Raises:
        VpdError: Bad `ids` or a `layer` without decomposed q and k (see `attention_layout`).
    """
    layout = attention_layout(d, layer)
    ids = _prompt_ids(d, ids)
    T, dh = ids.shape[1], layout.d_head
    interleaved = layout.positions.kind == "rope_interleaved"
    with _capture_attention_inputs(d, layout.attn_path) as seen, torch.no_grad():
        _, xs = d.model.forward_with_inputs(ids)
    with torch.no_grad():
        cos, sin = _rotation(d, layout, seen, xs[layout.q_path])

        def rope(x: Tensor, *, per_component: bool = False) -> Tensor:
            if per_component:  # x (1, C, n, d) against every position: (T, C, n, d)
                return apply_rope(x, cos[:, None, None], sin[:, None, None], interleaved=interleaved)
            return apply_rope(x, cos[:, None], sin[:, None], interleaved=interleaved)

        def side(path: str, cols: Tensor | None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
            comp = d.model.components(path)
            x = xs[path][0].double().cpu()  # (T, d_in)
            V, U = comp.V.detach().double().cpu(), comp.U.detach().double().cpu()
            W = comp.weight.detach().double().cpu()
            bias = None if comp.bias is None else comp.bias.detach().double().cpu()
            if cols is not None:  # this side's heads of a fused qkv matrix
                U, W, bias = U[:, cols], W[cols], None if bias is None else bias[cols]
            a = x @ V  # (T, C)
            # R_t u_c for every t, then scaled by a_c(t): (T, C, n, d) → (T, n, C, d).
            u_rot = rope(split_heads(U, dh)[None], per_component=True)
            parts = (a[:, :, None, None] * u_rot).permute(0, 2, 1, 3).contiguous()
            delta = F.linear(x, W - (V @ U).T)  # x Δᵀ with Δ = W − Ŵ, Ŵ = (V U)ᵀ
            rest = {"delta": rope(split_heads(delta, dh))}
            if bias is not None:
                rest["bias"] = rope(split_heads(bias, dh)[None].expand(T, -1, -1))
            full = rope(split_heads(F.linear(x, W, bias), dh))
            return parts, rest, full

        q_comp, q_rest, q = side(layout.q_path, layout.q_cols)
        k_comp, k_rest, k = side(layout.k_path, layout.k_cols)
        x_o = xs[layout.o_path][0].double().cpu() if layout.o_path is not None else None
    return ScoreTerms(layout, q_comp, k_comp, q_rest, k_rest, q, k, x_o, _alibi(layout, seen, T))


def _check_pos(name: str, value: Any, T: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < T:
        raise VpdError(f"`{name}` must be a position in 0..{T - 1}; got {value!r}.")
    return value


def data_dependent_strength(terms: ScoreTerms, t: int, t_key: int, head: int | None = None) -> Tensor:
    """DD(c, c′, t, t′, h) = a_{Q,c}(t) a_{K,c′}(t′) (R_t u^h_{Q,c})·(R_{t′} u^h_{K,c′}), before the 1/√d_head scale.

    Args:
        terms: From `score_terms`.
        t: Query position.
        t_key: Key position t′ (the model masks t′ > t; the term is still defined there).
        head: A query head, or None for all heads.

    Returns:
        (C_Q, C_K) for one head, else (H, C_Q, C_K).

    Raises:
        VpdError: A position or head out of range.
    """
    T, lay = terms.n_positions, terms.layout
    _check_pos("t", t, T)
    _check_pos("t_key", t_key, T)
    q, k = terms.q_comp[t], terms.k_comp[t_key][lay.kv_index]  # (H, C_Q, d), (H, C_K, d)
    if head is None:
        return torch.einsum("hcd,hed->hce", q, k)
    _check_pos("head", head, lay.n_heads)
    return q[head] @ k[head].T


def score_decomposition(terms: ScoreTerms, t: int, t_key: int) -> dict[str, Tensor]:
    """Every term of the score of (t, t′) per head; they sum to the model's pre-softmax score (before the scale).

    Keys are "{q piece}·{k piece}" with pieces "comp", "delta" and (when the projection has a bias)
    "bias": "comp·comp" is DD (H, C_Q, C_K), "comp·delta" (H, C_Q), "delta·comp" (H, C_K), and a
    rest·rest term such as "delta·bias" is (H,). Under ALiBi, "position" (H,) is the score bias.

    Raises:
        VpdError: A position out of range.
    """
    T, lay = terms.n_positions, terms.layout
    _check_pos("t", t, T)
    _check_pos("t_key", t_key, T)
    kv = lay.kv_index
    q_pieces = {"comp": terms.q_comp[t], **{n: v[t] for n, v in terms.q_rest.items()}}
    k_pieces = {"comp": terms.k_comp[t_key][kv], **{n: v[t_key][kv] for n, v in terms.k_rest.items()}}
    out = {}
    for qn, q in q_pieces.items():
        for kn, k in k_pieces.items():
            q_ = q if qn == "comp" else q[:, None]  # (H, C or 1, d)
            k_ = k if kn == "comp" else k[:, None]
            term = torch.einsum("hcd,hed->hce", q_, k_)
            if qn != "comp":
                term = term[:, 0]
            if kn != "comp":
                term = term[..., 0]
            out[f"{qn}·{kn}"] = term
    if terms.position is not None:
        out["position"] = terms.position[:, t, t_key]
    return out


# --- q/k pairs behind the o nodes of a graph ------------------------------------------------------


def _head_share(z: Tensor, v_o: Tensor, d_head: int) -> Tensor:
    """(H,) |v^h_o · z_h| / Σ_h′ |v^h′_o · z_h′|: how much of a_o = v_o · z comes through each head (uniform if 0)."""
    per_head = (split_heads(z, d_head) * split_heads(v_o, d_head)).sum(-1).abs()
    total = per_head.sum()
    return per_head / total if total > 0 else torch.full_like(per_head, 1.0 / per_head.numel())


def _top_dd(q_t: Tensor, k: Tensor, top: int, chunk: int = 16) -> tuple[Tensor, Tensor, int]:
    """Per (head, key position), the `top` DD(c, c′) of largest |DD| and their flat indices c · C_K + c′.

    q_t: (H, C_Q, d) at the query position; k: (t+1, H, C_K, d). Head share and attention scale a whole
    (head, key position) slice by one non-negative factor, so the strongest pairs of any o node at this
    position are among these; key positions go in chunks so the (H, chunk, C_Q, C_K) DD stays small.
    """
    values, indices = [], []
    for start in range(0, k.shape[0], chunk):
        dd = torch.einsum("hcd,shed->hsce", q_t, k[start : start + chunk]).flatten(2)  # (H, s, C_Q · C_K)
        idx = dd.abs().topk(min(top, dd.shape[-1]), dim=-1).indices
        values.append(dd.gather(-1, idx))
        indices.append(idx)
    return torch.cat(values, 1), torch.cat(indices, 1), k.shape[2]


def qk_pairs_for_o(d: Decomposition, ids: Tensor, G: nx.DiGraph, top: int = 5) -> list[dict[str, Any]]:
    """For every o-subcomponent node of `G`, the q/k subcomponent pairs that most shape the attention it reads.

    Definition. For an o node (block L, subcomponent c_o, position t):

    - head share r_h = |a^h_o| / Σ_h′ |a^h′_o|, where a^h_o = v^h_{O,c_o} · z_h(t) is the part of the o
      activation a_o = Σ_h a^h_o read from head h's output z_h(t) (v^h the head-h slice of v_{O,c_o});
    - for every query head h, key position t′ ≤ t, q subcomponent c and k subcomponent c′ of block L:
      strength = r_h · A_h(t, t′) · DD(c, c′, t, t′, h), with A the model's attention weights and DD
      the data-dependent strength (score units, before 1/√d_head);
    - the `top` entries by |strength| are kept, strongest first (rank 0). A positive strength means the
      pair raised the score of a key the head attends to.

    Args:
        d: The decomposition.
        ids: The graph's prompt token ids, (T,) or (1, T), covering every node position.
        G: An attribution graph (`attrgraph.to_networkx`); o nodes have kind "comp" and sublayer "o".
        top: Pairs kept per o node.

    Returns:
        Plain JSON-ready dicts, grouped by o node in graph order: o_node, o_label, q_node, k_node (canonical
        ids at positions t and t′), q_label, k_label, q_in_graph, k_in_graph, query_pos, key_pos, head,
        dd, attention, head_share, strength, rank.

    Raises:
        VpdError: A bad `top` or `ids`, or an o node outside the prompt or in a block without decomposed q, k.
    """
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise VpdError(f"`top` must be a positive int; got {top!r}.")
    o_nodes = [(n, a) for n, a in G.nodes(data=True) if a.get("kind") == "comp" and a.get("sublayer") == "o"]
    T = _prompt_ids(d, ids).shape[1]
    by_layer: dict[int, list[tuple[str, dict]]] = {}
    for n, a in o_nodes:
        if not 0 <= int(a["pos"]) < T:
            raise VpdError(
                f"o node {n!r} is at position {a['pos']}, outside the {T}-token `ids`; pass the graph's prompt."
            )
        by_layer.setdefault(module_short_name(a["module"])[0], []).append((n, a))
    found: dict[str, list[dict[str, Any]]] = {}
    for layer, nodes in by_layer.items():
        terms = score_terms(d, ids, layer)
        lay, A = terms.layout, terms.attention()
        dd, dd_pos = None, -1
        for n, a in sorted(nodes, key=lambda item: int(item[1]["pos"])):
            if a["module"] != lay.o_path:
                raise VpdError(f"o node {n!r} is not on the decomposed o_proj of block {layer}.")
            t = int(a["pos"])
            if t != dd_pos:  # nodes come sorted by position, so one position's candidates are held at a time
                dd, dd_idx, n_k = _top_dd(terms.q_comp[t], terms.k_comp[: t + 1][:, lay.kv_index], top)
                dd_pos = t
            v_o = d.model.components(lay.o_path).V[:, int(a["index"])].detach().double().cpu()
            share = _head_share(terms.x_o[t], v_o, lay.d_head)
            weighted = share[:, None, None] * A[:, t, : t + 1, None] * dd  # (H, t+1, top)
            flat = weighted.flatten().abs().topk(min(top, weighted.numel())).indices
            rows = []
            for rank, idx in enumerate(zip(*torch.unravel_index(flat, weighted.shape), strict=True)):
                h, s, j = (int(i) for i in idx)
                c, c_k = divmod(int(dd_idx[h, s, j]), n_k)
                q_node, k_node = NodeId.comp(lay.q_path, c, t), NodeId.comp(lay.k_path, c_k, s)
                rows.append(
                    {
                        "o_node": n,
                        "o_label": short_label(NodeId.parse(n)),
                        "q_node": str(q_node),
                        "k_node": str(k_node),
                        "q_label": short_label(q_node),
                        "k_label": short_label(k_node),
                        "q_in_graph": str(q_node) in G,
                        "k_in_graph": str(k_node) in G,
                        "query_pos": t,
                        "key_pos": s,
                        "head": h,
                        "dd": float(dd[h, s, j]),
                        "attention": float(A[h, t, s]),
                        "head_share": float(share[h]),
                        "strength": float(weighted[h, s, j]),
                        "rank": rank,
                    }
                )
            found[n] = rows
    return [row for n, _ in o_nodes for row in found[n]]


def add_qk_pairs(G: nx.DiGraph, d: Decomposition, ids: Tensor, top: int = 5) -> nx.DiGraph:
    """A copy of `G` whose `graph["qk_pairs"]` holds `qk_pairs_for_o(d, ids, G, top)`; `G` is unchanged.

    Where the decomposition has no q/k pairs (no decomposed query and key matrices, q/k normalisation),
    `qk_pairs` is empty and `graph["qk_note"]` says why, so the graph is still written and its panel
    explains the empty table.

    Raises:
        VpdError: As `qk_pairs_for_o`.
    """
    reason = qk_unavailable(d)
    pairs = qk_pairs_for_o(d, ids, G, top) if reason is None else []
    H = G.copy()  # copies the graph-attribute dict too, so G keeps its own qk_pairs
    H.graph["qk_pairs"] = pairs
    if reason is not None:
        H.graph["qk_note"] = reason
    return H
