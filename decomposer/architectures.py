"""One registry of decoder-only model families: where each family keeps its blocks and matrices.

An `Architecture` names, for one family of Hugging Face causal LMs:

- the block container (`model.layers`, `transformer.h`, …) and, inside a block, which module path is
  which matrix: the *role* q, k, v, o, qkv (fused), gate, up, gate_up (fused) or down;
- how a fused qkv output splits into the query, key and value heads (`qkv_columns`);
- the residual stream (sequential, or parallel attention and MLP), the position scheme (RoPE,
  interleaved RoPE, partial RoPE, learned positions with an offset, ALiBi) and the head layout (GQA).

Everything that reads a target's matrices by role asks here: `modules: auto` (`auto_modules`), the
`{block}.{attn|mlp}.{matrix}` short names of graph nodes (`matrix_role`) and the q/k score split.
A new family is one `register(Architecture(...))` call; see README "Supported models".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from decomposer.errors import VpdError

Role = Literal["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"]
ATTN_ROLES: tuple[str, ...] = ("q", "k", "v", "qkv", "o")  # the rest (gate, up, gate_up, down) are MLP roles

# C per matrix as a multiple of d_model, the paper's ratios (docs/method.md §3): q, k 0.67×; v, o 1.33×; MLP in
# 4×; MLP out 4.67×. A fused matrix holds several of these, so its C is their sum.
PAPER_C_RATIOS: dict[str, float] = {
    "q": 0.67,
    "k": 0.67,
    "v": 1.33,
    "o": 1.33,
    "qkv": 0.67 + 0.67 + 1.33,
    "gate": 4.0,
    "up": 4.0,
    "gate_up": 8.0,
    "down": 4.67,
}


@dataclass(frozen=True)
class PositionScheme:
    """How positions enter attention.

    Attributes:
        kind: "rope" (rotate-half pairs, Llama/NeoX), "rope_interleaved" (adjacent pairs, GPT-J),
            "learned" (absolute embeddings added to the input; q/k scores carry no rotation) or "alibi"
            (a per-head linear bias added to the scores).
        rotary_dim: Leading dims of each head that rotate (partial RoPE); None: all of them. Only for RoPE.
        offset: Learned positions: the embedding row of position 0 (OPT reserves 2 rows).
    """

    kind: Literal["rope", "rope_interleaved", "learned", "alibi"]
    rotary_dim: int | None = None
    offset: int = 0

    @property
    def rotary(self) -> bool:
        return self.kind in ("rope", "rope_interleaved")


@dataclass(frozen=True)
class HeadLayout:
    """H query heads of width d_head reading H_kv key/value heads (H_kv < H: grouped-query attention)."""

    n_heads: int
    n_kv: int
    d_head: int


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def d_model_of(config: Any) -> int:
    """The residual width of a HF config."""
    d = _cfg(config, "hidden_size", "n_embd", "d_model")
    if d is None:
        raise VpdError(f"The target config ({type(config).__name__}) has no hidden_size. Pass C for every matrix.")
    return int(d)


def _heads(config: Any) -> HeadLayout:
    H = int(_cfg(config, "num_attention_heads", "n_head"))
    d_head = int(_cfg(config, "head_dim", default=d_model_of(config) // H))
    return HeadLayout(H, int(_cfg(config, "num_key_value_heads", default=H)), d_head)


def _rotary_dim(config: Any, d_head: int) -> int | None:
    factor = _cfg(config, "partial_rotary_factor", "rotary_pct")
    rope = getattr(config, "rope_parameters", None)
    if factor is None and isinstance(rope, Mapping):
        factor = rope.get("partial_rotary_factor")
    return None if factor is None or float(factor) >= 1.0 else int(d_head * float(factor))


def _rope(config: Any) -> PositionScheme:
    return PositionScheme("rope", _rotary_dim(config, _heads(config).d_head))


def _contiguous_qkv(config: Any, heads: HeadLayout) -> dict[str, Tensor]:
    """[q of every head | k of every kv head | v of every kv head] (GPT-2, Phi-3)."""
    q, kv = heads.n_heads * heads.d_head, heads.n_kv * heads.d_head
    cols = torch.arange(q + 2 * kv)
    return {"q": cols[:q], "k": cols[q : q + kv], "v": cols[q + kv :]}


def _per_head_qkv(config: Any, heads: HeadLayout) -> dict[str, Tensor]:
    """[q_h | k_h | v_h] for each head h in turn (GPT-NeoX, Falcon without multi-query)."""
    cols = torch.arange(3 * heads.n_heads * heads.d_head).view(heads.n_heads, 3, heads.d_head)
    return {name: cols[:, i].reshape(-1) for i, name in enumerate("qkv")}


def _falcon_heads(config: Any) -> HeadLayout:
    H = int(config.num_attention_heads)
    d_head = config.hidden_size // H
    if config.new_decoder_architecture:
        return HeadLayout(H, int(config.num_kv_heads), d_head)
    return HeadLayout(H, 1 if config.multi_query else H, d_head)


def _falcon_qkv(config: Any, heads: HeadLayout) -> dict[str, Tensor]:
    if config.new_decoder_architecture:
        # Each kv group holds its H / H_kv queries, then its key and its value.
        per_group = heads.n_heads // heads.n_kv + 2
        cols = torch.arange(heads.n_kv * per_group * heads.d_head).view(heads.n_kv, per_group, heads.d_head)
        return {"q": cols[:, :-2].reshape(-1), "k": cols[:, -2].reshape(-1), "v": cols[:, -1].reshape(-1)}
    if config.multi_query:
        return _contiguous_qkv(config, heads)
    return _per_head_qkv(config, heads)


@dataclass(frozen=True)
class Architecture:
    """How one model family lays out its decoder blocks.

    Attributes:
        family: Display name, e.g. "Llama".
        model_types: The HF `config.model_type` values of the family.
        blocks: Regex of the block container's path, without the block index (e.g. `model\\.layers`);
            any prefix is accepted, so wrapped models (`base_model.model.…`) match too.
        matrices: Path inside a block → role, e.g. {"self_attn.q_proj": "q"}.
        positions: config → the position scheme.
        residual: config → "sequential" or "parallel" (attention and MLP read the same residual).
        heads: config → the head layout.
        qkv_columns: (config, heads) → the output columns of the fused qkv matrix holding q, k and v, each
            in head-major order (head h is columns [h·d_head, (h+1)·d_head) of the returned index); None
            when q, k and v are separate matrices.
        qk_norm: Whether q and k are normalised after the projection (Qwen3, OLMo2, Gemma 3), which makes
            attention scores non-bilinear in the q/k subcomponents.
        notes: The family's quirks, in a few words.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    matrices: Mapping[str, Role]
    positions: Callable[[Any], PositionScheme] = _rope
    residual: Callable[[Any], Literal["sequential", "parallel"]] = lambda config: "sequential"
    heads: Callable[[Any], HeadLayout] = _heads
    qkv_columns: Callable[[Any, HeadLayout], dict[str, Tensor]] | None = None
    qk_norm: bool = False
    notes: str = ""
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bad = sorted(set(self.matrices.values()) - set(PAPER_C_RATIOS))
        if bad:
            raise VpdError(f"`matrices` of {self.family} has roles {bad}; use roles from {sorted(PAPER_C_RATIOS)}.")
        suffixes = "|".join(re.escape(s) for s in sorted(self.matrices, key=len, reverse=True))
        object.__setattr__(self, "_pattern", re.compile(rf"(?:.+\.)?{self.blocks}\.([0-9]+)\.({suffixes})"))

    def role(self, path: str) -> tuple[int, str] | None:
        """(block, role) of a module path of this family, or None."""
        match = self._pattern.fullmatch(path)
        return None if match is None else (int(match.group(1)), self.matrices[match.group(2)])


