"""Where a layer's attention lives and how it rotates: the layout, RoPE and head helpers shared by the
per-prompt q/k split (`attrgraph.qk`) and the static q/k analysis (`circuits.qk`), and the attention
weights as the model computes them (`attention_pattern`).

The family's layout comes from `decomposer.architectures`: q and k are separate matrices, or column slices
of one fused qkv matrix (GPT-2 c_attn, NeoX, Phi-3, Falcon). The rotation is read from the model's own
rotary module (rotate-half or adjacent pairs, partial rotary).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attrgraph.nodes import module_short_name
from decomposer.architectures import PositionScheme, attention_spec
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "AttentionLayout",
    "Rope",
    "apply_rope",
    "attention_layout",
    "attention_pattern",
    "qk_blocks",
    "qk_unavailable",
    "rope_cos_sin",
    "rope_of",
    "rotary_module",
    "split_heads",
]


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


def rotary_module(target: nn.Module) -> nn.Module | None:
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
    module = rotary_module(d.model.target)
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


def split_heads(x: Tensor, d_head: int) -> Tensor:
    """(..., n·d_head) → (..., n, d_head)."""
    return x.reshape(*x.shape[:-1], -1, d_head)


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
