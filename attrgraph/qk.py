"""Query/key pair interactions of one prompt: the exact split of attention scores (attribution-graphs.md §7).

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
bilinear in the pieces. `qk_unavailable` says, in one sentence, why a decomposition has no q/k pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrgraph.nodes import NodeId, module_short_name, short_label
from decomposer.architectures import PositionScheme, attention_spec
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "AttentionLayout",
    "Rope",
    "ScoreTerms",
    "add_qk_pairs",
    "apply_rope",
    "attention_layout",
    "attention_pattern",
    "data_dependent_strength",
    "qk_blocks",
    "qk_pairs_for_o",
    "qk_unavailable",
    "rope_cos_sin",
    "rope_of",
    "score_decomposition",
    "score_terms",
    "split_heads",
]


# --- layout ---------------------------------------------------------------------------------------


_ROPE = PositionScheme("rope")


@dataclass(frozen=True)
class AttentionLayout:
    """Where one layer's attention lives and how its heads are laid out.

    Attributes:
        layer: Block index.
        attn_path: The attention module (parent of q_proj).
        q_path, k_path: The decomposed q and k projections; both the fused qkv matrix where the family fuses them.
        v_path, o_path: The decomposed v and o projections, or None where they are not decomposed.
        n_heads: Query heads H.
        n_kv: Key/value heads H_kv (H_kv < H for GQA).
        d_head: Width of one head.
        scaling: The model's score scale (1/√d_head for Llama).
        q_cols, k_cols: The output columns of q_path (k_path) holding the query (key) heads in head-major
            order; None where the matrix is the whole projection.
        positions: The family's position scheme.
        softcap: Gemma 2's score soft-capping c (weights from softmax(c · tanh(scaling · score / c))), or None.
    """

    layer: int
    attn_path: str
    q_path: str
    k_path: str
    v_path: str | None
    o_path: str | None
    n_heads: int
    n_kv: int
    d_head: int
    scaling: float
    q_cols: Tensor | None = None
    k_cols: Tensor | None = None
    positions: PositionScheme = _ROPE
    softcap: float | None = None

    def kv_head(self, h: int) -> int:
        """The key/value head read by query head `h`."""
        return h // (self.n_heads // self.n_kv)

    @property
    def kv_index(self) -> Tensor:
        """(H,) kv head of every query head."""
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv)


def _blocks_with(d: Decomposition, short: str) -> dict[int, str]:
    out = {}
    for path in d.module_paths:
        block, part, name = module_short_name(path)
        if part == "attn" and name == short:
            out[block] = path
    return out


def qk_blocks(d: Decomposition) -> dict[int, tuple[str, str]]:
    """Block → (q path, k path) for every block whose query and key matrices (or fused qkv) are decomposed."""
    qs, ks, fused = _blocks_with(d, "q"), _blocks_with(d, "k"), _blocks_with(d, "qkv")
    out = {block: (fused[block], fused[block]) for block in fused}
    out.update({block: (qs[block], ks[block]) for block in set(qs) & set(ks)})
    return dict(sorted(out.items()))


def qk_unavailable(d: Decomposition) -> str | None:
    """Why the decomposition has no q/k pairs, as one sentence; None when it has some."""
    try:
        spec = attention_spec(d.model.target)
    except VpdError as err:
        return str(err)
    if spec.arch.qk_norm:
        return (
            f"{spec.arch.family} normalises q and k after the projection, so its attention scores do not split "
            "into q/k subcomponent pairs."
        )
    if not qk_blocks(d):
        names = "the fused qkv matrix" if spec.qkv_columns is not None else "both the q and the k matrix"
        return f"No block has {names} decomposed, so there are no q/k pairs; decompose them (e.g. `modules: auto`)."
    return None


def attention_layout(d: Decomposition, layer: int) -> AttentionLayout:
    """The attention layout of block `layer`, whose query and key matrices (or fused qkv) must be decomposed.

    Raises:
        VpdError: `layer` is not a block with decomposed q and k, or the attention normalises q/k after the
            projection, or the family has no architecture adapter, or the head sizes do not divide.
    """
    reason = qk_unavailable(d)
    if reason is not None:
        raise VpdError(reason)
    blocks = qk_blocks(d)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer not in blocks:
        raise VpdError(
            f"`layer` {layer!r} is not a block with decomposed q and k projections; use one of "
            f"{', '.join(map(str, blocks))}."
        )
    q_path, k_path = blocks[layer]
    attn_path = q_path.rsplit(".", 1)[0]
    attn = d.model.target.get_submodule(attn_path)
    for name in ("q_norm", "k_norm"):
        if isinstance(getattr(attn, name, None), nn.Module):
            raise VpdError(
                f"Attention {attn_path!r} normalises {name[0]} after the projection, so its scores do not "
                "split into q/k subcomponent pairs. Use a model without q/k normalisation."
            )
    spec = attention_spec(d.model.target)
    heads, cols = spec.heads, spec.qkv_columns
    fused = q_path == k_path
    q_cols, k_cols = (cols["q"], cols["k"]) if fused and cols is not None else (None, None)
    q_width = len(q_cols) if q_cols is not None else d.model.components(q_path).d_out
    k_width = len(k_cols) if k_cols is not None else d.model.components(k_path).d_out
    if q_width != heads.n_heads * heads.d_head or k_width != heads.n_kv * heads.d_head:
        raise VpdError(
            f"Layer {layer}: q width {q_width} and k width {k_width} do not split into {heads.n_heads} and "
            f"{heads.n_kv} heads of {heads.d_head}."
        )
    v_path = q_path if fused else _blocks_with(d, "v").get(layer)
    return AttentionLayout(
        layer=layer,
        attn_path=attn_path,
        q_path=q_path,
        k_path=k_path,
        v_path=v_path,
        o_path=_blocks_with(d, "o").get(layer),
        n_heads=heads.n_heads,
        n_kv=heads.n_kv,
        d_head=heads.d_head,
        scaling=float(getattr(attn, "scaling", heads.d_head**-0.5)),
        q_cols=q_cols,
        k_cols=k_cols,
        positions=spec.positions,
        softcap=getattr(attn, "attn_logit_softcapping", None),
    )


# --- rotary embedding -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """The target's rotary embedding in float64.

    Attributes:
        inv_freq: (rotary_dim / 2,) angular frequencies θ_i; position p rotates pair i by p·θ_i.
        scaling: The factor the model multiplies cos and sin by (1 for default RoPE; YaRN etc. differ).
        interleaved: Pair i is dims (2i, 2i + 1) (GPT-J) rather than (i, i + rotary_dim / 2).
    """

    inv_freq: Tensor
    scaling: float
    interleaved: bool = False

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that rotate; the rest pass through (partial rotary)."""
        return 2 * self.inv_freq.numel()