def _llama_like(family: str, model_types: tuple[str, ...], *, qk_norm: bool = False, notes: str = "") -> Architecture:
    return Architecture(
        family=family,
        model_types=model_types,
        blocks=r"layers",
        matrices={
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.o_proj": "o",
            "mlp.gate_proj": "gate",
            "mlp.up_proj": "up",
            "mlp.down_proj": "down",
        },
        qk_norm=qk_norm,
        notes=notes,
    )


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add a family; its `model_types` then resolve to it. Returns `arch`.

    Raises:
        VpdError: A model type is registered already (to another family object) and `replace` is False.
    """
    taken = sorted(t for t in arch.model_types if t in _REGISTRY and _REGISTRY[t] is not arch)
    if taken and not replace:
        raise VpdError(
            f"model_type {', '.join(map(repr, taken))} is registered already (family {_REGISTRY[taken[0]].family}); "
            "pass replace=True to register(...) to replace it."
        )
    for model_type in arch.model_types:
        _REGISTRY[model_type] = arch
    _matrix_role.cache_clear()
    return arch


def architectures() -> list[Architecture]:
    """Every registered family, once each, in registration order."""
    return list({id(a): a for a in _REGISTRY.values()}.values())


def supported_families() -> str:
    """The registered family names, comma-separated, for messages."""
    return ", ".join(a.family for a in architectures())


_HOW_TO_ADD = "add the family with decomposer.architectures.register(Architecture(...)) (README, 'Supported models')"


def architecture_of(model: nn.Module) -> Architecture:
    """The adapter of a HF causal LM, chosen by `model.config.model_type`.

    Raises:
        VpdError: The model's family has no adapter.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} without a HF config"
        raise VpdError(
            f"The target is {what}, which no architecture adapter covers (supported: {supported_families()}); "
            f"pass `modules` as glob patterns with C, or {_HOW_TO_ADD}."
        )
    return arch


def matrix_role(path: str) -> tuple[int, str, str]:
    """(block, "attn" | "mlp", role) of a module path of any registered family.

    Raises:
        VpdError: The path is not a matrix of a registered family's block.
    """
    found = _matrix_role(path) if isinstance(path, str) else None
    if found is None:
        raise VpdError(
            f"`module` {path!r} is not an attention or MLP matrix of a supported family ({supported_families()}); "
            f"expected a path such as model.layers.3.self_attn.q_proj or transformer.h.1.mlp.c_fc, or {_HOW_TO_ADD}."
        )
    return found


@lru_cache(maxsize=4096)
def _matrix_role(path: str) -> tuple[int, str, str] | None:
    for arch in architectures():
        hit = arch.role(path)
        if hit is not None:
            block, role = hit
            return block, "attn" if role in ATTN_ROLES else "mlp", role
    return None


def auto_modules(model: nn.Module, overrides: Mapping[str, int] | None = None, *, scale: float = 1.0) -> dict[str, int]:
    """Every attention and MLP matrix of `model` with its C: `overrides[role]` if given, else the paper's ratio.

    Args:
        model: A HF causal LM of a registered family.
        overrides: Role → C for the roles whose C is given (q, k, v, qkv, o, gate, up, gate_up, down).
        scale: Multiplies every paper ratio (not the overrides), e.g. 0.25 for a quick run.

    Returns:
        Module path → C, in `model.named_modules()` order.

    Raises:
        VpdError: The family has no adapter, an override names no role of it, or no matrix is found.
    """
    arch = architecture_of(model)
    overrides = dict(overrides or {})
    roles = set(arch.matrices.values())
    unknown = sorted(set(overrides) - roles)
    if unknown:
        raise VpdError(
            f"`modules.C` names {unknown}, which {arch.family} does not have; use its roles {sorted(roles)}."
        )
    d_model = d_model_of(model.config)
    out = {}
    for path, module in model.named_modules():
        hit = arch.role(path) if isinstance(module, nn.Linear | Conv1D) else None
        if hit is not None:
            role = hit[1]
            out[path] = int(overrides.get(role, max(1, round(PAPER_C_RATIOS[role] * scale * d_model))))
    if not out:
        raise VpdError(f"No {arch.family} attention or MLP matrix was found in the target; {_HOW_TO_ADD}.")
    return out


@dataclass(frozen=True)
class AttentionSpec:
    """One model's adapter resolved against its config: heads, position scheme, fused-qkv split and residual."""

    arch: Architecture
    heads: HeadLayout
    positions: PositionScheme
    qkv_columns: dict[str, Tensor] | None
    residual: str