def _rotary_module(target: nn.Module) -> nn.Module | None:
    for module in target.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and isinstance(getattr(module, "inv_freq", None), Tensor):
            return module
    return None


def rope_of(d: Decomposition) -> Rope | None:
    """The target's rotary embedding, or None for a model without RoPE (then R_τ = I).

    The frequencies are the rotary module's `inv_freq` buffer as loaded (dynamic-scaling types change
    them only past the original context). The family's position scheme decides whether there is a
    rotation at all (an ALiBi Falcon still carries a rotary module) and its pairing; GPT-J's fixed
    sinusoid table is base 10,000 over its rotary width.
    """
    try:
        spec = attention_spec(d.model.target)
    except VpdError:  # a model outside the registry: trust its rotary module, if any
        spec = None
    if spec is not None and not spec.positions.rotary:
        return None
    if spec is not None and spec.positions.kind == "rope_interleaved":
        rot = spec.positions.rotary_dim or spec.heads.d_head
        inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
        return Rope(inv_freq, 1.0, interleaved=True)
    module = _rotary_module(d.model.target)
    if module is None:
        return None
    return Rope(module.inv_freq.detach().double().cpu(), float(getattr(module, "attention_scaling", 1.0)))


def rope_cos_sin(rope: Rope | None, positions: Tensor, *, head_dim: int) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (P, rotary_dim), in the HF layout cat(p·θ, p·θ) (interleaved: each angle twice in a
    row) and times `rope.scaling`.

    For `rope` None both have width 0, so `apply_rope` leaves its input unchanged.
    """
    positions = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
    if rope is None:
        empty = torch.zeros(positions.numel(), 0, dtype=torch.float64)
        return empty, empty
    if rope.rotary_dim > head_dim:
        raise VpdError(f"The rotary width {rope.rotary_dim} exceeds the head width {head_dim}.")
    angles = positions[:, None] * rope.inv_freq[None, :]
    angles = angles.repeat_interleave(2, dim=-1) if rope.interleaved else torch.cat((angles, angles), dim=-1)
    return angles.cos() * rope.scaling, angles.sin() * rope.scaling


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """RoPE on the first `cos.shape[-1]` dims of `x` (..., d_head); the rest pass through.

    Rotate-half pairs dim i with dim i + rotary_dim/2 (HF Llama, NeoX); `interleaved` pairs dims 2i and
    2i + 1 (GPT-J's rotate_every_two), with `cos` and `sin` repeated per pair. `cos` and `sin` broadcast
    against `x[..., :rotary_dim]`.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = rot // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass.expand(*out.shape[:-1], x_pass.shape[-1])), dim=-1)


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
    module = _rotary_module(d.model.target)
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


def split_heads(x: Tensor, d_head: int) -> Tensor:
    """(..., n·d_head) → (..., n, d_head)."""
    return x.reshape(*x.shape[:-1], -1, d_head)


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


# --- attention patterns under interventions -------------------------------------------------------


@contextmanager
def _eager_attention(target: nn.Module) -> Iterator[None]:
    """Run the target with eager attention, which returns its weights; restore the previous kind after."""
    config = getattr(target, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    target.set_attn_implementation("eager")
    try:
        yield
    finally:
        target.set_attn_implementation(before)


def attention_pattern(
    d: Decomposition,
    ids: Tensor,
    layer: int,
    *,
    masks: Mapping[str, Tensor] | None = None,
    delta_masks: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The attention weights of block `layer` as the model computes them, (B, H, T, T).

    Runs the component model (`masks`/`delta_masks` as in `ComponentModel.forward`; none: the target)
    with eager attention and records the weights the attention module returns.

    Args:
        d: The decomposition.
        ids: Token ids (T,) or (B, T).
        layer: Block index.
        masks: Path → subcomponent mask (B, T, C), e.g. to ablate a subcomponent.
        delta_masks: Path → delta mask (B, T).

    Raises:
        VpdError: A `layer` without decomposed q and k, or an attention module that returns no weights.
    """
    layout = attention_layout(d, layer)
    if ids.ndim == 1:
        ids = ids[None]
    seen: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, Tensor):
            raise VpdError(f"Attention {layout.attn_path!r} returned no weights even with eager attention.")
        seen["weights"] = weights.detach()

    handle = d.model.target.get_submodule(layout.attn_path).register_forward_hook(hook)
    try:
        with _eager_attention(d.model.target), torch.no_grad():
            d.model(ids.to(d.model_device), masks=masks, delta_masks=delta_masks)
    finally:
        handle.remove()
    return seen["weights"]


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
        G: An attribution graph (`attrgraph.graph`); o nodes have kind "comp" and sublayer "o".
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
                rows.append({
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
                })  # fmt: skip
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