def attention_spec(model: nn.Module) -> AttentionSpec:
    """The head layout, position scheme, fused-qkv split and residual of `model`, from its adapter.

    Raises:
        VpdError: The family has no adapter.
    """
    arch = architecture_of(model)
    heads = arch.heads(model.config)
    cols = arch.qkv_columns(model.config, heads) if arch.qkv_columns is not None else None
    return AttentionSpec(arch, heads, arch.positions(model.config), cols, arch.residual(model.config))


# --- the families -----------------------------------------------------------------------------------

register(_llama_like("Llama", ("llama",), notes="SmolLM, TinyLlama and other Llama checkpoints are `llama`"))
register(_llama_like("Mistral", ("mistral",)))
register(_llama_like("Qwen2", ("qwen2",), notes="q/k/v biases"))
register(_llama_like("Qwen3", ("qwen3",), qk_norm=True, notes="q/k norm: no q/k pairs"))
register(_llama_like("Gemma 2", ("gemma2",), notes="score soft-capping after the q/k product"))
register(_llama_like("Gemma 3", ("gemma3_text",), qk_norm=True, notes="q/k norm: no q/k pairs"))
register(_llama_like("OLMo 2", ("olmo2",), qk_norm=True, notes="q/k norm: no q/k pairs"))
register(
    Architecture(
        family="GPT-2",
        model_types=("gpt2",),
        blocks=r"h",
        matrices={"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"},
        positions=lambda config: PositionScheme("learned"),
        qkv_columns=_contiguous_qkv,
        notes="Conv1D; fused c_attn; learned positions",
    )
)
register(
    Architecture(
        family="GPT-NeoX/Pythia",
        model_types=("gpt_neox",),
        blocks=r"layers",
        matrices={
            "attention.query_key_value": "qkv",
            "attention.dense": "o",
            "mlp.dense_h_to_4h": "up",
            "mlp.dense_4h_to_h": "down",
        },
        residual=lambda config: "parallel" if config.use_parallel_residual else "sequential",
        qkv_columns=_per_head_qkv,
        notes="qkv interleaved per head; partial RoPE; parallel residual",
    )
)
register(
    Architecture(
        family="Phi-3",
        model_types=("phi3",),
        blocks=r"layers",
        matrices={
            "self_attn.qkv_proj": "qkv",
            "self_attn.o_proj": "o",
            "mlp.gate_up_proj": "gate_up",
            "mlp.down_proj": "down",
        },
        qkv_columns=_contiguous_qkv,
        notes="fused qkv and gate_up; partial RoPE",
    )
)
register(
    Architecture(
        family="OPT",
        model_types=("opt",),
        blocks=r"decoder\.layers",
        matrices={
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.out_proj": "o",
            "fc1": "up",
            "fc2": "down",
        },
        positions=lambda config: PositionScheme("learned", offset=2),
        notes="learned positions with offset 2",
    )
)
register(
    Architecture(
        family="GPT-J",
        model_types=("gptj",),
        blocks=r"h",
        matrices={
            "attn.q_proj": "q",
            "attn.k_proj": "k",
            "attn.v_proj": "v",
            "attn.out_proj": "o",
            "mlp.fc_in": "up",
            "mlp.fc_out": "down",
        },
        positions=lambda config: PositionScheme("rope_interleaved", config.rotary_dim),
        residual=lambda config: "parallel",
        notes="interleaved partial RoPE; parallel residual",
    )
)
register(
    Architecture(
        family="Falcon",
        model_types=("falcon",),
        blocks=r"h",
        matrices={
            "self_attention.query_key_value": "qkv",
            "self_attention.dense": "o",
            "mlp.dense_h_to_4h": "up",
            "mlp.dense_4h_to_h": "down",
        },
        positions=lambda config: PositionScheme("alibi") if config.alibi else PositionScheme("rope"),
        residual=lambda config: "parallel" if config.parallel_attn or config.new_decoder_architecture else "sequential",
        heads=_falcon_heads,
        qkv_columns=_falcon_qkv,
        notes="multi-query or grouped fused qkv; RoPE or ALiBi; parallel residual",
    )
)
